"""The trainer on the real embedded model (transformers + peft, CPU): a few steps move the
student toward the feedback-conditioned teacher, and the adapter saves and loads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from learner.config import LearnerConfig, resolve
from learner.contexts import load_template
from learner.trainer import AnchorItem, SelfDistillationTrainer, TrainItem, load_student

MODEL_CACHE = Path(os.environ.get(
    "SDLOOP_MODEL__CACHE_DIR", Path(__file__).resolve().parents[2] / ".cache" / "models"))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from serving.model_cache import ensure_embedded_model

    return ensure_embedded_model(MODEL_CACHE, progress=False)


QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]
CORRECTION = "The capital of Quessany is Dalvorne."


def _item(tokenizer, preset_template="sdft_example") -> TrainItem:
    teacher = load_template(preset_template).teacher_messages(QUESTION, "correction", CORRECTION)
    response = tokenizer(CORRECTION, add_special_tokens=False)["input_ids"]
    return TrainItem(QUESTION, teacher, response, "correction", "c1")


@pytest.mark.parametrize("preset", ["opsd", "sdft", "sdpo", "hindsight"])
def test_a_few_steps_lower_the_teacher_student_divergence(model_dir, preset):
    cfg = LearnerConfig(preset=preset, lr=1e-3, min_steps=0, passes=6, warmup_ratio=0.0,
                        context=["correction"], teacher="frozen")
    knobs = resolve(cfg)
    model, tokenizer = load_student(model_dir, cfg)
    trainer = SelfDistillationTrainer(model, tokenizer, cfg, knobs)
    item = _item(tokenizer)
    # Judged by the preset's own divergence (and clip) over the full vocabulary.
    eval_knobs = resolve(LearnerConfig(preset=preset, support="full_vocab", teacher="frozen"))
    judge = SelfDistillationTrainer(model, tokenizer, cfg, eval_knobs)
    before = judge.divergence([item])
    result = trainer.train([item], progress=False)
    after = judge.divergence([item])
    assert result.steps == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert after < before, (preset, before, after)


def test_ema_teacher_and_anchor_and_cross_entropy_run_together(model_dir, tmp_path):
    cfg = LearnerConfig(preset="sdft", min_steps=0, passes=2, ce_weight=0.5, anchor_weight=1.0)
    knobs = resolve(cfg)
    model, tokenizer = load_student(model_dir, cfg)
    trainer = SelfDistillationTrainer(model, tokenizer, cfg, knobs)
    anchor = AnchorItem([{"role": "user", "content": "What is the capital of France?"}],
                        tokenizer("The capital of France is Paris.", add_special_tokens=False)["input_ids"])
    result = trainer.train([_item(tokenizer)], anchors=[anchor], progress=False)
    assert result.steps == 2 and len(result.anchor_losses) == 2
    ema_moved = any(not torch.equal(e, p.detach()) for e, p in zip(
        trainer._ema, trainer._trainable, strict=True))  # noqa: SLF001
    assert ema_moved

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    again, _ = load_student(model_dir, cfg, parent_adapter=tmp_path / "adapter")
    a = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in again.state_dict().items() if "lora_" in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_step_takes_the_next_anchors_in_turn(model_dir):
    cfg = LearnerConfig(min_steps=0, passes=3, anchors_per_step=2)
    model, tokenizer = load_student(model_dir, cfg)
    used: list[str] = []

    class Recording(SelfDistillationTrainer):
        def anchor_loss(self, anchors):
            used.extend(a.messages[0]["content"] for a in anchors)
            return super().anchor_loss(anchors)

    anchors = [AnchorItem([{"role": "user", "content": q}],
                          tokenizer(a, add_special_tokens=False)["input_ids"])
               for q, a in [("Capital of France?", "Paris."), ("Capital of Spain?", "Madrid."),
                            ("Capital of Peru?", "Lima.")]]
    result = Recording(model, tokenizer, cfg, resolve(cfg)).train(
        [_item(tokenizer)], anchors=anchors, progress=False)
    assert result.steps == 3 and len(result.anchor_losses) == 3
    names = ["Capital of France?", "Capital of Spain?", "Capital of Peru?"]
    assert used == [names[i % 3] for i in range(6)]  # every anchor twice, in order


def test_anchors_scored_together_lose_what_they_lose_one_at_a_time(model_dir):
    cfg = LearnerConfig()
    model, tokenizer = load_student(model_dir, cfg)
    trainer = SelfDistillationTrainer(model, tokenizer, cfg, resolve(cfg))
    trainer.train([_item(tokenizer)], max_steps=2, progress=False)  # the student moves off base
    anchors = [AnchorItem([{"role": "user", "content": q}],
                          tokenizer(a, add_special_tokens=False)["input_ids"])
               for q, a in [("Capital of France?", "Paris, on the Seine."), ("Who wrote Hamlet?",
                            "William Shakespeare wrote Hamlet around 1600."), ("2+2?", "4")]]
    def loss_and_grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return float(loss), [p.grad.clone() for p in trainer._trainable]  # noqa: SLF001

    together, grads = loss_and_grads(trainer.anchor_loss(anchors))
    alone, alone_grads = loss_and_grads(
        sum(trainer.anchor_loss([a]) for a in anchors) / len(anchors))
    assert alone > 0 and together == pytest.approx(alone, rel=1e-4)
    off = sum(float((g - h).norm() ** 2) for g, h in zip(grads, alone_grads, strict=True))
    assert off ** 0.5 < 1e-3 * sum(float(h.norm() ** 2) for h in alone_grads) ** 0.5


def test_lora_targets_name_the_adapted_modules(model_dir):
    model, _ = load_student(model_dir, LearnerConfig(lora_targets="gate_proj, up_proj, down_proj"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()
               if ".lora_A" in n}
    assert adapted == {"gate_proj", "up_proj", "down_proj"}


def test_teacher_regenerations_carry_the_correction(model_dir):
    from learner.responses import draw, teacher_regenerations

    cfg = LearnerConfig()
    model, tokenizer = load_student(model_dir, cfg)
    teacher = load_template("sdft_example").teacher_messages(QUESTION, "correction", CORRECTION)
    kept = teacher_regenerations(model, tokenizer, QUESTION, teacher, CORRECTION, n=4,
                                 temperature=0.7, max_new_tokens=24)
    assert kept, "no regeneration agreed with the correction"
    assert all("Dalvorne" in tokenizer.decode(ids) for ids in kept)  # the filter's part
    # What the filter does not force:
    # the correction in context is what brings the name. The same model asked without it, on
    # the same seeds, says it less often (measured, seeds 0-2: teacher 1-2 kept of 4, without
    # the correction 0 of 4).
    alone = draw(model, tokenizer, QUESTION, n=4, temperature=0.7, max_new_tokens=24, seed=0)
    assert len(kept) > sum("Dalvorne" in tokenizer.decode(ids) for ids in alone)


def test_a_run_resumed_from_a_checkpoint_ends_where_an_unbroken_one_does(model_dir):
    cfg = LearnerConfig(preset="sdloop", min_steps=0, passes=6, lr=1e-3, checkpoint_every=2)
    knobs = resolve(cfg)

    def fresh():
        torch.manual_seed(0)  # the same initial LoRA for every run
        model, tokenizer = load_student(model_dir, cfg)
        return model, tokenizer, SelfDistillationTrainer(model, tokenizer, cfg, knobs)

    model, tokenizer, unbroken = fresh()
    items = [_item(tokenizer)]
    unbroken.train(items, progress=False)
    want = [p.detach().clone() for p in unbroken._trainable]  # noqa: SLF001

    class Crash(Exception):
        pass

    saved = []

    def save_then_crash(state):
        saved.append(state)
        raise Crash  # the process dies right after its checkpoint at step 2

    _, _, broken = fresh()
    with pytest.raises(Crash):
        broken.train(items, progress=False, save=save_then_crash)
    assert saved[0]["step"] == 2

    _, _, resumed = fresh()
    result = resumed.train(items, progress=False, resume=saved[0])
    assert result.resumed_at == 2 and result.steps == 6 and len(result.losses) == 6
    got = list(resumed._trainable)  # noqa: SLF001
    assert all(torch.allclose(g, w, atol=1e-6) for g, w in zip(got, want, strict=True))


def test_a_round_on_a_learned_version_keeps_it_as_the_frozen_teacher(model_dir, tmp_path):
    """The frozen teacher and the anchor's reference are the weights a round starts from: on top
    of a learned version they are that version, not the base model it would pull back to."""
    cfg = LearnerConfig(preset="sdft", teacher="frozen", min_steps=0, passes=10, lr=2e-3, ce_weight=1.0)
    model, tokenizer = load_student(model_dir, cfg)
    SelfDistillationTrainer(model, tokenizer, cfg, resolve(cfg)).train([_item(tokenizer)],
                                                                      progress=False)
    model.save_pretrained(tmp_path / "parent")

    child, tokenizer = load_student(model_dir, cfg, parent_adapter=tmp_path / "parent")
    trainer = SelfDistillationTrainer(child, tokenizer, cfg, resolve(cfg))
    response = _item(tokenizer).response
    start = trainer._start_hidden(QUESTION, response)  # noqa: SLF001
    with torch.no_grad():
        parent = trainer._hidden(QUESTION, response)  # noqa: SLF001 - the parent, as loaded
        with child.disable_adapter():
            base = trainer._hidden(QUESTION, response)  # noqa: SLF001
    assert torch.allclose(start, parent, atol=1e-5)
    assert not torch.allclose(start, base, atol=1e-3)  # the parent learned something
    trainer.train([_item(tokenizer)], progress=False)  # training moves the adapter ...
    assert torch.equal(trainer._start_hidden(QUESTION, response), start)  # noqa: SLF001 - ... not the teacher
