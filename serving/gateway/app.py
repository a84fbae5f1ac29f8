"""The gateway's Starlette app: routes, request metrics, and OpenAI-style errors for every
failure (never a stack trace).

Routes live by concern — `chat`, `feedback`, `admin` beside this module — and this module
puts them together with the probes and metrics. `SHARED_ROUTES` are served by `sdloop ingest`
too.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving import metrics
from serving.gateway.admin import (
    admin_adapter_action,
    admin_adapters,
    admin_key_revoke,
    admin_keys,
    admin_review,
    admin_review_decide,
    admin_sql,
)
from serving.gateway.chat import chat_completions
from serving.gateway.deps import Gateway, gateway_of
from serving.gateway.errors import APIError, error_response
from serving.gateway.feedback import feedback

log = logging.getLogger(__name__)


async def list_models(request: Request) -> Response:
    gateway_of(request).authenticate(request, "chat")
    created = int(time.time())
    data = [
        {"id": alias, "object": "model", "created": created, "owned_by": "sdloop", "version": version}
        for alias, version in sorted(gateway_of(request).registry.aliases().items())
    ]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw: Gateway = gateway_of(request)
    problems = []
    if not gw.engine.ready:
        problems.append(gw.engine.last_error)
    if not gw.sink.alive:
        problems.append(f"the {gw.sink.name} sink is not running")
    elif gw.sink.failure:  # e.g. the disk is full: every completion would be dropped
        problems.append(gw.sink.failure)
    if not gw.versions_ready():
        problems.append("adapter versions from the control topic are still being applied")
    if problems:
        return JSONResponse({"status": "not ready", "reasons": problems}, status_code=503)
    return JSONResponse({"status": "ready", "aliases": gw.registry.aliases()})


async def prometheus(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# Served by `sdloop ingest` too (its own /readyz beside them).
SHARED_ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    Route("/admin/sql", admin_sql, methods=["POST"]),
    Route("/admin/adapters", admin_adapters, methods=["GET"]),
    Route("/admin/adapters/{action}", admin_adapter_action, methods=["POST"]),
    Route("/admin/keys", admin_keys, methods=["GET", "POST"]),
    Route("/admin/keys/revoke", admin_key_revoke, methods=["POST"]),
    Route("/admin/review", admin_review, methods=["GET"]),
    Route("/admin/review/{decision}", admin_review_decide, methods=["POST"]),
]
ROUTES = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/feedback", feedback, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    *SHARED_ROUTES,
]
_ROUTE_PATHS = {r.path for r in ROUTES}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "error")
    message = {404: f"No route {request.url.path}.",
               405: f"Method {request.method} is not allowed on {request.url.path}."}.get(
        status, str(detail))
    return error_response(APIError(status, message))


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path)
    return error_response(APIError(500, "Internal server error; the server log has details."))


def exception_handlers() -> dict[Any, Any]:
    """OpenAI-style JSON errors for every failure, never a stack trace (shared with ingest)."""
    return {APIError: _api_error, HTTPException: _http_error, Exception: _unhandled}


class RequestMetrics:
    """Counts every response by route and status and times it to its last byte."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in _ROUTE_PATHS else "other"
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            metrics.REQUESTS.labels(route, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - started)


def create_app(gateway: Gateway, lifespan: Any = None) -> Starlette:
    app = Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers=exception_handlers())
    app.state.gateway = gateway
    app.add_middleware(RequestMetrics)
    return app
