"""Optional redaction of personal data before anything is stored.

Emails, phone numbers and payment-card numbers (Luhn-checked, so order numbers survive) are
replaced by typed placeholders. Redaction is applied to what users send (messages, sampling
parameters, feedback) and to what the model answered; where it changes a text, the token ids of
that text are dropped too, since they would still spell out what was removed.

Where it runs: in the sink, off the event loop, before anything is written or produced — the
store writer's thread redacts an event just before it writes it (`store.StoreWriter`), the
Kafka sink's encoder thread before it serializes and produces it (`feedback.kafka.KafkaSink`).
The gateway only hands events over. So a large text costs the request path nothing, nothing
unredacted reaches the DuckDB file or the topic (the unredacted event lives only in the sink's
bounded in-memory queue), and the order of events is kept: each sink redacts in the one thread
that already takes its events in order.

Time is linear in the text's length, whatever the text: every pattern starts only where a match
can start (a lookbehind, or after the previous address), runs of characters are read whole
(possessive quantifiers), and what is left to backtrack is bounded (at most a few ways per
start), so no backtracking grows with the input (the earlier e-mail pattern retried every
position of a long run of address characters: 100k of them took 10 s).
Python's `re` holds the GIL for a whole call, so a long text is also cut, at characters no match
can contain, into pieces of about `_PIECE_CHARS` (`redact_text`): the event loop gets the GIL
back between pieces instead of waiting for one call over megabytes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from feedback.events import (
    CompletionEvent,
    Event,
    FeedbackEvent,
    FollowupEvent,
    ToolResultEvent,
)

# Characters of an address's local part (before the "@"); the domain's are a subset of them.
_LOCAL = "A-Za-z0-9._%+-"
_ADDRESS_REST = rf"[{_LOCAL}]*+@[A-Za-z0-9.-]+\.[A-Za-z]{{2,}}"
# An address starts where a run of address characters starts (the lookbehind, checked after
# the first character so that `re` can skip to candidates by that character): a run with no
# "@" is read once, not once per position. Its domain is the run after the "@", which ends at
# the next "@", so each domain is read once too.
EMAIL = re.compile(rf"[{_LOCAL}](?<![{_LOCAL}].){_ADDRESS_REST}")
# An address that goes on right where the previous one ended (`a@b.com.c@d.org`: the first
# ends before ".c"): the one place where a match starts inside a run (`_replace_emails`).
_EMAIL_HERE = re.compile(rf"[{_LOCAL}]{_ADDRESS_REST}")
# 13-19 digits, optionally grouped by spaces or dashes. Linear as it is: a digit and an optional
# separator parse a string one way only, so a start is retried at most 7 times (12-18 groups),
# and starts are only digits that follow no digit.
CARD = re.compile(r"\d(?<!\d\d)(?:[ -]?\d){12,18}(?!\d)")
# International or national numbers: an optional country code (+1 to +999) and area code in
# parentheses, then runs of 2 or more digits with one separator between them; `_phone` decides
# which of them are numbers. Every digit run is read whole (possessive): the earlier pattern's
# `\d{2,4}(?:[ .-]?\d{2,4}){2,4}` split each run into groups in all the ways it could, at
# every start. The first character decides which prefix applies; `main` is where the runs begin.
PHONE = re.compile(
    r"[+(\d](?<![\w+].)"
    r"(?:(?<=\+)\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?(?P<main>\d{2,}+)"
    r"|(?<=\()\d{1,4}\)[ .-]?(?P<main_>\d{2,}+)"
    r"|(?<=\d)\d++)"
    r"(?:[ .-]\d{2,}+)*(?!\w)")
_DIGITS = re.compile(r"\d+")
# A number has 7-15 digits; in a longer series of digit runs, a number is at most 5 groups of
# up to 4 digits (a run of 5-8 digits is 2 groups), as the earlier pattern read them.
_PHONE_DIGITS = (7, 15)
_PHONE_GROUPS = 5
# Characters no match contains and no lookaround needs to see past: a text cut after one of
# them is redacted piece by piece exactly as it is whole.
_CUT = re.compile(r"[^\w.%+@() -]")
_PIECE_CHARS = 64 * 1024


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
    """A series of digit runs: one number if it has 7-15 digits; a longer series is read as
    numbers of up to `_PHONE_GROUPS` groups each, from its start (a list of numbers, or a card
    or id number that is none), and each is replaced if it has 7-15 digits."""
    text = match.group()
    main = max(match.start("main"), match.start("main_"), match.start()) - match.start()
    low, high = _PHONE_DIGITS
    # Digits, separators, and "+()" of the prefix: all that is not one of those is a digit.
    total = len(text) - sum(text.count(ch) for ch in " .-+()")
    if total <= high:
        return "[PHONE]" if total >= low else text
    lead = sum(ch.isdigit() for ch in text[:main])  # the country and area codes
    sizes = [len(run) for run in _DIGITS.findall(text, main)]  # one separator between runs
    pieces, done, i, at, n = [], 0, 0, main, len(sizes)  # `at`: where run i starts
    while i < n:
        groups, digits, j, end = 0, lead if i == 0 else 0, i, at
        while j < n:
            groups += (sizes[j] + 3) // 4
            if groups > _PHONE_GROUPS:
                break
            digits += sizes[j]
            end += sizes[j] + 1
            j += 1
        if j == i:  # one run of more than 20 digits: no number
            j, digits, end = i + 1, high + 1, at + sizes[i] + 1
        start, end = (0 if i == 0 else at), end - 1
        pieces += (text[done:start], "[PHONE]" if low <= digits <= high else text[start:end])
        done, i, at = end, j, end + 1
    pieces.append(text[done:])
    return "".join(pieces)


def _replace_emails(text: str) -> str:
    """`EMAIL` replaced, plus an address that starts right where the previous one ended: what
    `[A-Za-z0-9._%+-]+@…` replaced (it tried every position), in time linear in the text."""
    if "@" not in text:
        return text
    match = EMAIL.search(text)
    if match is None:
        return text
    parts, end = [], 0
    while match is not None:
        parts += (text[end:match.start()], "[EMAIL]")
        end = match.end()
        match = _EMAIL_HERE.match(text, end) or EMAIL.search(text, end)
    parts.append(text[end:])
    return "".join(parts)


def _redact_piece(text: str) -> str:
    text = _replace_emails(text)
    text = CARD.sub(_card, text)
    return PHONE.sub(_phone, text)


def redact_text(text: str) -> str:
    """The text with e-mail addresses, card numbers and phone numbers replaced.

    A text over `_PIECE_CHARS` is redacted in pieces cut after a `_CUT` character (no match
    spans one), so each `re` call, which holds the GIL, stays short; a text with no such
    character is one piece.
    """
    if len(text) <= _PIECE_CHARS:
        return _redact_piece(text)
    pieces, start = [], 0
    while start < len(text):
        cut = _CUT.search(text, start + _PIECE_CHARS)
        end = cut.end() if cut is not None else len(text)
        pieces.append(_redact_piece(text[start:end]))
        start = end
    return "".join(pieces)


def redact_value(value: Any) -> Any:
    """Every string in a JSON-like value redacted (keys kept)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value


def redact_event(event: Event) -> Event:
    """A copy of the event with personal data replaced; ids and hashes are kept."""
    if isinstance(event, CompletionEvent):
        messages = redact_value(event.messages)
        text = redact_text(event.response_text) if event.response_text is not None else None
        return dataclasses.replace(
            event,
            messages=messages,
            params=redact_value(event.params),  # `user`, `stop`, tool descriptions: free text
            response_text=text,
            response_message=redact_value(event.response_message),
            prompt_token_ids=event.prompt_token_ids if messages == event.messages else None,
            token_ids=event.token_ids if text == event.response_text else None,
            metadata=redact_value(event.metadata),
            user=redact_text(event.user) if event.user is not None else None,
        )
    if isinstance(event, FollowupEvent):
        return dataclasses.replace(event, text=redact_text(event.text))
    if isinstance(event, ToolResultEvent):
        return dataclasses.replace(
            event, content=redact_text(event.content),
            error=redact_text(event.error) if event.error is not None else None)
    if isinstance(event, FeedbackEvent):
        return dataclasses.replace(
            event,
            text=redact_text(event.text) if event.text is not None else None,
            metadata=redact_value(event.metadata),
            tool_calls=redact_value(event.tool_calls),  # arguments are free text
        )
    return event
