"""The admin API (`Authorization: Bearer <admin token>`): read-only SQL on the store and the
adapter versions. Served by `sdloop serve` and by `sdloop ingest` alike: both put an object with
`cfg`, `admin_token`, `store` and `registry` on the app (a Kafka replica has no store, and its
versions come from the control topic, so it refuses both with 409)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving.errors import APIError
from serving.gateway import gateway_of
from serving.http import read_model
from serving.protocol import ADAPTER_ACTIONS, PromoteRequest, PublishRequest, SqlRequest
from serving.version_folder import RegistryError
from store import QueryError, run_read_only


async def admin_sql(request: Request) -> Response:
    gw = gateway_of(request)
    gw.check_admin(request)
    if gw.store is None:
        raise APIError(409, "This gateway sends events to Kafka and has no store; query the "
                            "ingester's (`sdloop sql --data-dir <the ingester's data dir>`).",
                       code="no_store")
    _, req = await read_model(request, SqlRequest, gw.cfg.server.max_body_bytes)
    limit = gw.cfg.server.sql_max_rows
    max_rows = limit if req.max_rows is None else min(req.max_rows, limit)

    def run() -> Any:
        cur = gw.store.cursor()
        try:
            return run_read_only(cur, req.sql, max_rows, gw.cfg.server.sql_timeout_s, req.params)
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
    gw = gateway_of(request)
    gw.check_admin(request)
    listing = await gw.registry.listing()
    return Response(json.dumps(listing, default=str), media_type="application/json")


async def admin_adapter_action(request: Request) -> Response:
    """POST /admin/adapters/{publish|promote|rollback}."""
    gw = gateway_of(request)
    gw.check_admin(request)
    action = request.path_params["action"]
    body_model = ADAPTER_ACTIONS.get(action)
    if body_model is None:
        raise APIError(404, f"No adapter action '{action}': publish, promote or rollback.")
    if gw.store is None:
        raise APIError(409, "Versions reach Kafka replicas through the control topic: "
                            f"`sdloop adapters {action}` with the ingester's data dir.",
                       code="use_the_ingester")
    _, req = await read_model(request, body_model, gw.cfg.server.max_body_bytes)
    try:
        if isinstance(req, PublishRequest):
            result = await gw.registry.publish(req.path, promote=req.promote)
        elif isinstance(req, PromoteRequest):
            result = await gw.registry.promote(req.version)
        else:
            result = await gw.registry.rollback(req.alias)
    except RegistryError as exc:
        raise APIError(exc.status, str(exc), code="adapter_" + action) from None
    return JSONResponse(result)
