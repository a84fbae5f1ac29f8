"""`sdloop serve` runs the learner daemon beside itself and stops it when it stops; a round
killed mid-training costs the daemon nothing, and the next round resumes its work."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from serving.process import free_port
from tests.harness.server import Server, start_gateway, stop_server


def test_serve_starts_and_stops_the_learner_daemon(server: Server, tmp_path):
    gw = start_gateway(server, tmp_path / "with-learner", learner=True, env={
        "SDLOOP_LEARNER__INTERVAL_S": "2", "SDLOOP_LEARNER__METRICS_PORT": "-1"})
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


@pytest.mark.slow
def test_a_killed_round_is_resumed_by_the_next_gate_off_and_the_daemon_lives_on(
        server: Server, tmp_path, small_retention_set: str):
    metrics_port = free_port()
    # A store of its own on the session's engine: its `default@v1` is not the one other
    # tests' stores have there (the engine knows versions by their files).
    gw = start_gateway(server, tmp_path / "killed-round", learner=True, env={
        "SDLOOP_LEARNER__INTERVAL_S": "2",
        "SDLOOP_LEARNER__METRICS_PORT": str(metrics_port), "SDLOOP_LEARNER__PASSES": "12",
        "SDLOOP_LEARNER__CHECKPOINT_EVERY": "4", "SDLOOP_LEARNER__REGEN_SAMPLES": "2",
        # the kill and the resume of the shipped mechanism, not the anchor or the phrasings
        "SDLOOP_LEARNER__ANCHORS_PER_STEP": "1", "SDLOOP_LEARNER__PHRASINGS": "0",
        "SDLOOP_LEARNER__ANCHOR_PROMPTS": "4", "SDLOOP_LEARNER__NULL_SPACE_PROMPTS": "48",
        "SDLOOP_LEARNER__ENFORCE_GATE": "false", "SDLOOP_LEARNER__RETENTION_SET": small_retention_set})
    log = gw.data_dir / "logs" / "learner.log"
    checkpoint = gw.data_dir / "learner" / "checkpoint.pt"
    try:
        question = [{"role": "user", "content": "What is the capital of Quessany?"}]
        status, _, body = gw.request("POST", "/v1/chat/completions", {
            "model": "default", "messages": question, "max_tokens": 16, "temperature": 0})
        assert status == 200
        reply = json.loads(body)["choices"][0]["message"]["content"]
        status, _, _ = gw.request("POST", "/v1/chat/completions", {
            "model": "default", "max_tokens": 8, "messages": question + [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "No, the capital of Quessany is Dalvorne."}]})
        assert status == 200

        _wait(lambda: checkpoint.is_file(), 600, log)
        rounds = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_round(p, gw)]
        assert len(rounds) == 1
        os.kill(int(rounds[0].name), signal.SIGKILL)

        _wait(lambda: "killed by signal 9" in _read(log), 60, log)
        _wait(lambda: '"resumed_at_step"' in _read(log).split("killed by signal 9")[-1], 900, log)
        summary = json.loads(re.findall(r"round: (\{.*\})", _read(log))[-1])
        assert summary["gate"]["enforced"] is False  # "promoted": the round finished, not judged
        assert summary["status"] == "promoted" and summary["resumed_at_step"] >= 4, summary
        assert summary["steps"] > summary["resumed_at_step"]
        assert not checkpoint.exists()  # a finished round leaves no workspace behind

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        assert 'sdloop_learner_rounds_total{status="failed"} 1.0' in scraped
        assert 'sdloop_learner_rounds_total{status="promoted"} 1.0' in scraped
        assert "sdloop_learner_heldout_divergence" in scraped
        assert [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_learner(p, gw)]
    finally:
        stop_server(gw)


def _wait(condition, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out; learner log:\n{_read(log)[-3000:]}")


def _is_round(proc: Path, gw: Server) -> bool:
    try:
        cmd = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--once" in cmd and str(gw.data_dir).encode() in cmd


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
    return b"learn" in cmd and b"--once" not in cmd and str(gw.data_dir).encode() in cmd
