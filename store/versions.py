"""The tables of model versions and the aliases that point at them.

`adapter_versions` has one row per version the server could answer with (`base`, the model
without an adapter, and every published adapter, rejected ones included, with its manifest);
`aliases` maps each alias clients name in `model` to a version, remembering the one before for
rollback. The serving registry and the ingester's control publisher change them only through
these functions, each run inside the writer's transaction (`StoreWriter.call`).
"""

from __future__ import annotations

import json
from typing import Any

import duckdb

from feedback import utcnow

# The version name of the model without an adapter, and the alias seeded to point at it.
BASE_VERSION = "base"
DEFAULT_ALIAS = "default"


class VersionNotFound(LookupError):
    """No such version or alias."""


class VersionConflict(ValueError):
    """The version or alias exists but is not in a state that allows the change."""


def seed_and_read(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, str], dict[str, str]]:
    """Make sure `base` and the `default` alias exist; (alias → version, version → path)."""
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
    aliases = dict(con.execute("SELECT alias, version FROM aliases").fetchall())
    paths = dict(con.execute(
        "SELECT version, path FROM adapter_versions WHERE path IS NOT NULL").fetchall())
    return aliases, paths


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


def record_version(con: duckdb.DuckDBPyConnection, manifest: dict[str, Any], path: str,
                   status: str) -> None:
    """Add a version row; VersionConflict if the name exists (versions are immutable)."""
    known = con.execute("SELECT status FROM adapter_versions WHERE version = ?",
                        [manifest["version"]]).fetchone()
    if known is not None:
        raise VersionConflict(f"version {manifest['version']} already exists ({known[0]}); "
                              "versions are immutable, publish a new one")
    con.execute("INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                [manifest["version"], manifest["alias"], manifest.get("parent"), path, status,
                 utcnow(), json.dumps(manifest)])


def forget_version(con: duckdb.DuckDBPyConnection, version: str) -> None:
    """Drop a version row whose publish never reached an engine (nothing was learned about it)."""
    con.execute("DELETE FROM adapter_versions WHERE version = ?", [version])


def reject_version(con: duckdb.DuckDBPyConnection, version: str, reason: str) -> None:
    con.execute(
        "UPDATE adapter_versions SET status = 'rejected', manifest = json_merge_patch(manifest, ?) "
        "WHERE version = ?", [json.dumps({"rejected_because": reason}), version])


def stored_version(con: duckdb.DuckDBPyConnection, version: str) -> tuple[str, dict[str, Any]]:
    """(path, manifest) of a stored adapter version."""
    row = con.execute("SELECT path, manifest FROM adapter_versions WHERE version = ?",
                      [version]).fetchone()
    if row is None or row[0] is None:
        raise VersionNotFound(f"no adapter version {version}")
    return row[0], json.loads(row[1])


def promotable(con: duckdb.DuckDBPyConnection, version: str) -> tuple[str, str, dict[str, Any]]:
    """(alias, path, manifest) of a version that may be promoted."""
    row = con.execute("SELECT alias, path, status, manifest FROM adapter_versions WHERE version = ?",
                      [version]).fetchone()
    if row is None:
        raise VersionNotFound(f"no version {version}; see `sdloop adapters list`")
    alias, path, status, manifest = row
    if status == "rejected":
        raise VersionConflict(f"version {version} was rejected and cannot be promoted")
    if alias is None:
        raise VersionConflict(f"{version} is the base model; use rollback on an alias")
    return alias, path, json.loads(manifest)


def rollback_target(con: duckdb.DuckDBPyConnection, alias: str) -> tuple[str, str]:
    """(current, previous) version of an alias that can be rolled back."""
    row = con.execute("SELECT version, previous FROM aliases WHERE alias = ?", [alias]).fetchone()
    if row is None:
        raise VersionNotFound(f"no alias '{alias}'")
    current, previous = row
    if previous is None:
        raise VersionConflict(f"alias '{alias}' has nothing to roll back to")
    return current, previous


def flip_alias(con: duckdb.DuckDBPyConnection, alias: str, version: str) -> str | None:
    """Point `alias` at `version`, remembering the version before for rollback, and update the
    statuses (the old version is retired unless another alias still points at it). Returns
    the version the alias pointed at before."""
    row = con.execute("SELECT version FROM aliases WHERE alias = ?", [alias]).fetchone()
    old = row[0] if row else None
    used_elsewhere = {v for (v,) in con.execute(
        "SELECT version FROM aliases WHERE alias <> ?", [alias]).fetchall()}
    con.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?, ?)", [alias, version, old, utcnow()])
    con.execute("UPDATE adapter_versions SET status = 'promoted' WHERE version = ? "
                "AND version <> ?", [version, BASE_VERSION])
    if old and old != version and old != BASE_VERSION and old not in used_elsewhere:
        con.execute("UPDATE adapter_versions SET status = 'retired' WHERE version = ?", [old])
    return old

