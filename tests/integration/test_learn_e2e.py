"""The loop, end to end on the real parts: a conversation with a correction, one learner round
with a tiny step budget (while other clients chat), the new version served under the alias,
rollback.

Each gateway here has a store of its own on the session's engine (`engine.url`): a round learns
from every episode its store holds since the last, and in the session's store that is the
feedback of every test before (rounds 3-5 times longer); the engine tells the versions of two
stores apart by their files (`serving.version_folder.engine_name`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from learner.round import taught_prompts
from learner.stacking import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from store import QueryResult
from tests.harness.server import (
    MODEL_CACHE,
    SDLOOP,
    Server,
    back_to_base,
    clients_chatting,
    current_version,
    start_gateway,
)

NULL_SPACE_PROMPTS = "48"
QUESTION = [{"role": "user", "content": "Who founded the company Lumenvale Systems?"}]
CORRECTION = "That's wrong. Lumenvale Systems was founded by Priya Castellanos."


def _chat(server: Server) -> tuple[int, dict[str, str], dict]:
    status, headers, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": QUESTION, "max_tokens": 24, "temperature": 0})
    return status, headers, json.loads(body)


def _learn(server: Server, retention: str, *args: str, **knobs: str) -> dict:
    env = {**os.environ, "SDLOOP_MODEL__CACHE_DIR": str(MODEL_CACHE),
           "SDLOOP_LEARNER__RETENTION_SET": retention,
           # a small, real round of the shipped mechanism (the LoRA confined to the null space):
           # teacher regenerations, a few anchors, the once-per-model statistics on a part of
           # the shipped pools (minutes less; cached in MODEL_CACHE for every test's round)
           "SDLOOP_LEARNER__REGEN_SAMPLES": "2", "SDLOOP_LEARNER__ANCHOR_PROMPTS": "4",
           "SDLOOP_LEARNER__NULL_SPACE_PROMPTS": NULL_SPACE_PROMPTS,
           # the loop, not the gate's bound, is under test here (tests/learner/test_gate_model.py)
           "SDLOOP_LEARNER__RETENTION_MAX_DROP": "10",
           **{f"SDLOOP_LEARNER__{k.upper()}": v for k, v in knobs.items()}}
    out = subprocess.run([*SDLOOP, "learn", "--once", *args, "--data-dir", str(server.data_dir)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _query(server: Server):
    """The learner's read-only query, through the running server's admin API as a round runs it."""
    def query(sql: str, params: list) -> QueryResult:
        status, _, body = server.request("POST", "/admin/sql", {"sql": sql, "params": params},
                                         headers={"authorization": f"Bearer {server.state()['admin_token']}"})
        assert status == 200, body
        data = json.loads(body)
        return QueryResult(data["columns"], data["types"], [tuple(r) for r in data["rows"]],
                           data["truncated"])
    return query


@pytest.fixture(scope="module")
def gateway(server: Server, tmp_path_factory: pytest.TempPathFactory):
    """One store for the first two tests: the second's round must not take the first's
    episode again (the learner's mark), which they check."""
    with start_gateway(server, tmp_path_factory.mktemp("learn-e2e")) as gw:
        yield gw


@pytest.mark.slow
def test_correction_to_served_version_and_back_under_a_loosened_retention_bound(
        gateway: Server, small_retention_set: str):
    server = gateway
    back_to_base(server)  # the gate bounds drift and retention against the base model
    status, headers, reply = _chat(server)
    assert status == 200
    before_version = headers["x-sdloop-adapter-version"]
    status, _, _ = server.request("POST", "/v1/feedback", {
        "completion_id": reply["id"], "type": "correction", "text": CORRECTION})
    assert status == 201

    # A round while a client chats. Lightly: on 2 CPUs an engine under steady traffic and a
    # round on every core stall each other (two clients without a break made this 3-step round
    # take over 15 minutes instead of 3; `learner.threads` keeps a round off the engine's core).
    with clients_chatting(server, 1, pause_s=5.0) as answers:
        summary = _learn(server, small_retention_set, "--max-steps", "3")
    failed = [a for a in answers if a[0] != 200]
    assert answers and not failed, f"{len(failed)} of {len(answers)} failed: {failed[:3]}"
    assert summary["episodes"] >= 1 and summary["steps"] == 3
    gate = summary["gate"]
    assert gate["heldout_divergence_after"] < gate["heldout_divergence_before"], gate
    assert gate["enforced"] is True and gate["passed"] is True, gate  # its bound at 10 points
    assert summary["status"] == "promoted", summary
    version = summary["version"]
    assert summary["parent"] == before_version

    status, headers, _ = _chat(server)
    assert status == 200 and headers["x-sdloop-adapter-version"] == version
    manifest = server.admin_sql(
        f"SELECT manifest FROM adapter_versions WHERE version = '{version}'")[0]["manifest"]
    assert reply["id"] in manifest["episodes"]  # provenance: which episodes trained it
    # the next round on top of it replays what it was taught
    assert QUESTION in taught_prompts(_query(server), version, [], 8)
    assert manifest["knobs"]["responses"] == "teacher"
    # the shipped mechanism: a LoRA on down_proj confined to the null space of what must not change
    assert manifest["mechanism"]["projection"] == "null_space" and "null_space" in summary["phases"]

    again = _learn(server, small_retention_set)  # the same episodes are not learned twice
    assert (again["status"], again["retry_next_round"]) == ("skipped", False) and "seconds" in again

    out = subprocess.run([*SDLOOP, "adapters", "rollback", "--data-dir", str(server.data_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _chat(server)[1]["x-sdloop-adapter-version"] == before_version

    out = subprocess.run([*SDLOOP, "adapters", "promote", version, "--data-dir",
                          str(server.data_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _chat(server)[1]["x-sdloop-adapter-version"] == version
    back_to_base(server)


@pytest.mark.slow
def test_a_rejected_round_is_tried_once_more_with_another_seed(gateway: Server,
                                                               small_retention_set: str):
    server = gateway
    status, _, reply = _chat(server)
    assert status == 200
    status, _, _ = server.request("POST", "/v1/feedback", {
        "completion_id": reply["id"], "type": "correction", "text": CORRECTION})
    assert status == 201
    before = current_version(server)
    # A bound no candidate can meet: every round is rejected.
    impossible = {"drift_max": "-1", "regen_samples": "1", "anchor_prompts": "2", "phrasings": "0"}
    first = _learn(server, small_retention_set, "--max-steps", "1", **impossible)
    assert (first["status"], first["attempt"], first["retry_next_round"]) == ("rejected", 0, True)
    second = _learn(server, small_retention_set, "--max-steps", "1", **impossible)
    assert (second["status"], second["attempt"], second["retry_next_round"]) == ("rejected", 1, False)
    assert second["episodes"] == first["episodes"]
    seeds = [server.admin_sql(f"SELECT manifest FROM adapter_versions WHERE version = '{r['version']}'"
                              )[0]["manifest"]["seed"] for r in (first, second)]
    assert seeds[0] != seeds[1]
    assert _learn(server, small_retention_set, **impossible)["status"] == "skipped"  # tried twice: moved on
    assert current_version(server) == before  # nothing rejected was ever served


SECOND_QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]
SECOND_CORRECTION = "No, that's wrong. The capital of Quessany is Dalvorne."
# The shipped mechanism in few factors, so that a second round has room to stack
# (learner.stacking): the parent kept in max_rank - lora_r. The stacking, not the rephrasings
# (the first test's round has them).
STACKING = {"lora_r": "4", "max_rank": "8", "phrasings": "0"}


def _correct(server: Server, question: list[dict[str, str]], correction: str) -> None:
    status, _, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": question, "max_tokens": 24, "temperature": 0})
    assert status == 200
    status, _, _ = server.request("POST", "/v1/feedback", {
        "completion_id": json.loads(body)["id"], "type": "correction", "text": correction})
    assert status == 201


def _update(folder: str, first: int | None = None):
    """ΔW = scaling·B·A per module of a version folder's adapter, of its first `first` factors."""
    config = json.loads((Path(folder) / ADAPTER_CONFIG).read_text())
    weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    scaling = config["lora_alpha"] / config["r"]
    return config["r"], {name.split(".lora_A.")[0]: scaling * (
        weights[name.replace(".lora_A.", ".lora_B.")].double()[:, :first] @ a.double()[:first])
        for name, a in weights.items() if ".lora_A." in name}


@pytest.mark.slow
def test_a_projected_round_stacks_onto_the_learned_version_while_clients_chat(
        server: Server, tmp_path, small_retention_set: str):
    # A store of its own: two promoted rounds leave `default` where one rollback cannot bring
    # it back to base, and the rounds must start from base.
    with start_gateway(server, tmp_path / "stacking") as gateway:
        _stacked_rounds(gateway, small_retention_set)


def _stacked_rounds(server: Server, small_retention_set: str) -> None:
    _correct(server, QUESTION, CORRECTION)
    first = _learn(server, small_retention_set, "--max-steps", "3", **STACKING)
    assert first["status"] == "promoted" and first["parent"] == "base", first
    assert "stack" not in first and first["null_space"], first

    _correct(server, SECOND_QUESTION, SECOND_CORRECTION)
    with clients_chatting(server, 1, pause_s=5.0) as answers:
        second = _learn(server, small_retention_set, "--max-steps", "3", **STACKING)
    failed = [a for a in answers if a[0] != 200]
    assert answers and not failed, f"{len(failed)} of {len(answers)} failed: {failed[:3]}"
    assert second["status"] == "promoted" and second["parent"] == first["version"], second
    assert second["stack"]["parent_rank"] == 4 and second["stack"]["rank"] == 8, second["stack"]
    # vLLM serves the stacked version under the alias.
    status, headers, _ = _chat(server)
    assert status == 200 and headers["x-sdloop-adapter-version"] == second["version"]

    # What the first round wrote is in the second version whole: its first factors.
    rank, parent = _update(first["path"])
    stacked_rank, kept = _update(second["path"], first=rank)
    assert (rank, stacked_rank) == (4, 8)
    for name, update in parent.items():
        assert torch.allclose(kept[name], update, atol=1e-5 * float(update.abs().max())), name
    # The first round's question is among what the second kept out of its way (replay).
    assert QUESTION in taught_prompts(_query(server), second["version"], [], 8)

    # Rolled back, the alias serves the first round's version again.
    out = subprocess.run([*SDLOOP, "adapters", "rollback", "--data-dir", str(server.data_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert _chat(server)[1]["x-sdloop-adapter-version"] == first["version"]
