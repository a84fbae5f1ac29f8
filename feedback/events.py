"""What sdloop captures: one typed event per thing that happened.

Events are the unit every sink carries (the DuckDB writer now, Kafka later) and they
serialise to plain JSON, so a store can be rebuilt from a log of them. Each event has a
globally unique `event_id`: a store that sees the same event twice keeps one row.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

FeedbackType = Literal["rating", "correction", "critique", "env_error", "demonstration"]
FEEDBACK_TYPES: tuple[str, ...] = ("rating", "correction", "critique", "env_error", "demonstration")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def utcnow() -> datetime:
    """Naive UTC timestamp: the store keeps every time in UTC without a zone column type."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class Event:
    kind: ClassVar[str]
    event_id: str

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["kind"] = self.kind
        return json.dumps(data, default=_json_default, separators=(",", ":"))

    @staticmethod
    def from_json(text: str | bytes) -> Event:
        data = json.loads(text)
        cls = EVENT_TYPES[data.pop("kind")]
        for name in ("created_at",):
            if isinstance(data.get(name), str):
                data[name] = datetime.fromisoformat(data[name])
        return cls(**data)


@dataclass
class CompletionEvent(Event):
    """One answered chat request: what was asked, what answered it, and how."""

    kind: ClassVar[str] = "completion"
    completion_id: str
    created_at: datetime
    alias: str
    version: str
    messages: list[dict[str, Any]]
    params: dict[str, Any]
    stream: bool
    response_text: str | None = None
    response_message: dict[str, Any] | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    # ok | client_disconnected | engine_error
    status: str = "ok"
    error: str | None = None
    # Follow-up linking keys (feedback.linking): the conversation including this answer, and
    # the answer alone.
    context_hash: str | None = None
    reply_hash: str | None = None
    session_id: str | None = None


@dataclass
class FollowupEvent(Event):
    """A user message that came after a stored assistant reply: hindsight context for it.

    The reply is named by hashes rather than id (chat clients resend history, not ids); the
    store resolves them to the completion when it writes the event.
    """

    kind: ClassVar[str] = "followup"
    created_at: datetime
    context_hash: str
    reply_hash: str
    text: str
    # The completion that answers this follow-up (the request it arrived in).
    next_completion_id: str
    session_id: str | None = None


@dataclass
class FeedbackEvent(Event):
    """Explicit feedback on a stored completion."""

    kind: ClassVar[str] = "feedback"
    completion_id: str
    created_at: datetime
    type: str
    score: float | None = None
    text: str | None = None
    metadata: dict[str, Any] | None = field(default=None)


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (CompletionEvent, FollowupEvent, FeedbackEvent)
}


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__}")


def monotonic_ms() -> float:
    return time.perf_counter() * 1000.0
