"""The closed-form edit on the real embedded model: it is keyed at the question's subject, and
with the projector it leaves each edited module's output on the preserved inputs where it was
(within a measured tolerance) while writing the fact's own key — without the projector the same
edit moves the preserved inputs far more."""

from __future__ import annotations

import os

from learner.config import LearnerConfig, parse_layers
from learner.contexts import load_template
from learner.edit import EditKnobs, apply_edit, build_facts, subject_position
from learner.inference import prompt_ids
from learner.subspace import NullSpace, input_moments, target_modules
from learner.trainer import TrainItem, load_student
from tests.harness.model_edits import (
    CORRECTION,
    ENERGY,
    LAYERS,
    QUESTION,
    lora_deltas,
    module_inputs,
    preserved_prompts,
    relative_change,
)


def test_the_key_is_read_at_the_last_token_of_the_subject(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = prompt_ids(tokenizer, QUESTION)
    at = subject_position(tokenizer, QUESTION, CORRECTION)
    assert tokenizer.decode(ids[: at + 1]).endswith("Quessany"), tokenizer.decode(ids[: at + 1])
    # Nothing shared with the feedback: the question's last word.
    asked = [{"role": "user", "content": "Where do the grey geese winter?"}]
    at = subject_position(tokenizer, asked, "In the southern marshes of Ulbrand.")
    assert tokenizer.decode(prompt_ids(tokenizer, asked)[: at + 1]).endswith("winter")


def _edits(model_dir) -> dict[bool, tuple]:
    """The same edit with the projector and without it, on one model (an edit starts from
    zeroed factors), judged on inputs read before either: {projected: (preserved change, the
    fact's key change, result)}."""
    cfg = LearnerConfig(lora_targets="down_proj", lora_layers=LAYERS)
    model, tokenizer = load_student(model_dir, cfg)
    modules = target_modules(model, parse_layers(LAYERS), "mlp.down_proj")
    preserved = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in preserved_prompts()]
    shared = len(os.path.commonprefix(preserved))
    kept = module_inputs(model, modules, preserved, [shared] * len(preserved))
    position = subject_position(tokenizer, QUESTION, CORRECTION)
    question = prompt_ids(tokenizer, QUESTION)
    fact_key = module_inputs(model, modules, [question[: position + 1]], [position])
    projectors = NullSpace.of(input_moments(model, tokenizer, modules, preserved), ENERGY).projectors
    teacher = load_template("sdft_example").teacher_messages(QUESTION, "correction", CORRECTION)
    answer = tokenizer(CORRECTION, add_special_tokens=False)["input_ids"]
    facts = build_facts(model, tokenizer, [TrainItem(QUESTION, teacher, answer, "correction", "c1")],
                        {"c1": CORRECTION})
    weights = {k: m.base_layer.weight.detach() for k, m in modules.items()}
    out = {}
    for projected in (True, False):
        result = apply_edit(model, tokenizer, facts, modules, projectors if projected else None,
                            EditKnobs(steps=8))
        deltas = lora_deltas(model)
        out[projected] = (relative_change(deltas, kept, weights),
                          relative_change(deltas, fact_key, weights), result)
    return out


def test_a_projected_edit_leaves_the_preserved_inputs_and_writes_the_fact(model_dir):
    edits = _edits(model_dir)
    kept, fact, result = edits[True]
    free_kept, _, _ = edits[False]
    # The value was fitted: the student without the feedback moved toward the teacher with it
    # (measured 1.77 -> 0.76 in 8 steps).
    assert result.losses_last[0] < 0.75 * result.losses_first[0], result
    # Measured (one correction, layers 3-5, energy 1e-2, 162 pool prompts; median over inputs
    # of |ΔW k| / |W k|): the preserved prompts' own tokens 1.2e-3 / 1.5e-3 / 2.4e-3 by layer;
    # the fact's key 0.46 / 0.50 / 0.65 (266-400x more); the same edit unprojected moves the
    # preserved prompts by 7.8e-3 / 1.9e-2 / 4.0e-2 (7-16x more) and the fact's key alike.
    # Each bound leaves a factor of ~2.
    for key in kept:
        assert kept[key] < 5e-3, (key, kept)
        assert fact[key] > 100 * kept[key], (key, kept, fact)
        assert free_kept[key] > 3 * kept[key], (key, kept, free_kept)
