"""Reading a request: its body as bounded JSON, validated against a pydantic model, and its
bearer token. Every refusal is an `APIError` with the status and a message saying what to fix."""

from __future__ import annotations

import hmac
import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request

from feedback import describe_validation_error
from serving.errors import APIError

M = TypeVar("M", bound=BaseModel)
# An oversized body is still read (and dropped) up to this, so the client reads the 413.
_DISCARD_CAP = 64 * 1024 * 1024


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


async def read_model(request: Request, model: type[M], limit: int) -> tuple[dict[str, Any], M]:
    """The body as a JSON object and validated as `model`: 400 for bad JSON, 422 for bad fields."""
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return body, model.model_validate(body)
    except ValidationError as exc:
        raise APIError(422, describe_validation_error(exc)) from None


def check_bearer(request: Request, token: str, what: str) -> None:
    header = request.headers.get("authorization", "")
    given = header[7:] if header[:7].lower() == "bearer " else ""
    if not given or not hmac.compare_digest(given.encode(), token.encode()):
        raise APIError(401, f"{what} needs 'Authorization: Bearer <token>' with a valid token.",
                       code="invalid_api_key")
