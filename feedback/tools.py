"""Tool results in an agent's conversation: found in the request, told apart as failures.

An agent does not call `/v1/feedback` when a tool fails: it sends the tool's result back as the
next turn (`assistant` with `tool_calls`, then one `tool` message per call, then the next
request). Those trailing `tool` messages are what the environment said about the previous
answer, the most objective signal a deployment produces. `find_tool_results` reads them out of
a request; `failure` decides whether one says the call failed, from what the client states
(the message's own `is_error`, or keys of JSON content such as `error` or `exit_code`) and,
where configured, from the text (a traceback, an `Error:` line). A failed result becomes an
`env_error` signal on the answer that made the call, its text the error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from feedback.linking import content_text, context_hash

# What a key of a JSON tool result says, by its name (the last part of a dotted path).
# Anything else counts as failed when it holds a value (`"error": "unknown city"`).
_STATUS_KEYS = frozenset({"status", "state", "outcome"})
_CODE_KEYS = frozenset({"exit_code", "exitcode", "returncode", "return_code", "status_code", "code"})
_SUCCESS_KEYS = frozenset({"ok", "success", "succeeded", "passed"})
_FAILED_STATUS = frozenset({"error", "failed", "failure", "fail", "errored", "exception",
                            "crashed", "timeout", "timed_out"})
# Text that reads as a failure: a Python traceback anywhere, or a line that opens with an error
# label ("Error: …", "ValueError: …", "fatal: …", "FAILED …"). Linear: anchored alternatives and
# no nested repetition, so a long result costs one pass.
_FAILED_TEXT = re.compile(
    r"Traceback \(most recent call last\)"
    r"|^[ \t]*(?:[A-Za-z_][A-Za-z0-9_.]{0,80})?(?:Error|Exception|Fault)\b[ \t]*:"
    r"|^[ \t]*(?:fatal|panic|FAILED|FAIL|ERROR)\b",
    re.MULTILINE,
)
# A tool result is judged on its first this many characters, and parsed as JSON only up to this
# size (it runs on the gateway's event loop); it is stored whole.
_SCAN_CHARS = 65_536


@dataclass(frozen=True)
class ToolErrorRules:
    """How a tool result is judged failed (`[feedback]` `tool_error_keys`, `tool_error_text`)."""

    keys: tuple[str, ...] = ()
    text: bool = True


@dataclass(frozen=True)
class ToolResult:
    """One `tool` message that answers a call of the assistant message before it."""

    call_id: str | None
    name: str | None
    # The conversation up to and including the assistant message that made the call: what
    # the completion that made it hashed as its own context (`feedback.linking`).
    context_hash: str
    content: str
    error: str | None  # why it counts as failed; None: it did not fail


def find_tool_results(messages: list[dict[str, Any]], rules: ToolErrorRules
                      ) -> list[ToolResult]:
    """The `tool` messages the request ends with, when an assistant message with `tool_calls`
    comes right before them; each judged by `rules`. Earlier tool messages were captured with
    the request that first carried them."""
    end = len(messages)
    start = end
    while start > 0 and messages[start - 1].get("role") == "tool":
        start -= 1
    if start == end or start == 0:
        return []
    assistant = messages[start - 1]
    calls = assistant.get("tool_calls")
    if assistant.get("role") != "assistant" or not isinstance(calls, list) or not calls:
        return []
    names = {c.get("id"): (c.get("function") or {}).get("name")
             for c in calls if isinstance(c, dict) and isinstance(c.get("function"), dict)}
    ctx = context_hash(messages[:start])
    results = []
    for i, message in enumerate(messages[start:]):
        call_id = message.get("tool_call_id")
        call_id = call_id if isinstance(call_id, str) and call_id else None
        name = names.get(call_id)
        if name is None and call_id is None and i < len(calls) and isinstance(calls[i], dict):
            name = (calls[i].get("function") or {}).get("name")  # the calls' order, by position
        content = content_text(message.get("content"))
        results.append(ToolResult(call_id, name if isinstance(name, str) else None, ctx,
                                  content, failure(message, content, rules)))
    return results


def failure(message: dict[str, Any], content: str, rules: ToolErrorRules) -> str | None:
    """Why a tool message counts as a failed call (the error text to learn from), or None."""
    metadata = message.get("metadata")
    stated = message.get("is_error")
    if stated is None and isinstance(metadata, dict):
        stated = metadata.get("is_error")
    if stated is not None:  # the client said: that decides, whatever the content
        return (content.strip() or "the tool call failed") if _truthy(stated) else None
    head = content[:_SCAN_CHARS]
    if rules.keys and len(content) <= _SCAN_CHARS and head.lstrip()[:1] == "{":
        try:
            data = json.loads(content)
        except ValueError:
            data = None
        if isinstance(data, dict):
            for path in rules.keys:
                found, value = _lookup(data, path)
                if found and _says_failed(path.rsplit(".", 1)[-1].lower(), value):
                    return content.strip()  # the whole result: "unknown city" alone is terse
    if rules.text and _FAILED_TEXT.search(head):
        return content.strip()
    return None


def _lookup(data: dict[str, Any], path: str) -> tuple[bool, Any]:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _says_failed(key: str, value: Any) -> bool:
    if key in _SUCCESS_KEYS:
        return value is False or (isinstance(value, str) and value.lower() == "false")
    if key in _CODE_KEYS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        return value >= 400 if key in ("status_code", "code") else value != 0
    if key in _STATUS_KEYS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value >= 400
        return isinstance(value, str) and value.strip().lower() in _FAILED_STATUS
    return _truthy(value)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "no", "none", "null")
    return bool(value)

