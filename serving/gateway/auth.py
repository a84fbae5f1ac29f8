"""Who is asking: the principal behind a request's bearer key, and what it may do.

Keys live in the store (`store.keys`, `sdloop keys`); the gateway holds the active ones in
memory (`KeyRing`, reloaded whenever a key is added or revoked through it) so a request costs
one sha256 and a dict lookup. `server.api_key`, a key from the config file, is the principal
`api_key` with the `chat` and `feedback` scopes.

A server with no keys at all answers everyone as the principal `local`, with every scope but
`admin` (the admin API keeps its own token): the single-user install on loopback. The first
key added closes it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.requests import Request

from serving.gateway.errors import APIError
from serving.gateway.http import bearer
from store.keys import LOCAL_PRINCIPAL, key_digest

CONFIG_PRINCIPAL = "api_key"


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]

    @property
    def may_teach(self) -> bool:
        return "feedback" in self.scopes


LOCAL = Principal(LOCAL_PRINCIPAL, frozenset({"chat", "feedback"}))


class KeyRing:
    """The active keys, by digest."""

    def __init__(self, config_key: str = "", settled: bool = True) -> None:
        self._config_key = config_key
        self._keys: dict[str, Principal] = {}
        # False on a Kafka replica until the control topic is replayed: with no keys *yet*, it
        # must not answer everyone as `local`.
        self._settled = settled

    def replace(self, active: dict[str, tuple[str, frozenset[str]]]) -> None:
        self._keys = {digest: Principal(name, scopes) for digest, (name, scopes) in active.items()}

    def settle(self) -> None:
        self._settled = True

    @property
    def open(self) -> bool:
        """No key anywhere: every request is `local`."""
        return self._settled and not self._keys and not self._config_key

    def lookup(self, request: Request) -> Principal | None:
        given = bearer(request)
        if not given:
            return None
        if self._config_key and hmac.compare_digest(given.encode(), self._config_key.encode()):
            return Principal(CONFIG_PRINCIPAL, frozenset({"chat", "feedback"}))
        return self._keys.get(key_digest(given))

    def authenticate(self, request: Request, scope: str) -> Principal:
        """The request's principal, if it holds `scope`; 401 without a valid key, 403 without
        the scope."""
        if self.open:
            return LOCAL
        if not self._settled and not self._keys:
            raise APIError(503, "This replica is still reading its API keys from the control "
                                "topic; retry in a moment.", code="keys_loading")
        principal = self.lookup(request)
        if principal is None:
            raise APIError(401, "This route needs 'Authorization: Bearer <key>' with a valid API "
                                "key (`sdloop keys add NAME --scopes chat`).",
                           code="invalid_api_key")
        if scope not in principal.scopes:
            raise APIError(403, f"The key '{principal.name}' does not have the '{scope}' scope "
                                f"this route needs.", code="insufficient_scope")
        return principal
