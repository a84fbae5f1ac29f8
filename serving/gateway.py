"""The HTTP gateway: OpenAI-compatible chat, feedback, health, metrics and admin routes.

A thin layer over the engine. A chat request is checked (body size, JSON, the few fields the
gateway relies on, alias), forwarded to vLLM with the alias replaced by the version's engine
name and with token ids requested, and relayed back byte for byte; the completion is then
handed to the feedback sink without waiting. vLLM names its response after the `X-Request-Id`
header, so the id the client sees is the stored completion id with no rewriting of the body.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any, TypeVar

import aiohttp
from kafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from feedback import (
    CompletionEvent,
    Event,
    FeedbackRequest,
    FollowupEvent,
    Sink,
    SinkFull,
    context_hash,
    describe_validation_error,
    find_followup,
    new_id,
    redact_event,
    reply_hash,
    session_key,
    utcnow,
)
from feedback.linking import content_text
from serving import metrics
from serving.config import Config
from serving.engine import EngineManager
from serving.errors import APIError, error_body, error_response
from serving.protocol import ChatRequest
from serving.registry import (
    DEFAULT_ALIAS,
    AdapterRegistry,
    InFlight,
    RegistryError,
    UnknownAlias,
)
from store import QueryError, StoreClosed, StoreWriter, UnknownCompletion, run_read_only

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

VERSION_HEADER = "x-sdloop-adapter-version"
# Optional client-chosen conversation id; without it the conversation's opening names it.
SESSION_HEADER = "x-sdloop-session"
FEEDBACK_COMMIT_TIMEOUT_S = 30.0
_DISCARD_CAP = 64 * 1024 * 1024
# Request fields that are not sampling parameters; everything else is stored as `params`.
_NOT_PARAMS = {"messages", "model", "stream", "return_token_ids"}


class Gateway:
    """Everything the routes need, passed down once; no globals."""

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
        self.versions_ready: Any = lambda: True

    @property
    def kafka(self) -> bool:
        return self.store is None

    @property
    def sink_name(self) -> str:
        return "Kafka broker" if self.kafka else "feedback store"

    @property
    def feedback_timeout_s(self) -> float:
        return self.cfg.kafka.ack_timeout_s if self.kafka else FEEDBACK_COMMIT_TIMEOUT_S

    async def open(self) -> None:
        # No total timeout: a long generation is not an error. Connecting is bounded.
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
        )

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    # -- capture ---------------------------------------------------------------------------

    def capture(self, event: Event) -> Future[None]:
        if self.cfg.feedback.redact:
            event = redact_event(event)
        return self.sink.submit(event)

    def capture_nowait(self, event: Event) -> None:
        """Completions and follow-ups: written off the request path, never failing it."""
        try:
            self.capture(event)
        except (SinkFull, StoreClosed) as exc:
            metrics.CAPTURE_DROPPED.inc()
            log.error("could not capture %s %s: %s", event.kind, event.event_id, exc)


# -- request helpers -------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing more than `limit` bytes without ever holding more.

    An oversized body is still read to its end (and dropped), up to a hard cap, so that the
    client gets to read the 413 instead of a connection reset.
    """
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > _DISCARD_CAP:
                break
    except ClientDisconnect:
        raise APIError(400, "The client closed the connection before the body was sent.") from None
    if size > limit:
        raise APIError(413, f"Request body is over the limit of {limit} bytes "
                            "(server.max_body_bytes).", code="body_too_large")
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from None


def _require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


async def read_model(request: Request, model: type[M], limit: int) -> tuple[dict[str, Any], M]:
    """The body as a JSON object and validated as `model`: 400 for bad JSON, 422 for bad fields."""
    body = _require_object(await read_json(request, limit))
    try:
        return body, model.model_validate(body)
    except ValidationError as exc:
        raise APIError(422, describe_validation_error(exc)) from None


def _check_bearer(request: Request, token: str, what: str) -> None:
    header = request.headers.get("authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else ""
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise APIError(401, f"{what} needs 'Authorization: Bearer <token>' with a valid token.",
                       code="invalid_api_key")


def _gw(request: Request) -> Gateway:
    return request.app.state.gateway


def _check_api_key(request: Request) -> None:
    gw = _gw(request)
    if gw.cfg.server.api_key:
        _check_bearer(request, gw.cfg.server.api_key, "This route")


# -- chat ------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    gw = _gw(request)
    _check_api_key(request)
    body, chat = await read_model(request, ChatRequest, gw.cfg.server.max_body_bytes)
    try:
        version = gw.registry.resolve(chat.model)
    except UnknownAlias as exc:
        raise APIError(404, str(exc), code="model_not_found", param="model") from None
    if not gw.engine.ready:
        raise APIError(503, gw.engine.last_error, code="engine_unavailable")
    if not gw.sink.has_capacity():  # answer nothing that could not be recorded
        raise APIError(503, f"The {gw.sink_name} is behind; retry shortly.", code="store_backlog")

    request_hex = uuid.uuid4().hex
    completion_id = f"chatcmpl-{request_hex}"
    started = time.perf_counter()

    upstream = dict(body)
    upstream["model"] = gw.registry.engine_model(version, gw.engine.served_model_name)
    upstream["return_token_ids"] = True
    event = CompletionEvent(
        event_id=new_id("cmpl"), completion_id=completion_id, created_at=utcnow(),
        alias=chat.model, version=version, messages=body["messages"],
        params={k: v for k, v in body.items() if k not in _NOT_PARAMS}, stream=chat.stream,
        session_id=request.headers.get(SESSION_HEADER) or session_key(body["messages"]),
    )
    headers = {VERSION_HEADER: version}

    ticket = gw.registry.acquire(version)  # released once the answer is complete
    try:
        response = await _forward(gw, upstream, event, request_hex, headers, started, ticket)
    except BaseException:
        ticket.release()
        raise
    if not isinstance(response, StreamingResponse):  # a stream releases it when it ends
        ticket.release()
    return response


async def _forward(
    gw: Gateway, upstream: dict[str, Any], event: CompletionEvent, request_hex: str,
    headers: dict[str, str], started: float, ticket: InFlight,
) -> Response:
    """Send the request to the engine and relay the answer back."""
    assert gw.http is not None
    try:
        resp = await gw.http.post(
            f"{gw.engine.base_url}/v1/chat/completions",
            data=json.dumps(upstream),
            headers={"content-type": "application/json", "x-request-id": request_hex},
        )
    except (aiohttp.ClientConnectionError, OSError) as exc:
        gw.engine.mark_unreachable(f"{type(exc).__name__}: {exc}")
        raise APIError(503, f"The inference engine is unavailable ({type(exc).__name__}); "
                            "retry in a moment.", code="engine_unavailable") from None
    except aiohttp.ClientError as exc:
        raise APIError(502, f"The inference engine answered badly ({type(exc).__name__}).",
                       code="engine_error") from None

    if resp.status != 200:
        raw = await resp.read()
        resp.release()
        return _relay_error(resp.status, raw, headers)

    # The engine accepted the request: its last user message is now part of the record.
    followup = find_followup(event.messages)
    if followup is not None:
        metrics.FOLLOWUPS_SEEN.inc()
        gw.capture_nowait(FollowupEvent(
            event_id=new_id("fu"), created_at=utcnow(), context_hash=followup[0],
            reply_hash=followup[1], text=followup[2], next_completion_id=event.completion_id,
            session_id=event.session_id,
        ))

    if not event.stream:
        try:
            raw = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            event.status, event.error = "engine_error", f"response broke: {type(exc).__name__}"
            gw.capture_nowait(event)
            raise APIError(503, f"The inference engine dropped the request ({type(exc).__name__}).",
                           code="engine_unavailable") from None
        finally:
            resp.release()
        _finish_event(event, json.loads(raw), started)
        gw.capture_nowait(event)
        _count_tokens(event)
        return Response(raw, media_type="application/json", headers=headers)

    return StreamingResponse(
        _relay_stream(gw, resp, event, started, ticket),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


def _relay_error(status: int, raw: bytes, headers: dict[str, str]) -> Response:
    """Pass the engine's own OpenAI-style error through; wrap anything else."""
    try:
        if "error" in json.loads(raw):
            return Response(raw, status_code=status, media_type="application/json", headers=headers)
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
        pass
    return Response(
        error_body(status, f"The inference engine answered {status}.", code="engine_error"),
        status_code=status if status < 500 else 502, media_type="application/json", headers=headers,
    )


def _finish_event(event: CompletionEvent, data: dict[str, Any], started: float) -> None:
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    event.response_message = {k: v for k, v in message.items() if v is not None}
    event.response_text = content_text(message.get("content"))
    event.finish_reason = choice.get("finish_reason")
    event.token_ids = choice.get("token_ids")
    event.prompt_token_ids = data.get("prompt_token_ids")
    usage = data.get("usage") or {}
    event.prompt_tokens = usage.get("prompt_tokens")
    event.completion_tokens = usage.get("completion_tokens")
    event.latency_ms = (time.perf_counter() - started) * 1000.0
    _set_hashes(event)


def _set_hashes(event: CompletionEvent) -> None:
    text = event.response_text or ""
    event.context_hash = context_hash([*event.messages, {"role": "assistant", "content": text}])
    event.reply_hash = reply_hash(text)


def _count_tokens(event: CompletionEvent) -> None:
    if event.prompt_tokens:
        metrics.TOKENS.labels("in", event.alias).inc(event.prompt_tokens)
    if event.completion_tokens:
        metrics.TOKENS.labels("out", event.alias).inc(event.completion_tokens)


async def _relay_stream(
    gw: Gateway, resp: aiohttp.ClientResponse, event: CompletionEvent, started: float,
    ticket: InFlight,
) -> AsyncIterator[bytes]:
    """Forward SSE events as they come, reading what the store needs out of each.

    Whatever arrived is forwarded in one write, cut at the last complete event; the engine
    sends `data: {...}\n\n` per event.
    """
    parts: list[str] = []
    token_ids: list[int] = []
    pending = b""
    try:
        async for data in resp.content.iter_any():
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            ready, pending = pending[: cut + 2], pending[cut + 2 :]
            for line in ready.split(b"\n"):
                if line.startswith(b"data: {"):
                    _read_chunk(json.loads(line[6:]), event, parts, token_ids, started)
            yield ready
        if pending:
            yield pending
    except (asyncio.CancelledError, GeneratorExit):
        event.status = "client_disconnected"
        raise
    except (aiohttp.ClientError, OSError) as exc:
        event.status, event.error = "engine_error", f"stream broke: {type(exc).__name__}"
        yield b"data: " + error_body(502, "The inference engine dropped the stream.") + b"\n\n"
    finally:
        resp.release()
        ticket.release()
        event.response_text = "".join(parts)
        event.response_message = {"role": "assistant", "content": event.response_text}
        event.token_ids = token_ids or None
        if event.completion_tokens is None and event.token_ids is not None:
            event.completion_tokens = len(event.token_ids)
        if event.prompt_tokens is None and event.prompt_token_ids is not None:
            event.prompt_tokens = len(event.prompt_token_ids)
        event.latency_ms = (time.perf_counter() - started) * 1000.0
        _set_hashes(event)
        gw.capture_nowait(event)
        _count_tokens(event)


def _read_chunk(
    data: dict[str, Any], event: CompletionEvent, parts: list[str], token_ids: list[int],
    started: float,
) -> None:
    if "prompt_token_ids" in data and data["prompt_token_ids"] is not None:
        event.prompt_token_ids = data["prompt_token_ids"]
    for choice in data.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            parts.append(delta["content"])
        if choice.get("token_ids"):
            if not token_ids and event.ttft_ms is None:
                event.ttft_ms = (time.perf_counter() - started) * 1000.0
                metrics.TTFT_SECONDS.observe(event.ttft_ms / 1000.0)
            token_ids.extend(choice["token_ids"])
        if choice.get("finish_reason"):
            event.finish_reason = choice["finish_reason"]
    usage = data.get("usage")
    if usage:
        event.prompt_tokens = usage.get("prompt_tokens")
        event.completion_tokens = usage.get("completion_tokens")


# -- feedback ---------------------------------------------------------------------------------


async def feedback(request: Request) -> Response:
    gw = _gw(request)
    _check_api_key(request)
    _, req = await read_model(request, FeedbackRequest, gw.cfg.server.max_body_bytes)
    event = req.to_event(request.headers.get("idempotency-key"))
    try:
        fut = gw.capture(event)
        await asyncio.wait_for(asyncio.wrap_future(fut), gw.feedback_timeout_s)
    except UnknownCompletion as exc:
        raise APIError(404, f"Unknown completion_id: {exc}. Use the `id` of a chat completion "
                            "returned by this server.", code="completion_not_found",
                       param="completion_id") from None
    except (SinkFull, StoreClosed) as exc:
        raise APIError(503, f"Feedback was not stored: {exc}", code="store_unavailable") from None
    except TimeoutError:
        raise APIError(503, f"The {gw.sink_name} did not confirm the feedback within "
                            f"{gw.feedback_timeout_s:g} s; it was not acknowledged, retry.",
                       code="store_timeout") from None
    except KafkaError as exc:
        raise APIError(503, f"The Kafka broker did not take the feedback ({exc}); retry.",
                       code="store_unavailable") from None
    metrics.FEEDBACK_EVENTS.labels(req.type).inc()
    # On the store path the feedback is committed and its completion known (201); on the
    # Kafka path the broker has it and the ingester will store it (202).
    return JSONResponse(
        {"id": event.event_id, "object": "feedback", "completion_id": event.completion_id,
         "type": event.type, "created_at": event.created_at.isoformat() + "Z"},
        status_code=201 if gw.store is not None else 202,
    )


# -- models, health, metrics ------------------------------------------------------------------


async def list_models(request: Request) -> Response:
    _check_api_key(request)
    created = int(time.time())
    data = [
        {"id": alias, "object": "model", "created": created, "owned_by": "sdloop", "version": version}
        for alias, version in sorted(_gw(request).registry.aliases().items())
    ]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gw = _gw(request)
    problems = []
    if not gw.engine.ready:
        problems.append(gw.engine.last_error)
    if not gw.sink.alive:
        problems.append(f"the {gw.sink_name} sink is not running")
    if not gw.versions_ready():
        problems.append("adapter versions from the control topic are still being applied")
    if problems:
        return JSONResponse({"status": "not ready", "reasons": problems}, status_code=503)
    return JSONResponse({"status": "ready", "aliases": gw.registry.aliases()})


async def prometheus(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# -- admin ------------------------------------------------------------------------------------


def _check_admin(request: Request) -> Gateway:
    gw = _gw(request)
    _check_bearer(request, gw.admin_token, "The admin API")
    return gw


async def admin_sql(request: Request) -> Response:
    gw = _check_admin(request)
    if gw.store is None:
        raise APIError(409, "This gateway sends events to Kafka and has no store; query the "
                            "ingester's (`sdloop sql --data-dir <the ingester's data dir>`).",
                       code="no_store")
    body = _require_object(await read_json(request, gw.cfg.server.max_body_bytes))
    sql = body.get("sql")
    if not isinstance(sql, str) or not sql.strip():
        raise APIError(422, "sql: a non-empty string is required", param="sql")
    max_rows = body.get("max_rows", gw.cfg.server.sql_max_rows)
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 0:
        raise APIError(422, "max_rows: a non-negative integer is required", param="max_rows")
    max_rows = min(max_rows, gw.cfg.server.sql_max_rows)
    params = body.get("params", [])
    if not isinstance(params, list):
        raise APIError(422, "params: a JSON list of values for the statement's ? placeholders",
                       param="params")

    def run() -> Any:
        cur = gw.store.cursor()
        try:
            return run_read_only(cur, sql, max_rows, gw.cfg.server.sql_timeout_s, params)
        finally:
            cur.close()

    try:
        result = await asyncio.to_thread(run)
    except QueryError as exc:
        raise APIError(400, str(exc), code="invalid_sql", param="sql") from None
    payload = {"columns": result.columns, "types": result.types, "rows": result.rows,
               "truncated": result.truncated}
    return Response(json.dumps(payload, default=str), media_type="application/json")


async def admin_adapters(request: Request) -> Response:
    gw = _check_admin(request)
    listing = await gw.registry.listing()
    return Response(json.dumps(listing, default=str), media_type="application/json")


async def admin_adapter_action(request: Request) -> Response:
    """POST /admin/adapters/{publish|promote|rollback}."""
    gw = _check_admin(request)
    body = _require_object(await read_json(request, gw.cfg.server.max_body_bytes))
    action = request.path_params["action"]
    if gw.store is None:
        raise APIError(409, "Versions reach Kafka replicas through the control topic: "
                            f"`sdloop adapters {action}` with the ingester's data dir.",
                       code="use_the_ingester")
    try:
        if action == "publish":
            path, promote = body.get("path"), body.get("promote", True)
            if not isinstance(path, str) or not path:
                raise APIError(422, "path: the version folder to publish", param="path")
            if not isinstance(promote, bool):
                raise APIError(422, "promote: true (load, probe and flip the alias) or false "
                                    "(load and probe only)", param="promote")
            result = await gw.registry.publish(path, promote=promote)
        elif action == "promote":
            version = body.get("version")
            if not isinstance(version, str) or not version:
                raise APIError(422, "version: the version to promote", param="version")
            result = await gw.registry.promote(version)
        elif action == "rollback":
            alias = body.get("alias", DEFAULT_ALIAS)
            if not isinstance(alias, str):
                raise APIError(422, "alias: a string", param="alias")
            result = await gw.registry.rollback(alias)
        else:
            raise APIError(404, f"No adapter action '{action}': publish, promote or rollback.")
    except RegistryError as exc:
        raise APIError(exc.status, str(exc), code="adapter_" + action) from None
    return JSONResponse(result)


# -- the app ----------------------------------------------------------------------------------

# Served by `sdloop ingest` too (its own /readyz beside them).
SHARED_ROUTES = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", prometheus, methods=["GET"]),
    Route("/admin/sql", admin_sql, methods=["POST"]),
    Route("/admin/adapters", admin_adapters, methods=["GET"]),
    Route("/admin/adapters/{action}", admin_adapter_action, methods=["POST"]),
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


def exception_handlers() -> dict[Any, Any]:
    """OpenAI-style JSON errors for every failure, never a stack trace (shared with ingest)."""
    from starlette.exceptions import HTTPException

    return {APIError: _api_error, HTTPException: _http_error, Exception: _unhandled}


def create_app(gateway: Gateway, lifespan: Any = None) -> Starlette:
    app = Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers=exception_handlers())
    app.state.gateway = gateway
    app.add_middleware(RequestMetrics)
    return app
