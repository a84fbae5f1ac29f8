"""Prometheus metrics of the learner daemon (module-level, registered once).

The daemon records each round's JSON summary here and serves them on `learner.metrics_port`
(scraped beside the gateway's /metrics, which has the serving side of a swap: version per
alias, swap duration, swap failures, probe mismatches).
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

ROUNDS = Counter("sdloop_learner_rounds", "Learner rounds by outcome (promoted, rejected, "
                 "candidate, written, skipped, failed).", ["status"])
EPISODES = Counter("sdloop_learner_episodes", "Episodes used by rounds that trained.")
TRAIN_STEPS = Counter("sdloop_learner_train_steps", "Optimizer steps taken by finished rounds.")
ROUND_SECONDS = Histogram("sdloop_learner_round_seconds", "Wall-clock time of rounds that trained.",
                          buckets=(30, 60, 120, 300, 600, 1200, 2400, 3600, 7200))
LOSS = Gauge("sdloop_learner_loss", "Training loss of the last round, first and last step.",
             ["step"])
DIVERGENCE = Gauge("sdloop_learner_heldout_divergence",
                   "Teacher-student divergence on the gate's held-out answers, last round.",
                   ["when"])
GATE = Counter("sdloop_learner_gate", "Gate verdicts.", ["result"])
RETENTION = Gauge("sdloop_learner_retention_accuracy",
                  "Retention-set accuracy (%) of the base model and of the last candidate.",
                  ["model"])
DRIFT = Gauge("sdloop_learner_drift", "KL(base || candidate) on neutral prompts, last candidate.")
PHASE_SECONDS = Gauge("sdloop_learner_phase_seconds",
                      "Seconds the last round spent in each phase (load, responses, anchors, "
                      "heldout_before, train, gate, write, publish).", ["phase"])
RETENTION_FORGOTTEN = Gauge("sdloop_learner_retention_forgotten",
                            "Retention questions the base model answers right that the last "
                            "candidate forgot.")
LAST_VERSION = Gauge("sdloop_learner_last_version", "1 for the version the last round produced.",
                     ["version", "status"])


def serve(port: int) -> None:
    """Serve /metrics on `port` (0: an ephemeral one; negative: not at all)."""
    if port < 0:
        return
    try:
        server, _ = start_http_server(port, addr="127.0.0.1")
    except OSError as exc:
        log.warning("learner metrics not served: port %d: %s", port, exc)
        return
    log.info("learner metrics on http://127.0.0.1:%d/metrics", server.server_port)


def record_round(summary: dict[str, Any]) -> None:
    status = str(summary.get("status", "unknown"))
    ROUNDS.labels(status).inc()
    if status == "skipped":
        return
    EPISODES.inc(summary.get("episodes", 0))
    TRAIN_STEPS.inc(summary.get("steps", 0) - summary.get("resumed_at_step", 0))
    if summary.get("seconds") is not None:
        ROUND_SECONDS.observe(summary["seconds"])
    for step in ("first", "last"):
        if summary.get(f"loss_{step}") is not None:
            LOSS.labels(step).set(summary[f"loss_{step}"])
    gate = summary.get("gate") or {}
    if gate:
        GATE.labels("passed" if gate.get("passed") else "failed").inc()
        DIVERGENCE.labels("before").set(gate["heldout_divergence_before"])
        DIVERGENCE.labels("after").set(gate["heldout_divergence_after"])
        RETENTION.labels("base").set(gate["retention_base"])
        RETENTION.labels("candidate").set(gate["retention_candidate"])
        DRIFT.set(gate["drift"])
        RETENTION_FORGOTTEN.set(gate.get("retention_forgotten", 0))
    for phase, seconds in (summary.get("phases") or {}).items():
        PHASE_SECONDS.labels(phase).set(seconds)
    if summary.get("version"):
        LAST_VERSION.clear()
        LAST_VERSION.labels(summary["version"], status).set(1)
