"""The shipped Prometheus config, alert rules and Grafana dashboard speak the metric names
sdloop exports and scrape the ports it listens on by default."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import feedback.metrics  # noqa: F401 - registers the event bus's (producer, ingester)
import learner.metrics  # noqa: F401 - registers the learner's metrics
import serving.metrics  # noqa: F401 - registers the gateway's
import store.metrics  # noqa: F401 - registers the store writer's
from serving.config import load_config

OPS = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
DASHBOARD = OPS.parent / "grafana" / "sdloop.json"
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
             "gauge": ()}


def exported_names() -> set[str]:
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ()))
    return names


def rules() -> list[dict]:
    groups = yaml.safe_load((OPS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_uses_metrics_that_exist_and_says_what_happened():
    known = exported_names()
    assert rules()
    for rule in rules():
        assert rule["alert"].startswith("Sdloop") and rule["annotations"]["summary"], rule
        used = set(re.findall(r"\bsdloop_[a-z_]+", rule["expr"]))
        assert used <= known, f"{rule['alert']} uses unknown metrics {used - known}"


def test_every_dashboard_panel_queries_metrics_that_exist():
    known = exported_names()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("latency", "first token", "tokens", "feedback", "loss", "divergence", "gate",
                  "version", "swap"):
        assert topic in titles, f"no panel on {topic}"
    for p in panels:
        assert p["targets"], p["title"]
        for target in p["targets"]:
            used = set(re.findall(r"\bsdloop_[a-z_]+", target["expr"]))
            assert used and used <= known, f"{p['title']}: unknown metrics {used - known}"


def test_scrape_targets_are_the_default_ports():
    cfg = load_config(env={})
    jobs = {job["job_name"]: job["static_configs"][0]["targets"]
            for job in yaml.safe_load((OPS / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["sdloop-gateway"] == [f"127.0.0.1:{cfg.server.port}"]
    assert jobs["sdloop-learner"] == [f"127.0.0.1:{cfg.learner.metrics_port}"]
    assert jobs["sdloop-ingest"] == [f"127.0.0.1:{cfg.ingest.port}"]


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not on PATH (`make test` installs it into .venv/bin)")
def test_promtool_accepts_the_config_and_rules():
    for args in (["check", "config", str(OPS / "prometheus.yml")],
                 ["check", "rules", str(OPS / "alerts.yml")]):
        out = subprocess.run(["promtool", *args], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
