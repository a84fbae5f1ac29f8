"""`POST /v1/feedback`: explicit feedback on a completion, answered once it is durable.

201 on a sink that stores (the row is committed and its completion known), 202 on the event
bus (the broker acknowledged it; the ingester stores it). An `Idempotency-Key` header makes a
retry the same event, stored once. A sink that cannot take it or make it durable (backlog at its
bound, a store that cannot write, no confirmation in time) answers 503: nothing was
acknowledged, and the client retries. A call (`tool_calls`) that the answered request's tools
refuse answers 400 naming the field (`feedback.tool_calls`): checked here where this gateway
gave the answer lately, else by the store as it writes (on the event bus, an answer another
replica gave is checked by the ingester, which keeps a refused one as a dead letter).
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from feedback import FeedbackRequest, InvalidToolCall, SinkFull, UnknownCompletion
from feedback.tool_calls import check_tool_calls
from serving import metrics
from serving.gateway.deps import Gateway, gateway_of
from serving.gateway.errors import APIError
from serving.gateway.http import read_model


async def feedback(request: Request) -> Response:
    gw: Gateway = gateway_of(request)
    principal = gw.authenticate(request, "chat")  # stored from any client; teaches only
    _, req = await read_model(request, FeedbackRequest, gw.cfg.server.max_body_bytes,
                              gw.cfg.server.max_json_depth)
    event = req.to_event(request.headers.get("idempotency-key"), principal.name,
                         principal.may_teach)
    sink = gw.sink
    try:
        params = gw.recent_params(req.completion_id) if event.tool_calls else None
        if params is not None:  # else the store checks them against the stored request
            check_tool_calls(event.tool_calls, params)
        fut = gw.capture(event, request.state.body_bytes)
        await asyncio.wait_for(asyncio.wrap_future(fut), sink.ack_timeout_s)
    except UnknownCompletion as exc:
        raise APIError(404, f"Unknown completion_id: {exc}. Use the `id` of a chat completion "
                            "returned by this server.", code="completion_not_found",
                       param="completion_id") from None
    except InvalidToolCall as exc:
        raise APIError(400, f"{exc}. Nothing was stored: send calls the answered request's "
                            "tools take.", code="invalid_tool_call", param=exc.param) from None
    except SinkFull as exc:
        raise APIError(503, f"Feedback was not accepted by the {sink.name}: {exc}; retry.",
                       code="store_unavailable") from None
    except TimeoutError:
        raise APIError(503, f"The {sink.name} did not confirm the feedback within "
                            f"{sink.ack_timeout_s:g} s; it was not acknowledged, retry.",
                       code="store_timeout") from None
    metrics.FEEDBACK_EVENTS.labels(req.type).inc()
    return JSONResponse(
        {"id": event.event_id, "object": "feedback", "completion_id": event.completion_id,
         "type": event.type, "created_at": event.created_at.isoformat() + "Z"},
        status_code=201 if sink.stores else 202,
    )
