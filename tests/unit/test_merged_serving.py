"""The compiled engines follow the alias without taking CPU from the engines that serve users:
the live version and the one it left stay up (a rollback is a flip), a version a promote waits
for is started beside them, everything else is stopped; a merge nobody wants any more is
stopped, and merges run below serving. vLLM itself is replaced by a stand-in here (the
integration test `tests/integration/test_merged_serving.py` runs the real engines)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import EngineConfig
from serving.engine import merged as merged_module
from serving.engine.merged import MERGE_NICENESS, MergedServing, _background_child, _Slot
from serving.version_folder import VersionFolder


def _version(tmp_path: Path, name: str) -> VersionFolder:
    (tmp_path / name).mkdir(exist_ok=True)
    return VersionFolder(tmp_path / name, {"version": name, "alias": "default", "files": {}})


class _Engine:
    """What MergedServing reads off an engine: up at once, stopped on request."""

    def __init__(self) -> None:
        self.ready, self.pgid, self.stopped = True, 1, False

    async def stop(self) -> None:
        self.ready, self.pgid, self.stopped = False, None, True


def _serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[MergedServing,
                                                                        dict[str, _Engine]]:
    """A MergedServing whose engines are stand-ins that come up (and pass the probe) at once."""
    merged = MergedServing(EngineConfig(), "base-folder", tmp_path / "merged", tmp_path / "log",
                           drain=lambda _: asyncio.sleep(0))
    engines: dict[str, _Engine] = {}

    async def merge(found: VersionFolder, folder: Path) -> None:
        return None

    async def launch(slot: _Slot, folder: Path) -> _Engine:
        engines[slot.version] = engine = _Engine()
        slot.engine = engine  # type: ignore[assignment]
        asyncio.get_running_loop().call_soon(asyncio.ensure_future, merged._on_ready(slot))
        return engine

    async def probe(engine: object, found: VersionFolder, tolerance: float, *, model: str) -> float:
        return 0.0

    merged._merge = merge  # type: ignore[method-assign]
    merged._launch = launch  # type: ignore[method-assign]
    monkeypatch.setattr(merged_module, "merged_is_complete", lambda *a: False)
    monkeypatch.setattr(merged_module, "probe_version", probe)
    return merged, engines


def test_a_promote_waits_for_its_engine_and_the_version_left_stays_warm(tmp_path, monkeypatch):
    v1, v2 = _version(tmp_path, "default@v1"), _version(tmp_path, "default@v2")

    async def scenario() -> None:
        merged, engines = _serving(tmp_path, monkeypatch)
        merged.follow(None)  # the alias on base: the base model's folder, compiled
        await asyncio.sleep(0.05)
        assert merged.engine_for("base") is engines["base"]
        assert merged.status()["state"] == "serving" and merged.status()["version"] == "base"

        assert await merged.prepare(v1)  # up beside base before the alias flips
        assert merged.engine_for("default@v1") is engines["default@v1"]
        assert merged.status()["version"] == "base"  # the alias is the registry's to flip

        merged.follow(v1, [None])  # flipped: base stays warm for a rollback
        await asyncio.sleep(0.05)
        assert not engines["base"].stopped and merged.status()["warm"] == ["base"]
        merged.follow(None, [v1])  # rolled back: nothing starts, nothing stops
        await asyncio.sleep(0.05)
        assert set(engines) == {"base", "default@v1"}
        assert not any(e.stopped for e in engines.values())

        merged.follow(v1, [None])
        assert await merged.prepare(v2)
        merged.follow(v2, [v1])  # base is neither live nor warm now: stopped
        await asyncio.sleep(0.05)
        assert engines["base"].stopped and merged.engine_for("base") is None
        assert not engines["default@v1"].stopped and not engines["default@v2"].stopped
        assert merged.status() == {"alias": "default", "version": "default@v2",
                                   "state": "serving", "error": "", "warm": ["default@v1"]}
        await merged.stop()
        assert all(e.stopped for e in engines.values())

    asyncio.run(scenario())


def test_a_version_whose_merge_fails_is_reported_and_tried_again_when_promoted_again(
        tmp_path, monkeypatch):
    v1 = _version(tmp_path, "default@v1")

    async def scenario() -> None:
        merged, engines = _serving(tmp_path, monkeypatch)
        attempts = []

        async def failing_merge(found: VersionFolder, folder: Path) -> None:
            attempts.append(found.version)
            if len(attempts) == 1:
                raise merged_module.RegistryError(500, "merging default@v1 failed: disk full")

        merged._merge = failing_merge  # type: ignore[method-assign]
        merged.follow(None)
        assert not await merged.prepare(v1)
        assert "disk full" in merged.error_of("default@v1")
        assert merged.engine_for("default@v1") is None
        assert await merged.prepare(v1)  # asked again: merged again, and up
        assert attempts == ["default@v1", "default@v1"] and "default@v1" in engines
        await merged.stop()

    asyncio.run(scenario())


def test_a_merge_superseded_by_a_newer_version_is_stopped_and_the_newer_one_merged(
        tmp_path, monkeypatch):
    async def scenario() -> tuple[list[str], list[str]]:
        merged, _ = _serving(tmp_path, monkeypatch)
        started: list[str] = []
        stopped: list[str] = []
        gate = asyncio.Event()

        async def merge(found: VersionFolder, folder: Path) -> None:
            started.append(found.version)
            try:
                await gate.wait()
            except asyncio.CancelledError:
                stopped.append(found.version)
                raise

        merged._merge = merge  # type: ignore[method-assign]
        merged.follow(_version(tmp_path, "default@v1"))
        await asyncio.sleep(0.05)
        merged.follow(_version(tmp_path, "default@v2"))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.sleep(0.05)
        await merged.stop()
        return started, stopped

    started, stopped = asyncio.run(scenario())
    assert started == ["default@v1", "default@v2"]
    assert stopped == ["default@v1"]


def test_the_merge_process_runs_below_the_serving_priority():
    probe = [sys.executable, "-c", "import os; print(os.nice(0))"]
    mine = int(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    child = int(subprocess.run(probe, capture_output=True, text=True, check=True,
                               preexec_fn=_background_child).stdout)
    if mine >= 19:
        pytest.skip("the suite runs at nice 19: a child cannot be put below it")
    assert child == min(mine + MERGE_NICENESS, 19) and child > mine
