"""Validation of feedback at the edge: a bad event is refused before anything is stored."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from feedback.events import FEEDBACK_BY_TYPE, FeedbackEvent, FeedbackType, new_id, utcnow
from feedback.tool_calls import MAX_CALLS, ToolCall

MAX_TEXT_CHARS = 100_000
MAX_METADATA_BYTES = 64 * 1024


class FeedbackRequest(BaseModel):
    """Body of `POST /v1/feedback`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    completion_id: str = Field(min_length=1, max_length=200)
    type: FeedbackType
    score: float | None = Field(default=None, ge=-1e6, le=1e6)
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    metadata: dict[str, Any] | None = None
    # The call(s) the answer should have made (a demonstration or a correction of an agent's
    # answer); checked against the answered request's tools where the completion is stored.
    tool_calls: list[ToolCall] | None = Field(default=None, min_length=1, max_length=MAX_CALLS)

    @model_validator(mode="after")
    def _signal_present(self) -> FeedbackRequest:
        kind = FEEDBACK_BY_TYPE[self.type]
        if self.tool_calls is not None and not kind.is_answer:
            answers = ", ".join(k for k, v in FEEDBACK_BY_TYPE.items() if v.is_answer)
            raise ValueError(f"'tool_calls' is for feedback that gives the answer ({answers}), "
                             f"not '{self.type}'")
        if kind.needs == "score" and self.score is None:
            raise ValueError(f"feedback of type '{self.type}' needs a numeric 'score'")
        if kind.needs == "text" and not (self.text and self.text.strip()) and not self.tool_calls:
            raise ValueError(f"feedback of type '{self.type}' needs a non-empty 'text'"
                             + (" or 'tool_calls'" if kind.is_answer else ""))
        if self.metadata is not None and len(json.dumps(self.metadata)) > MAX_METADATA_BYTES:
            raise ValueError(f"'metadata' is larger than {MAX_METADATA_BYTES} bytes of JSON")
        return self

    def to_event(self, idempotency_key: str | None = None, principal: str | None = None,
                 may_teach: bool | None = None) -> FeedbackEvent:
        """With a client's `Idempotency-Key`, the event id is derived from it, the request and
        its principal: a retry after a 503 or a lost answer is the same event, stored once; the
        same key reused for other feedback, or by another principal, is another event."""
        event_id = new_id("fb")
        if idempotency_key:
            request = json.dumps([idempotency_key, self.model_dump(mode="json"), principal],
                                 sort_keys=True)
            event_id = "fb-" + hashlib.sha256(request.encode()).hexdigest()[:32]
        return FeedbackEvent(
            event_id=event_id,
            completion_id=self.completion_id,
            created_at=utcnow(),
            type=self.type,
            score=self.score,
            text=self.text,
            metadata=self.metadata,
            tool_calls=[c.model_dump(mode="json") for c in self.tool_calls]
            if self.tool_calls else None,
            principal=principal,
            may_teach=may_teach,
        )


def describe_validation_error(exc: ValidationError) -> str:
    """One line a client can act on: which field, what is wrong with it."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing":
            msg = "field required"
        elif err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts)
