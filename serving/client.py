"""Reaching the feedback store from another process (`sdloop sql`, `sdloop adapters`, `sdloop
keys`, `sdloop review`, the learner): through the running server's admin API while `serve` owns
the file, or by opening the file directly when no server runs (read-only for queries). Callers
get the same answer either way."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import duckdb

from serving.config import Config
from serving.state import is_locked, keep_private, running_server
from store import QueryResult, query_file
from store.migrations import migrate
from store.query import seal
from store.writer import in_transaction


class ClientError(RuntimeError):
    """The server or the store cannot be reached or refused the request."""


def server_state(cfg: Config) -> dict[str, Any] | None:
    """The running server of this data dir, None when there is none."""
    state = running_server(cfg.data_path)
    if state is None and is_locked(cfg.data_path):
        raise ClientError("the server on this data dir is starting; retry in a few seconds")
    return state


def admin_call(state: dict[str, Any], method: str, path: str, body: dict[str, Any] | None = None,
               timeout: float = 300.0) -> Any:
    req = urllib.request.Request(
        state["url"] + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"authorization": f"Bearer {state['admin_token']}",
                 "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = str(exc)
        raise ClientError(message) from None
    except urllib.error.URLError as exc:
        raise ClientError(f"the server at {state['url']} does not answer: {exc.reason}") from None


def store_query(cfg: Config, sql: str, params: list[Any] | None = None,
                max_rows: int | None = None) -> QueryResult:
    """One read-only statement on the store, wherever it is open. Values come back as JSON
    types (timestamps as ISO strings) on both paths."""
    limit = cfg.server.sql_max_rows if max_rows is None else max_rows
    state = server_state(cfg)
    if state is not None:
        data = admin_call(state, "POST", "/admin/sql",
                          {"sql": sql, "params": params or [], "max_rows": limit})
        return QueryResult(data["columns"], data["types"], [tuple(r) for r in data["rows"]],
                           data["truncated"])
    result = query_file(cfg.store_path, sql, limit, cfg.server.sql_timeout_s, params)
    result.rows = [tuple(r) for r in json.loads(json.dumps(result.rows, default=str))]
    return result


def store_change(cfg: Config, method: str, path: str, body: dict[str, Any] | None,
                 fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
    """A change to the store: the running server's admin route `method path` with `body`, or
    `fn` in a transaction on the file when no server runs. The answer is JSON types."""
    state = server_state(cfg)
    if state is not None:
        return admin_call(state, method, path, body)
    keep_private(cfg.data_path)  # keys may come before the first `serve` creates the store
    cfg.store_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(cfg.store_path))
    try:
        migrate(con)
        seal(con)
        return json.loads(json.dumps(in_transaction(con, fn), default=str))
    finally:
        con.close()
