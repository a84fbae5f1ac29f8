"""Optional redaction of personal data before anything is stored.

Emails, phone numbers and payment-card numbers (Luhn-checked, so order numbers survive) are
replaced by typed placeholders. Redaction is applied to what users send and to what the model
answered; where it changes a text, the token ids of that text are dropped too, since they
would still spell out what was removed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from feedback.events import CompletionEvent, Event, FeedbackEvent, FollowupEvent

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# 13-19 digits, optionally grouped by spaces or dashes.
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
# International or national numbers with at least 7 digits, common separators.
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn_ok(digits) else match.group()


def _phone(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[PHONE]" if 7 <= len(digits) <= 15 else match.group()


def redact_text(text: str) -> str:
    text = EMAIL.sub("[EMAIL]", text)
    text = CARD.sub(_card, text)
    return PHONE.sub(_phone, text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    return value


def redact_event(event: Event) -> Event:
    """A copy of the event with personal data replaced; ids and hashes are kept."""
    if isinstance(event, CompletionEvent):
        messages = _redact_value(event.messages)
        text = redact_text(event.response_text) if event.response_text is not None else None
        return dataclasses.replace(
            event,
            messages=messages,
            response_text=text,
            response_message=_redact_value(event.response_message),
            prompt_token_ids=event.prompt_token_ids if messages == event.messages else None,
            token_ids=event.token_ids if text == event.response_text else None,
        )
    if isinstance(event, FollowupEvent):
        return dataclasses.replace(event, text=redact_text(event.text))
    if isinstance(event, FeedbackEvent):
        return dataclasses.replace(
            event,
            text=redact_text(event.text) if event.text is not None else None,
            metadata=_redact_value(event.metadata),
        )
    return event
