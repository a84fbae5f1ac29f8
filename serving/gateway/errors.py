"""OpenAI-style error bodies. Every error a client sees goes through `error_response`."""

from __future__ import annotations

import json

from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


class APIError(Exception):
    """Raised anywhere below a route; the app turns it into an OpenAI-style JSON error."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }).encode()


def error_response(exc: APIError, headers: dict[str, str] | None = None) -> Response:
    return Response(
        error_body(exc.status, exc.message, exc.code, exc.param),
        status_code=exc.status,
        media_type="application/json",
        headers=headers,
    )
