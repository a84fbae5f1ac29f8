"""How many training steps a round takes, and in what order: sized to its items."""

from __future__ import annotations

from learner.config import LearnerConfig
from learner.trainer import step_plan


def test_a_small_round_takes_whole_passes_until_it_has_the_minimum_steps():
    plan = step_plan(2, LearnerConfig(passes=6, min_steps=24))
    assert len(plan) == 24  # 12 passes over one correction's two items, not 6
    assert all(sorted(i for step in plan[k:k + 2] for i in step) == [0, 1]
               for k in range(0, 24, 2))  # every pass takes each item once


def test_a_large_round_is_sized_by_its_passes():
    plan = step_plan(30, LearnerConfig(passes=6, min_steps=24))
    assert len(plan) == 180  # 6 passes over 30 items: the minimum adds nothing
    assert len(step_plan(3, LearnerConfig(passes=6, min_steps=0))) == 18


def test_the_step_order_is_a_function_of_the_seed():
    cfg = LearnerConfig(passes=2, min_steps=10, batch_size=2)
    assert step_plan(5, cfg) == step_plan(5, cfg)
    assert step_plan(5, cfg) != step_plan(5, LearnerConfig(passes=2, min_steps=10, batch_size=2,
                                                           seed=1))
    assert len(step_plan(5, cfg)) == 10 and all(len(b) == 2 for b in step_plan(5, cfg))
    assert step_plan(0, cfg) == []
