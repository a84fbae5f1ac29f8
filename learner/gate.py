"""The gate: a candidate is promoted only if it learned and did not forget.

(a) On the held-out episodes the teacher–student divergence dropped. (b) On the fixed
retention set shipped with the project (`learner/data/retention.json`) accuracy stays within
`retention_max_drop` points of the base model's, and the drift, KL(base ‖ candidate) over the
base model's own answers to neutral prompts, stays under `drift_max`. Base and candidate are
measured in the same process on the same weights (adapter disabled vs enabled), greedy, batched.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Any

import torch

from learner.inference import adapter_and_base_log_probs, generate_greedy, prompt_ids


@dataclass
class GateResult:
    passed: bool
    reasons: list[str]
    heldout_divergence_before: float
    heldout_divergence_after: float
    retention_base: float
    retention_candidate: float
    retention_forgotten: int  # questions the base model answers right and the candidate not
    drift: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def retention_set() -> dict[str, Any]:
    return json.loads(resources.files("learner").joinpath("data", "retention.json").read_text())


def _correct(tokenizer: Any, answers: list[list[int]], keys: list[list[str]]) -> list[bool]:
    texts = [tokenizer.decode(a, skip_special_tokens=True).lower() for a in answers]
    return [any(k.lower() in t for k in ks) for t, ks in zip(texts, keys, strict=True)]


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


def evaluate(model: Any, tokenizer: Any, before: float, after: float, retention_max_drop: float,
             drift_max: float, max_new_tokens: int = 32) -> GateResult:
    data = retention_set()
    questions = [[{"role": "user", "content": q["q"]}] for q in data["questions"]]
    keys = [q["a"] for q in data["questions"]]
    model.eval()
    with model.disable_adapter():
        base_ok = _correct(tokenizer, generate_greedy(model, tokenizer, questions, max_new_tokens),
                           keys)
        drift_convs = [[{"role": "user", "content": p}] for p in data["drift_prompts"]]
        drift_base = generate_greedy(model, tokenizer, drift_convs, max_new_tokens)
    cand_ok = _correct(tokenizer, generate_greedy(model, tokenizer, questions, max_new_tokens), keys)
    base_acc = 100.0 * sum(base_ok) / len(questions)
    cand_acc = 100.0 * sum(cand_ok) / len(questions)
    forgotten = sum(1 for b, c in zip(base_ok, cand_ok, strict=True) if b and not c)
    measured_drift = drift(model, tokenizer, drift_convs, drift_base)

    reasons = []
    if not after < before:
        reasons.append(f"held-out divergence did not drop ({before:.4f} -> {after:.4f})")
    if base_acc - cand_acc > retention_max_drop:
        reasons.append(f"retention accuracy fell {base_acc - cand_acc:.1f} points "
                       f"({base_acc:.1f} -> {cand_acc:.1f}; bound {retention_max_drop:g})")
    if measured_drift > drift_max:
        reasons.append(f"drift {measured_drift:.4f} over the bound {drift_max:g}")
    return GateResult(not reasons, reasons, before, after, base_acc, cand_acc, forgotten,
                      measured_drift)
