"""What every route of the gateway works with, passed down once through the app's state.

The gateway is a thin layer over the engine (`chat`), the feedback sink (`feedback`), the
registry and the store (`admin`); `app` puts the routes together.
This module holds the one object they share, and nothing global.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import aiohttp
from starlette.requests import Request

from feedback import CompletionEvent, Event, Sink, SinkFull, offered_tools
from serving import metrics
from serving.config import Config
from serving.engine.manager import EngineManager, engine_session
from serving.gateway.auth import KeyRing, Principal
from serving.gateway.http import check_bearer
from serving.versions.registry import AdapterRegistry
from store import StoreWriter
from store.keys import active_keys

log = logging.getLogger(__name__)

# The tools of this many recent answers are remembered (each up to this many bytes of JSON
# schemas), so a call in feedback on one is checked before it is acknowledged: a 400 on every
# sink, the event bus's included, whose ingester would otherwise only dead-letter it.
RECENT_TOOLS = 2048
RECENT_TOOLS_BYTES = 16 * 1024


class Gateway:
    """Everything the routes need: config, engine, registry, sink, and (on one machine) the
    store, which answers the admin API's SQL."""

    def __init__(
        self,
        cfg: Config,
        engine: EngineManager,
        registry: AdapterRegistry,
        sink: Sink,
        store: StoreWriter | None,
        admin_token: str,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.registry = registry
        self.sink = sink
        self.store = store
        if cfg.feedback.redact and not getattr(sink, "redact", False):
            # The sink redacts, off the event loop (`feedback.redaction`): one made without it
            # would store what `feedback.redact` promises never to.
            raise ValueError(f"feedback.redact is on but the {sink.name} was made without "
                             "redaction")
        self.admin_token = admin_token
        self.keys = KeyRing(cfg.server.api_key)
        # How a tool result an agent sends back is judged failed (`feedback.tools`).
        self.tool_error_rules = cfg.feedback.tool_error_rules()
        self.http: aiohttp.ClientSession | None = None
        # Set on a Kafka replica: False until the control topic's versions are applied.
        self.versions_ready: Callable[[], bool] = lambda: True
        self._recent_tools: OrderedDict[str, dict[str, Any]] = OrderedDict()

    async def open(self) -> None:
        # No total timeout: a long generation is not an error. Connecting is bounded.
        self.http = engine_session(aiohttp.ClientTimeout(total=None, sock_connect=5))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    # -- who may call ----------------------------------------------------------------------

    def authenticate(self, request: Request, scope: str) -> Principal:
        """Who sends this request, if they may use `scope` (`serving.gateway.auth`)."""
        return self.keys.authenticate(request, scope)

    def check_admin(self, request: Request) -> str:
        """The admin token, or a key with the `admin` scope; returns who it is."""
        principal = self.keys.lookup(request)
        if principal is not None and "admin" in principal.scopes:
            return principal.name
        check_bearer(request, self.admin_token, "The admin API")
        return "admin-token"

    async def reload_keys(self) -> None:
        """Take the store's active keys (after one was added or revoked)."""
        if self.store is not None:
            self.keys.replace(await asyncio.wrap_future(self.store.call(active_keys)))

    # -- capture ---------------------------------------------------------------------------

    def capture(self, event: Event, request_bytes: int | None = None) -> Future[None]:
        """Hand an event to the sink, which redacts it (`feedback.redact`) on its own thread.
        `request_bytes`: the size of the body it was read from (the sink's bound in bytes)."""
        return self.sink.submit(event, request_bytes)

    def capture_nowait(self, event: Event, request_bytes: int | None = None) -> None:
        """Completions, follow-ups, tool results: written off the request path, never failing
        it."""
        if isinstance(event, CompletionEvent):
            self._remember_tools(event)
        try:
            self.capture(event, request_bytes)
        except SinkFull as exc:
            metrics.CAPTURE_DROPPED.inc()
            log.error("could not capture %s %s: %s", event.kind, event.event_id, exc)

    def _remember_tools(self, event: CompletionEvent) -> None:
        tools = offered_tools(event.params)
        if tools and len(json.dumps(tools)) <= RECENT_TOOLS_BYTES:
            self._recent_tools[event.completion_id] = event.params
            while len(self._recent_tools) > RECENT_TOOLS:
                self._recent_tools.popitem(last=False)

    def recent_params(self, completion_id: str) -> dict[str, Any] | None:
        """The params of an answer this gateway gave lately whose request offered tools."""
        return self._recent_tools.get(completion_id)


def gateway_of(request: Request) -> Any:
    """The app's `Gateway` (or, on `sdloop ingest`, the object that stands in for it)."""
    return request.app.state.gateway
