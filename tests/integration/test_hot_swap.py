"""Publish a trained adapter into the running server: probe, flip, serve, roll back; corrupt
versions are rejected and never promoted."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import torch

from serving.version_folder import MANIFEST, file_digest
from tests.integration.conftest import SDLOOP, Server, train_version

QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]
CORRECTION = "The capital of Quessany is Dalvorne."


@pytest.fixture(scope="module")
def trained_version(server: Server, tmp_path_factory) -> str:
    return train_version(tmp_path_factory.mktemp("adapters"), "default@v1", QUESTION, CORRECTION)


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SDLOOP, "adapters", *args, "--data-dir", str(server.data_dir)],
                          capture_output=True, text=True, timeout=300)


def _chat(server: Server) -> tuple[str, str]:
    status, headers, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": QUESTION, "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    data = json.loads(body)
    return headers["x-sdloop-adapter-version"], data["choices"][0]["message"]["content"]


def test_publish_probe_flip_serve_and_roll_back(server: Server, trained_version: str):
    version_before, answer_before = _chat(server)
    assert version_before == "base" and "Dalvorne" not in answer_before

    out = _cli(server, "publish", trained_version)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "promoted"
    again = _cli(server, "publish", trained_version)  # versions are immutable
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr

    version, answer = _chat(server)
    assert version == "default@v1" and "Dalvorne" in answer  # served by the new weights
    models = server.request("GET", "/v1/models")[2]
    assert json.loads(models)["data"][0]["version"] == "default@v1"
    rows = server.admin_sql("SELECT version, status, manifest->>'$.probe.adapter_base_gap' AS gap "
                            "FROM adapter_versions WHERE version = 'default@v1'")
    assert rows[0]["status"] == "promoted" and float(rows[0]["gap"]) > 0.1

    started = time.monotonic()
    out = _cli(server, "rollback")
    assert out.returncode == 0, out.stderr
    assert _chat(server)[0] == "base"
    assert time.monotonic() - started < 10  # within seconds, CLI start included

    out = _cli(server, "promote", "default@v1")
    assert out.returncode == 0, out.stderr
    assert _chat(server)[0] == "default@v1"
    assert "sdloop_adapter_swap_seconds_count" in server.request("GET", "/metrics")[2].decode()


def test_corrupt_versions_are_rejected_and_never_promoted(server: Server, trained_version: str,
                                                          tmp_path):
    from safetensors.torch import load_file, save_file

    before = server.admin_sql("SELECT version FROM aliases WHERE alias = 'default'")[0]["version"]

    # Weights that do not match the manifest's probe, with honest hashes: caught by the probe.
    noisy = tmp_path / "default@v2"
    shutil.copytree(trained_version, noisy)
    weights = noisy / "adapter_model.safetensors"
    tensors = {k: torch.randn_like(v) * 0.05 for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    manifest = json.loads((noisy / MANIFEST).read_text())
    manifest["version"] = "default@v2"
    manifest["files"]["adapter_model.safetensors"] = file_digest(weights)
    (noisy / MANIFEST).write_text(json.dumps(manifest))
    out = _cli(server, "publish", str(noisy))
    assert out.returncode == 2 and "probe mismatch" in out.stderr, out.stderr

    # A damaged file: caught by its hash before the engine sees it.
    broken = tmp_path / "default@v3"
    shutil.copytree(trained_version, broken)
    manifest["version"] = "default@v3"
    manifest["files"]["adapter_model.safetensors"] = file_digest(
        broken / "adapter_model.safetensors")
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with open(broken / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    out = _cli(server, "publish", str(broken))
    assert out.returncode == 2 and "sha256" in out.stderr, out.stderr

    rows = server.admin_sql("SELECT version, status FROM adapter_versions "
                            "WHERE version IN ('default@v2', 'default@v3') ORDER BY 1")
    assert rows == [{"version": "default@v2", "status": "rejected"},
                    {"version": "default@v3", "status": "rejected"}]
    assert server.admin_sql("SELECT version FROM aliases WHERE alias = 'default'")[0]["version"] == before
    assert _chat(server)[0] == before
    out = _cli(server, "promote", "default@v2")
    assert out.returncode == 2 and "rejected" in out.stderr
    metrics = server.request("GET", "/metrics")[2].decode()
    assert "sdloop_adapter_probe_mismatches_total 1.0" in metrics
