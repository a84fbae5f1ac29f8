"""A round's workspace: a plan is reused only for the same work, and one round at a time."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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
        assert work.progress() == {"last_signal_at": "2026-11-27 10:00:00", "rounds": 3, "attempt": 1,
                                   "failed_starts": 0}


def test_two_rounds_cannot_share_a_workspace(tmp_path):
    with RoundWorkspace(tmp_path / "round"), pytest.raises(RoundBusy, match="another learner round"):
        RoundWorkspace(tmp_path / "round").__enter__()
    with RoundWorkspace(tmp_path / "round"):  # released when the first round ended
        pass


class _Planted:
    """What someone with write access to the workspace could plant: unpickling it runs code
    (here: creates a file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_checkpoint_that_unpickles_anything_but_tensors_and_plain_values_is_refused(tmp_path,
                                                                                     caplog):
    marker = tmp_path / "code-ran"
    with RoundWorkspace(tmp_path / "round") as work:
        work.save_checkpoint({"step": 4, "adapter": [torch.ones(2)], "planted": _Planted(marker)})
        with caplog.at_level(logging.ERROR, logger="learner.checkpoint"):
            assert work.load_checkpoint() is None  # the round trains from its start
        assert not marker.exists()  # refused before anything in it ran
        assert "refused the training checkpoint" in caplog.text
        assert not (work.path / "checkpoint.pt").exists()


def test_a_real_training_checkpoint_comes_back_through_the_safe_loader(tmp_path):
    """What the trainer saves (adapter, optimizer and scheduler state dicts, EMA, losses) is
    tensors and plain values: resuming reads it back whole."""
    param = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    param.sum().backward()
    optimizer.step()
    scheduler.step()
    state = {"step": 1, "adapter": [param.detach().clone()], "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "ema": [torch.zeros(3)], "losses": [0.5],
             "anchor_losses": []}
    with RoundWorkspace(tmp_path / "round") as work:
        work.save_checkpoint(state)
        back = work.load_checkpoint()
    assert back is not None and back["step"] == 1 and back["losses"] == [0.5]
    assert torch.equal(back["adapter"][0], state["adapter"][0])
    assert back["scheduler"] == scheduler.state_dict()
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3)
    restored.load_state_dict(back["optimizer"])
    assert torch.equal(restored.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
