"""Tool results in a request's history: found after the assistant's calls, judged failed or not,
and linked by the store to the answer (and call) they answer."""

from __future__ import annotations

import json
from concurrent.futures import wait
from typing import Any

import pytest

from feedback import ToolErrorRules, ToolResultEvent, context_hash, find_tool_results, utcnow
from feedback.config import FeedbackConfig
from tests.harness.factories import completion

RULES = FeedbackConfig().tool_error_rules()
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "weather", "arguments": '{"city_id": "Paris"}'}}


def _turn(*results: dict[str, Any], calls: list[dict[str, Any]] | None = None
          ) -> list[dict[str, Any]]:
    return [*QUESTION, {"role": "assistant", "content": None, "tool_calls": calls or [CALL]},
            *results]


def _tool(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": "call_1",
            "content": content if isinstance(content, str) else json.dumps(content), **extra}


@pytest.mark.parametrize("content", [
    {"error": "unknown city 'Paris'; use the form FR-PAR"},
    {"ok": False, "message": "quota"},
    {"exit_code": 2, "stderr": "no such file"},
    {"status": "failed"},
    {"status_code": 404},
    "Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'city'",
    "Error: unknown city 'Paris'",
    "ValueError: city_id must look like FR-PAR",
    "FAILED tests/test_x.py::test_y - assert 1 == 2",
])
def test_a_result_that_says_it_failed_is_an_error_with_its_text(content):
    [result] = find_tool_results(_turn(_tool(content)), RULES)
    assert result.call_id == "call_1" and result.name == "weather"
    assert result.error == result.content.strip() != ""


@pytest.mark.parametrize("content", [
    {"temperature_c": 14, "city": "FR-PAR"},
    {"error": None, "result": 3},
    {"ok": True},
    {"exit_code": 0, "stdout": "1 passed"},
    {"status": "ok"},
    "14 degrees and cloudy; no error reported.",
    "The errors column is empty.",
])
def test_a_result_that_does_not_say_it_failed_is_not_an_error(content):
    [result] = find_tool_results(_turn(_tool(content)), RULES)
    assert result.error is None


def test_what_the_client_states_decides_over_the_content():
    [failed] = find_tool_results(_turn(_tool("42", is_error=True)), RULES)
    [fine] = find_tool_results(_turn(_tool("Error: none, all good", is_error=False)), RULES)
    [by_metadata] = find_tool_results(_turn(_tool("42", metadata={"is_error": "true"})), RULES)
    assert failed.error == "42" and fine.error is None and by_metadata.error == "42"


def test_text_rules_and_keys_can_be_turned_off():
    text = _turn(_tool("Error: unknown city"))
    keyed = _turn(_tool({"error": "unknown city"}))
    assert find_tool_results(text, ToolErrorRules(keys=("error",), text=False))[0].error is None
    assert find_tool_results(keyed, ToolErrorRules(keys=(), text=True))[0].error is None
    nested = _turn(_tool({"result": {"failure": "timeout"}}))
    assert find_tool_results(nested, ToolErrorRules(keys=("result.failure",)))[0].error


def test_only_tool_messages_that_end_the_request_after_the_calls_are_results():
    answered = [*_turn(_tool({"error": "x"})), {"role": "assistant", "content": "Sorry."},
                {"role": "user", "content": "Try again"}]
    no_calls = [*QUESTION, {"role": "assistant", "content": "hm"}, _tool({"error": "x"})]
    assert find_tool_results(answered, RULES) == []
    assert find_tool_results(no_calls, RULES) == []
    assert find_tool_results([_tool({"error": "x"})], RULES) == []


def test_each_result_is_named_by_its_call_and_hashes_the_conversation_up_to_the_calls():
    second = {"id": "call_2", "type": "function",
              "function": {"name": "clock", "arguments": "{}"}}
    messages = _turn(_tool({"error": "x"}), {"role": "tool", "tool_call_id": "call_2",
                                             "content": "12:00"}, calls=[CALL, second])
    results = find_tool_results(messages, RULES)
    assert [(r.call_id, r.name, r.error is not None) for r in results] == [
        ("call_1", "weather", True), ("call_2", "clock", False)]
    assert {r.context_hash for r in results} == {context_hash(messages[:2])}
    anonymous = find_tool_results(_turn({"role": "tool", "content": "ok"}), RULES)
    assert anonymous[0].call_id is None and anonymous[0].name == "weather"  # by position


def test_a_long_result_is_judged_in_one_pass():
    [result] = find_tool_results(_turn(_tool("a" * 2_000_000 + "\nError: late")), RULES)
    assert result.error is None  # only the head is read; it is stored whole either way


def _result(event_id: str, call_id: str | None, error: str | None, principal: str = "local",
            messages: list[dict[str, Any]] | None = None) -> ToolResultEvent:
    return ToolResultEvent(
        event_id=event_id, created_at=utcnow(), context_hash=context_hash(
            messages or [*QUESTION, {"role": "assistant", "content": ""}]),
        content=error or "14 degrees", next_completion_id=f"next-{event_id}", call_id=call_id,
        name="weather", error=error, principal=principal)


def test_the_store_keeps_an_answers_tool_calls_as_rows(writer):
    wait([writer.submit(completion("c1", QUESTION, text="", principal="local",
                                   response_message={"role": "assistant", "tool_calls": [CALL]}))],
         5)
    rows = writer.cursor().execute(
        "SELECT completion_id, idx, call_id, name, arguments FROM tool_calls").fetchall()
    assert rows == [("c1", 0, "call_1", "weather", '{"city_id": "Paris"}')]


def test_a_failed_result_links_to_its_call_and_becomes_an_env_error_signal(writer):
    made = completion("c1", QUESTION, text="", principal="local",
                      response_message={"role": "assistant", "tool_calls": [CALL]})
    other = completion("c2", [{"role": "user", "content": "other"}], text="", principal="local")
    wait([writer.submit(made), writer.submit(other),
          writer.submit(_result("r1", "call_1", "Error: unknown city 'Paris'")),
          writer.submit(_result("r2", None, None)),  # no call id: by the conversation
          writer.submit(_result("r3", "call_1", "Error: x", principal="mallory")),
          writer.submit(_result("r4", "call_nowhere", "Error: x",
                                messages=[{"role": "user", "content": "?"}]))], 5)
    cur = writer.cursor()
    rows = cur.execute("SELECT id, completion_id, call_id, is_error, matched_by FROM tool_results "
                       "ORDER BY id").fetchall()
    assert rows == [("r1", "c1", "call_1", True, "call_id"), ("r2", "c1", None, False, "context")]
    signals = cur.execute("SELECT id, origin, type, text FROM signals").fetchall()
    assert signals == [("r1", "tool_result", "env_error", "Error: unknown city 'Paris'")]
    [(feedback,)] = cur.execute(
        "SELECT feedback FROM episodes WHERE completion_id = 'c1'").fetchall()
    assert [(f["type"], f["text"]) for f in feedback] == [("env_error",
                                                          "Error: unknown city 'Paris'")]
