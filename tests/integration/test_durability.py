"""kill -9 of the serving process loses no acknowledged feedback."""

from __future__ import annotations

import json
import signal
import threading
import time

from tests.integration.conftest import Server, start_server, stop_server


def test_acknowledged_feedback_survives_kill_9_of_the_server(server: Server, tmp_path):
    # A second gateway on its own store, attached to the shared engine: restarts in seconds.
    env = {"SDLOOP_ENGINE__URL": server.state()["engine_url"]}
    gw = start_server(tmp_path / "gw", env=env)
    try:
        status, _, body = gw.request("POST", "/v1/chat/completions", {
            "model": "default", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert status == 200
        completion_id = json.loads(body)["id"]

        acked: list[str] = []
        stop = threading.Event()

        def send_feedback() -> None:
            i = 0
            while not stop.is_set():
                try:
                    code, _, raw = gw.request("POST", "/v1/feedback", {
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
        gw.proc.send_signal(signal.SIGKILL)  # mid-stream: requests are in flight
        gw.proc.wait()
        stop.set()
        for t in senders:
            t.join()
    finally:
        stop_server(gw)

    gw = start_server(tmp_path / "gw", env=env)
    try:
        stored = {r["id"] for r in gw.sql("SELECT id FROM feedback")}
        assert len(acked) >= 200
        assert set(acked) <= stored, f"{len(set(acked) - stored)} acknowledged rows lost"
        assert gw.sql(f"SELECT id FROM completions WHERE id = '{completion_id}'")
    finally:
        stop_server(gw)
