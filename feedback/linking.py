"""Follow-up linking: recognise a stored assistant reply when a client resends the history.

Chat clients send the whole conversation with every request and no ids, and they are not
byte-exact about it: whitespace gets trimmed, text parts get joined. So a reply is
identified by a hash of its normalised text, and — to tell apart two identical replies in
different conversations ("Hello! How can I help?") — by a hash of the whole normalised
conversation up to and including it. The store prefers the conversation hash and falls back to
the reply hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def content_text(content: Any) -> str:
    """Text of an OpenAI message `content`: a string, a list of parts, or null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    return str(content)


def normalise(text: str) -> str:
    return " ".join(text.split())


def _digest(payload: object) -> str:
    raw = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def reply_hash(text: str) -> str:
    return _digest(normalise(text))


def context_hash(messages: list[dict[str, Any]]) -> str:
    """Hash of a conversation: roles and normalised texts, nothing clients tend to rewrite."""
    return _digest([[m.get("role", ""), normalise(content_text(m.get("content")))] for m in messages])


def find_followup(messages: list[dict[str, Any]]) -> tuple[str, str, str] | None:
    """If the request ends with `assistant, user`, return (context_hash, reply_hash, user text).

    The context hash covers everything up to and including that assistant message — exactly
    what the completion that produced it hashed as its own context.
    """
    if len(messages) < 2:
        return None
    previous, last = messages[-2], messages[-1]
    if previous.get("role") != "assistant" or last.get("role") != "user":
        return None
    reply = content_text(previous.get("content"))
    if not normalise(reply):
        return None
    return context_hash(messages[:-1]), reply_hash(reply), content_text(last.get("content"))


def session_key(messages: list[dict[str, Any]]) -> str:
    """A conversation's identity across its turns: the hash of its opening (everything up to
    and including the first user message), which every later request of it resends."""
    first_user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), len(messages) - 1)
    return "conv-" + context_hash(messages[: first_user + 1])
