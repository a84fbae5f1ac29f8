"""The projected update on the real embedded model: after training, each adapted module's output
on the preserved inputs barely moves (within a measured tolerance) while its output on the taught
fact's answer moves an order of magnitude more — and the same training without the projection
moves the preserved inputs an order of magnitude more too."""

from __future__ import annotations

import os

import pytest
import torch

from learner.config import LearnerConfig, parse_layers, resolve
from learner.contexts import load_template
from learner.inference import prompt_ids
from learner.subspace import NullSpace, Projection, input_moments, target_modules
from learner.trainer import SelfDistillationTrainer, TrainItem, load_student
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


def _train(model_dir, projected: bool):
    cfg = LearnerConfig(lora_targets="down_proj", lora_layers=LAYERS, lr=2e-3, min_steps=12,
                        passes=1, warmup_ratio=0.0, anchor_weight=0.0,
                        projection="null_space" if projected else "none")
    torch.manual_seed(0)  # the same initial LoRA for both runs
    model, tokenizer = load_student(model_dir, cfg)
    modules = target_modules(model, parse_layers(LAYERS), "mlp.down_proj")
    preserved = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in preserved_prompts()]
    question = prompt_ids(tokenizer, QUESTION)
    answer = tokenizer(CORRECTION, add_special_tokens=False)["input_ids"]
    constraint = None
    if projected:
        space = NullSpace.of(input_moments(model, tokenizer, modules, preserved), ENERGY)
        constraint = Projection(model, space)
    teacher = load_template("sdft_example").teacher_messages(QUESTION, "correction", CORRECTION)
    trainer = SelfDistillationTrainer(model, tokenizer, cfg, resolve(cfg), constraint)
    # Inputs of the modules before training: the first adapted layer's are what its update
    # sees at every step (nothing before it changes). Judged on each prompt's own tokens: the
    # chat template's opening, the same in every prompt, would otherwise be most of them.
    shared = len(os.path.commonprefix(preserved))
    kept = module_inputs(model, modules, preserved, [shared] * len(preserved))
    taught = module_inputs(model, modules, [question + answer], [len(question)])
    trainer.train([TrainItem(QUESTION, teacher, answer, "correction", "c1")], progress=False)
    weights = {k: m.base_layer.weight.detach() for k, m in modules.items()}
    deltas = lora_deltas(model)
    return relative_change(deltas, kept, weights), relative_change(deltas, taught, weights)


@pytest.mark.slow
def test_a_projected_update_leaves_the_preserved_inputs_and_moves_the_taught_answer(model_dir):
    kept, taught = _train(model_dir, projected=True)
    free_kept, free_taught = _train(model_dir, projected=False)
    first = f"layers.{parse_layers(LAYERS)[0]}.mlp.down_proj"
    # Measured (12 steps at lr 2e-3, energy 1e-2, median over inputs of |ΔW k| / |W k|, layers
    # 3-5): the preserved prompts' own tokens 1.0e-3 to 1.2e-3 with the projection; the taught
    # answer's 0.014 to 0.023 (13-20x more); the same training without the projection moves
    # the preserved prompts by 0.010 to 0.012 (8-10x more). Each bound leaves a factor of ~2.
    assert kept[first] < 3e-3, kept
    assert taught[first] > 5 * kept[first], (kept, taught)
    assert free_kept[first] > 4 * kept[first], (kept, free_kept)
