from feedback.events import FeedbackEvent, utcnow
from feedback.redaction import redact_event, redact_text
from tests.factories import completion


def test_emails_phones_and_valid_card_numbers_are_replaced():
    text = ("mail jane.doe+x@example.co.uk, call +44 20 7946 0958 or (555) 123-4567, "
            "card 4111 1111 1111 1111")
    assert redact_text(text) == "mail [EMAIL], call [PHONE] or [PHONE], card [CARD]"


def test_ordinary_numbers_survive():
    text = "Order 4111 1111 1111 1112 shipped in 2024; 3 items cost 19.99; version 1.2.3"
    assert redact_text(text) == text


def _completion(messages=({"role": "user", "content": "hi"},), text="ok"):
    return completion("c", list(messages), text=text, prompt_token_ids=[1, 2], token_ids=[3])


def test_token_ids_are_dropped_only_where_text_changed():
    kept = redact_event(_completion())
    assert kept.token_ids == [3] and kept.prompt_token_ids == [1, 2]
    changed = redact_event(_completion(
        messages=[{"role": "user", "content": "I am bob@example.com"}], text="Hi bob@example.com"))
    assert changed.messages[0]["content"] == "I am [EMAIL]"
    assert changed.response_text == "Hi [EMAIL]"
    assert changed.token_ids is None and changed.prompt_token_ids is None


def test_feedback_text_and_metadata_are_redacted():
    ev = FeedbackEvent(event_id="f", completion_id="c", created_at=utcnow(), type="critique",
                       text="write to a@b.io", metadata={"who": ["a@b.io"], "n": 1})
    out = redact_event(ev)
    assert out.text == "write to [EMAIL]" and out.metadata == {"who": ["[EMAIL]"], "n": 1}
