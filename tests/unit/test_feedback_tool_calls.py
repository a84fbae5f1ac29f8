"""Feedback that carries a tool call: checked against the answered request's tools, stored,
and read by the learner as the answer that makes the call."""

from __future__ import annotations

import json
from concurrent.futures import wait

import pytest
from pydantic import ValidationError

from feedback import InvalidToolCall, UnknownCompletion, call_text, offered_tools
from feedback.tool_calls import check_tool_calls
from feedback.validation import FeedbackRequest, describe_validation_error
from learner.config import CONTEXT_SOURCES
from learner.episodes import collect
from learner.responses import same_calls
from tests.harness.factories import completion, feedback
from tests.harness.store import query_of

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}},
           "required": ["city"], "additionalProperties": False}
TOOLS = {"tools": [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]}
# The JSON-mode agent the embedded model needs: the tool is the response_format's schema.
JSON_MODE = {"response_format": {"type": "json_schema", "json_schema": {
    "name": "weather", "schema": WEATHER, "strict": True}}}


def call(name="weather", arguments='{"city": "city:paris"}'):
    return {"id": "call_0", "type": "function", "function": {"name": name, "arguments": arguments}}


def request(**fields):
    return FeedbackRequest.model_validate({"completion_id": "c1", "type": "demonstration",
                                           **fields})


def test_a_demonstration_may_be_a_call_instead_of_text():
    event = request(tool_calls=[call(arguments={"city": "city:paris"})]).to_event()
    assert event.text is None
    assert event.tool_calls == [{"id": "call_0", "type": "function", "function": {
        "name": "weather", "arguments": '{"city": "city:paris"}'}}]


@pytest.mark.parametrize(("fields", "words"), [
    ({"tool_calls": [{"function": {"name": "weather"}}]},
     "tool_calls.0.function.arguments: field required"),
    ({"tool_calls": []}, "tool_calls: List should have at least 1 item"),
    ({"type": "critique", "text": "no", "tool_calls": [call()]},
     "'tool_calls' is for feedback that gives the answer (correction, demonstration)"),
    ({}, "needs a non-empty 'text' or 'tool_calls'"),
])
def test_a_malformed_call_is_refused_naming_its_field(fields, words):
    with pytest.raises(ValidationError) as info:
        request(**fields)
    assert words in describe_validation_error(info.value)


def test_a_request_offers_its_tools_and_its_json_schema():
    assert offered_tools(TOOLS) == {"weather": WEATHER}
    assert offered_tools(JSON_MODE) == {"weather": WEATHER}
    assert offered_tools({"temperature": 0}) == {}


@pytest.mark.parametrize(("calls", "params", "param", "words"), [
    ([call()], {"temperature": 0}, "tool_calls", "offered no tools"),
    ([call(name="forecast")], TOOLS, "tool_calls.0.function.name", "unknown tool 'forecast'"),
    ([call(arguments='{"city": 7}')], TOOLS, "tool_calls.0.function.arguments.city",
     "7 is not of type 'string'"),
    ([call(arguments='{"town": "x"}')], JSON_MODE, "tool_calls.0.function.arguments",
     "'city' is a required property"),
    ([call(), {"function": "weather"}], TOOLS, "tool_calls.1.function", "valid dictionary"),
    ([call(arguments='{"city": ')], TOOLS, "tool_calls.0.function.arguments", "not JSON text"),
    ([call(arguments='["city:paris"]')], TOOLS, "tool_calls.0.function.arguments",
     "arguments are a JSON object, not list"),
    ([call(arguments="[" * 100_000)], TOOLS, "tool_calls.0.function.arguments", "not JSON"),
])
def test_a_call_the_requests_tools_refuse_names_what_is_wrong(calls, params, param, words):
    with pytest.raises(InvalidToolCall) as info:
        check_tool_calls(calls, params)
    assert info.value.param == param and words in str(info.value)


def test_a_clients_regular_expression_is_not_run():
    # (a+)+$ on 40 a's and a b backtracks for hours; a request's schema is a client's.
    params = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "^(a+)+$"}}}}}]}
    check_tool_calls([call("f", json.dumps({"x": "a" * 40 + "b"}))], params)


def test_a_call_is_written_as_the_answer_that_makes_it():
    calls = check_tool_calls([call()], JSON_MODE)
    assert call_text(calls, JSON_MODE) == '{"city": "city:paris"}'
    assert call_text(calls, TOOLS) == '{"name": "weather", "arguments": {"city": "city:paris"}}'
    assert same_calls('<tool_call>\n{"name": "weather", "arguments": {"city": "city:paris"}}'
                      '\n</tool_call>', call_text(calls, TOOLS))
    assert not same_calls('{"city": "Paris"}', call_text(calls, JSON_MODE))


def test_the_store_refuses_a_call_the_answered_request_cannot_make(writer):
    writer.submit(completion("c1", params=JSON_MODE, text='{"city": "Paris"}'))
    futures = [writer.submit(feedback("c1", kind="demonstration",
                                      tool_calls=[call(arguments='{"city": 7}')])),
               writer.submit(feedback("c1", kind="correction", tool_calls=[call()])),
               writer.submit(feedback("nope", kind="correction", tool_calls=[call()]))]
    wait(futures, 5)
    with pytest.raises(InvalidToolCall, match=r"arguments\.city"):
        futures[0].result()
    assert futures[1].result() is None
    with pytest.raises(UnknownCompletion):
        futures[2].result()
    rows = writer.cursor().execute("SELECT type, text, tool_calls FROM feedback").fetchall()
    assert [(t, x, json.loads(c)[0]["function"]["arguments"]) for t, x, c in rows] == [
        ("correction", None, '{"city": "city:paris"}')]


def test_the_learner_reads_a_call_as_the_answer_that_makes_it(writer):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    writer.submit(completion("c1", messages=ask, params=JSON_MODE, text='{"city": "Paris"}'))
    writer.submit(completion("c2", messages=ask, params=JSON_MODE, text='{"city": "Lyon"}'))
    wait([writer.submit(feedback("c1", kind="demonstration", tool_calls=[call()])),
          writer.submit(feedback("c2", kind="correction", text="no, the id is city:paris"))], 5)
    signals = {ep.completion_id: ep.signals for ep in collect(
        query_of(writer), "1970-01-01", ["demonstration", "correction"])}
    assert [(s.source, s.text, s.call) for s in signals["c1"]] == [
        ("demonstration", '{"city": "city:paris"}', True)]
    # A call corrected in words is a correction like any other.
    assert [(s.source, s.text, s.call) for s in signals["c2"]] == [
        ("correction", "The id is city:paris", False)]


def test_a_known_working_call_replaces_the_errors_guesses_in_its_conversation(writer):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    retry = [*ask, {"role": "assistant", "content": '{"city": "Paris"}'},
             {"role": "user", "content": "unknown city"}]
    error = {"kind": "env_error", "text": "unknown city 'Paris'", "metadata": {"tool": "weather"}}
    writer.submit(completion("first", messages=ask, params=JSON_MODE, text='{"city": "Paris"}',
                             session_id="s1"))
    writer.submit(completion("retry", messages=retry, params=JSON_MODE, text='{"city": "FR"}',
                             session_id="s1"))
    writer.submit(completion("other", messages=ask, params=JSON_MODE, text='{"city": "Paris"}',
                             session_id="s2"))
    wait([writer.submit(feedback(c, **error)) for c in ("first", "retry", "other")]
         + [writer.submit(feedback("first", kind="demonstration", tool_calls=[call()]))], 5)
    signals = {ep.completion_id: [(s.source, s.text) for s in ep.signals]
               for ep in collect(query_of(writer), "1970-01-01", CONTEXT_SOURCES)}
    demonstrated = '{"city": "city:paris"}'
    assert signals == {"first": [("demonstration", demonstrated)],
                       "retry": [("sibling_success", demonstrated)],
                       "other": [("env_error", "unknown city 'Paris'")]}
