"""`sdloop export`: the captured conversations and their signals as JSONL in the dataset
formats people train with elsewhere.

TRL's formats (conversational: every prompt and answer is a list of chat messages):
`messages` (language modelling on whole conversations), `sft` (`prompt` / `completion`),
`dpo` (`prompt` / `chosen` / `rejected`) and `kto` (`prompt` / `completion` / `label`); and
OpenAI's preference fine-tuning format (`openai-dpo`: `input` / `preferred_output` /
`non_preferred_output`). A record carries the request's `tools` where it had them.

What counts as a better answer is what the learner reads into the same signals
(`learner.episodes`): a correction (sent as feedback or said in a follow-up), a demonstration
for an answer judged bad, a sibling success (a well-rated answer to the same prompt), and for an
agent a later call to the same tool in the same conversation whose result did not fail after one
that did. Only signals the teaching policy admits count (`learner.policy`: a principal that may
teach, not revoked, approved in review mode): an export is training data too.

The store is read a page at a time (keyset order on time and id), so the output streams and
memory holds only the good answers that may be someone's sibling success.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from feedback import FEEDBACK_BY_TYPE, call_text, context_hash, json_mode_tool, redact_value
from learner.episodes import as_json, corrected_statement, correction_text, failed_tools
from learner.policy import TeachingPolicy
from store import QueryResult

FORMATS = ("messages", "sft", "dpo", "kto", "openai-dpo")
Query = Callable[[str, list[Any]], QueryResult]

# One page of stored answers with their signals, after (time, id) `?`, `?`; {where}: the
# user's condition on the completions table.
_PAGE_SQL = """
SELECT e.completion_id, e.created_at, e.messages, e.params, e.response_text, e.response_message,
       e.feedback, e.followups, e.session_id
FROM episodes e
WHERE e.status = 'ok' AND e.created_at >= ?::TIMESTAMP
  AND (e.created_at > ?::TIMESTAMP OR (e.created_at = ?::TIMESTAMP AND e.completion_id > ?))
  AND e.completion_id IN (SELECT id FROM completions WHERE {where})
ORDER BY e.created_at, e.completion_id
LIMIT ?
"""
_COUNT_SQL = """
SELECT count(*) FROM completions
WHERE status = 'ok' AND created_at >= ?::TIMESTAMP AND id IN (SELECT id FROM completions WHERE {where})
"""
_TOOL_SUCCESSES_SQL = "SELECT session_id, name, created_at, completion_id FROM tool_successes"
_EPOCH = "1970-01-01 00:00:00"


@dataclass
class Stored:
    """One stored answer, as the export reads it."""

    completion_id: str
    created_at: str
    session_id: str | None
    prompt: list[dict[str, Any]]
    answer: dict[str, Any]
    tools: list[Any] | None
    rating: float | None = None
    # Admitted signals that ask for another answer (critique, env_error, correction...).
    judged_bad: bool = False
    # The newest better answer given in feedback (a correction or, for a bad answer, a
    # demonstration), as an assistant message, if any.
    better: dict[str, Any] | None = None
    # Tools whose call in this answer failed (from `tool_result` env_errors).
    failed_tools: list[str] = field(default_factory=list)

    @property
    def prompt_key(self) -> str:
        return context_hash(self.prompt)


def read(query: Query, since: str | None, where: str | None, policy: TeachingPolicy,
         page: int = 500) -> Iterator[Stored]:
    """Every stored answer (status ok) from `since`, matching `where`, oldest first."""
    condition = where.strip() if where and where.strip() else "true"
    sql = _PAGE_SQL.format(where=condition)
    after = (_EPOCH, "")
    start = since or _EPOCH
    while True:
        result = query(sql, [start, after[0], after[0], after[1], page])
        rows = [dict(zip(result.columns, r, strict=True)) for r in result.rows]
        for row in rows:
            yield _stored(row, policy)
        if not rows or (len(rows) < page and not result.truncated):
            return
        after = (str(rows[-1]["created_at"]), rows[-1]["completion_id"])


def count(query: Query, since: str | None, where: str | None) -> int:
    condition = where.strip() if where and where.strip() else "true"
    return int(query(_COUNT_SQL.format(where=condition), [since or _EPOCH]).rows[0][0])


def _stored(row: dict[str, Any], policy: TeachingPolicy) -> Stored:
    params = as_json(row["params"]) or {}
    message = as_json(row["response_message"]) or {"role": "assistant",
                                                    "content": row["response_text"] or ""}
    answer = {k: message[k] for k in ("role", "content", "tool_calls") if message.get(k) is not None}
    answer.setdefault("role", "assistant")
    answer.setdefault("content", "")
    item = Stored(row["completion_id"], str(row["created_at"]), row.get("session_id"),
                  as_json(row["messages"]) or [], answer,
                  params.get("tools") if isinstance(params.get("tools"), list) else None)
    feedback = [f for f in as_json(row["feedback"]) or [] if policy.admits(f, set())]
    scores = [f["score"] for f in feedback if f.get("type") == "rating"
              and f.get("score") is not None]
    item.rating = sum(scores) / len(scores) if scores else None
    item.failed_tools = failed_tools(feedback)
    better: list[tuple[str, dict[str, Any]]] = []  # (when, message), newest wins
    for f in feedback:
        kind = FEEDBACK_BY_TYPE.get(f.get("type") or "")
        text = (f.get("text") or "").strip()
        calls = as_json(f.get("tool_calls"))
        if kind is None or not (text or calls):
            continue
        if kind.asks_for_change:
            item.judged_bad = True
        if kind.is_answer and calls:
            better.append((str(f["created_at"]), call_message(calls, params)))
        elif kind.is_answer:
            better.append((str(f["created_at"]), _said(corrected_statement(text)
                                                       if f["type"] == "correction" else text)))
    for f in as_json(row["followups"]) or []:
        corrected = correction_text(f.get("text") or "") if policy.admits(f, set()) else None
        if corrected:
            item.judged_bad = True
            better.append((str(f["created_at"]), _said(corrected)))
    item.judged_bad = item.judged_bad or (item.rating is not None and item.rating < 0)
    # A demonstration improves on an answer only where that answer was judged bad (a
    # correction judges it so itself).
    if better and item.judged_bad:
        item.better = max(better, key=lambda b: b[0])[1]
    return item


def _said(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def call_message(calls: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
    """The assistant message that makes a call given in feedback: for a JSON-mode request the
    arguments as its content (what the engine answers there), else the calls as `tool_calls`."""
    if json_mode_tool(params) is not None:
        return _said(call_text(calls, params))
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": c.get("id") or f"call_{i}", "type": "function", "function": c["function"]}
        for i, c in enumerate(calls)]}


@dataclass
class Successes:
    """Answers another answer may prefer to: well-rated ones by prompt, and tool calls that
    worked by conversation and tool (with when, to take only one that came after a failure)."""

    by_prompt: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_task: dict[tuple[str, str], list[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(list))
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)


def successes(query: Query, items: Iterator[Stored]) -> Successes:
    found = Successes()
    worked = query(_TOOL_SUCCESSES_SQL, []).rows
    calls = {completion_id for _, _, _, completion_id in worked}
    for item in items:
        if (item.rating or 0) > 0 and not item.judged_bad:
            found.by_prompt.setdefault(item.prompt_key, item.answer)
        if item.completion_id in calls:
            found.answers[item.completion_id] = item.answer
    for session, tool, at, completion_id in worked:
        if completion_id in found.answers:  # in the export's selection
            found.by_task[(session, tool)].append((str(at), completion_id))
    for task in found.by_task.values():
        task.sort()
    return found


def preferred(item: Stored, found: Successes) -> dict[str, Any] | None:
    """A better answer than the logged one, if the signals give one."""
    if item.better is not None:
        return item.better
    if not item.judged_bad:
        return None
    for tool in item.failed_tools:  # the same tool, later in the same conversation, working
        for at, completion_id in found.by_task.get((item.session_id or "", tool), ()):
            if at > item.created_at:
                return found.answers[completion_id]
    return found.by_prompt.get(item.prompt_key)


def record(fmt: str, item: Stored, found: Successes | None) -> dict[str, Any] | None:
    """The item as one line of `fmt`, or None where it has nothing for that format."""
    tools = {"tools": item.tools} if item.tools else {}
    if fmt == "messages":
        return {"messages": [*item.prompt, item.answer], **tools}
    if fmt == "sft":
        if item.better is not None:
            return {"prompt": item.prompt, "completion": [item.better], **tools}
        if (item.rating or 0) > 0 and not item.judged_bad:
            return {"prompt": item.prompt, "completion": [item.answer], **tools}
        return None
    if fmt == "kto":
        if item.rating is not None and item.rating != 0:
            label = item.rating > 0 and not item.judged_bad
        elif item.failed_tools:  # the environment's verdict on the call
            label = False
        else:
            return None
        return {"prompt": item.prompt, "completion": [item.answer], "label": label, **tools}
    assert found is not None
    chosen = preferred(item, found)
    if chosen is None or chosen == item.answer:
        return None
    if fmt == "dpo":
        return {"prompt": item.prompt, "chosen": [chosen], "rejected": [item.answer], **tools}
    if fmt == "openai-dpo":
        return {"input": {"messages": item.prompt, **tools}, "preferred_output": [chosen],
                "non_preferred_output": [item.answer]}
    raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")


def export(query: Query, out: TextIO, fmt: str, policy: TeachingPolicy, *,
           since: str | None = None, where: str | None = None, redact: bool = False,
           progress: Callable[[int], None] | None = None) -> int:
    """Write `fmt` records as JSON lines to `out`; returns how many."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    found = (successes(query, read(query, since, where, policy))
             if fmt in ("dpo", "openai-dpo") else None)
    written = 0
    for item in read(query, since, where, policy):
        if progress is not None:
            progress(1)
        line = record(fmt, item, found)
        if line is None:
            continue
        if redact:
            line = redact_value(line)
        out.write(json.dumps(line, ensure_ascii=False) + "\n")
        written += 1
    return written
