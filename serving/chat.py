"""`POST /v1/chat/completions`: check, forward to vLLM, relay the answer back, capture it.

A chat request is checked (body size, JSON, the few fields the gateway relies on, alias),
forwarded to vLLM with the alias replaced by the version's engine name and with token ids
requested, and relayed back byte for byte; the completion is then handed to the feedback sink
without waiting. vLLM names its response after the `X-Request-Id` header, so the id the client
sees is the stored completion id with no rewriting of the body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from feedback import CompletionEvent, FollowupEvent, find_followup, new_id, session_key, utcnow
from serving import metrics
from serving.capture import StreamCapture, count_tokens, finish_from_json
from serving.errors import APIError, error_body
from serving.gateway import Gateway, gateway_of
from serving.http import read_model
from serving.protocol import ChatRequest
from serving.registry import InFlight, UnknownAlias

VERSION_HEADER = "x-sdloop-adapter-version"
# Which weights answered: `base`, `adapter` (runtime LoRA) or `merged` (`serving.merged`).
WEIGHTS_HEADER = "x-sdloop-weights"
# Optional client-chosen conversation id; without it the conversation's opening names it.
SESSION_HEADER = "x-sdloop-session"
# Request fields that are not sampling parameters; everything else is stored as `params`.
_NOT_PARAMS = {"messages", "model", "stream", "return_token_ids"}


async def chat_completions(request: Request) -> Response:
    gw: Gateway = gateway_of(request)
    gw.check_api_key(request)
    body, chat = await read_model(request, ChatRequest, gw.cfg.server.max_body_bytes)
    try:
        version = gw.registry.resolve(chat.model)
    except UnknownAlias as exc:
        raise APIError(404, str(exc), code="model_not_found", param="model") from None
    engine, _, _ = gw.registry.route(version)
    if not engine.ready:
        raise APIError(503, engine.last_error, code="engine_unavailable")
    if not gw.sink.has_capacity():  # answer nothing that could not be recorded
        raise APIError(503, f"The {gw.sink.name} is behind; retry shortly.", code="store_backlog")

    request_hex = uuid.uuid4().hex
    started = time.perf_counter()
    upstream = dict(body)
    upstream["return_token_ids"] = True
    event = CompletionEvent(
        event_id=new_id("cmpl"), completion_id=f"chatcmpl-{request_hex}", created_at=utcnow(),
        alias=chat.model, version=version, messages=body["messages"],
        params={k: v for k, v in body.items() if k not in _NOT_PARAMS}, stream=chat.stream,
        session_id=request.headers.get(SESSION_HEADER) or session_key(body["messages"]),
    )
    headers = {VERSION_HEADER: version}  # and WEIGHTS_HEADER, once the engine is chosen

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
    resp, raw = await _ask_engine(gw, upstream, request_hex, event, headers)
    if resp.status != 200:
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
        finish_from_json(event, json.loads(raw), started)
        gw.capture_nowait(event)
        count_tokens(event)
        return Response(raw, media_type="application/json", headers=headers)

    return StreamingResponse(
        _relay_stream(gw, resp, StreamCapture(event, started), ticket),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


async def _ask_engine(gw: Gateway, upstream: dict[str, Any], request_hex: str,
                      event: CompletionEvent, headers: dict[str, str],
                      ) -> tuple[aiohttp.ClientResponse, bytes]:
    """The engine's response, and its whole body unless it is a stream that starts well.

    The request goes where the registry routes its version (the merged engine or the primary
    one). When the engine drops the request before anything reached the client — it died (a
    crash, a kill, a restart under way) — the request is routed again (a merged engine that
    died is no longer a route: the primary engine serves the version), waits for that engine
    to be ready and is sent once more (`server.retry_after_restart_s`); a stream already
    relayed cannot be, and ends with an error event instead (`_relay_stream`)."""
    assert gw.http is not None
    retried = False
    while True:
        accepted = False
        engine, upstream["model"], headers[WEIGHTS_HEADER] = gw.registry.route(event.version)
        try:
            resp = await gw.http.post(
                f"{engine.base_url}/v1/chat/completions",
                data=json.dumps(upstream),
                headers={"content-type": "application/json", "x-request-id": request_hex},
            )
            if event.stream and resp.status == 200:
                return resp, b""
            accepted = True
            try:
                return resp, await resp.read()
            finally:
                resp.release()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            engine.mark_unreachable(f"{type(exc).__name__}: {exc}")
            wait = gw.cfg.server.retry_after_restart_s
            if not retried and wait > 0 and await gw.registry.route(event.version)[0].wait_ready(wait):
                metrics.RETRIED_AFTER_RESTART.inc()
                retried = True
                continue
            what = "dropped the request" if accepted else "is unavailable"
            if accepted:  # the engine had it: the record says how it ended
                event.status, event.error = "engine_error", f"response broke: {type(exc).__name__}"
                gw.capture_nowait(event)
            raise APIError(503, f"The inference engine {what} ({type(exc).__name__}); retry in a "
                                "moment.", code="engine_unavailable") from None
        except aiohttp.ClientError as exc:
            raise APIError(502, f"The inference engine answered badly ({type(exc).__name__}).",
                           code="engine_error") from None


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


async def _relay_stream(gw: Gateway, resp: aiohttp.ClientResponse, capture: StreamCapture,
                        ticket: InFlight) -> AsyncIterator[bytes]:
    """Forward SSE events as they come, reading what the store needs out of each.

    Whatever arrived is forwarded in one write, cut at the last complete event; the engine
    sends `data: {...}\\n\\n` per event.
    """
    event = capture.event
    pending, delivered = b"", False
    try:
        async for data in resp.content.iter_any():
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            ready, pending = pending[: cut + 2], pending[cut + 2 :]
            capture.read(ready)
            yield ready
            delivered = capture.done  # a client may hang up once it has read [DONE]
        if pending:
            yield pending
    except (asyncio.CancelledError, GeneratorExit):
        if not delivered:
            event.status = "client_disconnected"
        raise
    except (aiohttp.ClientError, OSError) as exc:
        event.status, event.error = "engine_error", f"stream broke: {type(exc).__name__}"
        yield b"data: " + error_body(502, "The inference engine dropped the stream.") + b"\n\n"
    finally:
        resp.release()
        ticket.release()
        capture.finish()
        gw.capture_nowait(event)
        count_tokens(event)
