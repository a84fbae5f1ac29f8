"""Learning episodes from the feedback store's `episodes` view.

An episode is one stored completion (prompt messages x, response y with its exact token ids)
and the signals c that say how it should have gone: explicit corrections, critiques,
environment errors, demonstrations, the user's follow-up, or a sibling success — a
well-rated answer to the same prompt. A rating alone carries no context: it only selects
episodes (and finds sibling successes).

An agent's failed tool call (a `tool` result the store judged failed: an `env_error` naming its
tool) has a sibling success too: a later answer in the same conversation whose call to the same
tool worked — what the model should have called the first time, a demonstration the
environment gave. A `demonstration` or `correction` that carries `tool_calls` (checked against
the request's tools when it was stored) is that call, written as the answer that makes it.

A follow-up that opens by rejecting the answer ("No, that's not right. The capital of X is Y.")
is the user correcting the model in plain chat: it becomes a `correction` whose text is what
follows the rejection, so it gets the correction's teacher placement (the best measured on the
embedded model) rather than the follow-up's hindsight note. Where `correction` is not a wanted
source it stays a `followup`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from feedback import FEEDBACK_KINDS, call_text, context_hash
from learner.config import TEXT_FEEDBACK
from learner.policy import (
    AGREEMENT_SQL,
    OVER_QUOTA_SQL,
    TeachingPolicy,
    agreement,
    apply_policy,
    signal_key,
)
from store import Query, QueryResult

# Episodes whose newest signal (feedback or follow-up) arrived after the given time: feedback
# on an old completion brings it back.
EPISODES_SQL = """
SELECT * FROM (
    SELECT completion_id, created_at, version, messages, params, response_text,
           response_message, token_ids, feedback, followups, session_id,
           greatest(coalesce(list_max([f.created_at FOR f IN feedback]), TIMESTAMP '1970-01-01'),
                    coalesce(list_max([u.created_at FOR u IN followups]), TIMESTAMP '1970-01-01'))
               AS signal_at
    FROM episodes
    WHERE has_signal AND status = 'ok'
)
WHERE signal_at > ?::TIMESTAMP
ORDER BY signal_at, completion_id
"""

# The tool successes (a store view) in the given conversations, with the answers that made them.
TOOL_SUCCESSES_SQL = """
SELECT t.session_id, t.name, t.created_at, c.response_text, c.response_message
FROM tool_successes t JOIN completions c ON c.id = t.completion_id
WHERE t.session_id IN (SELECT unnest(?::VARCHAR[]))
ORDER BY t.created_at
"""

# Request fields that constrain what the engine may answer (vLLM's structured outputs); a
# `response_format` of type `text` constrains nothing.
CONSTRAINT_PARAMS = ("response_format", "structured_outputs")

# Signals that say the answer should have gone otherwise.
_NEGATIVE = tuple(k.name for k in FEEDBACK_KINDS if k.asks_for_change)
# A rejection at the start of a follow-up, with the punctuation after it.
_REJECTION = re.compile(
    r"^\s*(?:no(?:pe)?|wrong|incorrect|false|not (?:quite|really|true|right|correct)|actually"
    r"|(?:that|this|it)(?:'s| is| was) (?:not (?:quite )?(?:right|true|correct)|wrong|incorrect|false))"
    r"\b[\s,.;:!-]*", re.IGNORECASE)


def correction_text(followup: str) -> str | None:
    """The corrected statement of a follow-up that rejects the answer, else None.

    "No, that's not right. The capital of X is Y." -> "The capital of X is Y."; a bare "No."
    carries nothing to learn from and is not a correction.
    """
    text, rejected = followup.strip(), False
    while match := _REJECTION.match(text):
        if not match.group(0):
            break
        text, rejected = text[match.end():], True
    text = text.strip()
    if not rejected or len(text) < 3:
        return None
    return text[0].upper() + text[1:]


def corrected_statement(correction: str) -> str:
    """An explicit correction as the answer it stands for: without the rejection it opens with.

    Users write corrections as replies ("Wrong. The loom was invented by T. B."); the teacher
    is shown the signal as an example answer to the question, and an example that opens by
    rejecting something sets the teacher talking *about* answers ("The answer to this question
    is a classic example of …") — the voice the student then learns for every question."""
    return correction_text(correction) or correction.strip()


@dataclass(frozen=True)
class Signal:
    source: str
    text: str
    # Who gave it (for the teaching policy's share and agreement; not part of its identity).
    principal: str | None = field(default=None, compare=False)
    # The text is a working tool call (feedback's `tool_calls`, or a later call that worked):
    # an answer the teacher's must make exactly, not one to agree with in words.
    call: bool = field(default=False, compare=False)


@dataclass
class Episode:
    completion_id: str
    created_at: str
    version: str
    messages: list[dict[str, Any]]
    response_text: str
    token_ids: list[int] | None
    signals: list[Signal] = field(default_factory=list)
    rating: float | None = None
    signal_at: str = ""  # when its newest signal arrived (UTC)
    session_id: str | None = None
    # Tools whose call in this answer failed (an admitted `env_error` from a tool result).
    failed_tools: list[str] = field(default_factory=list)
    # The structured-output fields the answer was drawn under (`output_constraint`), if any.
    constraint: dict[str, Any] | None = None


def build_episodes(result: QueryResult, sources: Iterable[str],
                   policy: TeachingPolicy | None = None,
                   over_quota: Collection[str] = (), dedupe: bool = True) -> list[Episode]:
    """Rows of EPISODES_SQL → episodes holding only signals from `sources` that the teaching
    policy admits (`learner.policy`); none: dropped. Without `dedupe`, a signal given by
    several principals on one answer stays once per principal (for counting agreement)."""
    policy = policy or TeachingPolicy()
    quota = set(over_quota)
    wanted = set(sources)
    rows = [dict(zip(result.columns, r, strict=True)) for r in result.rows]
    episodes, by_prompt = [], defaultdict(list)
    raters: dict[str, str | None] = {}
    for row in rows:
        feedback = [f for f in _as_list(row["feedback"]) if policy.admits(f, quota)]
        ratings = [f for f in feedback if f.get("type") == "rating" and f.get("score") is not None]
        scores = [f["score"] for f in ratings]
        ep = Episode(
            completion_id=row["completion_id"], created_at=str(row["created_at"]),
            version=row["version"], messages=as_json(row["messages"]),
            response_text=row["response_text"] or "", token_ids=row["token_ids"],
            rating=sum(scores) / len(scores) if scores else None,
            signal_at=str(row.get("signal_at", "")), session_id=row.get("session_id"),
            failed_tools=failed_tools(feedback),
            constraint=output_constraint(as_json(row.get("params"))),
        )
        if ratings:
            raters[ep.completion_id] = ratings[-1].get("principal")
        params = as_json(row.get("params"))
        ep.signals = [feedback_signal(f, params, policy) for f in feedback
                      if f.get("type") in TEXT_FEEDBACK
                      and ((f.get("text") or "").strip() or f.get("tool_calls"))]
        for f in _as_list(row["followups"]):
            if not policy.admits(f, quota):
                continue
            text = (f.get("text") or "").strip()
            corrected = correction_text(text) if "correction" in wanted else None
            if corrected:
                ep.signals.append(Signal("correction", policy.cut(corrected), f.get("principal")))
            elif text:
                ep.signals.append(Signal("followup", policy.cut(text), f.get("principal")))
        episodes.append(ep)
        by_prompt[context_hash(ep.messages)].append(ep)

    for group in by_prompt.values():
        good = [e for e in group if (e.rating or 0) > 0
                and not any(s.source in _NEGATIVE for s in e.signals)]
        for ep in group:
            needs_help = (ep.rating is not None and ep.rating < 0) or any(
                s.source in _NEGATIVE for s in ep.signals)
            if needs_help:
                ep.signals += [Signal("sibling_success", g.response_text,
                                      raters.get(g.completion_id)) for g in good
                               if g is not ep and g.response_text.strip()]

    for ep in episodes:  # the same correction given twice (a reply and a feedback call) is one
        ep.signals = [s for s in ep.signals if s.source in wanted]
        if dedupe:
            ep.signals = list(dict.fromkeys(ep.signals))
    return [ep for ep in episodes if ep.signals]


def feedback_signal(f: dict[str, Any], params: Any, policy: TeachingPolicy) -> Signal:
    """A text feedback item as a signal: its call(s) where it carries them (a demonstration or
    correction of an agent's answer; the text is then a note on them), written as the
    answer that makes them (`feedback.call_text`), else its text."""
    calls = as_json(f.get("tool_calls"))
    if calls:
        return Signal(f["type"], policy.cut(call_text(calls, params)), f.get("principal"),
                      call=True)
    text = corrected_statement(f["text"]) if f["type"] == "correction" else f["text"]
    return Signal(f["type"], policy.cut(text), f.get("principal"))


def collect(query: Query, since: str, sources: Iterable[str],
            policy: TeachingPolicy | None = None) -> list[Episode]:
    """Episodes with a signal that arrived after `since` (ISO timestamp, UTC), holding the
    signals the teaching policy lets teach."""
    policy = policy or TeachingPolicy()
    sources = list(sources)
    over_quota: set[str] = set()
    if policy.principal_quota_per_hour:
        over_quota = {r[0] for r in query(OVER_QUOTA_SQL,
                                          [since, policy.principal_quota_per_hour]).rows}
    episodes = build_episodes(query(EPISODES_SQL, [since]), sources, policy, over_quota)
    if "sibling_success" in sources:
        add_tool_successes(query, episodes)
    agreed = None
    if policy.min_principals > 1:
        history = build_episodes(query(AGREEMENT_SQL, []), sources, policy, over_quota,
                                 dedupe=False)
        agreed = agreement((signal_key(ep.messages, s.source, s.text), s.principal)
                           for ep in history for s in ep.signals)
    episodes = apply_policy(episodes, policy, agreed)
    share_known_calls(episodes, share="sibling_success" in sources)
    return episodes


def add_tool_successes(query: Query, episodes: list[Episode]) -> None:
    """A failed tool call's sibling success: the first later answer in its conversation whose
    call to the same tool worked (its text, else its calls as JSON)."""
    failed = [ep for ep in episodes if ep.failed_tools and ep.session_id]
    if not failed:
        return
    worked: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for session, tool, at, text, message in query(
            TOOL_SUCCESSES_SQL, [sorted({ep.session_id for ep in failed})]).rows:
        worked[(session, tool)].append((str(at), answer_text(text, as_json(message))))
    for ep in failed:
        for tool in dict.fromkeys(ep.failed_tools):
            later = next((text for at, text in worked.get((ep.session_id, tool), ())
                          if at > ep.created_at and text.strip()), None)
            if later is not None and later != ep.response_text:
                ep.signals.append(Signal("sibling_success", later, call=True))


def share_known_calls(episodes: list[Episode], share: bool = True) -> None:
    """Where the working call is known, the environment's error has nothing left to teach.

    An `env_error` teaches through the teacher's guess at a fix (kept when it repeats it), and
    on a model that cannot read errors the guesses are wrong calls: measured on the tool
    benchmark, 10 of a round's 22 items were such guesses beside 12 demonstrated calls. So an
    answer with a known working call (an admitted call signal) loses its `env_error` signals,
    and with `share` a failed call to the same tool elsewhere in its conversation (the agent's
    retry, say) gets that call as its sibling success instead of a guess."""
    known: dict[tuple[str, str], Signal] = {}
    for ep in episodes:
        calls = [s for s in ep.signals if s.call]
        if calls and ep.session_id:
            for tool in ep.failed_tools:
                known.setdefault((ep.session_id, tool), calls[0])
    for ep in episodes:
        if not ep.failed_tools:
            continue
        if share and not any(s.call for s in ep.signals) and ep.session_id:
            shared = [known[(ep.session_id, t)] for t in dict.fromkeys(ep.failed_tools)
                      if (ep.session_id, t) in known]
            ep.signals += [Signal("sibling_success", s.text, s.principal, call=True)
                           for s in shared if s.text != ep.response_text]
        if any(s.call for s in ep.signals):
            ep.signals = [s for s in ep.signals if s.source != "env_error"]


def output_constraint(params: Any) -> dict[str, Any] | None:
    """The structured-output fields of a stored answer's request (`params`): what a sample
    standing for that answer must be drawn under, as the engine's completions API takes them."""
    if not isinstance(params, dict):
        return None
    found = {k: params[k] for k in CONSTRAINT_PARAMS if isinstance(params.get(k), dict)}
    if (found.get("response_format") or {}).get("type", "text") == "text":
        found.pop("response_format", None)
    return found or None


def failed_tools(feedback: list[dict[str, Any]]) -> list[str]:
    """The tools whose calls failed, from an episode's feedback items (a failed tool result is
    an `env_error` whose metadata names its tool)."""
    return [tool for f in feedback if f.get("type") == "env_error"
            and (tool := (as_json(f.get("metadata")) or {}).get("tool"))]


def answer_text(text: str | None, message: dict[str, Any] | None) -> str:
    """An answer as text: what it said, or, for a call with nothing said, its tool calls as
    JSON (`{"name": ..., "arguments": {...}}` a line each)."""
    if text and text.strip():
        return text
    calls = (message or {}).get("tool_calls") or []
    lines = []
    for call in calls:
        if not isinstance(call, dict):
            continue
        function = call["function"] if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            with contextlib.suppress(ValueError):  # as the model wrote them, if not JSON
                arguments = json.loads(arguments)
        lines.append(json.dumps({"name": function.get("name"), "arguments": arguments},
                                ensure_ascii=False))
    return "\n".join(lines)


def as_json(value: Any) -> Any:
    """A JSON column's value, whether the query path returned it parsed or as text."""
    return json.loads(value) if isinstance(value, str) else value


def _as_list(value: Any) -> list[dict[str, Any]]:
    return list(as_json(value) or [])
