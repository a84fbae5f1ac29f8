"""Aliases, the model versions behind them, and the hot-swap between versions.

Clients name an alias (`default`) in `model`; the registry maps it to the version currently
promoted — `base` (the model without an adapter) until a version is published. The tables
live in the store (`store.versions`), so every stored completion's version can be traced and a
restarted server comes back on the same versions; the registry keeps a copy in memory for the
request path.

Versions are immutable folders (`serving.version_folder`), loaded into the engine under their
own name and never reloaded under another. A swap is: verify hashes → load the new name →
probe it through the engine (the trainer computed the log-probabilities of the probe's
response under the new weights, and the engine must reproduce them, so a match shows it
serves this version) → flip the alias. The version the alias leaves stays loaded as its
rollback target, so that a rollback (and a promote back) is a flip alone; the one before it,
if nothing else points there, is unloaded once its requests have finished.

With `merged` set (`serving.engine.merged`), the version `engine.merged_alias` points to — base
included — is served from an engine of its own on compiled weights, and the version it left
stays up there for a rollback; a promote to that alias flips it once the new version's engine
is up and probed. `route` says which engine and model name a request for a version goes to.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import duckdb

from serving import metrics
from serving.engine.manager import EngineManager, EngineRequestError, EngineUnavailable
from serving.engine.merged import MergedServing
from serving.engine.probe import probe_version
from serving.version_folder import (
    PROBE_TOLERANCE,
    RegistryError,
    VersionFolder,
    confined,
    open_version,
)
from store import BASE_VERSION, DEFAULT_ALIAS, versions

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 120.0
# The setting that lists the folders versions may be published from (named in refusals).
PUBLISH_DIRS_KNOB = "server.publish_dirs (SDLOOP_SERVER__PUBLISH_DIRS)"


class UnknownAlias(LookupError):
    def __init__(self, alias: str, known: list[str]) -> None:
        super().__init__(
            f"The model '{alias}' does not exist. Models served here: {', '.join(sorted(known))}."
        )
        self.alias = alias


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


class Tables(Protocol):
    """Where the registry keeps its tables: the store's writer, or a replica's local copy."""

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Future[Any]: ...


class AdapterRegistry:
    def __init__(self, writer: Tables, engine: EngineManager,
                 probe_tolerance: float = PROBE_TOLERANCE,
                 publish_dirs: Sequence[Path] = ()) -> None:
        """`publish_dirs`: the folders `publish` takes version folders from (`server.
        publish_dirs`); none: every publish is refused."""
        self._writer = writer
        self._engine = engine
        self._aliases: dict[str, str] = {}
        self._paths: dict[str, str] = {}
        # In the primary engine now, probed (or restored) there: version → the name the engine
        # knows it by (`VersionFolder.engine_name`).
        self._loaded: dict[str, str] = {}
        self._previous: dict[str, str] = {}  # alias → its rollback target, kept loaded
        self._pending: Counter[str] = Counter()  # versions a promote is about to flip to
        self._in_flight: Counter[str] = Counter()
        self._swap = asyncio.Lock()
        self.probe_tolerance = probe_tolerance
        self.publish_dirs = list(publish_dirs)
        # Set by the server when the live version is served merged (`engine.merged_alias`).
        self.merged: MergedServing | None = None

    # -- reading ---------------------------------------------------------------------------

    async def load(self) -> None:
        """Make sure `base` and the `default` alias exist, then read the tables."""
        self._aliases, self._paths = await self._store(versions.seed_and_read)
        for alias, version in self._aliases.items():
            metrics.ALIAS_VERSION.labels(alias, version).set(1)

    def resolve(self, alias: str) -> str:
        try:
            return self._aliases[alias]
        except KeyError:
            raise UnknownAlias(alias, list(self._aliases)) from None

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def route(self, version: str) -> tuple[EngineManager, str, str]:
        """Where a request for `version` goes: the engine, the model name it serves the version
        under, and what answers (`merged`, `adapter` or `base` weights). A compiled engine
        (`serving.engine.merged`) where one serves the version, else the primary engine."""
        compiled = self.merged.engine_for(version) if self.merged is not None else None
        if compiled is not None:
            return compiled, version, "base" if version == BASE_VERSION else "merged"
        if version == BASE_VERSION:
            return self._engine, self._engine.served_model_name, "base"
        return self._engine, self._loaded.get(version, version), "adapter"

    async def listing(self) -> dict[str, Any]:
        """The alias and version tables, and (while serving) what the merged engine does."""
        listing = await self._store(versions.list_versions)
        if self.merged is not None:
            listing["merged"] = self.merged.status()
        return listing

    def acquire(self, version: str) -> InFlight:
        """Taken by every request a version answers, so that a swap can wait for them."""
        return InFlight(self._in_flight, version)

    # -- engine (re)start ------------------------------------------------------------------

    async def restore(self) -> None:
        """Load every version an alias points to into a freshly started engine, checked as a
        publish checks it (hashes of the manifest the store recorded, load, probe): its files
        may have changed since, and the new engine may serve it differently.

        A version that fails is not served: each alias on it falls back to its previous version
        (checked the same way) or to `base`, recorded as a rollback with the version marked
        rejected and the reason, and logged as an error. An engine that goes away meanwhile
        (EngineUnavailable) raises: nothing was learned about the versions, and the engine
        manager keeps the gateway not ready and calls this again."""
        async with self._swap:
            self._loaded = {}
            failed: dict[str, str] = {}
            for version in sorted({v for v in self._aliases.values() if v != BASE_VERSION}):
                reason = await self._restore_one(version)
                if reason is not None:
                    failed[version] = reason
            for alias, version in sorted(self._aliases.items()):
                if version in failed:
                    await self._fall_back(alias, version, failed)
            if self.merged is not None:
                await self._follow_merged()

    async def _restore_one(self, version: str) -> str | None:
        """Check and load one stored version into the engine; None, or why it failed."""
        try:
            path, manifest = await self._store(lambda con: versions.stored_version(con, version))
            found = open_version(path, manifest)
            await asyncio.to_thread(found.verify_files)
            await self._load_and_probe(found)
        except RegistryError as exc:
            if exc.status == 503:
                raise EngineUnavailable(f"restoring {version}: {exc}") from None
            return str(exc)
        self._paths[version] = str(found.path)
        log.info("restored adapter %s into the engine (hashes and probe checked)", version)
        return None

    async def _fall_back(self, alias: str, version: str, failed: dict[str, str]) -> None:
        """Point `alias`, on `version` that failed its restore, at its previous version if that
        one may be served (not rejected) and passes the same checks, else at `base`; record it
        as a rollback with `version` rejected, and say why."""
        target = await self._fallback_target(alias, version, failed)
        why = f"restore after an engine restart: {failed[version]}"

        def record(con: duckdb.DuckDBPyConnection) -> None:
            versions.flip_alias(con, alias, target)
            versions.reject_version(con, version, why)  # after the flip, which retires it

        await self._store(record)
        self._aliases[alias] = target
        self._previous[alias] = BASE_VERSION  # nothing else of this alias is in the new engine
        metrics.RESTORE_FALLBACKS.labels(alias).inc()
        metrics.ALIAS_VERSION.labels(alias, version).set(0)
        metrics.ALIAS_VERSION.labels(alias, target).set(1)
        log.error("alias %s rolled back from %s to %s: %s", alias, version, target, why)

    async def _fallback_target(self, alias: str, version: str, failed: dict[str, str]) -> str:
        try:
            _, previous = await self._store(lambda con: versions.rollback_target(con, alias))
        except RegistryError:  # no previous version recorded
            return BASE_VERSION
        if previous in (BASE_VERSION, version) or previous in failed:
            return BASE_VERSION
        if previous in self._loaded:  # restored already: another alias serves it
            return previous
        try:  # refused if rejected (e.g. by an earlier restore) or gone
            await self._store(lambda con: versions.promotable(con, previous))
        except RegistryError as exc:
            log.warning("restore: alias %s does not go back to %s: %s", alias, previous, exc)
            return BASE_VERSION
        reason = await self._restore_one(previous)
        if reason is None:
            return previous
        failed[previous] = reason
        log.error("restore: %s, the version before %s on alias '%s', fails its checks too: %s",
                  previous, version, alias, reason)
        await self._store(lambda con: versions.reject_version(
            con, previous, f"restore after an engine restart: {reason}"))
        return BASE_VERSION

    # -- changing versions -----------------------------------------------------------------

    async def publish(self, folder: str | Path, promote: bool = True) -> dict[str, Any]:
        """Register a version folder, load and probe it, and (by default) make it current."""
        started = time.perf_counter()
        found = open_version(confined(folder, self.publish_dirs, PUBLISH_DIRS_KNOB))
        version, alias = found.version, found.alias
        async with self._swap:
            status = found.status
            await self._store(lambda con: versions.record_version(
                con, found.manifest, str(found.path), status))
            if status == "rejected":  # kept and recorded with its metrics, never loaded
                return found.rejected()
            try:
                hashing = time.perf_counter()
                await asyncio.to_thread(found.verify_files)  # hashing off the event loop
                phases = {"verify_s": round(time.perf_counter() - hashing, 3),
                          **await self._load_and_probe(found)}
            except RegistryError as exc:
                if exc.status == 503:  # the engine was away: nothing was learned about the version
                    await self._store(lambda con: versions.forget_version(con, version))
                    raise
                metrics.SWAP_FAILURES.inc()
                reason = str(exc)
                await self._store(lambda con: versions.reject_version(con, version, reason))
                raise
            self._paths[version] = str(found.path)
            if not promote:
                await self._engine.unload_adapter(self._loaded.pop(version))
                return {"version": version, "alias": alias, "status": "candidate",
                        "phases": phases}
        swap_s = await self._promote_when_ready(alias, found, started)
        return {"version": version, "alias": alias, "status": "promoted", "swap_s": swap_s}

    async def promote(self, version: str) -> dict[str, Any]:
        """Point the version's alias at it (loading it again if it is not loaded)."""
        started = time.perf_counter()
        async with self._swap:
            alias, path, manifest = await self._store(lambda con: versions.promotable(con, version))
            if self._aliases.get(alias) == version:
                return {"version": version, "alias": alias, "status": "promoted", "swap_s": 0.0}
            found = open_version(path, manifest)
            await self._ensure_loaded(found)
        swap_s = await self._promote_when_ready(alias, found, started)
        return {"version": version, "alias": alias, "status": "promoted", "swap_s": swap_s}

    async def _promote_when_ready(self, alias: str, found: VersionFolder, started: float) -> float:
        """Flip `alias` to a version loaded and probed in the primary engine — for the merged
        alias once the compiled engine that will serve it is up and probed (`serving.engine.merged`),
        so that no request meets the version on runtime LoRA. The alias answers from the
        version it is on meanwhile, and other management calls are not held up (the wait is
        outside the swap lock; the version stays loaded in the primary engine through it)."""
        version = found.version
        self._pending[version] += 1
        try:
            if self.merged is not None and alias == self.merged.alias:
                waited = time.perf_counter()
                if await self.merged.prepare(found):
                    log.info("compiled engine of %s ready in %.1f s", version,
                             time.perf_counter() - waited)
                else:
                    log.error("%s could not be served on compiled weights (%s); promoted on the "
                              "primary engine's runtime LoRA", version, self.merged.error_of(version))
            async with self._swap:
                await self._ensure_loaded(found)  # an engine restart meanwhile: load it again
                return await self._flip(alias, version, started)
        finally:
            self._pending[version] -= 1

    async def rollback(self, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        """Flip the alias back to the version it pointed at before."""
        started = time.perf_counter()
        async with self._swap:
            current, previous = await self._store(lambda con: versions.rollback_target(con, alias))
            if previous != BASE_VERSION:
                path, manifest = await self._store(
                    lambda con: versions.stored_version(con, previous))
                await self._ensure_loaded(open_version(path, manifest))
            swap_s = await self._flip(alias, previous, started)
        return {"alias": alias, "version": previous, "rolled_back_from": current, "swap_s": swap_s}

    # -- internals -------------------------------------------------------------------------

    async def _load_and_probe(self, found: VersionFolder) -> dict[str, float]:
        """Load the version into the primary engine and probe it there; the seconds each took."""
        version, name = found.version, found.engine_name
        started = time.perf_counter()
        try:
            await self._engine.load_adapter(name, str(found.path))
        except EngineRequestError as exc:
            raise RegistryError(422, f"the engine refused to load {version}: {exc}") from None
        except EngineUnavailable as exc:
            raise RegistryError(503, str(exc)) from None
        loaded = time.perf_counter()
        try:
            gap = await probe_version(self._engine, found, self.probe_tolerance, model=name)
        except RegistryError as exc:
            await self._unload_quietly(version, name)
            raise RegistryError(exc.status, f"{exc}; not promoted") from None
        phases = {"load_s": round(loaded - started, 3),
                  "probe_s": round(time.perf_counter() - loaded, 3)}
        log.info("probe of %s passed (mean |Δ logprob| %.4f); load %.2f s, probe %.2f s", version,
                 gap, phases["load_s"], phases["probe_s"])
        self._loaded[version] = name
        return phases

    async def _ensure_loaded(self, found: VersionFolder) -> None:
        """Load and probe a version unless the engine has it (live, or a rollback target)."""
        if found.version in self._loaded:
            return
        await asyncio.to_thread(found.verify_files)
        await self._load_and_probe(found)
        self._paths[found.version] = str(found.path)

    async def _flip(self, alias: str, version: str, started: float) -> float:
        """Point `alias` at `version`; returns the swap time (seconds from `started` — the
        management call — to the flip: from then on new requests get the new version). The
        old version is unloaded after that, once its requests have finished."""
        old = await self._store(lambda con: versions.flip_alias(con, alias, version))
        self._aliases[alias] = version
        swap_s = time.perf_counter() - started
        metrics.SWAP_SECONDS.observe(swap_s)
        if old is not None:
            metrics.ALIAS_VERSION.labels(alias, old).set(0)
        metrics.ALIAS_VERSION.labels(alias, version).set(1)
        log.info("alias %s -> %s (was %s)", alias, version, old)
        before, self._previous[alias] = self._previous.get(alias), old or BASE_VERSION
        if self.merged is not None and alias == self.merged.alias:
            await self._follow_merged()
        kept = {*self._aliases.values(), *self._previous.values(), BASE_VERSION,
                *(v for v, n in self._pending.items() if n > 0)}
        for gone in sorted({before, old} - kept - {None}):
            await self.drain(gone)
            await self._unload_quietly(gone)
        return round(swap_s, 3)

    async def _follow_merged(self) -> None:
        """Point the compiled engines at the merged alias's version and, warm beside it, the
        version it left (as the store recorded them)."""
        assert self.merged is not None
        alias = self.merged.alias
        if alias not in self._aliases:
            self.merged.stand_down()
            return
        live = await self._weights(self._aliases[alias])
        previous = self._previous.get(alias)
        warm = [await self._weights(previous)] if previous is not None else []
        self.merged.follow(live, warm)

    async def _weights(self, version: str) -> VersionFolder | None:
        """The folder a compiled engine serves `version` from (None: the base model)."""
        if version == BASE_VERSION:
            return None
        path, manifest = await self._store(lambda con: versions.stored_version(con, version))
        return open_version(path, manifest)

    async def drain(self, version: str) -> None:
        """Wait (bounded) until no request is on `version`."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self._in_flight[version] > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._in_flight[version] > 0:
            log.warning("%d requests still on %s after %.0f s; unloading anyway",
                        self._in_flight[version], version, DRAIN_TIMEOUT_S)

    async def _unload_quietly(self, version: str, name: str | None = None) -> None:
        """Unload `version` (under `name`, or the name it was loaded under) and forget it."""
        name = self._loaded.pop(version, name)
        if name is None:
            return
        try:
            await self._engine.unload_adapter(name)
        except (EngineRequestError, EngineUnavailable) as exc:
            log.warning("unloading %s: %s", version, exc)

    async def _store(self, fn: Any) -> Any:
        return await store_call(self._writer, fn)


async def store_call(tables: Tables, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
    """`fn` on the version tables, in the writer's order; the tables' refusals as RegistryError."""
    try:
        return await asyncio.wrap_future(tables.call(fn))
    except versions.VersionNotFound as exc:
        raise RegistryError(404, str(exc)) from None
    except versions.VersionConflict as exc:
        raise RegistryError(409, str(exc)) from None
