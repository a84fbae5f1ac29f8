"""A JSON-mode agent loop over an OpenAI-compatible chat endpoint, for the tool benchmark.

The embedded model gives usable tool calls only as JSON actions (`response_format` with the
tool's argument schema; `tool_choice: "required"` gives calls whose arguments ignore the schema,
docs/guide/agents-and-tools.md), so the loop does what JSON-mode agent frameworks do: it asks for the
arguments as JSON, runs the tool, and sends the result back as the next turn — its own
assistant message (the JSON as content, plus the `tool_calls` entry the call stands for) and a
`tool` message with the result. Through sdloop's gateway that is all it takes for a failed
result to become an `env_error` signal on the answer that made the call: no feedback call.
"""

from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from ops.bench.toolenv import TOOLS, Task, system_prompt

ACTION_TOKENS = 48  # an action is one short JSON object
REPLY_TOKENS = 24  # the answer to the user once the tool worked


@dataclass
class Episode:
    """One task run by the loop: every action and whether each call worked."""

    task: Task
    actions: list[str] = field(default_factory=list)
    worked: list[bool] = field(default_factory=list)
    # The completion id of each action's answer (what feedback on it names).
    ids: list[str] = field(default_factory=list)

    @property
    def first_call_ok(self) -> bool:
        return bool(self.worked) and self.worked[0]

    @property
    def turns_to_success(self) -> int | None:
        """Calls made until one worked (1: the first); None: none did."""
        return self.worked.index(True) + 1 if True in self.worked else None


def post_chat(url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json", **headers})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def run_task(url: str, model: str, task: Task, known: list[str], max_calls: int,
             headers: dict[str, str], reply: bool = False, temperature: float = 0.0,
             seed: int = 0) -> Episode:
    """Up to `max_calls` actions (greedy) until one works. With `reply`, the result of the last
    call is sent back too and the model answers the user — the request that carries that
    call's result to the store: a working call becomes a success the learner can find, a
    failed last call an `env_error` like the ones before it. `known`: the entities the tool
    has (`Tool.call`)."""
    tool = TOOLS[task.tool]
    schema = {"type": "json_schema",
              "json_schema": {"name": tool.name, "schema": tool.parameters, "strict": True}}
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt(tool)},
                                      {"role": "user", "content": task.ask}]
    episode = Episode(task)
    for n in range(max_calls):
        answer = post_chat(url, {"model": model, "messages": messages,
                                 "temperature": temperature, "seed": seed + n,
                                 "max_tokens": ACTION_TOKENS, "response_format": schema}, headers)
        text = answer["choices"][0]["message"].get("content") or ""
        try:
            arguments = json.loads(text)
        except ValueError:
            arguments = None
        worked, result = tool.call(task.instance, arguments, known)
        episode.actions.append(text)
        episode.worked.append(worked)
        episode.ids.append(answer["id"])
        call_id = f"call_{n}"
        messages += [
            {"role": "assistant", "content": text,
             "tool_calls": [{"id": call_id, "type": "function",
                             "function": {"name": tool.name, "arguments": text}}]},
            {"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)},
        ]
        if worked:
            break
    if reply:
        post_chat(url, {"model": model, "messages": messages, "temperature": 0.0,
                        "max_tokens": REPLY_TOKENS}, headers)
    return episode


def working_call(task: Task) -> dict[str, Any]:
    """The call that does the task, in OpenAI's shape (what an operator demonstrates)."""
    tool = TOOLS[task.tool]
    return {"type": "function", "function": {
        "name": tool.name, "arguments": json.dumps({tool.argument: tool.valid(task.instance)})}}
