"""A promote to the merged alias flips it only once the version's compiled engine is ready:
the alias answers from the version it is on until then, and a rollback meanwhile is not held
up behind the wait. The registry and the store are real; stand-ins answer for vLLM and for the
compiled engines (the real ones: tests/integration/test_merged_serving.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serving.version_folder import VersionFolder
from serving.versions.registry import AdapterRegistry
from store import StoreWriter
from tests.harness.registry import StandInEngine, write_version


class GatedCompiled:
    """MergedServing's surface, with `prepare` held until the test opens `up`."""

    def __init__(self, alias: str = "default") -> None:
        self.alias = alias
        self.up = asyncio.Event()
        self.prepared: list[str] = []
        self.follows: list[tuple[str, list[str]]] = []
        self.stood_down = 0

    async def prepare(self, found: VersionFolder | None) -> bool:
        self.prepared.append(found.version if found else "base")
        await self.up.wait()
        return True

    def follow(self, live: VersionFolder | None, warm: list = ()) -> None:
        self.follows.append((live.version if live else "base",
                             [w.version if w else "base" for w in warm]))

    def stand_down(self) -> None:
        self.stood_down += 1

    def engine_for(self, version: str) -> None:
        return None

    def error_of(self, version: str) -> str:
        return ""


def test_a_promote_flips_the_alias_once_its_compiled_engine_is_ready(tmp_path: Path):
    store = StoreWriter(tmp_path / "store.duckdb").open()
    engine = StandInEngine()
    registry = AdapterRegistry(store, engine, publish_dirs=[tmp_path])  # type: ignore[arg-type]
    compiled = registry.merged = GatedCompiled()  # type: ignore[assignment]
    v1, v2 = write_version(tmp_path, "default@v1"), write_version(tmp_path, "default@v2")

    async def scenario() -> None:
        await registry.load()
        publishing = asyncio.create_task(registry.publish(v1))
        await asyncio.sleep(0.2)
        assert compiled.prepared == ["default@v1"] and not publishing.done()
        assert registry.resolve("default") == "base"  # still answering from base
        assert "default@v1" in engine.loaded  # loaded and probed on the primary engine
        # Other management calls are not held up behind the wait.
        other = await asyncio.wait_for(registry.publish(v2, promote=False), 2)
        assert other["status"] == "candidate"
        compiled.up.set()
        result = await asyncio.wait_for(publishing, 2)
        assert result["status"] == "promoted" and registry.resolve("default") == "default@v1"
        assert compiled.follows[-1] == ("default@v1", ["base"])  # base kept warm
        rolled = await asyncio.wait_for(registry.rollback("default"), 2)  # a flip, no wait
        assert rolled["version"] == "base" and compiled.prepared == ["default@v1"]
        assert compiled.follows[-1] == ("base", ["default@v1"])
        assert "default@v1" in engine.loaded  # the rollback target stays loaded

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_an_alias_not_published_yet_gets_no_compiled_engine_until_its_first_promote(tmp_path: Path):
    """A replica configured to serve `kafka` compiled starts no engine for it (it would serve
    base under a name nobody can call) until a version of `kafka` is promoted."""
    store = StoreWriter(tmp_path / "store.duckdb").open()
    registry = AdapterRegistry(store, StandInEngine(), publish_dirs=[tmp_path])  # type: ignore[arg-type]
    compiled = registry.merged = GatedCompiled(alias="kafka")  # type: ignore[assignment]
    k1 = write_version(tmp_path, "kafka@v1", alias="kafka")

    async def scenario() -> None:
        await registry.load()
        await registry.restore()  # what the engine's start does
        assert compiled.stood_down == 1 and compiled.follows == []
        compiled.up.set()
        result = await asyncio.wait_for(registry.publish(k1), 2)
        assert result["status"] == "promoted" and compiled.prepared == ["kafka@v1"]
        assert compiled.follows[-1] == ("kafka@v1", ["base"])  # a rollback goes to base

    try:
        asyncio.run(scenario())
    finally:
        store.close()
