"""A real adapter version folder made in seconds: a few self-distillation steps on one
correction, written as the learner writes versions. Benchmarks that need a learned version
(and the integration tests) make theirs here."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train_version(root: Path, version: str, model_dir: str, question: list[dict[str, Any]],
                  correction: str) -> str:
    """`root/version`, an adapter that answers `question` with `correction` (CPU, ~20 s)."""
    from learner.config import LearnerConfig, resolve
    from learner.contexts import load_template
    from learner.trainer import SelfDistillationTrainer, TrainItem, load_student
    from learner.versions import write_version

    cfg = LearnerConfig(preset="sdft", teacher="frozen", min_steps=0, passes=20, lr=2e-3,
                        ce_weight=1.0)
    model, tokenizer = load_student(model_dir, cfg)
    teacher = load_template("sdft_example").teacher_messages(question, "correction", correction)
    response = tokenizer(correction, add_special_tokens=False)["input_ids"]
    SelfDistillationTrainer(model, tokenizer, cfg, resolve(cfg)).train(
        [TrainItem(question, teacher, response)], progress=False)
    folder = write_version(model, tokenizer, root, version, model_dir, None,
                           [(question, response)], {"knobs": resolve(cfg).as_dict()})
    return str(folder)
