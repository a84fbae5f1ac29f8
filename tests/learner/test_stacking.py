"""A constrained round on top of a learned version (learner.stacking), on the real embedded
model: the stacked adapter starts as the parent's function, training and the projection touch
only the round's own factors, and the version it writes — the two concatenated — loads as a
plain peft adapter that computes the same."""

from __future__ import annotations

import pytest
import torch

from learner.config import LearnerConfig, parse_layers, resolve
from learner.contexts import load_template
from learner.inference import prompt_ids
from learner.stacking import consolidate, parent_updates, stacked_student
from learner.subspace import NullSpace, Projection, input_moments, module_key, target_modules
from learner.trainer import SelfDistillationTrainer, TrainItem, load_student
from tests.harness.model_edits import (
    CORRECTION,
    ENERGY,
    QUESTION,
    lora_deltas,
    preserved_prompts,
)


def test_consolidation_keeps_an_update_within_its_rank_whole_and_reports_what_it_drops():
    torch.manual_seed(0)
    update = torch.randn(12, 3, dtype=torch.float64) @ torch.randn(3, 20, dtype=torch.float64)
    b, a, lost = consolidate(update, 5)
    assert a.shape == (3, 20) and b.shape == (12, 3)  # its own rank, not the budget
    assert torch.allclose(b @ a, update) and lost < 1e-12
    b, a, lost = consolidate(update, 2)
    s = torch.linalg.svdvals(update)
    assert a.shape[0] == 2
    assert lost == pytest.approx(float(s[2] ** 2 / s.pow(2).sum()))
    assert float((update - b @ a).norm() ** 2 / update.norm() ** 2) == pytest.approx(lost)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


def _factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {module_key(n): (m.lora_A["default"].weight.detach().clone(),
                            m.lora_B["default"].weight.detach().clone())
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def _parent(model_dir, folder, rank: int):
    """A parent version written to `folder`: a rank-`rank` LoRA on down_proj of layers 3-5 with
    a real (random) update in it; the model and tokenizer."""
    torch.manual_seed(0)
    parent, tokenizer = load_student(model_dir, LearnerConfig(lora_targets="down_proj",
                                                              lora_layers="3-5", lora_r=rank))
    with torch.no_grad():
        for name, p in parent.named_parameters():
            if ".lora_B." in name:
                p.normal_(0.0, 0.02)
    parent.save_pretrained(folder)
    return parent, tokenizer


def test_a_stacked_round_keeps_the_parent_frozen_and_writes_a_plain_adapter(model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # A parent version: a rank-4 LoRA on down_proj of layers 3-5 with a real update in it.
    parent, tokenizer = _parent(model_dir, tmp_path / "parent", 4)
    ids = prompt_ids(tokenizer, QUESTION)
    parent_logits = _logits(parent, ids)

    # The round adapts other layers (4-6) than its parent did: the stack covers 3-6.
    cfg = LearnerConfig(lora_targets="down_proj", lora_layers="4-6", lora_r=4, max_rank=8,
                        lr=1e-2, min_steps=4, passes=1, warmup_ratio=0.0, anchor_weight=0.0)
    model, tokenizer, stack = stacked_student(model_dir, cfg, tmp_path / "parent")
    assert (stack.frozen, stack.rank) == (4, 8) and stack.report["parent_energy_lost_max"] < 1e-9
    assert torch.allclose(_logits(model, ids), parent_logits, atol=1e-4)
    updates = parent_updates(tmp_path / "parent")
    assert all(torch.allclose(lora_deltas(model)[k].double(), u, atol=1e-6) for k, u in updates.items())

    own = parse_layers(cfg.lora_layers)
    modules = target_modules(model, own, "mlp.down_proj")
    preserved = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in preserved_prompts()[:48]]
    space = NullSpace.of(input_moments(model, tokenizer, modules, preserved), ENERGY)
    before = _factors(model)
    teacher = load_template("sdft_example").teacher_messages(QUESTION, "correction", CORRECTION)
    answer = tokenizer(CORRECTION, add_special_tokens=False)["input_ids"]
    trainer = SelfDistillationTrainer(model, tokenizer, cfg, resolve(cfg),
                                      Projection(model, space, stack.frozen))
    trainer.train([TrainItem(QUESTION, teacher, answer, "correction", "c1")], progress=False)
    after = _factors(model)

    for key, (a, b) in after.items():
        a0, b0 = before[key]
        # The parent's factors, and every factor of a module the round does not adapt, as they were.
        assert torch.equal(a[:4], a0[:4]) and torch.equal(b[:, :4], b0[:, :4]), key
        if int(key.split(".")[1]) not in own:
            assert torch.equal(a, a0) and torch.equal(b, b0), key
            continue
        # The round's own factors learned, with their input side in the null space.
        assert b[:, 4:].abs().max() > 0, key
        projector = space.projectors[key]
        assert torch.allclose(a[4:] @ projector, a[4:], atol=1e-5), key
    assert not torch.allclose(_logits(model, ids), parent_logits, atol=1e-4)

    # The written version is a plain peft adapter of rank 8 computing what the stack computed.
    model.save_pretrained(tmp_path / "child")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    served = PeftModel.from_pretrained(base, str(tmp_path / "child"))
    assert served.peft_config["default"].r == 8
    assert torch.allclose(_logits(served, ids), _logits(model, ids), atol=1e-4)


def test_a_stack_without_room_for_the_parent_is_refused(model_dir, tmp_path):
    parent, _ = load_student(model_dir, LearnerConfig(lora_targets="down_proj", lora_layers="3",
                                                      lora_r=2))
    parent.save_pretrained(tmp_path / "parent")
    cfg = LearnerConfig(lora_targets="down_proj", lora_layers="3", lora_r=8, max_rank=8)
    with pytest.raises(ValueError, match="no room for the parent's update"):
        stacked_student(model_dir, cfg, tmp_path / "parent")


def test_an_edit_on_a_stacked_adapter_writes_only_the_rounds_own_factors(model_dir, tmp_path):
    from learner.edit import EditKnobs, apply_edit, build_facts

    _parent(model_dir, tmp_path / "parent", 2)
    cfg = LearnerConfig(lora_targets="down_proj", lora_layers="3-5", lora_r=4, max_rank=6)
    model, tokenizer, stack = stacked_student(model_dir, cfg, tmp_path / "parent")
    before = _factors(model)
    teacher = load_template("sdft_example").teacher_messages(QUESTION, "correction", CORRECTION)
    answer = tokenizer(CORRECTION, add_special_tokens=False)["input_ids"]
    facts = build_facts(model, tokenizer, [TrainItem(QUESTION, teacher, answer, "correction", "c1")],
                        {"c1": CORRECTION})
    modules = target_modules(model, parse_layers(cfg.lora_layers), "mlp.down_proj")
    apply_edit(model, tokenizer, facts, modules, None, EditKnobs(steps=4), stack.frozen)
    for key, (a, b) in _factors(model).items():
        a0, b0 = before[key]
        assert torch.equal(a[:2], a0[:2]) and torch.equal(b[:, :2], b0[:, :2]), key
        assert b[:, 2].abs().max() > 0 and not b[:, 3:].any(), key  # one fact: one factor
