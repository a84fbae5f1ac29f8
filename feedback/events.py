"""What sdloop captures: one typed event per thing that happened.

Events are the unit every sink carries (the DuckDB writer now, Kafka later) and they
serialise to plain JSON, so a store can be rebuilt from a log of them. Each event has a
globally unique `event_id`: a store that sees the same event twice keeps one row.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import orjson

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
        # Shallow: the values are JSON types already (asdict's deep copy is most of the cost).
        data = {name: getattr(self, name) for name in _field_names(type(self))}
        data["kind"] = self.kind
        return orjson.dumps(data).decode()

    @staticmethod
    def from_json(text: str | bytes) -> Event:
        """Parse and check an event that crossed a process boundary (the events topic).

        Raises InvalidEvent naming what is wrong: the ingester keeps such messages in the
        dead-letter table instead of storing half an event or stopping on it.
        """
        try:
            data = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise InvalidEvent("not_json", f"not a JSON document: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidEvent("invalid_event", f"expected a JSON object, got {type(data).__name__}")
        kind = data.pop("kind", None)
        cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise InvalidEvent("invalid_event", f"unknown event kind {kind!r}; expected one of "
                                                f"{', '.join(sorted(EVENT_TYPES))}")
        checks = _field_checks(cls)
        unknown = data.keys() - checks.keys()
        if unknown:
            raise InvalidEvent("invalid_event", f"{kind}: unknown field(s) {', '.join(sorted(unknown))}")
        missing = _required(cls) - data.keys()
        if missing:
            raise InvalidEvent("invalid_event", f"{kind}: missing field '{min(missing)}'")
        for name, value in data.items():
            check = checks[name]
            if type(value) not in check.as_is:  # the common case costs one set lookup
                data[name] = check.checked(kind, name, value)
        if cls is FeedbackEvent and data["type"] not in FEEDBACK_TYPES:
            raise InvalidEvent("invalid_event", f"feedback.type: {data['type']!r} is not one of "
                                                f"{', '.join(FEEDBACK_TYPES)}")
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


@dataclass
class ReplicaVersionEvent(Event):
    """A serving replica's outcome for an adapter-version command from the control topic."""

    kind: ClassVar[str] = "replica_version"
    created_at: datetime
    replica: str
    version: str
    action: str
    status: str
    alias: str | None = None
    detail: str | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls for cls in (CompletionEvent, FollowupEvent, FeedbackEvent, ReplicaVersionEvent)
}


class InvalidEvent(ValueError):
    """A message is not a well-formed event; `code` is a short machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@functools.cache
def _field_types(cls: type[Event]) -> dict[str, Any]:
    return {name: typ for name, typ in typing.get_type_hints(cls).items()
            if typing.get_origin(typ) is not ClassVar}


@functools.cache
def _field_names(cls: type[Event]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _required(cls: type[Event]) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)


@dataclass(frozen=True)
class _FieldCheck:
    """What a field accepts on the wire, precomputed from its annotation (the ingest path checks
    every field of every message)."""

    accepts: frozenset[type]
    nullable: bool
    declared: str
    timestamp: bool = False
    literals: tuple[Any, ...] = ()

    @functools.cached_property
    def as_is(self) -> frozenset[type]:
        """Types taken without conversion or further checks."""
        if self.timestamp or self.literals:
            return frozenset()
        return self.accepts - {int} if float in self.accepts else self.accepts

    def checked(self, kind: str, name: str, value: Any) -> Any:
        """The value if it fits the field's declared type (datetimes arrive as ISO text)."""
        if value is None:
            if self.nullable:
                return None
            raise InvalidEvent("invalid_event", f"{kind}.{name}: must not be null")
        if type(value) in self.accepts and (not self.literals or value in self.literals):
            if self.timestamp:
                try:
                    return datetime.fromisoformat(value)
                except ValueError:
                    pass
            elif float in self.accepts and type(value) is int:
                return float(value)
            else:
                return value
        raise InvalidEvent("invalid_event", f"{kind}.{name}: {value!r:.60} is not a valid {self.declared}")


@functools.cache
def _check_of(typ: Any) -> _FieldCheck:
    union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    options = typing.get_args(typ) if union else (typ,)
    accepts: set[type] = set()
    timestamp, literals = False, ()
    for option in options:
        base = typing.get_origin(option) or option
        if base is datetime:
            timestamp = True
            accepts.add(str)
        elif base is float:
            accepts.update((float, int))
        elif base is typing.Literal:
            literals = typing.get_args(option)
            accepts.update(type(v) for v in literals)
        elif base is not type(None):
            accepts.add(base)
    declared = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    return _FieldCheck(frozenset(accepts), type(None) in options, declared, timestamp, literals)


@functools.cache
def _field_checks(cls: type[Event]) -> dict[str, _FieldCheck]:
    return {name: _check_of(typ) for name, typ in _field_types(cls).items()}


def monotonic_ms() -> float:
    return time.perf_counter() * 1000.0
