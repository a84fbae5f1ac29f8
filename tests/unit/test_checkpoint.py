"""A round's workspace: a plan is reused only for the same work, and one round at a time."""

from __future__ import annotations

import pytest
import torch

from learner.checkpoint import RoundBusy, RoundWorkspace, plan_key
from learner.trainer import AnchorItem, TrainItem

Q = [{"role": "user", "content": "What is the capital of Quessany?"}]
T = [{"role": "user", "content": "What is the capital of Quessany?\n\nexample: Dalvorne"}]


def test_a_plan_comes_back_for_the_same_work_only(tmp_path):
    key = plan_key({"parent": "base", "episodes": [("c1", "2026-11-27 10:00:00")]})
    items = [TrainItem(Q, T, [1, 2, 3], "correction", "c1", engine_logprobs=[-0.1, -0.2, -0.3])]
    with RoundWorkspace(tmp_path / "round") as work:
        work.save_plan(key, items, items[:1], [AnchorItem(Q, [4, 5])], before=1.5)
        work.save_checkpoint({"step": 4, "adapter": [torch.ones(2)]})
        plan = work.load_plan(key)
        assert plan["items"] == items and plan["anchors"] == [AnchorItem(Q, [4, 5])]
        assert plan["before"] == 1.5 and work.load_checkpoint()["step"] == 4

        other = plan_key({"parent": "default@v1", "episodes": [("c1", "2026-11-27 10:00:00")]})
        assert work.load_plan(other) is None  # other work: the stale workspace is cleared
        assert work.load_checkpoint() is None and work.load_plan(key) is None


def test_the_progress_mark_outlives_a_cleared_round(tmp_path):
    with RoundWorkspace(tmp_path / "learner") as work:
        assert work.progress()["last_signal_at"] == "1970-01-01 00:00:00"
        work.save_progress({"last_signal_at": "2026-11-27 10:00:00", "rounds": 3, "attempt": 1})
        work.clear()
    with RoundWorkspace(tmp_path / "learner") as work:
        assert work.progress() == {"last_signal_at": "2026-11-27 10:00:00", "rounds": 3, "attempt": 1}


def test_two_rounds_cannot_share_a_workspace(tmp_path):
    with RoundWorkspace(tmp_path / "round"), pytest.raises(RoundBusy, match="another learner round"):
        RoundWorkspace(tmp_path / "round").__enter__()
    with RoundWorkspace(tmp_path / "round"):  # released when the first round ended
        pass
