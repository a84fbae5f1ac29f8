"""Read-only SQL on the feedback store, sealed.

While `sdloop serve` runs it owns the DuckDB file (DuckDB allows no second process to open a
file another process writes), so queries go to the server, which answers them on a cursor of
its own database. When no server runs, the file is opened read-only directly. Both paths go
through `run_read_only`.

A query is whatever an admin (or whoever holds the token) sends, so three locks, each enough
for what it covers:
- the database itself is sealed when opened (`seal`): no file or network access from SQL
  (`read_text('/etc/passwd')`, `glob`, `COPY`, `ATTACH`), no extension installs or loads, and
  the configuration locked so no statement can undo that;
- the statement's parse tree (`json_serialize_sql`) must be a plain query: a SELECT can carry a
  data-modifying CTE (`WITH u AS (UPDATE …) SELECT …`), and a few functions act on the
  database (`checkpoint()`, `nextval`);
- it runs in a transaction that is always rolled back, so whatever got past both writes
  nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

# Statement types a read-only query may contain. DESCRIBE / SHOW / SUMMARIZE parse as SELECT.
_READ_ONLY = {duckdb.StatementType.SELECT}
_EXPLAIN = re.compile(r"^\s*EXPLAIN(\s+ANALY[SZ]E)?\b", re.IGNORECASE)
# Functions that change the database or run SQL given as a string (past the parse-tree check).
_REFUSED_FUNCTIONS = frozenset({"checkpoint", "force_checkpoint", "query", "nextval", "setseed"})
# Set on every connection that can run a query from outside, in this order (the lock last).
SEALED_SETTINGS: dict[str, Any] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "lock_configuration": True,
}


class QueryError(ValueError):
    """The SQL is not a read-only query, does not parse, or failed."""


@dataclass
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


# One read-only statement and its `?` parameters -> its result: how the learner and the report
# read the store, whether through the running server's admin API or from the file.
Query = Callable[[str, list[Any]], QueryResult]


def seal(con: duckdb.DuckDBPyConnection) -> None:
    """Close the database to files, network and extensions for every connection to it, for
    good (the writer needs none of them; the schema is read by Python)."""
    for name, value in SEALED_SETTINGS.items():
        con.execute(f"SET {name} = {str(value).lower()}")


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise QueryError(f"SQL does not parse: {exc}") from exc
    if not statements:
        raise QueryError("no SQL statement given")
    if len(statements) > 1:
        raise QueryError("one statement at a time, please")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE runs its statement: what it explains must be read-only as well.
        inner = _EXPLAIN.sub("", sql, count=1)
        try:
            kinds = [s.type for s in con.extract_statements(inner)]
        except duckdb.Error as exc:
            raise QueryError(f"SQL does not parse: {exc}") from exc
        if kinds != [duckdb.StatementType.SELECT]:
            raise QueryError("EXPLAIN is allowed for SELECT statements only")
        _check_tree(con, inner)
    elif kind not in _READ_ONLY:
        raise QueryError(
            f"only read-only queries (SELECT, DESCRIBE, SHOW, EXPLAIN) are allowed here, "
            f"not {kind.name}"
        )
    else:
        _check_tree(con, sql)


def _check_tree(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse a SELECT whose parse tree holds a write (a data-modifying CTE or subquery) or a
    function that acts on the database."""
    try:
        tree = json.loads(con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone()[0])
    except (duckdb.Error, TypeError, json.JSONDecodeError) as exc:
        raise QueryError(f"SQL could not be checked: {exc}") from exc
    if tree.get("error"):
        raise QueryError(f"SQL could not be checked: {tree.get('error_message', 'unknown')}")
    stack: list[Any] = [tree["statements"]]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind.endswith("_QUERY_NODE"):  # INSERT/UPDATE/DELETE
                verb = kind.removesuffix("_QUERY_NODE")
                raise QueryError(f"read-only queries only: this one contains {verb} (a "
                                 "data-modifying WITH clause or subquery)")
            name = node.get("function_name")
            if isinstance(name, str) and name.lower() in _REFUSED_FUNCTIONS:
                raise QueryError(f"read-only queries only: {name}() is not allowed here")
            stack.extend(node.values())


def run_read_only(
    con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout_s: float,
    params: list[Any] | None = None,
) -> QueryResult:
    """Run one read-only statement on `con` (a cursor of its own, on a sealed database),
    bounded in rows and time, in a transaction rolled back whatever happens."""
    check_read_only(con, sql)
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.start()
    con.begin()
    try:
        rel = con.execute(sql, params or None)
        description = rel.description or []
        rows = rel.fetchmany(max_rows + 1)
    except duckdb.InterruptException as exc:
        raise QueryError(f"query cancelled after {timeout_s:g} s") from exc
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    finally:
        timer.cancel()
        with contextlib.suppress(duckdb.Error):  # a failed statement may have ended it
            con.rollback()
    rows, truncated = rows[:max_rows], len(rows) > max_rows
    columns, types = [d[0] for d in description], [str(d[1]) for d in description]
    decoders = [_json_decoder(d[1]) for d in description]
    if any(decoders):  # DuckDB hands JSON values over as text; give callers the values
        rows = [
            tuple(dec(v) if dec and v is not None else v for dec, v in zip(decoders, row, strict=True))
            for row in rows
        ]
    return QueryResult(columns, types, rows, truncated)


def _json_decoder(typ: Any) -> Callable[[Any], Any] | None:
    """A function that parses the JSON inside a value of this (possibly nested) type."""
    if "JSON" not in str(typ):
        return None
    if str(typ) == "JSON":
        return lambda v: json.loads(v) if isinstance(v, str) else v
    children = dict(typ.children)
    if typ.id in ("list", "array"):
        child = _json_decoder(children["child"])
        return lambda v: [child(x) if x is not None else x for x in v]
    if typ.id == "struct":
        fields = {name: _json_decoder(t) for name, t in children.items()}
        return lambda v: {k: (fields[k](x) if fields.get(k) and x is not None else x) for k, x in v.items()}
    if typ.id == "map":
        value = _json_decoder(children["value"])
        if value is None:
            return None
        return lambda v: {k: value(x) if x is not None else x for k, x in v.items()}
    return None


def query_file(
    path: Path, sql: str, max_rows: int, timeout_s: float, params: list[Any] | None = None
) -> QueryResult:
    """Query a store no server holds open."""
    if not Path(path).exists():
        raise QueryError(f"no feedback store at {path}")
    con = duckdb.connect(str(path), read_only=True, config=SEALED_SETTINGS)
    try:
        return run_read_only(con, sql, max_rows, timeout_s, params)
    finally:
        con.close()
