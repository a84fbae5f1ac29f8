"""Reading a test's store as the learner and the report read theirs."""

from __future__ import annotations

from store import Query, StoreWriter, run_read_only


def query_of(writer: StoreWriter) -> Query:
    """A read-only query function on a writer's store, as the learner and the report get one."""
    return lambda sql, params: run_read_only(writer.cursor(), sql, 100_000, 10, params)
