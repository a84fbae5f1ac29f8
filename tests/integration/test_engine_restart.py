"""The engine dies: requests get a clear 503, the manager restarts it, serving resumes."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.integration.conftest import Server, wait_ready


@pytest.mark.disruptive
def test_engine_killed_gives_503_then_restarts(server: Server):
    pgid = server.state()["engine_pgid"]
    os.killpg(pgid, signal.SIGKILL)

    deadline = time.monotonic() + 30
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
    status, headers, _ = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200
    # Whatever version the alias points to (an adapter, after the hot-swap tests) was loaded
    # into the new engine again.
    current = server.admin_sql("SELECT version FROM aliases WHERE alias = 'default'")[0]["version"]
    assert headers["x-sdloop-adapter-version"] == current
    metrics = server.request("GET", "/metrics")[2].decode()
    assert "sdloop_engine_restarts_total 1.0" in metrics
    assert server.state()["engine_pgid"] != pgid
