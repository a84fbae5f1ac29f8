"""The gate: a candidate is promoted only if it learned and did not forget.

(a) Learned: on held-out teacher answers the teacher–student divergence dropped.
(b) Did not forget, judged on the retention set (the shipped `learner/data/retention.json`,
~300 short-answer questions, or the operator's own: `learner.retention_set`), restricted to the
questions the base model answers right, and promptly (its key within the first half of the
answer window):
  - exact match, as a paired comparison per question: the candidate forgot k of those N. The
    gate fails when k is significantly more than `retention_max_drop` points allow: the
    one-sided binomial test of "the candidate forgets at most that share" rejects at
    `gate_confidence`. One unlucky question does not decide a round; a real regression does —
    and bleed of a taught fact into neighbouring questions (other capitals, other animals) is
    exactly such a regression. A round's attempts (a rejected round is retried) share one
    false-pass budget, so each is held to a lower limit (`forgetting_limit`): retrying cannot
    buy a pass;
  - likelihood, with far more resolution than exact match: the mean per-token increase of the
    negative log-likelihood of the base model's own right answers under the candidate;
  - drift, KL(base ‖ candidate) over the base model's own answers to neutral prompts.
Base and candidate are measured in the same process on the same weights (adapter disabled vs
enabled). The base model's answers do not change between rounds: they are computed once and
kept in the learner's workspace. The candidate is checked teacher-forced on them — one forward
pass per question: if its greedy choice follows the base answer at least until a key has been
said, greedy decoding would say it too — and only the questions where it turns away earlier
are generated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from learner.inference import (
    adapter_and_base_log_probs,
    answer_log_probs,
    generate_greedy,
    prompt_ids,
)

RETENTION_TOKENS = 32  # new tokens per retention answer (short answers say the key early)
# A question counts only where the base model says its key within this many tokens: half the
# window, so a candidate that phrases the same answer with more preamble is not judged by where
# the window cuts it off. Answers whose key comes at the end of a ramble (the multiplication
# tables, "The answer to this classic problem is ...") turned on any change of style and
# measured the window, not what the model knows.
RETENTION_KEY_WITHIN = 16


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    heldout_divergence_before: float
    heldout_divergence_after: float
    retention_base: float  # % of the retention set the base model answers right
    retention_candidate: float  # % of it the candidate still answers right (forgetting only)
    retention_forgotten: int  # questions the base model answers right and the candidate not
    retention_questions: int  # the questions the base model answers right: the test's N
    retention_p_value: float  # P(forgetting >= observed | the candidate forgets the bound's share)
    retention_nll_increase: float  # mean per-token NLL increase of the base's right answers
    drift: float
    retention_limit: int = 0  # the most questions this attempt could forget and pass
    attempts: int = 1  # the round's attempts sharing the false-pass budget (forgetting_limit)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def says_key(text: str, keys: list[str]) -> bool:
    """A key at the start of a word, case-insensitive ("Bras" matches "Brasília", "he" does
    not match "the", "4" does not match "14")."""
    low = text.lower()
    return any(re.search(r"(?<!\w)" + re.escape(k.lower()) + (r"(?!\d)" if k[-1:].isdigit() else ""),
                         low) for k in keys)


def _binomial_mass(n: int, p: float, js: range) -> float:
    """P(X in js) for X ~ Binomial(n, p), 0 < p < 1, summed in log space."""
    log_terms = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1)
                 + j * math.log(p) + (n - j) * math.log1p(-p) for j in js]
    if not log_terms:
        return 0.0
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def forgetting_p_value(forgotten: int, questions: int, max_drop_points: float) -> float:
    """P(X >= forgotten) for X ~ Binomial(questions, max_drop_points / 100): how likely this much
    forgetting is from a candidate that forgets exactly the allowed share. Small: significant."""
    p = min(max(max_drop_points / 100.0, 0.0), 1.0)
    if forgotten <= 0:
        return 1.0
    if p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    return _binomial_mass(questions, p, range(forgotten, questions + 1))


# A "bad" candidate, for sharing the false-pass budget among a round's attempts: one that
# forgets this many times the allowed share.
BAD_FACTOR = 2.0


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return _binomial_mass(n, p, range(k + 1))


def forgetting_limit(questions: int, max_drop_points: float, confidence: float,
                     attempts: int = 1) -> int:
    """The most questions one of a round's `attempts` candidates may forget of `questions`.

    One attempt: the most that is not significantly more than `max_drop_points` allow (the
    one-sided binomial test at `confidence`). A rejected round is tried again on the same
    questions, and every try is another chance for a candidate that forgets too much to pass
    by luck: a retry that passes is partly selected by the gate's own set. So the attempts
    share one false-pass budget: each is held to the largest limit at which `attempts` of them
    together pass a candidate that forgets `BAD_FACTOR` times the allowed share no more often
    than one attempt under the single limit would (the union bound; for a candidate forgetting
    more still, the limits' pass probabilities fall apart faster, so it holds there too)."""
    single = questions
    for k in range(questions + 1):
        if forgetting_p_value(k, questions, max_drop_points) < 1.0 - confidence:
            single = k - 1
            break
    if attempts <= 1 or single < 0:
        return single
    bad = min(BAD_FACTOR * max_drop_points / 100.0, 1.0)
    budget = _binomial_cdf(single, questions, bad) / attempts
    limit = single
    while limit >= 0 and _binomial_cdf(limit, questions, bad) > budget:
        limit -= 1
    return limit


@dataclass
class BaseReference:
    """What the base model says and how sure it is, per retention question and drift prompt."""

    answers: list[list[int]]  # greedy answer token ids
    key_at: list[int | None]  # answer tokens after which a key has been said; None: not said
    # within RETENTION_KEY_WITHIN tokens (wrong, or too late to judge)
    logprobs: list[list[float]]  # per-token log-probability of its answer
    drift_answers: list[list[int]]


def _key_at(tokenizer: Any, answer: list[int], keys: list[str]) -> int | None:
    for t in range(1, len(answer) + 1):
        if says_key(tokenizer.decode(answer[:t], skip_special_tokens=True), keys):
            return t
    return None


def base_reference(model: Any, tokenizer: Any, data: dict[str, Any],
                   cache: Path | None = None, cache_key: str = "") -> BaseReference:
    """The base model's answers (adapter disabled), from `cache` when it was made for the same
    model, set and settings."""
    digest = hashlib.sha256(json.dumps([cache_key, RETENTION_TOKENS, RETENTION_KEY_WITHIN, data],
                                       sort_keys=True).encode()).hexdigest()
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("digest") == digest:
                return BaseReference(**saved["reference"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
    questions = [[{"role": "user", "content": q["q"]}] for q in data["questions"]]
    drift_convs = [[{"role": "user", "content": p}] for p in data["drift_prompts"]]
    model.eval()
    with model.disable_adapter():
        answers = generate_greedy(model, tokenizer, questions, RETENTION_TOKENS)
        key_at = [_key_at(tokenizer, a[:RETENTION_KEY_WITHIN], q["a"])
                  for a, q in zip(answers, data["questions"], strict=True)]
        scored = answer_log_probs(model, tokenizer, [prompt_ids(tokenizer, c) for c in questions],
                                  answers)
        logprobs = [lp if k is not None else [] for (lp, _), k in zip(scored, key_at, strict=True)]
        drift_answers = generate_greedy(model, tokenizer, drift_convs, RETENTION_TOKENS)
    ref = BaseReference(answers, key_at, logprobs, drift_answers)
    if cache is not None:  # replaced whole: rounds of other data dirs may read it meanwhile
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"digest": digest, "reference": asdict(ref)}))
        tmp.replace(cache)
    return ref


@torch.no_grad()
def drift(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
          base_answers: list[list[int]]) -> float:
    """Mean per-token KL(base ‖ candidate) over the base model's own answers."""
    total, count = 0.0, 0
    for conv, answer in zip(conversations, base_answers, strict=True):
        if not answer:
            continue
        cand, base = adapter_and_base_log_probs(model, prompt_ids(tokenizer, conv), answer)
        total += float((base.exp() * (base - cand)).sum())
        count += len(answer)
    return total / max(count, 1)


@dataclass
class Retention:
    forgotten: list[int]  # indices of the questions the candidate no longer answers right
    questions: int  # the base model answers this many right
    nll_increase: float


@torch.no_grad()
def retention(model: Any, tokenizer: Any, data: dict[str, Any], ref: BaseReference) -> Retention:
    """The candidate (adapter enabled) on the questions the base model answers right."""
    model.eval()
    right = [i for i, k in enumerate(ref.key_at) if k is not None]
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": data["questions"][i]["q"]}])
               for i in right]
    turned: list[int] = []
    increases: list[float] = []
    for i, (logp, greedy) in zip(right, answer_log_probs(model, tokenizer, prompts,
                                                         [ref.answers[i] for i in right]),
                                 strict=True):
        answer, key_at = ref.answers[i], ref.key_at[i]
        increases.append(sum(b - c for b, c in zip(ref.logprobs[i], logp, strict=True)) / len(answer))
        # Greedy decoding follows the base answer up to the first token it would choose otherwise.
        departs = next((t for t, (g, a) in enumerate(zip(greedy, answer, strict=True)) if g != a),
                       len(answer))
        if departs < key_at:
            turned.append(i)
    forgotten = []
    if turned:
        convs = [[{"role": "user", "content": data["questions"][i]["q"]}] for i in turned]
        for i, answer in zip(turned, generate_greedy(model, tokenizer, convs, RETENTION_TOKENS),
                             strict=True):
            if not says_key(tokenizer.decode(answer, skip_special_tokens=True),
                            data["questions"][i]["a"]):
                forgotten.append(i)
    return Retention(forgotten, len(right), sum(increases) / max(len(increases), 1))


def evaluate(model: Any, tokenizer: Any, data: dict[str, Any], *, before: float, after: float,
             retention_max_drop: float, drift_max: float, retention_nll_max: float,
             confidence: float = 0.95, cache: Path | None = None,
             cache_key: str = "", attempts: int = 1) -> GateResult:
    """The verdict on the candidate (adapter enabled) against the base model (disabled), on the
    retention set `data` (`learner.retention_data.retention_set`), for one of a round's
    `attempts` (`forgetting_limit`)."""
    ref = base_reference(model, tokenizer, data, cache, cache_key)
    kept = retention(model, tokenizer, data, ref)
    total = len(data["questions"])
    forgotten = len(kept.forgotten)
    base_acc = 100.0 * kept.questions / total
    cand_acc = 100.0 * (kept.questions - forgotten) / total
    p_value = forgetting_p_value(forgotten, kept.questions, retention_max_drop)
    drift_convs = [[{"role": "user", "content": p}] for p in data["drift_prompts"]]
    measured_drift = drift(model, tokenizer, drift_convs, ref.drift_answers)

    limit = forgetting_limit(kept.questions, retention_max_drop, confidence, attempts)

    reasons = []
    if not after < before:
        reasons.append(f"held-out divergence did not drop ({before:.4f} -> {after:.4f})")
    if forgotten > limit:
        shared = (f"; {attempts} attempts share the false-pass budget, so each may forget "
                  f"{limit}" if attempts > 1 else "")
        reasons.append(
            f"retention: forgot {forgotten} of the {kept.questions} questions the base model answers "
            f"right ({100.0 * forgotten / max(kept.questions, 1):.1f} %), significantly more than "
            f"{retention_max_drop:g} points allow (p = {p_value:.3g}{shared})")
    if kept.nll_increase > retention_nll_max:
        reasons.append(f"retention: the base model's right answers became {kept.nll_increase:.3f} "
                       f"nats/token less likely (bound {retention_nll_max:g})")
    if measured_drift > drift_max:
        reasons.append(f"drift {measured_drift:.4f} over the bound {drift_max:g}")
    return GateResult(not reasons, reasons, before, after, base_acc, cand_acc, forgotten,
                      kept.questions, p_value, kept.nll_increase, measured_drift, limit, attempts)
