"""The learner's workspace: how far it has learned, what the current round planned, how far
that round trained, and who is running it.

A round writes its plan (the training items, the held-out gate items, the anchors, the
divergence before training) once it has built them, and a training checkpoint (adapter,
optimizer, schedule, EMA teacher, losses) every `checkpoint_every` steps, each file replaced
atomically. A round killed at any point leaves a workspace that the next round resumes from,
provided it would do the same work (same parent version, episodes and knobs: the plan's key);
otherwise the workspace is discarded and the round starts over. Only a finished round writes a
version folder, so a half-trained adapter is never published. The progress mark (the newest
signal learned from, the round count, the retry attempt) is read and written under the same
lock, which keeps two rounds (the daemon's and a manual `sdloop learn --once`) from sharing one
workspace or learning the same episodes twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from learner.trainer import AnchorItem, TrainItem

log = logging.getLogger(__name__)

PLAN = "plan.json"
CHECKPOINT = "checkpoint.pt"
LOCK = "round.lock"
PROGRESS = "state.json"  # the name earlier versions kept it under, in the same folder
# failed_starts: rounds that started on the episodes after the mark and never finished.
NO_PROGRESS = {"last_signal_at": "1970-01-01 00:00:00", "rounds": 0, "attempt": 0,
               "failed_starts": 0}
QUARANTINE = "quarantine.json"  # episodes set aside after `learner.quarantine_after` failures


class RoundBusy(RuntimeError):
    pass


def plan_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class RoundWorkspace:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def __enter__(self) -> RoundWorkspace:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RoundBusy(f"another learner round is running in {self.path}") from None
        self._lock_fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- progress across rounds -------------------------------------------------------------

    def progress(self) -> dict[str, Any]:
        try:
            return {**NO_PROGRESS, **json.loads((self.path / PROGRESS).read_text())}
        except (OSError, json.JSONDecodeError):
            return dict(NO_PROGRESS)

    def save_progress(self, progress: dict[str, Any]) -> None:
        self._write_atomic(PROGRESS, lambda tmp: tmp.write_text(json.dumps(progress)))

    def quarantine(self, entry: dict[str, Any]) -> None:
        """Add an entry to the quarantine file (a JSON list, newest last)."""
        try:
            entries = json.loads((self.path / QUARANTINE).read_text())
        except (OSError, json.JSONDecodeError):
            entries = []
        entries.append(entry)
        self._write_atomic(QUARANTINE, lambda tmp: tmp.write_text(json.dumps(entries, indent=1)))

    # -- the plan --------------------------------------------------------------------------

    def load_plan(self, key: str) -> dict[str, Any] | None:
        """The saved plan if it is for this work, else None (and the stale workspace is cleared)."""
        try:
            plan = json.loads((self.path / PLAN).read_text())
        except (OSError, json.JSONDecodeError):
            plan = None
        if plan is None or plan.get("key") != key:
            self.clear()
            return None
        plan["items"] = [TrainItem(**it) for it in plan["items"]]
        plan["gate_items"] = [TrainItem(**it) for it in plan["gate_items"]]
        plan["anchors"] = [AnchorItem(**it) for it in plan["anchors"]]
        return plan

    def save_plan(self, key: str, items: list[TrainItem], gate_items: list[TrainItem],
                  anchors: list[AnchorItem], before: float) -> None:
        plan = json.dumps({
            "key": key, "before": before, "items": [asdict(i) for i in items],
            "gate_items": [asdict(i) for i in gate_items], "anchors": [asdict(a) for a in anchors],
        })
        self._write_atomic(PLAN, lambda tmp: tmp.write_text(plan))

    # -- training checkpoints --------------------------------------------------------------

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """`state` holds tensors and plain values only (numbers, strings, lists, dicts: the
        optimizer's and scheduler's state dicts are), which is all `load_checkpoint` takes."""
        self._write_atomic(CHECKPOINT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The saved training state, read with torch's safe loader (`weights_only`): a file
        that would unpickle anything else — an object whose unpickling runs code, planted in
        the workspace — is refused before it runs, logged, and removed, and the round trains
        from its start."""
        path = self.path / CHECKPOINT
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            log.error("refused the training checkpoint %s (not tensors and plain values only: "
                      "%s); training from the start", path, str(exc).splitlines()[0])
            path.unlink(missing_ok=True)
            return None

    def clear(self) -> None:
        """Drop the plan and checkpoint (the progress mark and the lock file stay)."""
        for name in (PLAN, CHECKPOINT):
            (self.path / name).unlink(missing_ok=True)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _write_atomic(self, name: str, write: Callable[[Path], Any]) -> None:
        tmp = self.path / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, self.path / name)
