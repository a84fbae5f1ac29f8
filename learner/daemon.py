"""`sdloop learn`: run a round every `learner.interval_s`, for as long as the process lives.

A round that fails (the server restarted, the store was busy, a bug) is logged and the next
one starts on schedule; since the progress mark is saved only at the end of a round, the failed
round's episodes are picked up again.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from serving.config import Config

log = logging.getLogger("sdloop.learn")


def run_once(cfg: Config, max_steps: int | None = None) -> dict[str, Any]:
    from learner.round import run_round

    return run_round(cfg, max_steps=max_steps)


def run_daemon(cfg: Config, max_steps: int | None = None) -> int:
    log.info("learner every %.0f s, preset %s", cfg.learner.interval_s, cfg.learner.preset)
    while True:
        started = time.monotonic()
        try:
            summary = run_once(cfg, max_steps)
            log.info("round: %s", json.dumps(summary, default=str))
        except Exception:  # noqa: BLE001 - a failed round must not end the daemon
            log.exception("learner round failed; retrying next interval")
        time.sleep(max(cfg.learner.interval_s - (time.monotonic() - started), 1.0))
