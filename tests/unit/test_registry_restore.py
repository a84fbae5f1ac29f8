"""A restarted engine gets back only versions that pass the checks a publish makes (hashes of
the recorded manifest, load, probe); an alias on one that fails goes back to its previous version
or to base, recorded and logged, and an engine that cannot take anything keeps the gateway not
ready. The registry and the store are real; a stand-in answers for vLLM (the real engine:
tests/integration/test_engine_restart.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from serving.config import EngineConfig
from serving.engine.manager import EngineManager, EngineUnavailable
from serving.versions.registry import AdapterRegistry
from store import StoreWriter
from tests.harness.registry import StandInEngine, write_version


def _alter(folder: Path) -> None:
    (folder / "adapter_model.safetensors").write_bytes(b"other weights")


@pytest.fixture()
def setup(tmp_path: Path) -> Any:
    store = StoreWriter(tmp_path / "store.duckdb").open()
    engine = StandInEngine()
    registry = AdapterRegistry(store, engine, publish_dirs=[tmp_path])  # type: ignore[arg-type]
    v1, v2 = write_version(tmp_path, "default@v1"), write_version(tmp_path, "default@v2")

    async def publish_both() -> None:
        await registry.load()
        await registry.publish(v1)
        await registry.publish(v2)  # default -> v2, previous v1

    asyncio.run(publish_both())
    engine.folders.clear()  # the engine restarted: nothing in it
    yield registry, engine, store, v1, v2
    store.close()


def _rows(store: StoreWriter, sql: str) -> list[tuple[Any, ...]]:
    return store.call(lambda con: con.execute(sql).fetchall()).result(5)


def test_a_version_that_passes_its_checks_is_restored(setup):
    registry, engine, _, _, _ = setup
    asyncio.run(registry.restore())
    assert registry.resolve("default") == "default@v2" and engine.loaded == {"default@v2"}


def test_an_altered_version_is_not_restored_and_its_alias_goes_back_to_the_previous_one(
        setup, caplog):
    registry, engine, store, _, v2 = setup
    _alter(v2)
    with caplog.at_level(logging.ERROR, logger="serving.versions.registry"):
        asyncio.run(registry.restore())
    assert registry.resolve("default") == "default@v1" and engine.loaded == {"default@v1"}
    assert _rows(store, "SELECT version, previous FROM aliases") == [("default@v1", "default@v2")]
    status, why = _rows(store, "SELECT status, json_extract_string(manifest, '$.rejected_because') "
                               "FROM adapter_versions WHERE version = 'default@v2'")[0]
    assert status == "rejected"
    assert why.startswith("restore after an engine restart") and "sha256" in why
    assert "alias default rolled back from default@v2 to default@v1" in caplog.text


def test_when_the_previous_version_fails_too_the_alias_goes_back_to_base(setup):
    registry, engine, store, v1, v2 = setup
    _alter(v1)
    _alter(v2)
    asyncio.run(registry.restore())
    assert registry.resolve("default") == "base" and engine.loaded == set()
    assert _rows(store, "SELECT version, status FROM adapter_versions WHERE version <> 'base' "
                        "ORDER BY 1") == [("default@v1", "rejected"), ("default@v2", "rejected")]


def test_an_engine_that_goes_away_during_the_restore_changes_nothing_and_raises(setup):
    registry, engine, store, _, _ = setup
    engine.away = True
    with pytest.raises(EngineUnavailable):
        asyncio.run(registry.restore())
    assert registry.resolve("default") == "default@v2"
    assert _rows(store, "SELECT status FROM adapter_versions WHERE version = 'default@v2'") == [
        ("promoted",)]


def test_the_engine_is_not_marked_ready_until_the_restore_succeeds(tmp_path):
    """Ready with its versions missing would answer their aliases with 404s: the engine stays
    not ready (/readyz 503) and the monitor tries again."""
    outcomes = [EngineUnavailable("the engine went away mid-restore"), None]

    async def restore() -> None:
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    async def go() -> None:
        engine = EngineManager(EngineConfig(), "model", tmp_path / "engine.log", restore)
        assert await engine._became_ready() is False  # noqa: SLF001
        assert not engine.ready and "could not be restored" in engine.last_error
        assert await engine._became_ready() is True  # noqa: SLF001
        assert engine.ready

    asyncio.run(go())
