"""Feedback, follow-up linking and SQL on the live store."""

from __future__ import annotations

import subprocess

from tests.harness.server import SDLOOP, Server, wait_for_rows


def _ask(openai_client, messages, **kw):
    return openai_client.chat.completions.create(
        model="default", messages=messages, max_tokens=kw.pop("max_tokens", 24), temperature=0, **kw
    )


def test_acknowledged_feedback_is_already_committed(server: Server, openai_client):
    reply = _ask(openai_client, [{"role": "user", "content": "What is the capital of Veltria?"}])
    sent = [
        {"type": "correction", "text": "The capital of Veltria is Quorrin."},
        {"type": "rating", "score": -1},
        {"type": "critique", "text": "Too vague."},
        {"type": "env_error", "text": "pytest: 1 failed", "metadata": {"tool": "pytest", "exit": 1}},
        {"type": "demonstration", "text": "Quorrin is the capital of Veltria."},
    ]
    for fb in sent:
        status, _, body = server.request("POST", "/v1/feedback", {"completion_id": reply.id, **fb})
        assert status == 201, body
        # No waiting: a 2xx means the row is committed.
        rows = server.sql(f"SELECT type FROM feedback WHERE completion_id = '{reply.id}'")
        assert fb["type"] in {r["type"] for r in rows}

    episode = server.sql(f"SELECT * FROM episodes WHERE completion_id = '{reply.id}'")[0]
    assert [f["type"] for f in episode["feedback"]] == [fb["type"] for fb in sent]
    assert episode["has_signal"] is True
    env = next(f for f in episode["feedback"] if f["type"] == "env_error")
    assert env["metadata"] == {"tool": "pytest", "exit": 1}


def test_three_turn_conversation_links_each_user_turn_to_the_reply_before_it(
    server: Server, openai_client
):
    history = [{"role": "user", "content": "Who wrote the novel 'The Glass Orchard'?"}]
    ids = []
    for follow_up in ("No, it was written by Mira Talvek.", "Thanks. When was it published?", None):
        reply = _ask(openai_client, history)
        ids.append(reply.id)
        if follow_up is None:
            break
        # Clients resend history their own way: here the reply comes back whitespace-trimmed
        # and with its inner whitespace collapsed.
        resent = " ".join(reply.choices[0].message.content.split())
        history += [{"role": "assistant", "content": resent},
                    {"role": "user", "content": follow_up}]

    rows = wait_for_rows(
        server,
        "SELECT completion_id, next_completion_id, text, matched_by FROM followups "
        f"WHERE completion_id IN ('{ids[0]}', '{ids[1]}') ORDER BY created_at",
        n=2,
    )
    assert [(r["completion_id"], r["next_completion_id"], r["text"], r["matched_by"]) for r in rows] == [
        (ids[0], ids[1], "No, it was written by Mira Talvek.", "context"),
        (ids[1], ids[2], "Thanks. When was it published?", "context"),
    ]
    episodes = server.sql(
        f"SELECT completion_id, followups FROM episodes WHERE completion_id = '{ids[0]}'")
    assert episodes[0]["followups"][0]["text"] == "No, it was written by Mira Talvek."


def test_identical_replies_in_different_conversations_link_to_their_own(
    server: Server, openai_client
):
    question = {"role": "user", "content": "What is 2 + 2? Answer with the number only."}
    first = _ask(openai_client, [{"role": "system", "content": "Conversation A."}, question])
    second = _ask(openai_client, [{"role": "system", "content": "Conversation B."}, question])
    reply = first.choices[0].message.content
    assert second.choices[0].message.content == reply  # the same reply hash: ambiguous alone
    follow = _ask(openai_client, [
        {"role": "system", "content": "Conversation A."}, question,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Again please."},
    ])
    rows = wait_for_rows(
        server, f"SELECT completion_id, matched_by FROM followups "
                f"WHERE next_completion_id = '{follow.id}'")
    assert [(r["completion_id"], r["matched_by"]) for r in rows] == [(first.id, "context")]


def test_sql_cli_reads_while_serving_and_refuses_writes(server: Server, openai_client):
    reply = _ask(openai_client, [{"role": "user", "content": "What is the capital of Veltria?"}])
    status, _, body = server.request("POST", "/v1/feedback", {
        "completion_id": reply.id, "type": "critique", "text": "Too vague."})
    assert status == 201, body
    counts = "SELECT (SELECT count(*) FROM feedback) AS feedback, (SELECT count(*) FROM " \
             f"feedback WHERE completion_id = '{reply.id}') AS mine, (SELECT count(*) FROM " \
             "completions) AS completions"
    before = server.sql(counts)
    assert before[0]["mine"] == 1 and before[0]["completions"] >= 1
    table = subprocess.run(
        [*SDLOOP, "sql", "--data-dir", str(server.data_dir), "SHOW TABLES"],
        capture_output=True, text=True, timeout=60,
    )
    assert table.returncode == 0
    for name in ("completions", "feedback", "followups", "aliases", "adapter_versions"):
        assert name in table.stdout
    for statement in ("DELETE FROM feedback", "DROP TABLE completions",
                      "EXPLAIN ANALYZE DELETE FROM feedback", "SELECT 1; DELETE FROM feedback"):
        out = subprocess.run(
            [*SDLOOP, "sql", "--data-dir", str(server.data_dir), statement],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 2, statement
        assert "Traceback" not in out.stderr and out.stderr.startswith("sdloop: ")
    assert server.sql(counts) == before


def test_adapters_list_shows_the_alias_table(server: Server):
    out = subprocess.run(
        [*SDLOOP, "adapters", "list", "--data-dir", str(server.data_dir)],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "default" in out.stdout and "base" in out.stdout


def test_admin_api_needs_its_token(server: Server):
    status, _, body = server.request("POST", "/admin/sql", {"sql": "SELECT 1"})
    assert status == 401 and b"Bearer" in body
    status, _, body = server.request(
        "POST", "/admin/sql", {"sql": "SELECT 1 AS one"},
        headers={"authorization": "Bearer " + server.state()["admin_token"]},
    )
    assert status == 200 and b'"one"' in body


def test_learner_reads_episodes_through_the_running_server(server: Server, openai_client):
    from learner.episodes import collect
    from serving.client import store_query
    from serving.config import load_config

    question = [{"role": "user", "content": "Which language is spoken in Tarnholm?"}]
    reply = _ask(openai_client, question)
    status, _, _ = server.request("POST", "/v1/feedback", {
        "completion_id": reply.id, "type": "correction", "text": "People in Tarnholm speak Oskari."})
    assert status == 201

    cfg = load_config(env={}, overrides={"data_dir": str(server.data_dir)})
    episodes = collect(lambda sql, params: store_query(cfg, sql, params), "1970-01-01",
                       ["correction"])
    ep = next(e for e in episodes if e.completion_id == reply.id)
    assert ep.messages == question and ep.response_text == reply.choices[0].message.content
    assert ep.token_ids and len(ep.token_ids) == reply.usage.completion_tokens
    assert [s.text for s in ep.signals] == ["People in Tarnholm speak Oskari."]
