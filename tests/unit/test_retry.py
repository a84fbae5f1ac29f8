"""What a rejected round's episodes are tried again with: more than another seed."""

from __future__ import annotations

from learner.config import LearnerConfig, resolve
from learner.round import retry_config


def test_the_first_attempt_runs_the_config_as_given():
    cfg = LearnerConfig(seed=3)
    assert retry_config(cfg, 0) == cfg


def test_a_retry_takes_another_seed_and_holds_the_anchor_twice_as_hard():
    first = LearnerConfig(seed=3)
    again = retry_config(first, 1)
    assert again.seed == 1003
    assert resolve(again).anchor_weight == 2 * resolve(first).anchor_weight > 0
    assert resolve(retry_config(LearnerConfig(anchor_weight=0.5), 2)).anchor_weight == 2.0


def test_a_retry_of_a_preset_without_an_anchor_still_has_none():
    assert resolve(retry_config(LearnerConfig(preset="sft"), 1)).anchor_weight == 0.0
