"""Aliases, the model versions behind them, and the hot-swap between versions.

Clients name an alias (`default`) in `model`; the registry maps it to the version currently
promoted — `base` (the model without an adapter) until a version is published. The tables
live in the store, so every stored completion's version can be traced and a restarted server
comes back on the same versions; the registry keeps a copy in memory for the request path.

Versions are immutable: a version is a folder with a manifest (`<alias>@v<N>`, a content hash
per file, and a probe), loaded into the engine under its own name and never reloaded under
another. A swap is: verify hashes → load the new name → probe it through the engine (the
probe's expected log-probabilities, under the new weights and under the base model, were
computed by the trainer, and the engine must reproduce the difference, so a match shows it
serves this version) → flip the alias → wait for requests still on the
old version → unload it. Rollback flips back to the previous version.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import duckdb

from feedback import utcnow
from serving import metrics
from serving.engine import EngineManager, EngineRequestError, EngineUnavailable
from store import BASE_VERSION, DEFAULT_ALIAS

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
VERSION_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*@v[0-9]+$")
# Mean |Δ(adapter − base) log-prob| per probe token, engine vs trainer: what the adapter
# changes must be what the trainer measured. bf16 serving of an fp32-trained adapter measured
# about 0.001 on confident tokens, but 0.02–0.105 on the uncertain tokens of the small
# model's answers (clean-clone test runs); an adapter with other weights than the manifest's
# is far off.
PROBE_TOLERANCE = 0.25
DRAIN_TIMEOUT_S = 120.0


class UnknownAlias(LookupError):
    def __init__(self, alias: str, known: list[str]) -> None:
        super().__init__(
            f"The model '{alias}' does not exist. Models served here: {', '.join(sorted(known))}."
        )
        self.alias = alias


class RegistryError(RuntimeError):
    """A publish, promote or rollback was refused; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class InFlight:
    """One request on a version; `release` is idempotent."""

    __slots__ = ("_counts", "_version", "_held")

    def __init__(self, counts: Counter[str], version: str) -> None:
        self._counts, self._version, self._held = counts, version, True
        counts[version] += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._counts[self._version] -= 1


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Tables(Protocol):
    """Where the registry keeps its tables: the store's writer, or a replica's local copy."""

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Future[Any]: ...


class AdapterRegistry:
    def __init__(self, writer: Tables, engine: EngineManager,
                 probe_tolerance: float = PROBE_TOLERANCE) -> None:
        self._writer = writer
        self._engine = engine
        self._aliases: dict[str, str] = {}
        self._paths: dict[str, str] = {}
        self._in_flight: Counter[str] = Counter()
        self._swap = asyncio.Lock()
        self.probe_tolerance = probe_tolerance

    # -- reading ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Make sure `base` and the `default` alias exist, then read the tables."""
        self._aliases, self._paths = await self._store(seed_and_read)
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
        return await self._store(list_versions)

    def acquire(self, version: str) -> InFlight:
        """Taken by every request a version answers, so that a swap can wait for them."""
        return InFlight(self._in_flight, version)

    # -- engine (re)start ------------------------------------------------------------------

    async def restore(self) -> None:
        """Load every version an alias points to into a freshly started engine."""
        for version in sorted({v for v in self._aliases.values() if v != BASE_VERSION}):
            await self._engine.load_adapter(version, self._paths[version])
            log.info("restored adapter %s into the engine", version)

    # -- changing versions -----------------------------------------------------------------

    async def publish(self, folder: str | Path, promote: bool = True) -> dict[str, Any]:
        """Register a version folder, load and probe it, and (by default) make it current."""
        path = Path(folder).resolve()
        manifest = read_manifest(path)
        version, alias = manifest["version"], manifest["alias"]
        async with self._swap:
            started = time.perf_counter()
            status = registration_status(manifest)
            await self._store(lambda con: record_version(con, manifest, path, status))
            if status == "rejected":  # kept and recorded with its metrics, never loaded
                return {"version": version, "alias": alias, "status": "rejected",
                        "reasons": (manifest.get("gate") or {}).get("reasons", [])}
            try:
                verify_files(path, manifest)
                await self._load_and_probe(version, path, manifest)
            except RegistryError as exc:
                if exc.status == 503:  # the engine was away: nothing was learned about the version
                    await self._store(lambda con: con.execute(
                        "DELETE FROM adapter_versions WHERE version = ?", [version]))
                    raise
                metrics.SWAP_FAILURES.inc()
                await self._set_status(version, "rejected", str(exc))
                raise
            self._paths[version] = str(path)
            if promote:
                await self._flip(alias, version)
            else:
                await self._engine.unload_adapter(version)
            metrics.SWAP_SECONDS.observe(time.perf_counter() - started)
        return {"version": version, "alias": alias, "status": "promoted" if promote else "candidate"}

    async def promote(self, version: str) -> dict[str, Any]:
        """Point the version's alias at it (loading it again if it is not loaded)."""
        async with self._swap:
            alias, path, manifest = await self._store(lambda con: promotable(con, version))
            if self._aliases.get(alias) != version:
                await self._ensure_loaded(version, path, json.loads(manifest))
                await self._flip(alias, version)
        return {"version": version, "alias": alias, "status": "promoted"}

    async def rollback(self, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        """Flip the alias back to the version it pointed at before."""
        async with self._swap:
            current, previous = await self._store(lambda con: rollback_target(con, alias))
            if previous != BASE_VERSION:
                path, manifest = await self._store(lambda con: con.execute(
                    "SELECT path, manifest FROM adapter_versions WHERE version = ?",
                    [previous]).fetchone())
                await self._ensure_loaded(previous, path, json.loads(manifest))
            await self._flip(alias, previous)
        return {"alias": alias, "version": previous, "rolled_back_from": current}

    # -- internals -------------------------------------------------------------------------

    async def _load_and_probe(self, version: str, path: Path, manifest: dict[str, Any]) -> None:
        try:
            await self._engine.load_adapter(version, str(path))
        except EngineRequestError as exc:
            raise RegistryError(422, f"the engine refused to load {version}: {exc}") from None
        except EngineUnavailable as exc:
            raise RegistryError(503, str(exc)) from None
        probe = manifest["probe"]
        prompt, response = probe["prompt_token_ids"], probe["response_token_ids"]
        try:
            got = await self._engine.score(version, prompt, response)
            got_base = await self._engine.score(self._engine.served_model_name, prompt, response)
        except (EngineRequestError, EngineUnavailable, KeyError) as exc:
            await self._unload_quietly(version)
            raise RegistryError(422, f"probe of {version} failed: {exc}") from None
        # What the adapter changes, as the engine serves it vs as the trainer computed it:
        # the engine's own precision error cancels in the difference with its base scores.
        gap = sum(
            abs((g - gb) - (w - wb))
            for g, gb, w, wb in zip(got, got_base, probe["logprobs"], probe["base_logprobs"],
                                    strict=True)
        ) / max(len(response), 1)
        if gap > self.probe_tolerance:
            metrics.PROBE_MISMATCHES.inc()
            await self._unload_quietly(version)
            raise RegistryError(422, f"probe mismatch for {version}: the engine's log-probabilities "
                                     f"differ from the trainer's by {gap:.3f} per token "
                                     f"(tolerance {self.probe_tolerance}); not promoted")
        log.info("probe of %s passed (mean |Δ logprob| %.4f)", version, gap)

    async def _ensure_loaded(self, version: str, path: str, manifest: dict[str, Any]) -> None:
        if version in self._aliases.values():
            return
        verify_files(Path(path), manifest)
        await self._load_and_probe(version, Path(path), manifest)
        self._paths[version] = path

    async def _flip(self, alias: str, version: str) -> None:
        old = self._aliases.get(alias)

        others = {v for a, v in self._aliases.items() if a != alias}
        await self._store(lambda con: record_flip(con, alias, version, old, others))
        self._aliases[alias] = version
        if old is not None:
            metrics.ALIAS_VERSION.labels(alias, old).set(0)
        metrics.ALIAS_VERSION.labels(alias, version).set(1)
        log.info("alias %s -> %s (was %s)", alias, version, old)
        if old and old != BASE_VERSION and old not in self._aliases.values():
            await self._drain(old)
            await self._unload_quietly(old)

    async def _drain(self, version: str) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self._in_flight[version] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight[version] > 0:
            log.warning("%d requests still on %s after %.0f s; unloading anyway",
                        self._in_flight[version], version, DRAIN_TIMEOUT_S)

    async def _unload_quietly(self, version: str) -> None:
        try:
            await self._engine.unload_adapter(version)
        except (EngineRequestError, EngineUnavailable) as exc:
            log.warning("unloading %s: %s", version, exc)

    async def _set_status(self, version: str, status: str, reason: str) -> None:
        def write(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                "UPDATE adapter_versions SET status = ?, manifest = json_merge_patch(manifest, ?) "
                "WHERE version = ?", [status, json.dumps({"rejected_because": reason}), version])

        await self._store(write)

    async def _store(self, fn: Any) -> Any:
        return await asyncio.wrap_future(self._writer.call(fn))


def registration_status(manifest: dict[str, Any]) -> str:
    """`rejected` for a version whose gate failed, `candidate` otherwise. A failed gate is final
    unless the learner ran with its gate not enforced (benchmarks): then it is only recorded."""
    gate = manifest.get("gate") or {}
    return "rejected" if gate.get("passed") is False and gate.get("enforced", True) else "candidate"


def promotable(con: duckdb.DuckDBPyConnection, version: str) -> tuple[str, str, str]:
    """(alias, path, manifest) of a version that may be promoted; RegistryError otherwise."""
    row = con.execute("SELECT alias, path, status, manifest FROM adapter_versions WHERE version = ?",
                      [version]).fetchone()
    if row is None:
        raise RegistryError(404, f"no version {version}; see `sdloop adapters list`")
    alias, path, status, manifest = row
    if status == "rejected":
        raise RegistryError(409, f"version {version} was rejected and cannot be promoted")
    if alias is None:
        raise RegistryError(409, f"{version} is the base model; use rollback on an alias")
    return alias, path, manifest


def rollback_target(con: duckdb.DuckDBPyConnection, alias: str) -> tuple[str, str]:
    """(current, previous) version of an alias that can be rolled back; RegistryError otherwise."""
    row = con.execute("SELECT version, previous FROM aliases WHERE alias = ?", [alias]).fetchone()
    if row is None:
        raise RegistryError(404, f"no alias '{alias}'")
    current, previous = row
    if previous is None:
        raise RegistryError(409, f"alias '{alias}' has nothing to roll back to")
    return current, previous


def record_version(con: duckdb.DuckDBPyConnection, manifest: dict[str, Any], path: Path,
                   status: str) -> None:
    """Add a version row; 409 if the name exists (versions are immutable)."""
    known = con.execute("SELECT status FROM adapter_versions WHERE version = ?",
                        [manifest["version"]]).fetchone()
    if known is not None:
        raise RegistryError(409, f"version {manifest['version']} already exists ({known[0]}); "
                                 "versions are immutable, publish a new one")
    con.execute("INSERT INTO adapter_versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                [manifest["version"], manifest["alias"], manifest.get("parent"), str(path), status,
                 utcnow(), json.dumps(manifest)])


def record_flip(con: duckdb.DuckDBPyConnection, alias: str, version: str, old: str | None,
                used_elsewhere: set[str]) -> None:
    """Point `alias` at `version` (remembering `old` for rollback) and update the statuses."""
    con.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?, ?)", [alias, version, old, utcnow()])
    con.execute("UPDATE adapter_versions SET status = 'promoted' WHERE version = ? "
                "AND version <> 'base'", [version])
    if old and old != version and old != BASE_VERSION and old not in used_elsewhere:
        con.execute("UPDATE adapter_versions SET status = 'retired' WHERE version = ?", [old])


def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise RegistryError(404, f"no adapter folder at {path}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise RegistryError(400, f"{path} has no {MANIFEST}") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(400, f"{path / MANIFEST} is not valid JSON: {exc}") from None
    for key in ("version", "alias", "files", "probe"):
        if key not in manifest:
            raise RegistryError(400, f"{path / MANIFEST} lacks '{key}'")
    if not VERSION_NAME.match(str(manifest["version"])):
        raise RegistryError(400, f"version name '{manifest['version']}' is not <alias>@v<N>")
    if manifest["version"].split("@")[0] != manifest["alias"]:
        raise RegistryError(400, f"version {manifest['version']} does not belong to alias "
                                 f"'{manifest['alias']}'")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    for name, digest in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise RegistryError(422, f"{file} is missing")
        if file_digest(file) != digest:
            raise RegistryError(422, f"{file} does not match its sha256 in the manifest")


def seed_and_read(con: duckdb.DuckDBPyConnection) -> tuple[dict[str, str], dict[str, str]]:
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
