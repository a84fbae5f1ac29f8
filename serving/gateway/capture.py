"""What the store keeps of an answer, read out of what vLLM sent back.

The gateway relays the engine's bytes untouched; this module reads the same JSON (or SSE
events, as they pass) into the request's `CompletionEvent`: the answer's text and message,
its exact token ids and the prompt's, usage, latency, time to first token, and the follow-up
linking hashes.
"""

from __future__ import annotations

import json
import time
from typing import Any

from feedback import CompletionEvent, content_text, context_hash, reply_hash
from serving import metrics


def finish_from_json(event: CompletionEvent, data: dict[str, Any], started: float) -> None:
    """A whole (non-streaming) chat completion."""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    event.response_message = {k: v for k, v in message.items() if v is not None}
    event.response_text = content_text(message.get("content"))
    event.finish_reason = choice.get("finish_reason")
    event.token_ids = choice.get("token_ids")
    event.prompt_token_ids = data.get("prompt_token_ids")
    usage = data.get("usage") or {}
    event.prompt_tokens = usage.get("prompt_tokens")
    event.completion_tokens = usage.get("completion_tokens")
    _finish(event, started)


class StreamCapture:
    """Reads a stream's SSE events as they are relayed; `finish` completes the event."""

    def __init__(self, event: CompletionEvent, started: float) -> None:
        self.event = event
        self.started = started
        self._parts: list[str] = []
        self._token_ids: list[int] = []
        # Tool calls as their deltas arrive: by index, the id, name and argument pieces.
        self._calls: dict[int, dict[str, Any]] = {}
        self.done = False
        """The engine's `data: [DONE]` went by: the answer is whole."""

    def read(self, ready: bytes) -> None:
        """Complete SSE events (`data: {...}\\n\\n` each), as cut by the relay."""
        for line in ready.split(b"\n"):
            if line.startswith(b"data: {"):
                self._chunk(json.loads(line[6:]))
            elif line.strip() == b"data: [DONE]":
                self.done = True

    def _chunk(self, data: dict[str, Any]) -> None:
        event = self.event
        if data.get("prompt_token_ids") is not None:
            event.prompt_token_ids = data["prompt_token_ids"]
        for choice in data.get("choices") or ():
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self._parts.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                self._tool_call_delta(call)
            if choice.get("token_ids"):
                if not self._token_ids and event.ttft_ms is None:
                    event.ttft_ms = (time.perf_counter() - self.started) * 1000.0
                    metrics.TTFT_SECONDS.observe(event.ttft_ms / 1000.0)
                self._token_ids.extend(choice["token_ids"])
            if choice.get("finish_reason"):
                event.finish_reason = choice["finish_reason"]
        usage = data.get("usage")
        if usage:
            event.prompt_tokens = usage.get("prompt_tokens")
            event.completion_tokens = usage.get("completion_tokens")

    def _tool_call_delta(self, delta: dict[str, Any]) -> None:
        """OpenAI streams a call as deltas of one index: its id, type and name first, then the
        arguments in pieces."""
        index = delta.get("index")
        call = self._calls.setdefault(index if isinstance(index, int) else len(self._calls),
                                      {"arguments": []})
        for key in ("id", "type"):
            if delta.get(key):
                call[key] = delta[key]
        function = delta.get("function") or {}
        if function.get("name"):
            call["name"] = function["name"]
        if isinstance(function.get("arguments"), str):
            call["arguments"].append(function["arguments"])

    def finish(self) -> None:
        event = self.event
        event.response_text = "".join(self._parts)
        event.response_message = {"role": "assistant", "content": event.response_text}
        if self._calls:  # the same shape as a non-streamed answer's message
            event.response_message["tool_calls"] = [
                {"id": c.get("id"), "type": c.get("type", "function"),
                 "function": {"name": c.get("name"), "arguments": "".join(c["arguments"])}}
                for _, c in sorted(self._calls.items())]
        event.token_ids = self._token_ids or None
        if event.completion_tokens is None and event.token_ids is not None:
            event.completion_tokens = len(event.token_ids)
        if event.prompt_tokens is None and event.prompt_token_ids is not None:
            event.prompt_tokens = len(event.prompt_token_ids)
        _finish(event, self.started)


def _finish(event: CompletionEvent, started: float) -> None:
    event.latency_ms = (time.perf_counter() - started) * 1000.0
    text = event.response_text or ""
    event.context_hash = context_hash([*event.messages, {"role": "assistant", "content": text}])
    event.reply_hash = reply_hash(text)


def count_tokens(event: CompletionEvent) -> None:
    if event.prompt_tokens:
        metrics.TOKENS.labels("in", event.alias).inc(event.prompt_tokens)
    if event.completion_tokens:
        metrics.TOKENS.labels("out", event.alias).inc(event.completion_tokens)
