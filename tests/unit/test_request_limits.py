"""What the gateway refuses or trims on the request path, in-process (the real app and store
writer on a DuckDB file, a stand-in engine): nesting depth, message count, which request fields
are stored, and a store that cannot write. The same requests against the real server are in
tests/integration/test_request_limits.py."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from serving.gateway.chat import OMITTED, STORED_PARAMS, stored_params
from serving.gateway.http import nests_deeper_than
from tests.harness.gateway import CHAT, FEEDBACK, HI, Bus, FakeEngine, Harness, gateway

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    fake = FakeEngine().start()
    yield fake
    fake.stop()


@pytest.fixture()
def gw(tmp_path: Any, engine: FakeEngine) -> Iterator[Harness]:
    with gateway(tmp_path, f"http://127.0.0.1:{engine.port}") as harness:
        yield harness


def _post(h: Harness, route: str, raw: bytes) -> Any:
    return h.client.post(route, content=raw, headers={"content-type": "application/json"})


# -- nesting -----------------------------------------------------------------------------------


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def test_the_depth_check_agrees_with_the_depth_of_the_parsed_value():
    rng = random.Random(5)
    # Strings full of brackets, quotes and backslashes must not count.
    texts = ['a\\"[{', "x\\\\", "}]\"", "\\", "[[[[", '\\\\"[', "\\u005c", "{}"]

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 40 or roll < 0.3:
            return rng.choice([*texts, 1, None, 2.5])
        if roll < 0.65:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(texts) + str(i): value(depth + 1) for i in range(rng.randint(0, 3))}

    for _ in range(2000):
        v = value(0)
        raw = json.dumps(v).encode()
        for limit in (1, 3, 8):
            for budget in (0, 10_000):  # measured on the bytes, and walked
                assert nests_deeper_than(raw, v, limit, budget) == (_depth(v) > limit), raw[:200]


DEEP_LISTS = b"[" * 100_000 + b"]" * 100_000  # past the JSON parser's own recursion limit
DEEP_OBJECTS = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000


@pytest.mark.parametrize(("route", "raw"), [
    (CHAT, DEEP_LISTS),
    (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "x": '
     + DEEP_LISTS + b"}"),
    (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], "x": '
     + b"[" * 65 + b"]" * 65 + b"}"),  # the parser takes it; the limit is 64
    (FEEDBACK, b'{"completion_id": "c", "type": "rating", "score": 1, "metadata": '
     + DEEP_OBJECTS + b"}"),
], ids=["chat-lists", "chat-field", "chat-65", "feedback-objects"])
def test_a_body_nested_deeper_than_the_limit_is_a_400_naming_it(gw: Harness, route, raw,
                                                                  caplog):
    with caplog.at_level(logging.WARNING):
        resp = _post(gw, route, raw)
    assert resp.status_code == 400, resp.text[:300]
    error = resp.json()["error"]
    assert "deeper than 64 levels" in error["message"] and "server.max_json_depth" in \
        error["message"] and error["code"] == "json_too_deep"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback logged


def test_nesting_within_the_limit_and_brackets_inside_strings_are_served(gw: Harness,
                                                                       engine: FakeEngine):
    schema: Any = {"type": "string"}
    for _ in range(25):  # a tool schema 50+ levels deep
        schema = {"type": "object", "properties": {"x": schema}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    resp = gw.chat([{"role": "user", "content": "[{" * 5000}], tools=tools)
    assert resp.status_code == 200, resp.text[:300]
    assert engine.requests[-1]["tools"] == tools


# -- how many messages ---------------------------------------------------------------------------


def test_more_messages_than_the_limit_is_a_422_naming_the_knob(tmp_path, engine: FakeEngine):
    with gateway(tmp_path, f"http://127.0.0.1:{engine.port}",
                 env={"SDLOOP_SERVER__MAX_MESSAGES": "3"}) as h:
        assert h.chat(HI * 3).status_code == 200
        resp = h.chat(HI * 4)
        assert resp.status_code == 422
        error = resp.json()["error"]
        assert "4 messages" in error["message"] and "server.max_messages" in error["message"]
        assert error["param"] == "messages"


def test_the_default_message_limit_is_a_thousand(gw: Harness):
    assert gw.chat(HI * 1000).status_code == 200
    assert gw.chat(HI * 1001).status_code == 422


# -- what is stored of a request -----------------------------------------------------------------


def test_only_known_sampling_parameters_are_stored_and_the_rest_still_reaches_the_engine(
        gw: Harness, engine: FakeEngine):
    junk = "x" * (MIB // 2)  # (the stand-in engine takes up to 1 MiB)
    resp = gw.chat(temperature=0.2, max_tokens=4, user="u1", junk=junk, chat_template="{{x}}")
    assert resp.status_code == 200
    assert engine.requests[-1]["junk"] == junk  # vLLM validates what it is sent
    params, user = gw.rows("SELECT params, end_user FROM completions")[0]
    assert json.loads(params) == {"temperature": 0.2, "max_tokens": 4} and user == "u1"


def test_oversized_parameters_are_stored_as_a_marker_keeping_the_numbers(gw: Harness):
    tools = [{"type": "function", "function": {"name": f"f{i}", "description": "d" * 1000}}
             for i in range(40)]
    assert gw.chat(temperature=0.7, tools=tools, stop=["x" * 100]).status_code == 200
    params = json.loads(gw.rows("SELECT params FROM completions")[0][0])
    assert params["temperature"] == 0.7 and params[OMITTED]["keys"] == ["stop", "tools"]
    assert params[OMITTED]["bytes"] > 40_000


def test_stored_params_measure_only_a_body_over_the_limit():
    body = {"model": "m", "messages": HI, "temperature": 1, "tools": ["t" * 100], "junk": 1}
    assert stored_params(body, 50, 50) == {"temperature": 1, "tools": ["t" * 100]}  # not measured
    assert stored_params(body, 5000, 50) == {"temperature": 1,
                                             OMITTED: {"bytes": 130, "keys": ["tools"]}}
    assert stored_params(body, 5000, 500) == {"temperature": 1, "tools": ["t" * 100]}
    assert "messages" not in STORED_PARAMS and "model" not in STORED_PARAMS


# -- a store that cannot write -------------------------------------------------------------------


def test_a_store_that_cannot_write_answers_feedback_503_and_readyz_503_until_it_can(
        gw: Harness):
    reply = gw.chat().json()
    assert gw.client.get("/readyz").status_code == 200
    gw.store.probe_interval_s = 0.2
    assert gw.rows("SELECT count(*) FROM completions") == [(1,)]  # the writer is idle now
    gw.store._con.close()  # the connection is gone: every write fails until it is reopened
    resp = gw.client.post(FEEDBACK, json={"completion_id": reply["id"], "type": "rating",
                                          "score": 1})
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "store_unavailable" and "retry" in error["message"]
    ready = gw.client.get("/readyz")
    assert ready.status_code == 503
    assert any("cannot write" in reason for reason in ready.json()["reasons"])
    deadline = time.monotonic() + 10  # the writer reopens the store by itself, no traffic needed
    while gw.client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.client.get("/readyz").status_code == 200
    resp = gw.client.post(FEEDBACK, json={"completion_id": reply["id"], "type": "rating",
                                          "score": 1})
    assert resp.status_code == 201


# -- redaction -------------------------------------------------------------------------------------


def test_with_redaction_on_the_gateway_refuses_a_sink_that_does_not_redact(tmp_path,
                                                                          engine: FakeEngine):
    with pytest.raises(ValueError, match="feedback.redact is on"), \
            gateway(tmp_path, f"http://127.0.0.1:{engine.port}",
                    env={"SDLOOP_FEEDBACK__REDACT": "true"}, sink=Bus("ack")):
        pass

