"""Where the response y of a training item comes from.

- `logged`: the stored reply's exact token ids (what the engine produced).
- `teacher`: the feedback-conditioned teacher regenerates the answer in its own words (SDFT's
  generate-from-teacher); several samples, kept only when they agree with the feedback.
- `on_policy`: a fresh sample from the current version, drawn by the serving engine when one
  is running (its token ids and log-probabilities kept, for the truncated importance weight
  between the engine that sampled and the trainer that learns), else by the trainer's model.

The consistency filter knows nothing of any evaluation: a regenerated answer is kept when it
contains at least half of the content words the signal adds to the question — the words of the
correction that the question did not already have. An environment error is not an answer to
agree with: there a regeneration is kept when the teacher gave the same answer at least twice
among its samples (self-consistency: measured on the tool benchmark, the embedded model's
teacher, shown a tool's error, mostly answers something new each time, and a round that trained
on every such sample taught wrong calls — "Paris" became "Barcelona-12345"; a fix it repeats is
one it is sure of) and that answer does not repeat the one that failed.

An answer the engine gave under a structured-output constraint (an agent's `response_format`
JSON schema) is regenerated under the same constraint, by the serving engine serving the same
version: the trainer's model cannot apply one, and unconstrained, the embedded model answers an
agent's JSON prompt in prose or by continuing the schema — samples of what is never served.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from dataclasses import dataclass
from typing import Any

from learner.inference import prompt_ids, sample

log = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")
_STOP = frozenset("""a an the of in on at to for from by with and or but not no yes is are was were
be been being it its this that these those as which who whom what when where why how do does did
so than then there here i you he she we they me him her us them my your his our their actually
that's it's wrong right correct incorrect""".split())  # noqa: SIM905 - a word list


def content_words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text) if w.lower() not in _STOP and len(w) > 1}


def added_words(question: str, signal: str) -> set[str]:
    """Content words the signal brings that the question does not have."""
    return content_words(signal) - content_words(question)


def agrees(answer: str, question: str, signal: str, min_share: float = 0.5) -> bool:
    wanted = added_words(question, signal)
    if not wanted:
        return True
    return len(wanted & content_words(answer)) >= min_share * len(wanted)


@dataclass(frozen=True)
class EnginePolicy:
    """Where on-policy samples come from: the running engine, the name it serves the current
    version under, and its API key (the server's state file has it: the engine answers only
    requests that carry it)."""

    url: str
    model: str
    api_key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @classmethod
    def of(cls, engine_url: str, served: str, api_key: str = "") -> EnginePolicy:
        """`served`: the name the engine serves the version under; `base`: its base model."""
        if served != "base":
            return cls(engine_url, served, api_key)
        req = urllib.request.Request(f"{engine_url}/v1/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        with urllib.request.urlopen(req, timeout=30) as resp:
            models = json.loads(resp.read())["data"]
        return cls(engine_url, next(m["id"] for m in models if not m.get("parent")), api_key)

    def sample(self, prompt: list[int], n: int, temperature: float, max_new_tokens: int,
               seed: int = 0, constraint: dict[str, Any] | None = None,
               ) -> list[tuple[list[int], list[float]]]:
        """`n` samples after the (already templated) prompt ids: token ids, end-of-turn kept,
        each with the engine's log-probability of that token. `constraint`: the structured-output
        fields of the answer they stand for (`learner.episodes.output_constraint`)."""
        body = {"model": self.model, "prompt": prompt, "n": n, "temperature": temperature,
                "max_tokens": max_new_tokens, "logprobs": 0, "return_token_ids": True,
                "seed": seed, **(constraint or {})}
        req = urllib.request.Request(f"{self.url}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **self.headers})
        with urllib.request.urlopen(req, timeout=300) as resp:
            choices = json.loads(resp.read())["choices"]
        return [(list(c["token_ids"]), [float(x) for x in c["logprobs"]["token_logprobs"]])
                for c in choices if c.get("token_ids")]


def draw(model: Any, tokenizer: Any, messages: list[dict[str, Any]], *, n: int,
         temperature: float, max_new_tokens: int, seed: int = 0,
         engine: EnginePolicy | None = None,
         constraint: dict[str, Any] | None = None) -> list[list[int]]:
    """`n` sampled answers to `messages` from the version a round improves: by the serving
    engine under `constraint` where the answer had one and the engine is there, else by the
    trainer's model (`model`, which must then be that version)."""
    if constraint and engine is not None:
        try:
            return [ids for ids, _ in engine.sample(prompt_ids(tokenizer, messages), n, temperature,
                                                    max_new_tokens, seed, constraint) if ids]
        except (OSError, ValueError, KeyError) as exc:  # refused, gone, or not its answer's shape
            log.warning("constrained samples from the trainer's model, unconstrained: the engine "
                        "did not give them (%s)", exc)
    return sample(model, tokenizer, messages, n, temperature, max_new_tokens, seed)


def same_answer(a: str, b: str) -> bool:
    """Whether two answers say the same: equal JSON values, else equal text up to case and
    whitespace."""
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return " ".join(a.lower().split()) == " ".join(b.lower().split())


def same_calls(answer: str, calls: str) -> bool:
    """Whether an answer makes the calls `calls` (one JSON value a line) and no others: the
    JSON values it holds, wherever they stand in its text (a tool-call parser's markup
    around them, say), equal theirs."""
    if same_answer(answer, calls):
        return True
    wanted = [_json_or_none(line) for line in calls.splitlines() if line.strip()]
    return bool(wanted) and _json_values(answer) == wanted


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_values(text: str) -> list[Any]:
    """The JSON objects in a text, in order (each outermost one once)."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at = text.find("{", at + 1)
            continue
        found.append(value)
        at = text.find("{", end)
    return found


def teacher_regenerations(model: Any, tokenizer: Any, student_messages: list[dict[str, Any]],
                          teacher_messages: list[dict[str, Any]], signal: str, *, n: int,
                          temperature: float, max_new_tokens: int, seed: int = 0,
                          engine: EnginePolicy | None = None,
                          constraint: dict[str, Any] | None = None,
                          failed: str | None = None, call: bool = False) -> list[list[int]]:
    """The frozen teacher's answers with the signal in context, kept if they agree with it.
    Called before training: the model is then the version the round improves (the frozen
    teacher), whose earlier lessons the answers keep. `engine`, `constraint`: see `draw`.
    `failed`: the signal is an environment error about this answer; kept are the answers the
    teacher gave at least twice that do not repeat it. `call`: the signal is a working tool
    call; kept are the answers that make it (a call shares its words with wrong calls: the
    keys, the tool's name)."""
    candidates = draw(model, tokenizer, teacher_messages, n=n, temperature=temperature,
                      max_new_tokens=max_new_tokens, seed=seed, engine=engine,
                      constraint=constraint)
    question = " ".join(str(m.get("content", "")) for m in student_messages if m.get("role") == "user")
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in candidates]
    kept = []
    for ids, text in zip(candidates, texts, strict=True):
        if not text.strip() or ids in kept:
            continue
        if failed is not None and (same_answer(text, failed)
                                   or sum(same_answer(text, t) for t in texts) < 2):
            continue
        if call and not same_calls(text, signal):
            continue
        if failed is None and not call and not agrees(text, question, signal):
            continue
        kept.append(ids)
    return kept
