"""What sdloop captures: one typed event per thing that happened.

Events are the unit every sink carries (the DuckDB writer, the Kafka events topic) and they
serialise to plain JSON, so a store can be rebuilt from a log of them. Each event has a
globally unique `event_id`: a store that sees the same event twice keeps one row.

`FEEDBACK_KINDS` is the one list of explicit feedback types: the HTTP validation, the wire
format, the report and the learner's signal sources are all derived from it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

import msgspec


@dataclass(frozen=True)
class FeedbackKind:
    """One type of explicit feedback: what a client must send with it, and what it tells the
    learner."""

    name: str
    needs: Literal["score", "text"]
    # The answer should have gone otherwise (the learner looks for a better sibling answer).
    asks_for_change: bool
    # The text is itself a good answer to the question (the learner may train on it as one).
    is_answer: bool


FEEDBACK_KINDS: tuple[FeedbackKind, ...] = (
    FeedbackKind("rating", needs="score", asks_for_change=False, is_answer=False),
    FeedbackKind("correction", needs="text", asks_for_change=True, is_answer=True),
    FeedbackKind("critique", needs="text", asks_for_change=True, is_answer=False),
    FeedbackKind("env_error", needs="text", asks_for_change=True, is_answer=False),
    FeedbackKind("demonstration", needs="text", asks_for_change=False, is_answer=True),
)
FEEDBACK_TYPES: tuple[str, ...] = tuple(k.name for k in FEEDBACK_KINDS)
FEEDBACK_BY_TYPE: dict[str, FeedbackKind] = {k.name: k for k in FEEDBACK_KINDS}
# Literal[("a", "b")] is Literal["a", "b"]: checked by pydantic at the edge, msgspec on the wire.
FeedbackType = Literal[FEEDBACK_TYPES]  # type: ignore[valid-type]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def utcnow() -> datetime:
    """Naive UTC timestamp: the store keeps every time in UTC without a zone column type."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass
class Event:
    kind: ClassVar[str]
    event_id: str

    def to_json(self) -> bytes:
        # Shallow: the values are JSON types already (asdict's deep copy is most of the cost).
        data = {name: getattr(self, name) for name in _field_names(type(self))}
        data["kind"] = self.kind
        return _ENCODER.encode(data)

    @staticmethod
    def from_json(text: str | bytes | None) -> Event:
        """Parse and check an event that crossed a process boundary (the events topic).

        Raises InvalidEvent naming what is wrong, and nothing else, whatever the bytes: the
        ingester keeps such messages in the dead-letter table instead of storing half an event
        or stopping on it (a record it cannot get past would stop its partition on every
        restart). A Kafka record may have no value at all (a tombstone): `text` None. Token
        ids stay JSON text (`EncodedIds`).
        """
        if not text:  # None (a tombstone) or zero bytes: nothing a producer of events writes
            raise InvalidEvent("empty_value", "the record has no value (null or empty); "
                                              "an event is a JSON object")
        try:
            decoder, kinds = _wire()
            wire = decoder.decode(text)
        except msgspec.ValidationError as exc:
            raise InvalidEvent("invalid_event", _explain(text, exc)) from None
        except msgspec.DecodeError as exc:
            raise InvalidEvent("not_json", f"not a JSON document: {exc}") from None
        except RecursionError:  # msgspec's depth limit, on arbitrarily nested `Any` fields
            raise InvalidEvent("invalid_event", "nested too deeply to decode") from None
        except (TypeError, ValueError) as exc:  # e.g. a value that is not bytes or text
            raise InvalidEvent("not_json", f"cannot decode {type(text).__name__}: {exc}") from None
        kind = kinds[type(wire)]
        cls = kind.cls
        data = msgspec.structs.asdict(wire)
        for name in kind.timestamps:  # the store keeps naive UTC
            value = data[name]
            if value is not None and value.tzinfo is not None:
                try:
                    data[name] = value.astimezone(UTC).replace(tzinfo=None)
                except OverflowError:  # 0001-01-01T00:00+14:00 is before year 1 in UTC
                    raise InvalidEvent("invalid_event", f"{cls.kind}: timestamp "
                                       f"{value.isoformat()} is out of range in UTC (years "
                                       f"1-9999) - at `$.{name}`") from None
        for name in kind.encoded_ids:
            if data[name] is None:
                continue
            ids = bytes(data[name])
            if ids == b"null":
                data[name] = None
            elif ids.translate(None, _INT_LIST_CHARS) == b"[]":  # valid JSON already
                data[name] = EncodedIds(ids.decode())
            else:
                raise InvalidEvent("invalid_event", f"{cls.kind}: Expected an array of integers, "
                                                    f"got {ids[:40]!r} - at `$.{name}`")
        return cls(**data)


class EncodedIds(Sequence[int]):
    """Token ids still in the JSON text they arrived in (events decoded from the wire).

    Nothing on the ingest path reads token ids, and turning ~200 integers into Python objects
    (then back into JSON for the store) cost more than all the rest of an event: they stay
    text, which the store parses itself, until something reads them.
    """

    __slots__ = ("json", "_ids")

    def __init__(self, json: str) -> None:
        self.json = json
        self._ids: list[int] | None = None

    @property
    def ids(self) -> list[int]:
        if self._ids is None:
            self._ids = msgspec.json.decode(self.json, type=list[int])
        return self._ids

    def __getitem__(self, index: Any) -> Any:
        return self.ids[index]

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EncodedIds):
            return self.json == other.json or self.ids == other.ids
        return self.ids == other if isinstance(other, list) else NotImplemented

    def __repr__(self) -> str:
        return f"EncodedIds({self.json[:40]!r})"


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
    # Lists from the engine; `EncodedIds` when the event came off the events topic.
    prompt_token_ids: list[int] | EncodedIds | None = None
    token_ids: list[int] | EncodedIds | None = None
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
    # Who asked (an API key's name; `local` on a server without keys).
    principal: str | None = None
    # The request's OpenAI `metadata` (string map) and `user` (the end user's id, as the
    # client names them).
    metadata: dict[str, str] | None = None
    user: str | None = None


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
    # Who sent it; it is linked only to a reply given to the same principal.
    principal: str | None = None
    # The principal held the `feedback` scope: the follow-up may teach.
    may_teach: bool | None = None


@dataclass
class ToolResultEvent(Event):
    """A tool's result that an agent sent back as the next turn (a `tool` message answering a
    call of a stored answer): the environment's word on that answer. A failed one is an
    `env_error` signal on it, with `error` as its text.

    The call is named by its id where the client kept it, else by the conversation hash (as
    follow-ups are); the store resolves it to the completion that made the call.
    """

    kind: ClassVar[str] = "tool_result"
    created_at: datetime
    context_hash: str
    content: str
    # The completion whose request carried it.
    next_completion_id: str
    call_id: str | None = None
    name: str | None = None
    # Why it counts as failed (`feedback.tools`); None: it did not fail.
    error: str | None = None
    session_id: str | None = None
    principal: str | None = None
    may_teach: bool | None = None


@dataclass
class FeedbackEvent(Event):
    """Explicit feedback on a stored completion."""

    kind: ClassVar[str] = "feedback"
    completion_id: str
    created_at: datetime
    type: FeedbackType
    score: float | None = None
    text: str | None = None
    metadata: dict[str, Any] | None = field(default=None)
    principal: str | None = None
    # The principal held the `feedback` scope: stored either way, trained on only then.
    may_teach: bool | None = None
    # The call(s) the answer should have made, OpenAI's shape (`feedback.tool_calls`).
    tool_calls: list[dict[str, Any]] | None = None


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
    cls.kind: cls for cls in (CompletionEvent, FollowupEvent, ToolResultEvent, FeedbackEvent,
                              ReplicaVersionEvent)
}


class InvalidEvent(ValueError):
    """A message is not a well-formed event; `code` is a short machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@functools.cache
def _field_names(cls: type[Event]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _encode_default(value: Any) -> Any:
    if isinstance(value, EncodedIds):
        return msgspec.Raw(value.json)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


_ENCODER = msgspec.json.Encoder(enc_hook=_encode_default)


def json_text(value: Any) -> str | None:
    """A field's value as JSON text for the store's JSON and list columns (None stays NULL)."""
    if value is None:
        return None
    if type(value) is EncodedIds:
        return value.json
    return _ENCODER.encode(value).decode()


# Valid JSON that is one pair of brackets around only these is an array of integers (a regex
# is ~15x slower on 200 ids).
_INT_LIST_CHARS = b"0123456789,- \t\n\r"


def _explain(text: str | bytes, exc: msgspec.ValidationError) -> str:
    """msgspec's message (what was expected, and where) prefixed with the event kind."""
    message = str(exc)
    if "`$.kind`" in message or "field `kind`" in message:
        return f"{message}; kind must be one of {', '.join(sorted(EVENT_TYPES))}"
    try:
        data = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:  # the check stopped before reaching the malformed part
        return f"{message}; and not a JSON document: {exc}"
    except RecursionError:  # ... or before a part nested past msgspec's depth limit
        return f"{message}; and nested too deeply to decode"
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == FeedbackEvent.kind and message.endswith("`$.type`"):
        message += f"; type must be one of {', '.join(FEEDBACK_TYPES)}"
    return f"{kind}: {message}" if isinstance(kind, str) else message


def _wire_type(typ: Any) -> Any:
    """What msgspec decodes a field as: token-id lists stay raw JSON (see `EncodedIds`)."""
    options = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) \
        else (typ,)
    return msgspec.Raw if EncodedIds in options else typ


@dataclass(frozen=True)
class _WireKind:
    """How one event kind comes off the wire: its class, and the fields decoding leaves to
    finish (timestamps to bring to naive UTC, token-id lists kept as JSON text)."""

    cls: type[Event]
    timestamps: tuple[str, ...]
    encoded_ids: tuple[str, ...]


@functools.cache
def _wire() -> tuple[msgspec.json.Decoder, dict[type, _WireKind]]:
    """One decoder for every kind (a tagged union of structs mirroring the event dataclasses,
    so the wire is checked against the same declarations the code uses), and per struct what
    it decodes to."""
    kinds: dict[type, _WireKind] = {}
    for kind, cls in EVENT_TYPES.items():
        hints = typing.get_type_hints(cls)
        fields: list[tuple[Any, ...]] = []
        timestamps, encoded_ids = [], []
        for f in dataclasses.fields(cls):
            wire = _wire_type(hints[f.name])
            if hints[f.name] is datetime:
                timestamps.append(f.name)
            if wire is msgspec.Raw:
                encoded_ids.append(f.name)
            if f.default is not dataclasses.MISSING:
                fields.append((f.name, wire, f.default))
            elif f.default_factory is not dataclasses.MISSING:
                fields.append((f.name, wire, msgspec.field(default_factory=f.default_factory)))
            else:
                fields.append((f.name, wire))
        struct = msgspec.defstruct(f"Wire{cls.__name__}", fields, kw_only=True,
                                   tag_field="kind", tag=kind, forbid_unknown_fields=True)
        kinds[struct] = _WireKind(cls, tuple(timestamps), tuple(encoded_ids))
    return msgspec.json.Decoder(typing.Union[tuple(kinds)]), kinds  # noqa: UP007
