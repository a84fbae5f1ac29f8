"""The live version of one alias served from a second engine on merged weights.

The primary engine serves the base model and every version as runtime LoRA: a publish or
promote takes effect there within the swap (load, probe, flip), and candidates, probes and
rollback targets stay there. Runtime LoRA costs a large share of the throughput, though, so the
version the alias (`engine.merged_alias`, `default`) points to is also merged into the base
weights (`serving.merge`) and a second engine is started on them beside the first — as replicas
roll: the alias keeps being answered by the primary engine until the merged engine is up and
its probe passes, then its requests go to the merged engine. A rollback or promote sends them
back to the primary engine at once (the flip is the registry's, and the route follows the
version), and the merged engine is stopped once the requests it holds have finished.

Its probe is the version's own: the merged engine's log-probabilities of the manifest's probe
response must be what the trainer measured under the new weights (`serving.probe`, absolute:
the merged engine has no base to difference with, and the check must not depend on the
primary engine's state); it is repeated every time the merged engine (re)starts, and until
it passes nothing is routed there. A merged engine that dies is restarted by its monitor like
the primary one; meanwhile the primary engine serves the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from serving import metrics
from serving.config import EngineConfig
from serving.engine import EngineManager, die_with_parent
from serving.merge import merged_is_complete, prune
from serving.probe import probe_version
from serving.version_folder import PROBE_TOLERANCE, RegistryError, VersionFolder

log = logging.getLogger(__name__)

MERGE_NICENESS = 10  # added to the merge process's nice value: below serving, not starved


class MergedServing:
    """Keeps a merged engine on the version `follow` was last given (or none), and says
    whether a request for a version may go there (`engine_for`)."""

    def __init__(
        self,
        cfg: EngineConfig,
        base_model: str,
        work_dir: Path,
        log_path: Path,
        drain: Callable[[str], Awaitable[None]],
        probe_tolerance: float = PROBE_TOLERANCE,
    ) -> None:
        self.cfg = cfg
        self.alias = cfg.merged_alias
        self.base_model = base_model
        self.work_dir = work_dir
        self.log_path = log_path
        self.probe_tolerance = probe_tolerance
        self._drain = drain
        self._want: VersionFolder | None = None
        self._engine: EngineManager | None = None
        self._serving: VersionFolder | None = None  # what `_engine` was started on
        self._retired: str | None = None  # the version served before: likely rolled back to
        self._probed = False
        self.state = "off"  # off | merging | starting | serving | failed
        self.error = ""
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None

    # -- what the registry and the routes call ---------------------------------------------

    def follow(self, found: VersionFolder | None) -> None:
        """Serve `found` merged from now on (None: stop serving merged). Returns at once; the
        merge and the engine start run in the background."""
        if _name(found) == _name(self._want):
            return
        self._want = found
        self._changed.set()
        if self._task is not None and not self._task.done() and self.state == "merging":
            # A merge of a version no longer wanted: its CPU belongs to the engines serving.
            self._task.cancel()
            self._task = asyncio.create_task(self._reconcile(after=self._task),
                                             name="merged-engine")
        elif self._task is None or self._task.done():
            self._task = asyncio.create_task(self._reconcile(), name="merged-engine")

    def engine_for(self, version: str) -> EngineManager | None:
        """The merged engine if it serves `version` now (up, probe passed), else None."""
        engine = self._engine
        if (engine is not None and self._probed and engine.ready and self._serving is not None
                and self._serving.version == version and self._want is not None
                and self._want.version == version):
            return engine
        return None

    @property
    def pgid(self) -> int | None:
        return self._engine.pgid if self._engine is not None else None

    def status(self) -> dict[str, Any]:
        """What the merged engine does now; `restarting` while a serving one is down (its
        monitor restarts it, and it is probed again before requests return to it)."""
        version = self._want.version if self._want else None
        state = self.state
        if state == "serving" and (version is None or self.engine_for(version) is None):
            state = "restarting"
        return {"alias": self.alias, "version": version, "state": state, "error": self.error}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stop_engine()

    # -- the background task ---------------------------------------------------------------

    async def _reconcile(self, after: asyncio.Task[None] | None = None) -> None:
        """Move the merged engine to `_want`, again whenever it changes (once `after`, a
        cancelled reconcile, has cleaned up: its merge process is gone)."""
        if after is not None:
            await asyncio.wait([after])
        while True:
            self._changed.clear()
            want = self._want
            if self._serving is not None and (want is None or want.version != self._serving.version):
                await self._retire()
                continue
            if want is not None and self._engine is None:
                try:
                    await self._start(want)
                except RegistryError as exc:
                    self._set_state("failed", str(exc))
                    log.error("merged serving of %s: %s; the primary engine serves it",
                              want.version, exc)
            if want is None:
                self._set_state("off", "")
            if not self._changed.is_set():
                await self._changed.wait()

    async def _retire(self) -> None:
        """Stop the merged engine once the requests it holds for its version have finished."""
        assert self._serving is not None
        version = self._serving.version
        self._probed = False  # nothing new is routed here (the route also follows the version)
        await self._drain(version)
        if self._want is not None and self._want.version == version:  # promoted back meanwhile
            if self._engine is not None and self._engine.ready:
                await self._on_ready()  # probed again; one still starting is probed when up
            return
        await self._stop_engine()
        self._retired = version
        log.info("merged engine of %s stopped", version)

    async def _start(self, found: VersionFolder) -> None:
        folder = self.work_dir / found.version
        files = found.manifest["files"]
        if not await asyncio.to_thread(merged_is_complete, folder, found.version, files):
            self._set_state("merging", "")
            await asyncio.to_thread(found.verify_files)
            await self._merge(found, folder)
            if self._want is not found:
                return
        keep = {found.version, self._retired} - {None}
        for gone in await asyncio.to_thread(prune, self.work_dir, keep):
            log.info("removed the merged copy of %s (no alias serves it)", gone)
        self._set_state("starting", "")
        self._serving = found
        self._engine = EngineManager(self.cfg, str(folder), self.log_path, self._on_ready,
                                     role="merged", served_model_name=found.version, lora=False)
        await self._engine.start()
        log.info("merged engine for %s starting (%s)", found.version, folder)

    async def _merge(self, found: VersionFolder, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "serving.merge", self.base_model, str(found.path), str(folder),
            found.version, json.dumps(found.manifest["files"]),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=_background_child,
        )
        try:
            out, _ = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = out.decode(errors="replace").strip().splitlines()[-3:]
            raise RegistryError(500, f"merging {found.version} failed: {' '.join(tail)}")

    async def _on_ready(self) -> None:
        """Each time the merged engine comes up: probe it before any request is routed there."""
        found, engine = self._serving, self._engine
        if found is None or engine is None:
            return
        self._probed = False
        try:
            gap = await probe_version(engine, found, self.probe_tolerance)
        except RegistryError as exc:
            self._give_up(f"merged engine: {exc}")
            return
        self._probed = True
        self._set_state("serving", "")
        log.info("merged engine serves %s (probe mean |Δ logprob| %.4f)", found.version, gap)

    def _give_up(self, reason: str) -> None:
        """A merged engine that fails its probe serves nothing: stopped (from a task of its own,
        as this runs in the engine's monitor), and the primary engine keeps the version until
        another one is promoted."""
        self._set_state("failed", reason)
        log.error("%s; the primary engine serves it", reason)
        self._stopping = asyncio.create_task(self._stop_engine())

    async def _stop_engine(self) -> None:
        engine, self._engine, self._serving, self._probed = self._engine, None, None, False
        if engine is not None:
            await engine.stop()

    def _set_state(self, state: str, error: str) -> None:
        self.state, self.error = state, error
        for name in ("off", "merging", "starting", "serving", "failed"):
            metrics.MERGED_STATE.labels(name).set(1 if name == state else 0)


def _background_child() -> None:  # runs in the merge process between fork and exec
    """The merge is batch work beside engines answering users: it yields the CPU to them
    (on the 2-core machine, under the swap benchmark's load, publishes took 2.8 s beside
    merges at normal priority and 1.8-2.0 s with them niced and superseded ones stopped)."""
    die_with_parent()
    os.nice(MERGE_NICENESS)


def _name(found: VersionFolder | None) -> str | None:
    return found.version if found is not None else None
