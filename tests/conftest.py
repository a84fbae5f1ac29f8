"""Fixtures every test package shares: a real store writer on a DuckDB file of its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from store import Query, StoreWriter, run_read_only


@pytest.fixture()
def writer(tmp_path) -> Iterator[StoreWriter]:
    w = StoreWriter(tmp_path / "store.duckdb").open()
    yield w
    w.close()


def query_of(writer: StoreWriter) -> Query:
    """A read-only query function on a writer's store, as the learner and the report get one."""
    return lambda sql, params: run_read_only(writer.cursor(), sql, 100_000, 10, params)
