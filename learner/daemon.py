"""`sdloop learn`: run a round every `learner.interval_s`, for as long as the process lives.

Each round runs in a child process (`python -m learner --once`, which is `sdloop learn --once`):
a round that dies — killed, out of memory, a bug — costs that round only; the daemon logs it and
starts the next one on schedule, which resumes from the dead round's workspace
(learner.checkpoint). A child also hands every
byte of the model and optimizer back to the system when the round ends. The daemon keeps the
learner's Prometheus metrics (learner.metrics) and serves them on `learner.metrics_port`.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from learner import metrics
from serving.config import Config
from serving.process import die_with_parent

log = logging.getLogger("sdloop.learn")


def run_daemon(cfg: Config, config_path: str | None = None, max_steps: int | None = None) -> int:
    log.info("learner every %.0f s, preset %s", cfg.learner.interval_s, cfg.learner.preset)
    metrics.serve(cfg.learner.metrics_port)
    child: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: Any) -> None:
        for proc in child:
            proc.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    while True:
        started = time.monotonic()
        summary = _round_in_child(cfg, config_path, max_steps, child)
        if summary is not None:
            metrics.record_round(summary)
        time.sleep(max(cfg.learner.interval_s - (time.monotonic() - started), 1.0))


def _round_in_child(cfg: Config, config_path: str | None, max_steps: int | None,
                    child: list[subprocess.Popen[bytes]]) -> dict[str, Any] | None:
    cmd = [sys.executable, "-m", "learner", "--once", "--data-dir", str(cfg.data_path),
           "--log-level", cfg.log_level.lower()]
    if config_path:
        cmd += ["--config", str(Path(config_path).resolve())]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            preexec_fn=die_with_parent)  # noqa: PLW1509 - no threads here
    child[:] = [proc]
    out, _ = proc.communicate()
    child.clear()
    if proc.returncode != 0:
        how = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exit status {proc.returncode}")
        log.error("learner round failed (%s) after %.0f s; the next round resumes its work",
                  how, time.monotonic() - started)
        metrics.ROUNDS.labels("failed").inc()
        return None
    try:
        summary = json.loads(out.decode().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        log.error("learner round printed no summary: %r", out[-500:])
        metrics.ROUNDS.labels("failed").inc()
        return None
    log.info("round: %s", json.dumps(summary, default=str))
    return summary
