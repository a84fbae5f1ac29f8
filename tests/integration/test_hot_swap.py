"""Publish a trained adapter into the running server: probe, flip, serve, roll back; corrupt
versions are rejected and never promoted."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from serving.config import EngineConfig
from serving.engine.manager import EngineManager
from serving.version_folder import MANIFEST, file_digest
from tests.harness.server import (
    QUESSANY,
    SDLOOP,
    Server,
    back_to_base,
    current_version,
    engine_headers,
    engine_model,
    fresh_version,
    metric,
)

QUESTION = QUESSANY


@pytest.fixture()
def on_base(server: Server):
    """The test starts with `default` on the base model and leaves it there."""
    back_to_base(server)
    yield
    back_to_base(server)


def _cli(server: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SDLOOP, "adapters", *args, "--data-dir", str(server.data_dir)],
                          capture_output=True, text=True, timeout=300)


def _chat(server: Server) -> tuple[str, str]:
    status, headers, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": QUESTION, "max_tokens": 16, "temperature": 0})
    assert status == 200, body
    data = json.loads(body)
    return headers["x-sdloop-adapter-version"], data["choices"][0]["message"]["content"]


def test_publish_probe_flip_serve_and_roll_back(server: Server, taught_adapter: str, tmp_path,
                                                on_base):
    version_before, answer_before = _chat(server)
    assert version_before == "base" and "Dalvorne" not in answer_before

    folder = fresh_version(server, taught_adapter, tmp_path)
    name = folder.rsplit("/", 1)[1]
    out = _cli(server, "publish", folder)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["status"] == "promoted"
    again = _cli(server, "publish", folder)  # versions are immutable
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr

    version, answer = _chat(server)
    assert version == name and "Dalvorne" in answer  # served by the new weights
    models = server.request("GET", "/v1/models")[2]
    assert json.loads(models)["data"][0]["version"] == name
    rows = server.admin_sql("SELECT version, status, manifest->>'$.probe.adapter_base_gap' AS gap "
                            f"FROM adapter_versions WHERE version = '{name}'")
    assert rows[0]["status"] == "promoted" and float(rows[0]["gap"]) > 0.1

    started = time.monotonic()
    out = _cli(server, "rollback")
    assert out.returncode == 0, out.stderr
    assert _chat(server)[0] == "base"
    assert time.monotonic() - started < 10  # within seconds, CLI start included

    out = _cli(server, "promote", name)
    assert out.returncode == 0, out.stderr
    assert _chat(server)[0] == name
    assert "sdloop_adapter_swap_seconds_count" in server.request("GET", "/metrics")[2].decode()


def test_corrupt_versions_are_rejected_and_never_promoted(server: Server, taught_adapter: str,
                                                          tmp_path):
    from safetensors.torch import load_file, save_file

    before = current_version(server)
    mismatches = metric(server, "sdloop_adapter_probe_mismatches_total")

    # Weights that do not match the manifest's probe, with honest hashes: caught by the probe.
    noisy = Path(fresh_version(server, taught_adapter, tmp_path / "noisy"))
    weights = noisy / "adapter_model.safetensors"
    tensors = {k: torch.randn_like(v) * 0.05 for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    manifest = json.loads((noisy / MANIFEST).read_text())
    manifest["files"]["adapter_model.safetensors"] = file_digest(weights)
    (noisy / MANIFEST).write_text(json.dumps(manifest))
    out = _cli(server, "publish", str(noisy))
    assert out.returncode == 2 and "probe mismatch" in out.stderr, out.stderr

    # A damaged file: caught by its hash before the engine sees it.
    broken = Path(fresh_version(server, taught_adapter, tmp_path / "broken"))
    with open(broken / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(1000)
    out = _cli(server, "publish", str(broken))
    assert out.returncode == 2 and "sha256" in out.stderr, out.stderr

    names = [noisy.name, broken.name]
    rows = server.admin_sql("SELECT version, status FROM adapter_versions "
                            f"WHERE version IN ('{names[0]}', '{names[1]}') ORDER BY 1")
    assert rows == [{"version": n, "status": "rejected"} for n in sorted(names)]
    assert current_version(server) == before
    assert _chat(server)[0] == before
    out = _cli(server, "promote", names[0])
    assert out.returncode == 2 and "rejected" in out.stderr
    assert metric(server, "sdloop_adapter_probe_mismatches_total") == mismatches + 1


def _engine_post(server: Server, path: str, body: dict) -> dict:
    """Straight to the server's engine, with its API key."""
    req = urllib.request.Request(f"{server.state()['engine_url']}{path}", json.dumps(body).encode(),
                                 headers={"content-type": "application/json",
                                          **engine_headers(server)}, method="POST")
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _engine_chat(server: Server, model: str, max_tokens: int) -> str:
    return _engine_post(server, "/v1/chat/completions", {
        "model": model, "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True})["choices"][0]["message"]["content"]


def _base_model(server: Server) -> str:
    req = urllib.request.Request(f"{server.state()['engine_url']}/v1/models",
                                 headers=engine_headers(server))
    with urllib.request.urlopen(req) as resp:
        return next(m["id"] for m in json.loads(resp.read())["data"] if not m.get("parent"))


def test_base_requests_beside_adapter_requests_get_the_base_model_with_every_lora_slot_taken(
        server: Server, taught_adapter: str, tmp_path, on_base):
    """vLLM-CPU's LoRA ops give tokens without an adapter the adapter in the last LoRA slot;
    the sdloop vLLM plugin (serving.engine.vllm_plugin) mends them. Without it, the base requests here
    answer with the taught adapter's Dalvorne."""
    base = _base_model(server)
    alone = _engine_chat(server, base, 12)
    assert "Dalvorne" not in alone
    # Both LoRA slots (max_loras = 2) hold an adapter: the live version's, and a candidate's,
    # left in its slot after its probe (vLLM does not clear a slot when it unloads an adapter).
    for promote in ([], ["--no-promote"]):
        out = _cli(server, "publish", fresh_version(server, taught_adapter, tmp_path), *promote)
        assert out.returncode == 0, out.stderr
    live = current_version(server)
    assert live != "base"

    with ThreadPoolExecutor(8) as pool:
        on_adapter = [pool.submit(_engine_chat, server, engine_model(server, live), 48)
                      for _ in range(4)]
        time.sleep(1.0)  # they are decoding: the base requests share their engine steps
        beside = [f.result() for f in [pool.submit(_engine_chat, server, base, 12)
                                       for _ in range(4)]]
        shared_steps = not all(f.done() for f in on_adapter)
        adapter_answers = [f.result() for f in on_adapter]
    assert shared_steps, "the base requests did not overlap the adapter's"
    assert all("Dalvorne" in a for a in adapter_answers), adapter_answers
    assert all("Dalvorne" not in a for a in beside), (alone, beside)


def test_probe_scores_are_teacher_forced_in_one_request_while_the_engine_follows_the_response(
        server: Server):
    """`EngineManager.score` reads a greedy generation's scores of the response's tokens while
    the engine chooses them, and scores the positions after it parts one by one: both give what
    one one-token request per position gives (the teacher-forced log-probabilities)."""
    engine_url = server.state()["engine_url"]
    base = _base_model(server)
    prompt = _engine_post(server, "/tokenize", {"model": base, "prompt": "The capital of "
                                                    "France is Paris. The capital of Italy is"})
    prompt = prompt["tokens"]
    greedy = _engine_post(server, "/v1/completions", {
        "model": base, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
        "return_tokens_as_token_ids": True, "logprobs": 0})
    followed = [int(t.split(":")[1]) for t in greedy["choices"][0]["logprobs"]["tokens"]]
    parted = [*followed[:3], 1, *followed[4:]]  # position 3: a token the engine would not choose

    async def scores() -> list[tuple[list[float], list[float], float]]:
        engine = EngineManager(EngineConfig(url=engine_url, api_key=server.state()["engine_api_key"]),
                               None, Path("/dev/null"))
        await engine.start()
        post, posted = engine._post, []  # noqa: SLF001 - counts the requests score makes

        async def counted(path: str, body: dict) -> object:
            posted.append(path)
            return await post(path, body)

        engine._post = counted  # type: ignore[method-assign]  # noqa: SLF001
        try:
            out = []
            for response in (followed, parted):
                posted.clear()
                got = await engine.score(base, prompt, response)
                asked = len(posted)
                one_by_one = [await engine._score_at(base, prompt + response[:i], token)  # noqa: SLF001
                              for i, token in enumerate(response)]
                out.append((got, one_by_one, asked))
            return out
        finally:
            await engine.stop()

    (got, want, asked), (got_parted, want_parted, asked_parted) = asyncio.run(scores())
    assert asked == 1 and asked_parted == 1 + len(parted) - 4
    assert want_parted[3] < -5  # the parted token is an unlikely one
    # What the generation read (every position of the followed response, the parted one up to
    # its parting token) against the one-token requests; after the parting token `score` asks
    # the one-token requests itself, which would be the method checked against itself.
    for read, reference in ((got, want), (got_parted[:4], want_parted[:4])):
        assert all(_close(a, b) for a, b in zip(read, reference, strict=True)), (read, reference)
    # The tolerance tells positions apart: the parted response's scores read one position off,
    # either way, do not pass it.
    read, reference = got_parted[:4], want_parted[:4]
    for shifted, against in ((read[1:], reference[:-1]), (read[:-1], reference[1:])):
        assert not all(_close(a, b) for a, b in zip(shifted, against, strict=True)), read


def _close(decoded: float, prefilled: float) -> bool:
    """A log-probability read in a decode step against the same one from a prefill, in bf16.
    Measured by ops/bench/score_gap.py on the base model (24 prompts, every generated token and
    8 others per step, 16 and 40 tokens: 36,787 pairs, 2 cores): |a - b| at most 0.12 where
    |b| < 1 (p99 0.08), at most 0.63 elsewhere (p99 0.37), growing with the context, not with
    |b| past 1; a score read one position off is 10-11 units away (median)."""
    return abs(decoded - prefilled) < (0.15 if abs(prefilled) < 1 else 0.75)
