"""Reading a request: its body as bounded JSON, validated against a pydantic model, and its
bearer token. Every refusal is an `APIError` with the status and a message saying what to fix."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from feedback import describe_validation_error
from serving.gateway.errors import APIError

M = TypeVar("M", bound=BaseModel)
# An oversized body is still read (and dropped) up to this, so the client reads the 413.
_DISCARD_CAP = 64 * 1024 * 1024
# Levels of arrays and objects a body may nest (`server.max_json_depth` for the OpenAI routes).
MAX_JSON_DEPTH = 64
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_DEPTH_STEPS = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))  # +1, +1, -1, -1 as int8


def nests_deeper_than(raw: bytes, body: Any, limit: int, walk_budget: int = 10_000) -> bool:
    """Whether JSON (as bytes, and as parsed) nests arrays and objects more than `limit`
    levels deep; without recursion, so it holds for any depth.

    With no more than `limit` brackets in all there is nothing to check: every ordinary
    request. Otherwise the parsed value is walked, container by container, as long as that
    stays within `walk_budget` values (a chat of hundreds of messages: tens of microseconds);
    past that, the bytes are measured in C instead (`_bytes_nest_deeper_than`), so a body of
    millions of tiny values costs milliseconds, not a walk of each.
    """
    if raw.count(b"[") + raw.count(b"{") <= limit or type(body) not in (dict, list):
        return False
    stack = [(body, 1)]
    push = stack.append
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        items = value.values() if type(value) is dict else value
        walk_budget -= len(items)
        if walk_budget < 0:
            return _bytes_nest_deeper_than(raw, limit)
        depth += 1
        for item in items:
            kind = type(item)
            if kind is dict or kind is list:
                push((item, depth))
    return False


def _bytes_nest_deeper_than(raw: bytes, limit: int) -> bool:
    """The depth of valid JSON from its bytes: strings cut out (their escaped backslashes and
    quotes first), the depth is the highest running sum of the brackets left."""
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    skeleton = b"".join(text.split(b'"')[::2])  # what lies outside strings
    if len(skeleton) <= 2 * limit:
        return False
    steps = np.frombuffer(skeleton.translate(_DEPTH_STEPS), dtype=np.int8)
    return int(np.cumsum(steps, dtype=np.int32).max()) > limit


def _too_deep(limit: int) -> APIError:
    return APIError(400, f"The request body nests arrays and objects deeper than {limit} levels "
                         "(server.max_json_depth); send a flatter body.", code="json_too_deep")


async def read_json(request: Request, limit: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The body as JSON, refusing more than `limit` bytes without ever holding more, and more
    than `max_depth` levels of nesting (it would exhaust the recursion of whatever walks it:
    the JSON parser itself, pydantic, the store's encoder, redaction).

    An oversized body is still read to its end (and dropped), up to a hard cap, so that the
    client gets to read the 413 instead of a connection reset. The size read is left in
    `request.state.body_bytes` (what the events made from it are counted as by the sink).
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
    request.state.body_bytes = size
    if not raw.strip():
        raise APIError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:  # deeper than the parser's recursion limit (about 1000 levels)
        raise _too_deep(max_depth) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if nests_deeper_than(raw, body, max_depth):
        raise _too_deep(max_depth)
    return body


async def read_model(request: Request, model: type[M], limit: int,
                     max_depth: int = MAX_JSON_DEPTH,
                     check: Callable[[dict[str, Any]], None] | None = None,
                     ) -> tuple[dict[str, Any], M]:
    """The body as a JSON object and validated as `model`: 400 for bad JSON, 422 for bad fields.
    `check` sees the object first and may refuse it (`APIError`) before validation costs more."""
    body = await read_json(request, limit, max_depth)
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    if check is not None:
        check(body)
    try:
        return body, model.model_validate(body)
    except ValidationError as exc:
        raise APIError(422, describe_validation_error(exc)) from None


def bearer(request: Request) -> str:
    """The request's `Authorization: Bearer` token ('' without one)."""
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def check_bearer(request: Request, token: str, what: str) -> None:
    given = bearer(request)
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise APIError(401, f"{what} needs 'Authorization: Bearer <token>' with a valid token.",
                       code="invalid_api_key")
