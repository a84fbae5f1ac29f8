"""Gateways of two stores can share one engine: version names count per store (each has its
own `default@v1`), so the engine knows an adapter by its version and a digest of its files
(`VersionFolder.engine_name`), and each gateway routes its versions to its own adapters. The
registries and stores are real; a stand-in answers for vLLM, keeping the first folder loaded
under a name as vLLM does (the real engine: tests/integration/test_learn_e2e.py's gateways)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from serving.version_folder import open_version
from serving.versions.registry import AdapterRegistry
from store import StoreWriter
from tests.harness.registry import StandInEngine, write_version


def test_two_stores_on_one_engine_each_serve_their_own_version_of_the_same_name(tmp_path: Path):
    engine = StandInEngine()
    stores = [StoreWriter(tmp_path / f"store-{i}.duckdb").open() for i in (1, 2)]
    folders = [write_version(tmp_path / "one", "default@v1", weights=b"taught one thing"),
               write_version(tmp_path / "two", "default@v1", weights=b"taught another",
                             logprob=-2.5)]
    registries = [AdapterRegistry(s, engine, publish_dirs=[tmp_path]) for s in stores]  # type: ignore[arg-type]

    async def publish() -> list[dict]:
        for registry in registries:
            await registry.load()
        return [await r.publish(f) for r, f in zip(registries, folders, strict=True)]

    try:
        published = asyncio.run(publish())
    finally:
        for store in stores:
            store.close()
    assert [p["status"] for p in published] == ["promoted", "promoted"], published
    routes = [r.route("default@v1")[1] for r in registries]
    assert routes[0] != routes[1]
    assert [engine.folders[name] for name in routes] == folders


def test_the_engine_name_follows_the_files_not_the_folder(tmp_path: Path):
    def named(folder: Path) -> str:
        return open_version(folder).engine_name

    same = write_version(tmp_path / "a", "default@v3", weights=b"w")
    copy = write_version(tmp_path / "b", "default@v3", weights=b"w")
    other = write_version(tmp_path / "c", "default@v3", weights=b"other")
    assert named(same) == named(copy) != named(other)
    assert named(same).startswith("default@v3.")
