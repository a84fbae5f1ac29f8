"""The merged engine follows the alias's version without taking CPU from the engines that
serve users: a merge nobody wants any more is stopped, and merges run below serving."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from serving.config import EngineConfig
from serving.merged import MERGE_NICENESS, MergedServing, _background_child
from serving.version_folder import VersionFolder


def _version(tmp_path: Path, name: str) -> VersionFolder:
    (tmp_path / name).mkdir(exist_ok=True)
    return VersionFolder(tmp_path / name, {"version": name, "alias": "default", "files": {}})


def test_a_merge_superseded_by_a_newer_version_is_stopped_and_the_newer_one_merged(tmp_path):
    async def scenario() -> tuple[list[str], list[str]]:
        merged = MergedServing(EngineConfig(), "base", tmp_path / "merged", tmp_path / "log",
                               drain=lambda _: asyncio.sleep(0))
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
            merged._want = None  # done: leave the engine unstarted (nothing to start here)

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
