"""Events cross process boundaries as JSON (the Kafka path): they come back equal, and anything
that is not a well-formed event is refused with a reason the dead-letter table can keep."""

from __future__ import annotations

import json

import pytest

from feedback import (
    CompletionEvent,
    Event,
    FeedbackEvent,
    FollowupEvent,
    InvalidEvent,
    ReplicaVersionEvent,
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
                        session_id="conv-x"),
        FollowupEvent(event_id=new_id("fu"), created_at=now, context_hash="c", reply_hash="r",
                      text="No.", next_completion_id="chatcmpl-2"),
        FeedbackEvent(event_id=new_id("fb"), completion_id="chatcmpl-1", created_at=now,
                      type="rating", score=1, metadata={"k": [1]}),
        ReplicaVersionEvent(event_id=new_id("rv"), created_at=now, replica="a:8000",
                            version="default@v2", action="publish", status="promoted"),
    ]


@pytest.mark.parametrize("event", _events(), ids=lambda e: e.kind)
def test_every_event_kind_survives_the_wire(event: Event):
    back = Event.from_json(event.to_json())
    assert back == event and type(back) is type(event)


@pytest.mark.parametrize(("raw", "code", "says"), [
    (b"\xff\xfe", "not_json", "not a JSON document"),
    (b"{not json", "not_json", "not a JSON document"),
    (b"[1, 2]", "invalid_event", "expected a JSON object"),
    (b'{"event_id": "x"}', "invalid_event", "unknown event kind None"),
    (b'{"kind": "telemetry"}', "invalid_event", "unknown event kind 'telemetry'"),
    (b'{"kind": "feedback", "event_id": "x"}', "invalid_event", "missing field 'completion_id'"),
])
def test_what_is_not_an_event_is_refused_with_a_reason(raw: bytes, code: str, says: str):
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(raw)
    assert err.value.code == code and says in str(err.value)


@pytest.mark.parametrize(("field", "value", "says"), [
    ("type", "thumbs", "is not one of"),
    ("type", 5, "feedback.type"),
    ("score", "high", "feedback.score"),
    ("score", True, "feedback.score"),
    ("created_at", "yesterday", "feedback.created_at"),
    ("completion_id", None, "must not be null"),
    ("colour", "red", "unknown field(s) colour"),
])
def test_a_field_of_the_wrong_type_is_named(field: str, value: object, says: str):
    data = json.loads(_events()[2].to_json())
    data[field] = value
    with pytest.raises(InvalidEvent) as err:
        Event.from_json(json.dumps(data))
    assert says in str(err.value)


def test_a_conversation_keeps_its_session_key_across_turns():
    opening = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"}]
    later = [*opening, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "No."}]
    other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Colour?"}]
    assert session_key(opening) == session_key(later) != session_key(other)
