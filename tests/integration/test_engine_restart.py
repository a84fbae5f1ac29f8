"""The engine dies: new requests get a clear 503, the one it was answering is sent once more to
the restarted engine, the manager restarts it, serving resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.harness.server import (
    SDLOOP,
    Server,
    back_to_base,
    current_version,
    fresh_version,
    metric,
    wait_ready,
)


@pytest.mark.disruptive
@pytest.mark.slow
def test_engine_killed_gives_503_then_restarts(server: Server, taught_adapter: str, tmp_path):
    back_to_base(server)
    folder = fresh_version(server, taught_adapter, tmp_path)  # promoted: to be restored
    out = subprocess.run([*SDLOOP, "adapters", "publish", folder, "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    restarts = metric(server, 'sdloop_engine_restarts_total{role="primary"}')
    pgid = server.state()["engine_pgid"]
    in_flight: list[tuple[int, dict]] = []  # a long answer the kill catches half-way
    caught = threading.Thread(target=lambda: in_flight.append(_long_chat(server)), daemon=True)
    caught.start()
    time.sleep(2)
    os.killpg(pgid, signal.SIGKILL)

    deadline = time.monotonic() + 30
    while server.request("GET", "/readyz")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.1)  # the gateway noticed (else a request could still be sent, and retried)
    while True:
        status, _, body = server.request("POST", "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        if status == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 503
    error = json.loads(body)["error"]
    assert error["type"] == "service_unavailable" and "engine" in error["message"]
    assert server.request("GET", "/readyz")[0] == 503
    assert server.request("GET", "/healthz")[0] == 200  # the gateway itself is alive

    wait_ready(server)
    caught.join(300)  # sent once more to the restarted engine, not dropped
    assert in_flight and in_flight[0][0] == 200, in_flight
    assert in_flight[0][1]["choices"][0]["message"]["content"]
    assert metric(server, "sdloop_requests_retried_after_restart_total") >= 1
    status, headers, _ = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200
    # The promoted adapter was loaded into the new engine again.
    assert headers["x-sdloop-adapter-version"] == current_version(server) == Path(folder).name
    assert metric(server, 'sdloop_engine_restarts_total{role="primary"}') == restarts + 1
    assert server.state()["engine_pgid"] != pgid
    back_to_base(server)


def _long_chat(server: Server) -> tuple[int, dict]:
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]})
    return status, json.loads(body)


@pytest.mark.disruptive
def test_a_version_altered_on_disk_is_not_restored_into_the_restarted_engine(
        server: Server, taught_adapter: str, tmp_path):
    """After a restart the registry checks each served version again (hashes of the manifest
    recorded at publish, load, probe): weights changed on disk since the publish are not loaded;
    the alias goes back to its previous version (here base), recorded as a rollback with the
    reason, and answers keep coming."""
    back_to_base(server)
    folder = Path(fresh_version(server, taught_adapter, tmp_path))
    out = subprocess.run([*SDLOOP, "adapters", "publish", str(folder), "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert current_version(server) == folder.name
    with open(folder / "adapter_model.safetensors", "r+b") as fh:  # still a valid file
        fh.seek(-16, os.SEEK_END)
        fh.write(bytes(16))
    fallbacks = metric(server, 'sdloop_adapter_restore_fallbacks_total{alias="default"}', 0.0)

    os.killpg(server.state()["engine_pgid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.request("GET", "/readyz")[0] != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    wait_ready(server)

    assert current_version(server) == "base"
    status, headers, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200, body
    assert headers["x-sdloop-adapter-version"] == "base"
    row = server.admin_sql(
        "SELECT status, json_extract_string(manifest, '$.rejected_because') AS why "
        f"FROM adapter_versions WHERE version = '{folder.name}'")[0]
    assert row["status"] == "rejected", row
    assert row["why"].startswith("restore after an engine restart") and "sha256" in row["why"]
    assert server.admin_sql("SELECT previous FROM aliases WHERE alias = 'default'"
                            )[0]["previous"] == folder.name  # recorded like a rollback
    assert metric(server, 'sdloop_adapter_restore_fallbacks_total{alias="default"}') \
        == fallbacks + 1
    assert f"alias default rolled back from {folder.name} to base" in server.log_tail(400)
