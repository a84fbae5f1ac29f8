"""Feedback capture: the event model, validation at the edge, redaction, sinks.

The bottom of the stack: it imports no other sdloop package. Public surface: the events and
`FEEDBACK_KINDS` (the one list of feedback types), `FeedbackRequest`, `redact_event`, the
linking hashes, the `Sink` protocol and the errors it raises. The Kafka sink is `feedback.kafka`
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
    ToolResultEvent,
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
from feedback.redaction import redact_event, redact_text, redact_value
from feedback.sinks import Sink, SinkFull, UnknownCompletion
from feedback.tool_calls import InvalidToolCall, call_text, json_mode_tool, offered_tools
from feedback.tools import ToolErrorRules, ToolResult, failure, find_tool_results
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
    "InvalidToolCall",
    "ReplicaVersionEvent",
    "Sink",
    "SinkFull",
    "ToolErrorRules",
    "ToolResult",
    "ToolResultEvent",
    "UnknownCompletion",
    "content_text",
    "call_text",
    "context_hash",
    "json_mode_tool",
    "normalise",
    "offered_tools",
    "describe_validation_error",
    "failure",
    "find_followup",
    "find_tool_results",
    "new_id",
    "redact_event",
    "redact_text",
    "redact_value",
    "reply_hash",
    "session_key",
    "utcnow",
]
