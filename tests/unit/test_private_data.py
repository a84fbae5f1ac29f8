"""The data dir holds every conversation (the store and its WAL), the adapters and the learner's
checkpoints: the commands that write it keep it and what they write readable by their user only
(`serving.commands.private_data`), whatever the umask they were started with."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.commands import private_data
from serving.config import load_config
from store import StoreWriter
from tests.harness.factories import completion


@pytest.fixture()
def shared_umask() -> Iterator[None]:
    """Start as a login shell often does (umask 022: files 0644, folders 0755); the process
    umask is put back afterwards."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_data_dir_and_the_store_and_wal_written_there_are_private(tmp_path, shared_umask):
    cfg = load_config(env={}, overrides={"data_dir": str(tmp_path / "sdloop-data")})
    private_data(cfg)  # what `sdloop serve`, `ingest` and `learn` do first
    store = StoreWriter(cfg.store_path).open()  # the one way the project opens its store
    try:
        store.submit(completion("chatcmpl-private")).result(10)
        wal = cfg.store_path.with_name(cfg.store_path.name + ".wal")
        assert cfg.store_path.is_file() and wal.is_file()
        assert _mode(cfg.data_path) == 0o700
        assert _mode(cfg.store_path) == 0o600 and _mode(wal) == 0o600
        logs = cfg.data_path / "logs"
        logs.mkdir()
        (logs / "engine.log").write_text("written later by the server")
        assert _mode(logs) == 0o700 and _mode(logs / "engine.log") == 0o600
    finally:
        store.close()


def test_an_existing_data_dir_and_store_readable_by_others_are_tightened_and_logged(
        tmp_path, shared_umask, caplog):
    data = tmp_path / "sdloop-data"
    data.mkdir()
    os.chmod(data, 0o755)
    store = StoreWriter(data / "feedback.duckdb").open()  # an earlier run, before this change
    store.close()
    assert _mode(data / "feedback.duckdb") == 0o644
    cfg = load_config(env={}, overrides={"data_dir": str(data)})
    with caplog.at_level(logging.WARNING, logger="serving.state"):
        private_data(cfg)
    assert _mode(data) == 0o700 and _mode(data / "feedback.duckdb") == 0o600
    assert f"{data} was readable by other users (mode 755); made it 700" in caplog.text
