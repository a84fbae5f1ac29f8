"""Events cross process boundaries as JSON (the Kafka path): they come back equal, and anything
that is not a well-formed event is refused with a reason the dead-letter table can keep."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from feedback import (
    CompletionEvent,
    EncodedIds,
    Event,
    FeedbackEvent,
    FollowupEvent,
    InvalidEvent,
    ReplicaVersionEvent,
    ToolResultEvent,
    new_id,
    session_key,
    utcnow,
)


def _events() -> list[Event]:
    now = utcnow()
    return [
        CompletionEvent(event_id=new_id("cmpl"), completion_id="chatcmpl-1", created_at=now,
                        alias="default", version="base", messages=[{"role": "user", "content": "hi"}],
                        params={"temperature": 0}, stream=True, token_ids=[1, 2], latency_ms=3,
                        session_id="conv-x", metadata={"agent": "a"}, user="u1",
                        response_message={"role": "assistant", "tool_calls": [
                            {"id": "call_1", "type": "function",
                             "function": {"name": "f", "arguments": "{}"}}]}),
        FollowupEvent(event_id=new_id("fu"), created_at=now, context_hash="c", reply_hash="r",
                      text="No.", next_completion_id="chatcmpl-2"),
        FeedbackEvent(event_id=new_id("fb"), completion_id="chatcmpl-1", created_at=now,
                      type="rating", score=1, metadata={"k": [1]}),
        ReplicaVersionEvent(event_id=new_id("rv"), created_at=now, replica="a:8000",
                            version="default@v2", action="publish", status="promoted"),
        ToolResultEvent(event_id=new_id("tr"), created_at=now, context_hash="c",
                        content='{"error": "x"}', next_completion_id="chatcmpl-3",
                        call_id="call_1", name="f", error='{"error": "x"}', may_teach=True),
    ]


@pytest.mark.parametrize("event", _events(), ids=lambda e: e.kind)
def test_every_event_kind_survives_the_wire(event: Event):
    back = Event.from_json(event.to_json())
    assert back == event and type(back) is type(event)


def test_token_ids_off_the_wire_stay_json_until_read():
    event = _events()[0]
    back = Event.from_json(event.to_json())
    assert isinstance(back.token_ids, EncodedIds) and back.token_ids.json == "[1,2]"
    assert back.token_ids == [1, 2] and list(back.token_ids) == [1, 2]
    assert Event.from_json(back.to_json()) == event  # and go out again as they came


@pytest.mark.parametrize(("raw", "code", "says"), [
    (b"\xff\xfe", "not_json", "not a JSON document"),
    (b"{not json", "not_json", "not a JSON document"),
    (b"[1, 2]", "invalid_event", "Expected `object`, got `array`"),
    (b'{"event_id": "x"}', "invalid_event", "missing required field `kind`; kind must be one of"),
    (b'{"kind": "telemetry"}', "invalid_event", "Invalid value 'telemetry' - at `$.kind`"),
    (b'{"kind": "feedback", "event_id": "x"}', "invalid_event",
     "missing required field `completion_id`"),
    (b'{"kind": "feedback", "event_id": 5, "text": "cut sh', "invalid_event",
     "Expected `str`, got `int` - at `$.event_id`; and not a JSON document"),
])
def test_what_is_not_an_event_is_refused_with_a_reason(raw: bytes, code: str, says: str):
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(raw)
    assert err.value.code == code and says in str(err.value)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("type", "thumbs", "feedback: Invalid enum value 'thumbs' - at `$.type`; type must be one of"),
    ("type", 5, "feedback: Expected `str`, got `int` - at `$.type`"),
    ("score", "high", "feedback: Expected `float | null`, got `str` - at `$.score`"),
    ("score", True, "got `bool` - at `$.score`"),
    ("created_at", "yesterday", "feedback: Invalid RFC3339 encoded datetime - at `$.created_at`"),
    ("completion_id", None, "got `null` - at `$.completion_id`"),
    ("colour", "red", "unknown field `colour`"),
])
def test_a_field_of_the_wrong_type_is_named(field: str, value: object, says: str):
    data = json.loads(_events()[2].to_json())
    data[field] = value
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(json.dumps(data))
    assert err.value.code == "invalid_event" and says in str(err.value)


@pytest.mark.parametrize("ids", ['["a"]', "[1.5]", '"1,2"', "{}"])
def test_token_ids_must_be_an_array_of_integers(ids: str):
    data = json.loads(_events()[0].to_json())
    data["token_ids"] = json.loads(ids)
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(json.dumps(data))
    assert "completion: Expected an array of integers" in str(err.value)
    assert "`$.token_ids`" in str(err.value)


@pytest.mark.parametrize("raw", [None, b"", ""], ids=["null", "empty-bytes", "empty-text"])
def test_a_record_without_a_value_is_refused_as_empty(raw: bytes | str | None):
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(raw)
    assert err.value.code == "empty_value" and "no value" in str(err.value)


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-01:00"])
def test_a_timestamp_outside_the_years_utc_can_hold_is_refused(stamp: str):
    data = json.loads(_events()[2].to_json())
    data["created_at"] = stamp
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(json.dumps(data))
    assert err.value.code == "invalid_event"
    assert f"feedback: timestamp {stamp} is out of range in UTC" in str(err.value)
    assert "`$.created_at`" in str(err.value)


def test_the_first_and_last_utc_instants_still_decode():
    data = json.loads(_events()[2].to_json())
    for stamp, naive in (("0001-01-01T00:00:00Z", datetime(1, 1, 1)),
                         ("9999-12-31T23:59:59+00:00", datetime(9999, 12, 31, 23, 59, 59))):
        data["created_at"] = stamp
        assert Event.from_json(json.dumps(data)).created_at == naive


@pytest.mark.parametrize("valid_before", [True, False])
def test_json_nested_past_the_decoders_depth_is_refused(valid_before: bool):
    deep = "[" * 100_000 + "]" * 100_000
    head = '{"kind": "feedback", "event_id": "x",' if valid_before else '{"kind": "feedback", "event_id": 5,'
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(f'{head} "metadata": {{"x": {deep}}}}}')
    assert err.value.code == "invalid_event" and "nested too deeply" in str(err.value)


def test_a_value_that_is_not_bytes_or_text_is_refused():
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(12345)  # type: ignore[arg-type]
    assert err.value.code == "not_json" and "cannot decode int" in str(err.value)


def test_timestamps_with_an_offset_are_stored_as_utc():
    data = json.loads(_events()[2].to_json())
    data["created_at"] = "2026-11-28T03:00:00+02:00"
    assert Event.from_json(json.dumps(data)).created_at == datetime(2026, 11, 28, 1, 0)


def test_a_conversation_keeps_its_session_key_across_turns():
    opening = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]
    later = [*opening, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "No."}]
    other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}]
    assert session_key(opening) == session_key(later) != session_key(other)
