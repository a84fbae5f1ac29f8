"""The admin API (`Authorization: Bearer <admin token>`): read-only SQL on the store and the
adapter versions. Served by `sdloop serve` and by `sdloop ingest` alike: both put an object with
`cfg`, `admin_token`, `store` and `registry` on the app (a Kafka replica has no store, and its
versions come from the control topic, so it refuses both with 409)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TypeVar

import duckdb
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving.gateway.deps import Gateway, gateway_of
from serving.gateway.errors import APIError
from serving.gateway.http import read_model
from serving.gateway.protocol import (
    ADAPTER_ACTIONS,
    KeyRequest,
    PromoteRequest,
    PublishRequest,
    ReviewRequest,
    RevokeRequest,
    SqlRequest,
)
from serving.version_folder import RegistryError
from store import QueryError, QueryResult, keys, review, run_read_only

T = TypeVar("T")


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

    def run() -> bytes:
        cur = gw.store.cursor()
        try:
            result = run_read_only(cur, req.sql, max_rows, gw.cfg.server.sql_timeout_s, req.params)
        finally:
            cur.close()
        return _encode(result, gw.cfg.server.sql_max_bytes)

    try:
        body = await asyncio.to_thread(run)  # the query and its JSON, off the event loop
    except QueryError as exc:
        raise APIError(400, str(exc), code="invalid_sql", param="sql") from None
    return Response(body, media_type="application/json")


def _encode(result: QueryResult, max_bytes: int) -> bytes:
    """The result as JSON, its rows cut (`truncated`) where the body would pass `max_bytes`:
    a row limit alone lets a few huge values make a body of gigabytes."""
    rows: list[str] = []
    size = 0
    truncated = result.truncated
    for row in result.rows:
        text = json.dumps(row, default=str)
        size += len(text) + 1
        if size > max_bytes:
            truncated = True
            break
        rows.append(text)
    return (f'{{"columns": {json.dumps(result.columns)}, "types": {json.dumps(result.types)}, '
            f'"rows": [{", ".join(rows)}], "truncated": {json.dumps(truncated)}}}').encode()


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


# -- principals and review --------------------------------------------------------------------


async def _on_store(gw: Gateway, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """`fn` on the gateway's store, in a transaction of its own, off the event loop."""
    if gw.store is None:
        raise APIError(409, "This gateway has no store; manage keys and reviews on the one that "
                            "holds it.", code="no_store")
    return await asyncio.wrap_future(gw.store.call(fn))


async def admin_keys(request: Request) -> Response:
    """GET: the keys (never the keys themselves); POST: a new one, answered once with its key."""
    gw = gateway_of(request)
    gw.check_admin(request)
    if request.method == "GET":
        return Response(json.dumps(await _on_store(gw, keys.list_keys), default=str),
                        media_type="application/json")
    _, req = await read_model(request, KeyRequest, gw.cfg.server.max_body_bytes)
    try:
        made = await _on_store(gw, lambda con: keys.add_key(con, req.name, req.scopes))
    except keys.KeyRefused as exc:
        raise APIError(400, str(exc), code="invalid_key_request") from None
    await gw.reload_keys()
    return JSONResponse(made, status_code=201)


async def admin_key_revoke(request: Request) -> Response:
    gw = gateway_of(request)
    gw.check_admin(request)
    _, req = await read_model(request, RevokeRequest, gw.cfg.server.max_body_bytes)
    try:
        revoked = await _on_store(gw, lambda con: keys.revoke_key(con, req.name))
    except keys.KeyRefused as exc:
        raise APIError(404, str(exc), code="key_not_found") from None
    await gw.reload_keys()
    return Response(json.dumps(revoked, default=str), media_type="application/json")


async def admin_review(request: Request) -> Response:
    """GET: signals waiting for review (`?limit=`)."""
    gw = gateway_of(request)
    gw.check_admin(request)
    try:
        limit = int(request.query_params.get("limit", "100"))
    except ValueError:
        raise APIError(400, "limit must be an integer", param="limit") from None
    rows = await _on_store(gw, lambda con: review.pending(con, max(0, min(limit, 10_000))))
    return Response(json.dumps(rows, default=str), media_type="application/json")


async def admin_review_decide(request: Request) -> Response:
    """POST /admin/review/{approve|reject} {"ids": [...]}."""
    gw = gateway_of(request)
    reviewer = gw.check_admin(request)
    decision = {"approve": "approved", "reject": "rejected"}.get(request.path_params["decision"])
    if decision is None:
        raise APIError(404, "No review action here: approve or reject.")
    _, req = await read_model(request, ReviewRequest, gw.cfg.server.max_body_bytes)
    try:
        done = await _on_store(gw, lambda con: review.decide(con, req.ids, decision, reviewer))
    except review.ReviewRefused as exc:
        raise APIError(404, str(exc), code="signal_not_found", param="ids") from None
    return JSONResponse(done)
