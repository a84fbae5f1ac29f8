"""Who is asking: keys, scopes and the keyless single-user mode, as the gateway decides them
for every request; and keys as they travel to Kafka replicas in signed control commands."""

from __future__ import annotations

import pytest
from starlette.requests import Request

from serving.gateway.auth import CONFIG_PRINCIPAL, LOCAL, KeyRing
from serving.gateway.errors import APIError
from serving.versions.control import CommandGate, RefusedCommand
from store.keys import key_digest
from tests.harness.control import SECRET, TOPIC, command, signed

ALICE = "sdl-alice-key"


def request(key: str | None = None) -> Request:
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def ring(**scopes: list[str]) -> KeyRing:
    keys = KeyRing()
    keys.replace({key_digest(f"sdl-{name}-key"): (name, frozenset(s))
                  for name, s in scopes.items()})
    return keys


def test_a_server_with_no_key_answers_everyone_as_local_who_may_chat_and_teach():
    assert KeyRing().authenticate(request(), "chat") == LOCAL
    assert LOCAL.may_teach


def test_once_a_key_exists_a_request_needs_one_with_the_scope_of_its_route():
    keys = ring(alice=["chat", "feedback"], carol=["chat"], ops=["admin"])
    with pytest.raises(APIError) as missing:
        keys.authenticate(request(), "chat")
    assert missing.value.status == 401
    with pytest.raises(APIError) as wrong:
        keys.authenticate(request("sdl-nobody-key"), "chat")
    assert wrong.value.status == 401
    with pytest.raises(APIError) as scope:
        keys.authenticate(request("sdl-ops-key"), "chat")
    assert scope.value.status == 403 and "chat" in scope.value.message
    alice = keys.authenticate(request(ALICE), "chat")
    assert alice.name == "alice" and alice.may_teach
    assert not keys.authenticate(request("sdl-carol-key"), "chat").may_teach


def test_the_config_key_is_a_principal_that_may_chat_and_teach():
    keys = KeyRing("a-configured-key")
    principal = keys.authenticate(request("a-configured-key"), "chat")
    assert principal.name == CONFIG_PRINCIPAL and principal.may_teach
    with pytest.raises(APIError):
        keys.authenticate(request(), "chat")


def test_a_replica_that_has_not_read_its_keys_yet_answers_503_not_open():
    keys = KeyRing(settled=False)
    with pytest.raises(APIError) as early:
        keys.authenticate(request(), "chat")
    assert early.value.status == 503
    keys.settle()  # the control topic held no keys: open, as configured
    assert keys.authenticate(request(), "chat") == LOCAL


def test_a_signed_keys_command_carries_digests_names_and_scopes_only():
    value = command("keys", keys=[{"digest": key_digest(ALICE), "name": "alice",
                                   "scopes": ["chat", "feedback"]}])
    admitted = CommandGate(SECRET, TOPIC).admit(value, signed(value))
    keys = KeyRing(settled=False)
    keys.replace(admitted["active"])
    keys.settle()
    assert keys.authenticate(request(ALICE), "chat").name == "alice"
    assert ALICE.encode() not in value


@pytest.mark.parametrize("entries", [
    "not a list", [{"digest": "zz", "name": "a", "scopes": ["chat"]}],
    [{"digest": "0" * 64, "name": "a", "scopes": ["root"]}], [{"digest": "0" * 64}],
])
def test_a_malformed_keys_command_is_refused(entries):
    value = command("keys", keys=entries)
    with pytest.raises(RefusedCommand) as refused:
        CommandGate(SECRET, TOPIC).admit(value, signed(value))
    assert refused.value.reason == "malformed"
