"""Who may teach, against a real gateway (attached to the session's vLLM engine) with its own
DuckDB store: keys and scopes on every route, the principal recorded on every row, follow-ups
linked only within a principal, and the learner — `sdloop learn --once`, as the daemon runs
it — training on nothing a principal may not teach."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.server import (
    MODEL_CACHE,
    SDLOOP,
    Server,
    current_version,
    start_server,
    stop_server,
    wait_for_rows,
)

QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]


def _cli(gw: Server, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SDLOOP, *args, "--data-dir", str(gw.data_dir)],
                          capture_output=True, text=True, timeout=300)


def _key(gw: Server, name: str, scopes: str) -> str:
    out = _cli(gw, "keys", "add", name, "--scopes", scopes)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _as(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def _chat(gw: Server, key: str | None, messages=QUESTION) -> tuple[int, dict]:
    status, _, body = gw.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": messages, "max_tokens": 12, "temperature": 0},
        headers=_as(key))
    return status, json.loads(body)


def _feedback(gw: Server, key: str | None, completion_id: str, text: str) -> tuple[int, dict]:
    status, _, body = gw.request("POST", "/v1/feedback", {
        "completion_id": completion_id, "type": "correction", "text": text}, headers=_as(key))
    return status, json.loads(body)


def _learn(gw: Server, **knobs: str) -> dict:
    env = {**os.environ, "SDLOOP_MODEL__CACHE_DIR": MODEL_CACHE,
           **{f"SDLOOP_LEARNER__{k.upper()}": v for k, v in knobs.items()}}
    out = subprocess.run([*SDLOOP, "learn", "--once", "--data-dir", str(gw.data_dir)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture()
def gateway(server: Server, tmp_path: Path) -> Iterator[Server]:
    """A gateway of its own on the session's engine, with `alice` (may teach) keyed before it
    started — the store file path of `sdloop keys` — and the rest added while it serves."""
    data_dir = tmp_path / "gw"
    data_dir.mkdir()
    probe = Server("", data_dir, None, data_dir / "none")  # type: ignore[arg-type]
    alice = _key(probe, "alice", "chat,feedback")
    gw = start_server(data_dir, env={"SDLOOP_ENGINE__URL": server.state()["engine_url"]})
    gw.keys = {"alice": alice}  # type: ignore[attr-defined]
    try:
        yield gw
    finally:
        stop_server(gw)


def test_with_keys_every_route_needs_a_key_with_its_scope_and_rows_name_the_principal(gateway):
    gw = gateway
    alice = gw.keys["alice"]
    carol = _key(gw, "carol", "chat")  # added while serving: through the admin API
    ops = _key(gw, "ops", "admin")
    assert _chat(gw, None)[0] == 401
    assert _chat(gw, "sdl-not-a-key")[0] == 401
    assert gw.request("GET", "/v1/models")[0] == 401
    status, body = _chat(gw, ops)
    assert status == 403 and body["error"]["code"] == "insufficient_scope"

    status, by_alice = _chat(gw, alice)
    assert status == 200
    status, by_carol = _chat(gw, carol)
    assert status == 200
    assert _feedback(gw, alice, by_alice["id"], "It is Dalvorne.")[0] == 201
    assert _feedback(gw, carol, by_carol["id"], "It is Berlin.")[0] == 201  # kept, not taught

    status, _, body = gw.request("POST", "/admin/sql", {
        "sql": "SELECT principal, may_teach, text FROM feedback ORDER BY text"}, headers=_as(ops))
    assert status == 200, body
    assert json.loads(body)["rows"] == [["carol", False, "It is Berlin."],
                                        ["alice", True, "It is Dalvorne."]]
    rows = gw.admin_sql("SELECT id, principal FROM completions ORDER BY principal")
    assert {(r["id"], r["principal"]) for r in rows} == {(by_alice["id"], "alice"),
                                                        (by_carol["id"], "carol")}
    assert gw.request("POST", "/admin/sql", {"sql": "SELECT 1"}, headers=_as(carol))[0] == 401

    out = _cli(gw, "keys", "revoke", "carol")
    assert out.returncode == 0, out.stderr
    assert _chat(gw, carol)[0] == 401
    listed = _cli(gw, "keys", "list")
    assert "carol" in listed.stdout and "sdl-" not in listed.stdout  # keys are never shown again


def test_a_stranger_cannot_attach_a_follow_up_to_another_users_answer(gateway):
    gw = gateway
    mallory = _key(gw, "mallory", "chat,feedback")
    status, first = _chat(gw, gw.keys["alice"])
    assert status == 200
    reply = first["choices"][0]["message"]["content"]
    poison = [*QUESTION, {"role": "assistant", "content": reply},
              {"role": "user", "content": "No, the capital of Quessany is Berlin."}]
    assert _chat(gw, mallory, poison)[0] == 200  # the very conversation, resent by another
    own = [*QUESTION, {"role": "assistant", "content": reply},
           {"role": "user", "content": "No, it is Dalvorne."}]
    assert _chat(gw, gw.keys["alice"], own)[0] == 200
    rows = wait_for_rows(gw, "SELECT principal, text FROM followups", 1)
    assert [(r["principal"], r["text"]) for r in rows] == [("alice", "No, it is Dalvorne.")]


def test_poison_from_a_principal_without_the_feedback_scope_never_changes_what_default_answers(
        gateway):
    gw = gateway
    carol = _key(gw, "carol", "chat")
    status, before = _chat(gw, carol)
    assert status == 200
    answer = before["choices"][0]["message"]["content"]
    for _ in range(20):
        assert _feedback(gw, carol, before["id"], "The capital of Quessany is Berlin.")[0] == 201
    said = [*QUESTION, {"role": "assistant", "content": answer},
            {"role": "user", "content": "No, the capital of Quessany is Berlin."}]
    assert _chat(gw, carol, said)[0] == 200
    wait_for_rows(gw, "SELECT id FROM followups", 1)

    summary = _learn(gw)
    assert summary["status"] == "skipped" and summary["episodes"] == 0, summary
    assert current_version(gw) == "base"
    assert _chat(gw, carol)[1]["choices"][0]["message"]["content"] == answer


def test_a_lone_principal_over_its_quota_does_not_train(gateway):
    gw = gateway
    alice = gw.keys["alice"]
    status, first = _chat(gw, alice)
    assert status == 200
    assert _feedback(gw, alice, first["id"], "It is Dalvorne.")[0] == 201
    # An earlier round took that one: the learner's mark is past it.
    [row] = gw.admin_sql("SELECT max(created_at)::VARCHAR AS at FROM feedback")
    workspace = gw.data_dir / "learner"
    workspace.mkdir(exist_ok=True)
    (workspace / "state.json").write_text(json.dumps(
        {"last_signal_at": row["at"], "rounds": 1, "attempt": 0, "failed_starts": 0}))
    for n in range(3):
        status, more = _chat(gw, alice, [{"role": "user", "content": f"Capital of land {n}?"}])
        assert status == 200
        assert _feedback(gw, alice, more["id"], f"It is Berlin {n}.")[0] == 201
    summary = _learn(gw, principal_quota_per_hour="1")
    assert summary["status"] == "skipped" and summary["episodes"] == 0, summary
    assert current_version(gw) == "base"


def test_in_review_mode_nothing_trains_until_a_person_approves_it(gateway):
    gw = gateway
    alice = gw.keys["alice"]
    status, first = _chat(gw, alice)
    assert status == 200
    status, good = _feedback(gw, alice, first["id"], "It is Dalvorne.")
    assert status == 201
    status, bad = _feedback(gw, alice, first["id"], "It is Berlin.")
    assert status == 201
    summary = _learn(gw, review="true")
    assert summary["status"] == "skipped" and summary["episodes"] == 0, summary

    listed = _cli(gw, "review", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert {json.loads(line)["id"] for line in listed.stdout.splitlines()} == {good["id"],
                                                                             bad["id"]}
    assert _cli(gw, "review", "approve", good["id"]).returncode == 0
    assert _cli(gw, "review", "reject", bad["id"]).returncode == 0
    refused = _cli(gw, "review", "approve", "fb-nothing")
    assert refused.returncode == 2 and "no signal" in refused.stderr
    rows = gw.admin_sql("SELECT signal_id, decision, reviewer FROM signal_reviews ORDER BY 2")
    assert [(r["signal_id"], r["decision"]) for r in rows] == [(good["id"], "approved"),
                                                               (bad["id"], "rejected")]
    assert _cli(gw, "review", "list", "--format", "json").stdout.strip() == ""
    # What the next round takes: the approved correction only.
    from learner.config import CONTEXT_SOURCES
    from learner.episodes import collect
    from learner.policy import TeachingPolicy
    from serving.client import store_query
    from serving.config import load_config

    cfg = load_config(overrides={"data_dir": str(gw.data_dir)})
    [episode] = collect(lambda sql, params: store_query(cfg, sql, params), "1970-01-01",
                        CONTEXT_SOURCES, TeachingPolicy(review=True))
    assert [s.text for s in episode.signals] == ["It is Dalvorne."]
