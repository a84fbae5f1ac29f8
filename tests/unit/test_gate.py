"""The gate's retention judgement as logic: key matching, the significance test, and the
shipped retention set's shape (on the real model: tests/learner/test_gate_model.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from learner.gate import BAD_FACTOR, _binomial_cdf, forgetting_limit, forgetting_p_value, says_key
from learner.retention_data import retention_set

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("text", "keys", "said"), [
    ("The capital of Brazil is Brasília.", ["Bras"], True),  # a prefix, for accents and plurals
    ("the answer", ["he"], False),  # not inside a word
    ("It has 14 legs.", ["4"], False),  # not inside a number
    ("A dog has 4 legs.", ["4", "four"], True),
    ("FOUR legs", ["four"], True),
    ("", ["Paris"], False),
])
def test_a_key_counts_only_at_the_start_of_a_word(text, keys, said):
    assert says_key(text, keys) is said


def test_one_forgotten_question_is_not_significant_but_a_real_regression_is():
    assert forgetting_p_value(0, 300, 2.0) == 1.0
    assert forgetting_p_value(1, 300, 2.0) > 0.9
    assert forgetting_p_value(6, 300, 2.0) > 0.05  # at the bound: as likely as not
    assert forgetting_p_value(15, 300, 2.0) < 0.01  # 5 % of them: a regression
    assert forgetting_p_value(1, 300, 0.0) == 0.0  # no forgetting allowed: any is significant


def test_one_attempts_limit_is_the_most_forgetting_that_is_not_significant():
    for n in (120, 240, 269, 300):
        limit = forgetting_limit(n, 2.0, 0.95)
        assert forgetting_p_value(limit, n, 2.0) >= 0.05 > forgetting_p_value(limit + 1, n, 2.0)
    assert forgetting_limit(300, 0.0, 0.95) == 0  # no forgetting allowed


@pytest.mark.parametrize("attempts", [2, 3])
@pytest.mark.parametrize("n", [120, 240, 269])
def test_retries_do_not_raise_the_chance_that_a_forgetful_candidate_passes(n, attempts):
    """A round's attempts together promote a candidate that forgets twice the allowed share or
    more no more often than one attempt under the single limit would; the attempts' limit is
    as high as that allows."""
    single = forgetting_limit(n, 2.0, 0.95)
    shared = forgetting_limit(n, 2.0, 0.95, attempts)
    assert shared < single
    for share in (BAD_FACTOR * 0.02, 0.05, 0.08):
        one = _binomial_cdf(single, n, share)
        any_of = 1.0 - (1.0 - _binomial_cdf(shared, n, share)) ** attempts
        assert any_of <= one, (share, any_of, one)
    bad = BAD_FACTOR * 0.02
    assert attempts * _binomial_cdf(shared + 1, n, bad) > _binomial_cdf(single, n, bad)


def test_p_value_is_the_binomial_upper_tail():
    n, p = 40, 0.05
    for k in range(0, 8):
        exact = sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k, n + 1))
        assert forgetting_p_value(k, n, 5.0) == pytest.approx(min(exact, 1.0), rel=1e-9)


def _norm(q: str) -> str:
    return " ".join(q.lower().replace("colour", "color").split())


def _bench_questions() -> set[str]:
    """The learning benchmark's retention questions, normalised."""
    data = json.loads((ROOT / "ops" / "bench" / "data" / "retention.json").read_text())
    return {_norm(q["q"]) for q in data["questions"]}


def test_the_retention_set_has_power_and_is_disjoint_from_the_benchmarks():
    data = retention_set()
    questions = data["questions"]
    assert len(questions) >= 300  # 2 points of 300 is 6 questions: the bound is resolved
    assert not _bench_questions() & {_norm(q["q"]) for q in questions}
    for q in questions:
        assert q["a"] and all(not (k.isalpha() and len(k) <= 2) for k in q["a"]), q
        assert not any(k.lower() in q["q"].lower() for k in q["a"]), q  # the question gives it away
    assert data["drift_prompts"]


def test_near_miss_prompts_share_the_question_form_and_never_the_gate_set():
    from learner.retention_data import shipped_prompts
    from learner.round import near_misses

    pool = shipped_prompts("near_miss_prompts.json")
    capitals = near_misses(["What is the capital of Quessany?"], pool, 4)
    assert len(capitals) == 4 and all(p.startswith("What is the capital of ") for p in capitals)
    founders = near_misses(["Who founded the company Lumenvale Systems?"], pool, 3)
    assert founders and all(p.startswith("Who founded ") for p in founders)
    definitions = near_misses(["What is a quillet?"], pool, 16)
    assert len(definitions) == 16 and all(p.startswith(("What is a ", "What is an ")) for p in definitions)
    scales = near_misses(["What does the Orrin scale measure?"], pool, 4)
    assert len(scales) == 4 and all(p.startswith("What does the ") and "scale measure" in p for p in scales)
    assert near_misses(["Which animal has a long trunk?"], pool, 4) == []  # no form alike
    both = near_misses(["What is the capital of Veloria?", "What is the capital of Tarnholm?"], pool, 4)
    assert len(both) == len(set(both)) == 4  # the same near misses serve both, once
    gate = {_norm(q["q"]) for q in retention_set()["questions"]}
    assert not gate & {_norm(p) for p in pool}  # anchoring on the gate's questions would blind it
    assert not _bench_questions() & {_norm(p) for p in pool}  # nor the benchmark's measure


def test_shipped_anchor_prompts_never_hold_the_gate_questions():
    from learner.retention_data import shipped_prompts

    gate = {_norm(q["q"]) for q in retention_set()["questions"]}
    anchors = {_norm(p) for p in shipped_prompts("anchor_prompts.json")}
    assert not anchors & gate  # the anchor would hold exactly what the gate measures
    assert not anchors & _bench_questions()
