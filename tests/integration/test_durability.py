"""kill -9 of the serving process loses no acknowledged feedback and leaves no engine behind."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.harness.server import Server, start_gateway, start_server, stop_server


def _engine_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p) == pgid]
        if not alive:
            return True
        time.sleep(0.5)
    return False


def _pgid(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


@pytest.mark.slow
def test_acknowledged_feedback_survives_kill_9_of_the_server(server: Server, tmp_path):
    data_dir = tmp_path / "victim"
    # A full server with its own vLLM child, without a compiled engine beside it (a second
    # vLLM start: the kill and what it leaves behind are under test, not how fast it answers).
    victim = start_server(data_dir, env={"SDLOOP_ENGINE__MERGED_ALIAS": ""})
    engine_pgid = victim.state()["engine_pgid"]
    acked: list[str] = []
    try:
        status, _, body = victim.request("POST", "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert status == 200
        completion_id = json.loads(body)["id"]
        stop = threading.Event()

        def send_feedback() -> None:
            i = 0
            while not stop.is_set():
                try:
                    code, _, raw = victim.request("POST", "/v1/feedback", {
                        "completion_id": completion_id, "type": "critique", "text": f"note {i}"})
                except OSError:
                    return  # the server is gone
                if code == 201:
                    acked.append(json.loads(raw)["id"])
                i += 1

        senders = [threading.Thread(target=send_feedback) for _ in range(4)]
        for t in senders:
            t.start()
        deadline = time.monotonic() + 120
        while len(acked) < 200 and time.monotonic() < deadline:
            stop.wait(0.05)
        victim.proc.send_signal(signal.SIGKILL)  # requests are in flight
        victim.proc.wait()
        stop.set()
        for t in senders:
            t.join()
    finally:
        stop_server(victim)

    assert _engine_gone(engine_pgid, timeout=60), "the engine outlived its killed server"

    # Restart on the same data dir (attached to the shared engine: seconds, not minutes).
    restarted = start_gateway(server, data_dir)
    try:
        stored = {r["id"] for r in restarted.sql("SELECT id FROM feedback")}
        assert len(acked) >= 200
        assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged rows lost"
        assert restarted.sql(f"SELECT id FROM completions WHERE id = '{completion_id}'")
    finally:
        stop_server(restarted)
