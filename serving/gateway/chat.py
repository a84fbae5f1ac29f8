"""`POST /v1/chat/completions`: check, forward to vLLM, relay the answer back, capture it.

A chat request is checked (body size, JSON and its nesting, the number of messages, the few
fields the gateway relies on, alias), forwarded to vLLM with the alias replaced by the version's
engine name and with token ids requested, and relayed back byte for byte; the completion (with
the known sampling parameters only, `STORED_PARAMS`) is then handed to the feedback sink
without waiting. vLLM names its response after the `X-Request-Id` header, so the id the client
sees is the stored completion id with no rewriting of the body.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from feedback import (
    CompletionEvent,
    Event,
    FollowupEvent,
    ToolResultEvent,
    find_followup,
    find_tool_results,
    new_id,
    session_key,
    utcnow,
)
from serving import metrics
from serving.gateway.auth import Principal
from serving.gateway.capture import StreamCapture, count_tokens, finish_from_json
from serving.gateway.deps import Gateway, gateway_of
from serving.gateway.errors import APIError, error_body
from serving.gateway.http import read_model
from serving.gateway.protocol import ChatRequest
from serving.versions.registry import InFlight, UnknownAlias

VERSION_HEADER = "x-sdloop-adapter-version"
# Which weights answered: `base`, `adapter` (runtime LoRA) or `merged` (`serving.engine.merged`);
# and which engine: `primary` (LoRA-enabled) or `compiled` (no LoRA: base or merged weights).
WEIGHTS_HEADER = "x-sdloop-weights"
ENGINE_HEADER = "x-sdloop-engine"
# Optional client-chosen conversation id; without it the conversation's opening names it.
SESSION_HEADER = "x-sdloop-session"
# Request fields stored with the completion as its `params`: the OpenAI parameters and vLLM's
# sampling and chat-template extras (vLLM's ChatCompletionRequest) that shape the answer. Other
# fields (vLLM validates or ignores them) are sent to the engine but not stored: the store keeps
# no arbitrary client data. `messages`, `model`, `stream`, `metadata` and `user` have columns of
# their own.
STORED_PARAMS = frozenset({
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
    "max_completion_tokens", "n", "presence_penalty", "response_format", "seed", "stop",
    "stream_options", "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls",
    "reasoning_effort",
    "top_k", "min_p", "repetition_penalty", "length_penalty", "use_beam_search",
    "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
    "skip_special_tokens", "spaces_between_special_tokens", "truncate_prompt_tokens",
    "allowed_token_ids", "bad_words", "structured_outputs", "thinking_token_budget",
    "include_reasoning", "add_generation_prompt", "continue_final_message", "chat_template_kwargs",
})
# Where the parameters left out of an oversized `params` are named.
OMITTED = "_omitted"
# Request fields the gateway consumes (OpenAI's): vLLM does not take them.
GATEWAY_FIELDS = ("metadata", "store")

Record = Callable[[Event, "int | None"], None]


def _not_stored(event: Event, request_bytes: int | None = None) -> None:
    """What `store: false` records: nothing."""


def stored_params(body: dict[str, Any], request_bytes: int, max_bytes: int) -> dict[str, Any]:
    """The request's `STORED_PARAMS`; when their JSON is over `max_bytes` (tools, a schema),
    the numbers and flags among them, and under `OMITTED` the size and names of the rest.

    Measured only when the whole body is over `max_bytes`: parameters taken from a smaller body
    cannot be much larger, so an ordinary request costs a key lookup per field.
    """
    params = {k: v for k, v in body.items() if k in STORED_PARAMS}
    if request_bytes <= max_bytes or not params:
        return params
    size = len(json.dumps(params, separators=(",", ":")))
    if size <= max_bytes:
        return params
    kept = {k: v for k, v in params.items()
            if v is None or isinstance(v, bool | int | float)}
    kept[OMITTED] = {"bytes": size, "keys": sorted(k for k in params if k not in kept)}
    return kept


async def chat_completions(request: Request) -> Response:
    gw: Gateway = gateway_of(request)
    principal = gw.authenticate(request, "chat")
    server = gw.cfg.server

    def few_enough_messages(body: dict[str, Any]) -> None:  # before validating each of them
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > server.max_messages:
            raise APIError(422, f"messages: {len(messages)} messages; at most "
                                f"{server.max_messages} are taken (server.max_messages).",
                           param="messages")

    body, chat = await read_model(request, ChatRequest, server.max_body_bytes,
                                  server.max_json_depth, few_enough_messages)
    request_bytes: int = request.state.body_bytes
    try:
        version = gw.registry.resolve(chat.model)
    except UnknownAlias as exc:
        raise APIError(404, str(exc), code="model_not_found", param="model") from None
    engine, _, _ = gw.registry.route(version)
    if not engine.ready:
        raise APIError(503, engine.last_error, code="engine_unavailable")
    stored = chat.store is not False  # the client's right to opt out of capture
    if stored and not gw.sink.has_capacity():  # answer nothing that could not be recorded
        raise APIError(503, f"The {gw.sink.name} is behind; retry shortly.", code="store_backlog")
    record: Record = gw.capture_nowait if stored else _not_stored

    request_hex = uuid.uuid4().hex
    started = time.perf_counter()
    upstream = {k: v for k, v in body.items() if k not in GATEWAY_FIELDS}
    upstream["return_token_ids"] = True
    event = CompletionEvent(
        event_id=new_id("cmpl"), completion_id=f"chatcmpl-{request_hex}", created_at=utcnow(),
        alias=chat.model, version=version, messages=body["messages"],
        params=stored_params(body, request_bytes, server.max_params_bytes), stream=chat.stream,
        session_id=request.headers.get(SESSION_HEADER) or session_key(body["messages"]),
        principal=principal.name, metadata=chat.metadata, user=chat.user,
    )
    headers = {VERSION_HEADER: version}  # and WEIGHTS_HEADER, once the engine is chosen

    ticket = gw.registry.acquire(version)  # released once the answer is complete
    try:
        response = await _forward(gw, upstream, event, request_hex=request_hex, headers=headers,
                                  started=started, ticket=ticket, principal=principal,
                                  record=record, request_bytes=request_bytes)
    except BaseException:
        ticket.release()
        raise
    if not isinstance(response, StreamingResponse):  # a stream releases it when it ends
        ticket.release()
    return response


async def _forward(
    gw: Gateway, upstream: dict[str, Any], event: CompletionEvent, *, request_hex: str,
    headers: dict[str, str], started: float, ticket: InFlight, principal: Principal,
    record: Record, request_bytes: int | None = None,
) -> Response:
    """Send the request to the engine and relay the answer back, handing what it captures to
    `record`. `request_bytes`: the body's size, what the completion is counted as in the
    sink's bound in bytes."""
    resp, raw = await _ask_engine(gw, upstream, request_hex, event, headers, record,
                                  request_bytes)
    if resp.status != 200:
        return _relay_error(resp.status, raw, headers)

    # The engine accepted the request: what it says about the previous answer — the user's
    # next message, or the results of the tools that answer called — is now part of the record.
    if record is not _not_stored:
        _record_hindsight(gw, event, principal, record)

    if not event.stream:
        finish_from_json(event, json.loads(raw), started)
        record(event, request_bytes)
        count_tokens(event)
        return Response(raw, media_type="application/json", headers=headers)

    return StreamingResponse(
        _relay_stream(resp, StreamCapture(event, started), ticket, record, request_bytes),
        media_type="text/event-stream",
        headers={**headers, "cache-control": "no-cache"},
    )


def _record_hindsight(gw: Gateway, event: CompletionEvent, principal: Principal,
                      record: Record) -> None:
    """The follow-up and the tool results the request's history ends with, as events linked
    (by the store) to the stored answer they follow."""
    followup = find_followup(event.messages)
    if followup is not None:
        metrics.FOLLOWUPS_SEEN.inc()
        record(FollowupEvent(
            event_id=new_id("fu"), created_at=utcnow(), context_hash=followup[0],
            reply_hash=followup[1], text=followup[2], next_completion_id=event.completion_id,
            session_id=event.session_id, principal=principal.name, may_teach=principal.may_teach,
        ), None)
    for result in find_tool_results(event.messages, gw.tool_error_rules):
        metrics.TOOL_RESULTS_SEEN.labels("failed" if result.error is not None else "ok").inc()
        record(ToolResultEvent(
            event_id=new_id("tr"), created_at=utcnow(), context_hash=result.context_hash,
            content=result.content, next_completion_id=event.completion_id,
            call_id=result.call_id, name=result.name, error=result.error,
            session_id=event.session_id, principal=principal.name, may_teach=principal.may_teach,
        ), None)


async def _ask_engine(gw: Gateway, upstream: dict[str, Any], request_hex: str,
                      event: CompletionEvent, headers: dict[str, str], record: Record,
                      request_bytes: int | None = None,
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
        headers[ENGINE_HEADER] = engine.role
        try:
            resp = await gw.http.post(
                f"{engine.base_url}/v1/chat/completions",
                data=json.dumps(upstream),
                headers={"content-type": "application/json", "x-request-id": request_hex,
                         **engine.auth_headers},
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
                record(event, request_bytes)
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


async def _relay_stream(resp: aiohttp.ClientResponse, capture: StreamCapture,
                        ticket: InFlight, record: Record, request_bytes: int | None = None,
                        ) -> AsyncIterator[bytes]:
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
        record(event, request_bytes)
        count_tokens(event)
