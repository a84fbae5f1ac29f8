"""Read-only SQL on the feedback store.

While `sdloop serve` runs it owns the DuckDB file (DuckDB allows no second process to open a
file another process writes), so queries go to the server, which answers them on its own
connection with only read statements allowed. When no server runs, the file is opened
read-only directly. Both paths go through `run_read_only`.
"""

from __future__ import annotations

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
    elif kind not in _READ_ONLY:
        raise QueryError(
            f"only read-only queries (SELECT, DESCRIBE, SHOW, EXPLAIN) are allowed here, "
            f"not {kind.name}"
        )


def run_read_only(
    con: duckdb.DuckDBPyConnection, sql: str, max_rows: int, timeout_s: float,
    params: list[Any] | None = None,
) -> QueryResult:
    """Run one read-only statement on `con` (a cursor of its own), bounded in rows and time."""
    check_read_only(con, sql)
    timer = threading.Timer(timeout_s, con.interrupt)
    timer.start()
    try:
        rel = con.execute(sql, params or None)
        columns = [d[0] for d in rel.description or []]
        types = [str(d[1]) for d in rel.description or []]
        rows = rel.fetchmany(max_rows + 1)
    except duckdb.InterruptException as exc:
        raise QueryError(f"query cancelled after {timeout_s:g} s") from exc
    except duckdb.Error as exc:
        raise QueryError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    finally:
        timer.cancel()
    rows, truncated = rows[:max_rows], len(rows) > max_rows
    decoders = [_json_decoder(d[1]) for d in rel.description or []]
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
    con = duckdb.connect(str(path), read_only=True)
    try:
        return run_read_only(con, sql, max_rows, timeout_s, params)
    finally:
        con.close()
