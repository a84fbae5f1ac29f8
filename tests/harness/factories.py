"""Events as the gateway makes them, for tests that write a store or a topic without a server."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from feedback import CompletionEvent, FeedbackEvent, context_hash, new_id, reply_hash, utcnow

QUESTION = [{"role": "user", "content": "Capital of France?"}]


def completion(cid: str, messages: list[dict[str, Any]] | None = None, text: str = "Paris.",
               status: str = "ok", at: datetime | None = None, **fields: Any) -> CompletionEvent:
    """A completion with token ids and the follow-up linking hashes set as the gateway sets them."""
    messages = messages or QUESTION
    return CompletionEvent(**{
        "event_id": new_id("cmpl"), "completion_id": cid, "created_at": at or utcnow(),
        "alias": "default", "version": "base", "messages": messages,
        "params": {"temperature": 0}, "stream": False, "response_text": text,
        "token_ids": [1, 2, 3], "prompt_token_ids": [4, 5], "status": status,
        "context_hash": context_hash([*messages, {"role": "assistant", "content": text}]),
        "reply_hash": reply_hash(text), **fields,
    })


def feedback(cid: str, kind: str = "rating", at: datetime | None = None, **fields: Any) -> FeedbackEvent:
    return FeedbackEvent(event_id=new_id("fb"), completion_id=cid, created_at=at or utcnow(),
                         type=kind, **fields)
