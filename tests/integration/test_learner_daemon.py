"""`sdloop serve` runs the learner daemon beside itself and stops it when it stops."""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.conftest import Server, start_server, stop_server


def test_serve_starts_and_stops_the_learner_daemon(server: Server, tmp_path):
    gw = start_server(tmp_path / "with-learner", learner=True, env={
        "SDLOOP_ENGINE__URL": server.state()["engine_url"], "SDLOOP_LEARNER__INTERVAL_S": "2"})
    log = gw.data_dir / "logs" / "learner.log"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and '"status": "skipped"' not in _read(log):
            time.sleep(1)
        assert '"status": "skipped"' in _read(log), _read(log)[-2000:]  # no feedback yet
        pids = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_learner(p, gw)]
        assert len(pids) == 1
    finally:
        stop_server(gw)
    time.sleep(1)
    assert not [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_learner(p, gw)]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _is_learner(proc: Path, gw: Server) -> bool:
    try:
        cmd = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"learn" in cmd and str(gw.data_dir).encode() in cmd
