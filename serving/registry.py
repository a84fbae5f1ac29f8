"""Aliases and the model versions behind them.

Clients name an alias (`default`) in `model`; the registry maps it to the version currently
promoted — `base` (the model without an adapter) until the learner publishes one. The table
lives in the store so that every stored completion's version can be traced back and a
restarted server comes back on the same versions; the registry keeps a copy in memory because
the request path reads it on every request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import duckdb

from feedback import utcnow
from serving import metrics
from store import StoreWriter

BASE_VERSION = "base"
DEFAULT_ALIAS = "default"


class UnknownAlias(LookupError):
    def __init__(self, alias: str, known: list[str]) -> None:
        super().__init__(
            f"The model '{alias}' does not exist. Models served here: {', '.join(sorted(known))}."
        )
        self.alias = alias


class AdapterRegistry:
    def __init__(self, writer: StoreWriter) -> None:
        self._writer = writer
        self._aliases: dict[str, str] = {}

    async def load(self) -> None:
        """Make sure `base` and the `default` alias exist, then read the alias table."""
        self._aliases = await asyncio.wrap_future(self._writer.call(_seed_and_read))
        for alias, version in self._aliases.items():
            metrics.ALIAS_VERSION.labels(alias, version).set(1)

    def resolve(self, alias: str) -> str:
        try:
            return self._aliases[alias]
        except KeyError:
            raise UnknownAlias(alias, list(self._aliases)) from None

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def engine_model(self, version: str, base_name: str) -> str:
        """The name the engine serves a version under: the base model's, or the adapter's."""
        return base_name if version == BASE_VERSION else version

    async def listing(self) -> dict[str, list[dict[str, Any]]]:
        return await asyncio.wrap_future(self._writer.call(list_versions))


def _seed_and_read(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    now = utcnow()
    con.execute(
        "INSERT OR IGNORE INTO adapter_versions (version, alias, parent, path, status, created_at) "
        "VALUES (?, NULL, NULL, NULL, 'base', ?)",
        [BASE_VERSION, now],
    )
    con.execute(
        "INSERT OR IGNORE INTO aliases (alias, version, previous, updated_at) VALUES (?, ?, NULL, ?)",
        [DEFAULT_ALIAS, BASE_VERSION, now],
    )
    return dict(con.execute("SELECT alias, version FROM aliases").fetchall())


def list_versions(con: duckdb.DuckDBPyConnection) -> dict[str, list[dict[str, Any]]]:
    """The alias table and every version, newest last."""
    def rows(sql: str) -> list[dict[str, Any]]:
        cur = con.execute(sql)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    return {
        "aliases": rows("SELECT alias, version, previous, updated_at FROM aliases ORDER BY alias"),
        "versions": rows(
            "SELECT version, alias, parent, status, path, created_at FROM adapter_versions "
            "ORDER BY created_at, version"
        ),
    }
