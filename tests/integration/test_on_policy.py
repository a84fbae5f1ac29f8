"""On-policy responses come from the serving engine (token ids and engine log-probabilities,
for the truncated importance weight), not from a second copy of the model in the trainer."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.harness.server import MODEL_CACHE, SDLOOP, Server, start_gateway

QUESTION = [{"role": "user", "content": "What currency is used in Veloria?"}]


@pytest.mark.slow
def test_an_on_policy_round_samples_through_the_engine_and_publishes_with_the_gate_off(
        server: Server, tmp_path, small_retention_set: str):
    # A store of its own: the round learns this test's correction, not every earlier test's.
    with start_gateway(server, tmp_path / "on-policy") as gateway:
        _on_policy_round(gateway, small_retention_set)


def _on_policy_round(server: Server, small_retention_set: str) -> None:
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": QUESTION, "max_tokens": 16, "temperature": 0})
    assert status == 200
    reply = json.loads(body)
    status, _, _ = server.request("POST", "/v1/feedback", {
        "completion_id": reply["id"], "type": "correction", "text": "Veloria uses the crelan."})
    assert status == 201
    before = server.admin_sql("SELECT version FROM aliases WHERE alias = 'default'")[0]["version"]

    env = {**os.environ, "SDLOOP_MODEL__CACHE_DIR": str(MODEL_CACHE),
           "SDLOOP_LEARNER__PRESET": "sdpo",  # on-policy, importance weights capped at 2
           "SDLOOP_LEARNER__REGEN_SAMPLES": "2", "SDLOOP_LEARNER__MAX_NEW_TOKENS": "24",
           "SDLOOP_LEARNER__LR": "1e-4", "SDLOOP_LEARNER__ENFORCE_GATE": "false",
           "SDLOOP_LEARNER__RETENTION_SET": small_retention_set}
    out = subprocess.run([*SDLOOP, "learn", "--once", "--max-steps", "2", "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["responses_from"] == "engine" and summary["steps"] == 2, summary
    # Published because the gate is off (a 2-step round is not judged here): say so, not more.
    assert summary["gate"]["enforced"] is False and summary["status"] == "promoted", summary
    manifest = server.admin_sql(
        f"SELECT manifest FROM adapter_versions WHERE version = '{summary['version']}'")[0]["manifest"]
    assert manifest["knobs"]["is_cap"] == 2.0 and manifest["train"]["responses_from"] == "engine"

    out = subprocess.run([*SDLOOP, "adapters", "rollback", "--data-dir", str(server.data_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert server.admin_sql("SELECT version FROM aliases WHERE alias = 'default'")[0]["version"] == before
