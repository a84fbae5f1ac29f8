import pytest
from pydantic import ValidationError

from feedback.validation import FeedbackRequest, describe_validation_error


def test_valid_feedback_becomes_an_event():
    ev = FeedbackRequest.model_validate(
        {"completion_id": "c1", "type": "rating", "score": 1}).to_event()
    assert ev.type == "rating" and ev.score == 1.0 and ev.event_id.startswith("fb-")


@pytest.mark.parametrize(("body", "words"), [
    ({"type": "rating", "score": 1}, "completion_id: field required"),
    ({"completion_id": "c", "type": "rating"}, "needs a numeric 'score'"),
    ({"completion_id": "c", "type": "critique", "text": " "}, "needs a non-empty 'text'"),
    ({"completion_id": "c", "type": "rating", "score": "5"}, "score"),
    ({"completion_id": "c", "type": "vibes", "score": 1}, "type"),
    ({"completion_id": "c", "type": "rating", "score": 1, "extra": 1}, "extra: unknown field"),
])
def test_invalid_feedback_explains_itself(body, words):
    with pytest.raises(ValidationError) as info:
        FeedbackRequest.model_validate(body)
    assert words in describe_validation_error(info.value)


def test_an_idempotency_key_names_one_request_not_any_feedback_sent_with_it():
    rating = FeedbackRequest(completion_id="chatcmpl-1", type="rating", score=1.0)
    retry = FeedbackRequest(completion_id="chatcmpl-1", type="rating", score=1.0)
    other = FeedbackRequest(completion_id="chatcmpl-2", type="rating", score=-1.0)
    assert rating.to_event("k1").event_id == retry.to_event("k1").event_id
    assert rating.to_event("k1").event_id != other.to_event("k1").event_id
    assert rating.to_event("k1").event_id != rating.to_event("k2").event_id
    assert rating.to_event().event_id != retry.to_event().event_id
