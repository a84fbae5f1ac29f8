"""What every route of the gateway works with, passed down once through the app's state.

The gateway is a thin layer over the engine (`serving.chat`), the feedback sink
(`serving.feedback_api`), the registry and the store (`serving.admin`); `serving.app` puts the
routes together. This module holds the one object they share, and nothing global.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import aiohttp
from starlette.requests import Request

from feedback import Event, Sink, SinkFull, redact_event
from serving import metrics
from serving.config import Config
from serving.engine import EngineManager
from serving.http import check_bearer
from serving.registry import AdapterRegistry
from store import StoreWriter

log = logging.getLogger(__name__)


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
        self.admin_token = admin_token
        self.http: aiohttp.ClientSession | None = None
        # Set on a Kafka replica: False until the control topic's versions are applied.
        self.versions_ready: Callable[[], bool] = lambda: True

    async def open(self) -> None:
        # No total timeout: a long generation is not an error. Connecting is bounded.
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    # -- who may call ----------------------------------------------------------------------

    def check_api_key(self, request: Request) -> None:
        if self.cfg.server.api_key:
            check_bearer(request, self.cfg.server.api_key, "This route")

    def check_admin(self, request: Request) -> None:
        check_bearer(request, self.admin_token, "The admin API")

    # -- capture ---------------------------------------------------------------------------

    def capture(self, event: Event) -> Future[None]:
        if self.cfg.feedback.redact:
            event = redact_event(event)
        return self.sink.submit(event)

    def capture_nowait(self, event: Event) -> None:
        """Completions and follow-ups: written off the request path, never failing it."""
        try:
            self.capture(event)
        except SinkFull as exc:
            metrics.CAPTURE_DROPPED.inc()
            log.error("could not capture %s %s: %s", event.kind, event.event_id, exc)


def gateway_of(request: Request) -> Any:
    """The app's `Gateway` (or, on `sdloop ingest`, the object that stands in for it)."""
    return request.app.state.gateway
