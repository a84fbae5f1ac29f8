"""Where captured events go. The gateway talks to a Sink and nothing else.

A sink accepts an event and returns a future that resolves once the event is durable (the
store committed it, or the Kafka broker acknowledged it). The gateway waits on that future for
explicit feedback — a 2xx means durable — and does not wait for completions and follow-ups,
which are written off the request path.

A sink raises, and fails its futures with, only the errors below, so its callers never need
to know which sink they hold: `SinkFull` (take it again later: backlog at its bound, the sink
closed, the broker away), `UnknownCompletion` (feedback on a completion the store has never
seen) and `feedback.tool_calls.InvalidToolCall` (feedback's call that the answered request's
tools refuse); only a sink that `stores` can know the last two.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Protocol

from feedback.events import (
    CompletionEvent,
    Event,
    FeedbackEvent,
    FollowupEvent,
    ToolResultEvent,
)


class SinkFull(RuntimeError):
    """The sink cannot take or deliver events now; the caller answers 503 and the client retries."""


class UnknownCompletion(LookupError):
    """Feedback names a completion id the store has never seen."""

    def __init__(self, completion_id: str) -> None:
        super().__init__(f"no completion with id '{completion_id}'")
        self.completion_id = completion_id


class Sink(Protocol):
    # Who makes an event durable, for messages: "feedback store" or "Kafka broker".
    name: str
    # True: a resolved future means the event is committed to the store (and feedback's
    # completion is known). False: the bus has it and an ingester stores it later.
    stores: bool
    # How long a caller that needs durability waits on a future before giving up.
    ack_timeout_s: float
    # Replaces personal data (`feedback.redaction`) before an event is written or produced, on
    # a thread of its own, in order; the gateway only hands events over (`feedback.redact`).
    redact: bool

    def submit(self, event: Event, request_bytes: int | None = None) -> Future[None]:
        """Queue an event; raises SinkFull instead of growing without bound (in events and in
        bytes). `request_bytes`: the size of the request body the event was read from, when
        the caller knows it (`approx_bytes`)."""
        ...

    @property
    def alive(self) -> bool:
        """False once the sink can no longer deliver anything (stopped or failed)."""
        ...

    def has_capacity(self) -> bool:
        """False when the backlog is near its bound: new work should be refused (503) before
        it produces events that could not be queued."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the sink cannot make events durable now (its last write failed: disk full,
        file not writable), or None. Set on a failed write, cleared by the next one that
        succeeds; /readyz reports it."""
        ...


# What an event is counted as beyond its texts: the object, its ids, hashes and timestamps.
_EVENT_OVERHEAD = 1024


def approx_bytes(event: Event, request_bytes: int | None = None) -> int:
    """About how much memory an event holds while it waits in a backlog, for the bounds in
    bytes on it; cheap, and never a serialization.

    What the client sent is counted as the size of its request body (`request_bytes`: the
    gateway has it, and the parsed messages or feedback hold about that much); without it, as
    the lengths of the event's texts, one level deep. What the engine answered is counted as
    its text and token ids.
    """
    size = _EVENT_OVERHEAD
    if isinstance(event, CompletionEvent):
        if request_bytes is None:
            request_bytes = sum(_text_len(m.get("content")) for m in event.messages
                                if isinstance(m, dict))
        size += request_bytes + 2 * len(event.response_text or "")  # and response_message's
        size += 8 * (_ids_len(event.prompt_token_ids) + _ids_len(event.token_ids))
    elif isinstance(event, FeedbackEvent):
        size += request_bytes if request_bytes is not None else (
            len(event.text or "") + 64 * 1024 * (event.metadata is not None))
    elif isinstance(event, FollowupEvent):
        size += len(event.text)
    elif isinstance(event, ToolResultEvent):
        size += len(event.content) + len(event.error or "")
    return size


def _text_len(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(v) for part in content if isinstance(part, dict)
                   for v in part.values() if isinstance(v, str))
    return 0


def _ids_len(ids: Any) -> int:
    try:
        return len(ids) if ids is not None else 0
    except TypeError:  # `EncodedIds` off the events topic: its JSON text
        return len(getattr(ids, "json", "")) // 4
