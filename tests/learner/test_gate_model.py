"""The gate's retention check on the real embedded model: the teacher-forced shortcut finds
exactly the questions full greedy generation finds forgotten, and an unchanged model forgets
nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from learner.config import LearnerConfig, resolve
from learner.contexts import load_template
from learner.gate import base_reference, retention, says_key
from learner.inference import answer_log_probs, generate_greedy, prompt_ids, response_log_probs
from learner.retention_data import retention_set
from learner.trainer import SelfDistillationTrainer, TrainItem, load_student

MODEL_CACHE = Path(os.environ.get(
    "SDLOOP_MODEL__CACHE_DIR", Path(__file__).resolve().parents[2] / ".cache" / "models"))
QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]
CORRECTION = "The capital of Quessany is Dalvorne."


@pytest.fixture(scope="module")
def subset() -> dict:
    data = retention_set()
    return {**data, "questions": data["questions"][:40]}  # capitals first: where a taught capital bleeds


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from serving.model_cache import ensure_embedded_model

    return ensure_embedded_model(MODEL_CACHE, progress=False)


def test_the_retention_scorer_agrees_with_the_reference_on_identical_weights(model_dir, subset, tmp_path):
    model, tokenizer = load_student(model_dir, LearnerConfig())  # a fresh LoRA adds nothing
    ref = base_reference(model, tokenizer, subset, tmp_path / "base.json", "k")
    kept = retention(model, tokenizer, subset, ref)
    assert kept.forgotten == [] and kept.nll_increase == pytest.approx(0.0, abs=1e-6)
    assert kept.questions == sum(k is not None for k in ref.key_at) > 30
    assert base_reference(model, tokenizer, subset, tmp_path / "base.json", "k") == ref  # cached


def test_the_shortcut_finds_what_full_generation_finds(model_dir, subset, tmp_path):
    cfg = LearnerConfig(preset="sdft", teacher="frozen", min_steps=0, passes=20, lr=2e-3,
                        ce_weight=1.0)
    model, tokenizer = load_student(model_dir, cfg)
    ref = base_reference(model, tokenizer, subset)
    teacher = load_template("sdft_example").teacher_messages(QUESTION, "correction", CORRECTION)
    response = tokenizer(CORRECTION, add_special_tokens=False)["input_ids"]
    SelfDistillationTrainer(model, tokenizer, cfg, resolve(cfg)).train(
        [TrainItem(QUESTION, teacher, response)], progress=False)  # over-fitted: it bleeds

    kept = retention(model, tokenizer, subset, ref)
    questions = [[{"role": "user", "content": q["q"]}] for q in subset["questions"]]
    answers = generate_greedy(model, tokenizer, questions, 32)
    lost = [i for i, (a, k) in enumerate(zip(answers, ref.key_at, strict=True))
            if k is not None and not says_key(tokenizer.decode(a, skip_special_tokens=True),
                                              subset["questions"][i]["a"])]
    assert kept.forgotten == lost and lost  # the taught capital bled into real ones
    assert kept.nll_increase > 0


def test_batched_scoring_matches_one_sequence_at_a_time(model_dir, subset):
    """The shared prompt opening run once, batches sorted by length, logits only at the answer:
    the same numbers as a plain forward pass per sequence, in the callers' order."""
    model, tokenizer = load_student(model_dir, LearnerConfig())
    convs = [[{"role": "user", "content": q["q"]}] for q in subset["questions"][:5]]
    convs.append([{"role": "system", "content": "Be brief."}, *QUESTION])  # shares less
    prompts = [prompt_ids(tokenizer, c) for c in convs]
    answers = generate_greedy(model, tokenizer, convs, 12)
    answers[0] = answers[0][:3]  # lengths differ: sorting moves it
    scored = answer_log_probs(model, tokenizer, prompts, answers, batch_size=4)
    for prompt, answer, (logp, greedy) in zip(prompts, answers, scored, strict=True):
        full = response_log_probs(model, prompt, answer)
        assert logp == pytest.approx(full.gather(-1, torch.tensor(answer)[:, None])[:, 0].tolist(),
                                     abs=1e-4)
        assert greedy == full.argmax(-1).tolist()
