"""Chat through the gateway with the official `openai` client; every answer lands in the store."""

from __future__ import annotations

import time

from tests.harness.server import Server, wait_for_rows

QUESTION = "What is the capital of France?"


def test_non_streaming_chat_answers_and_is_stored_within_a_second(server: Server, openai_client):
    raw = openai_client.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16, temperature=0,
    )
    reply = raw.parse()
    assert raw.headers["x-sdloop-adapter-version"] == "base"
    assert reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content.strip()
    answered = time.monotonic()

    query = f"SELECT * FROM completions WHERE id = '{reply.id}'"
    committed = False
    while not committed and time.monotonic() - answered < 1.0:
        committed = bool(server.admin_sql(query))
        time.sleep(0 if committed else 0.05)
    assert committed, "not committed within 1 s of the response"
    rows = server.sql(query)  # and readable through the CLI, as users will
    assert len(rows) == 1
    row = rows[0]
    assert row["alias"] == "default" and row["version"] == "base"
    assert row["response_text"] == reply.choices[0].message.content
    assert row["status"] == "ok" and row["stream"] is False
    assert row["params"]["max_tokens"] == 16 and row["params"]["temperature"] == 0
    assert row["messages"] == [{"role": "user", "content": QUESTION}]
    assert len(row["token_ids"]) == reply.usage.completion_tokens == row["completion_tokens"]
    assert len(row["prompt_token_ids"]) == reply.usage.prompt_tokens
    assert row["latency_ms"] > 0


def test_streaming_chat_relays_chunks_and_stores_the_whole_answer(server: Server, openai_client):
    stream = openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=24, temperature=0, stream=True,
    )
    ids, text, finish = set(), [], None
    for chunk in stream:
        ids.add(chunk.id)
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len(ids) == 1 and finish is not None
    completion_id = ids.pop()

    rows = wait_for_rows(server, f"SELECT * FROM completions WHERE id = '{completion_id}'")
    assert len(rows) == 1
    row = rows[0]
    assert row["stream"] is True and row["status"] == "ok"
    assert row["response_text"] == "".join(text)
    assert row["finish_reason"] == finish
    assert row["token_ids"] and row["completion_tokens"] == len(row["token_ids"])
    assert row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["latency_ms"]


def test_models_lists_aliases_with_their_versions(server: Server, openai_client):
    models = openai_client.models.list()
    aliases = server.admin_sql("SELECT alias, version FROM aliases ORDER BY alias")
    assert [(m.id, m.model_extra["version"]) for m in models.data] == [
        (a["alias"], a["version"]) for a in aliases]
    assert "default" in {m.id for m in models.data}


def test_sampling_errors_from_the_engine_pass_through_as_openai_errors(server: Server):
    status, headers, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": [{"role": "user", "content": "hi"}], "temperature": -3,
    })
    assert status == 400
    assert b'"error"' in body and b"Traceback" not in body


def test_metrics_expose_gateway_store_and_engine_series(server: Server, openai_client):
    openai_client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    status, _, body = server.request("GET", "/metrics")
    text = body.decode()
    assert status == 200
    for series in (
        'sdloop_http_requests_total{route="/v1/chat/completions",status="200"}',
        "sdloop_http_request_seconds_bucket",
        "sdloop_time_to_first_token_seconds_bucket",
        'sdloop_tokens_total{alias="default",direction="out"}',
        "sdloop_store_write_batch_size_bucket",
        "sdloop_store_commit_seconds_bucket",
        "sdloop_store_queue_depth",
        'sdloop_alias_version{alias="default",version="base"} 1.0',
        'sdloop_engine_up{role="primary"} 1.0',
    ):
        assert series in text, series


def test_health_and_readiness(server: Server):
    assert server.request("GET", "/healthz")[0] == 200
    status, _, body = server.request("GET", "/readyz")
    assert status == 200 and b"ready" in body


def test_client_hanging_up_mid_stream_is_recorded_as_such(server: Server):
    import http.client
    import json

    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": "default", "stream": True, "max_tokens": 200, "ignore_eos": True,
        "messages": [{"role": "user", "content": "Tell me a long story."}]}),
        headers={"content-type": "application/json"})
    resp = conn.getresponse()
    first = b""
    while b"\n\n" not in first:
        first += resp.read1(4096)
    completion_id = json.loads(first.split(b"\n", 1)[0][len(b"data: "):])["id"]
    conn.sock.close()  # hang up after the first event
    conn.close()

    rows = wait_for_rows(
        server, f"SELECT status, completion_tokens FROM completions WHERE id = '{completion_id}'",
        timeout=30)
    assert rows and rows[0]["status"] == "client_disconnected"
    assert rows[0]["completion_tokens"] is None or rows[0]["completion_tokens"] < 200
