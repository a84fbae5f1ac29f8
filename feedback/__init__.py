"""Feedback capture: the event model, validation at the edge, redaction, sinks.

Public surface: the events, `FeedbackRequest`, `redact_event`, the linking hashes, `Sink`.
"""

from feedback.events import (
    FEEDBACK_TYPES,
    CompletionEvent,
    EncodedIds,
    Event,
    FeedbackEvent,
    FollowupEvent,
    InvalidEvent,
    ReplicaVersionEvent,
    new_id,
    utcnow,
)
from feedback.linking import context_hash, find_followup, reply_hash, session_key
from feedback.redaction import redact_event, redact_text
from feedback.sinks import Sink, SinkFull
from feedback.validation import FeedbackRequest, describe_validation_error

__all__ = [
    "FEEDBACK_TYPES",
    "CompletionEvent",
    "EncodedIds",
    "Event",
    "FeedbackEvent",
    "FeedbackRequest",
    "FollowupEvent",
    "InvalidEvent",
    "ReplicaVersionEvent",
    "Sink",
    "SinkFull",
    "context_hash",
    "describe_validation_error",
    "find_followup",
    "new_id",
    "redact_event",
    "redact_text",
    "reply_hash",
    "session_key",
    "utcnow",
]
