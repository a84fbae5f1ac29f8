"""Feedback capture: the event model, validation at the edge, redaction, sinks.

The bottom of the stack: it imports no other sdloop package. Public surface: the events and
`FEEDBACK_KINDS` (the one list of feedback types), `FeedbackRequest`, `redact_event`, the
linking hashes, the `Sink` protocol and its two errors. The Kafka sink is `feedback.kafka`
(imported on its own: it pulls in kafka-python).
"""

from feedback.events import (
    FEEDBACK_BY_TYPE,
    FEEDBACK_KINDS,
    FEEDBACK_TYPES,
    CompletionEvent,
    EncodedIds,
    Event,
    FeedbackEvent,
    FeedbackKind,
    FeedbackType,
    FollowupEvent,
    InvalidEvent,
    ReplicaVersionEvent,
    new_id,
    utcnow,
)
from feedback.linking import (
    content_text,
    context_hash,
    find_followup,
    normalise,
    reply_hash,
    session_key,
)
from feedback.redaction import redact_event, redact_text
from feedback.sinks import Sink, SinkFull, UnknownCompletion
from feedback.validation import FeedbackRequest, describe_validation_error

__all__ = [
    "FEEDBACK_BY_TYPE",
    "FEEDBACK_KINDS",
    "FEEDBACK_TYPES",
    "CompletionEvent",
    "EncodedIds",
    "Event",
    "FeedbackEvent",
    "FeedbackKind",
    "FeedbackRequest",
    "FeedbackType",
    "FollowupEvent",
    "InvalidEvent",
    "ReplicaVersionEvent",
    "Sink",
    "SinkFull",
    "UnknownCompletion",
    "content_text",
    "context_hash",
    "normalise",
    "describe_validation_error",
    "find_followup",
    "new_id",
    "redact_event",
    "redact_text",
    "reply_hash",
    "session_key",
    "utcnow",
]
