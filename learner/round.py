"""One learner round: collect → responses → train → gate → write the version → publish.

The round reads the store and publishes through the running server (serving.client), so it
runs beside `sdloop serve` in its own process. Its progress mark (the newest episode it has
used) is saved only when the round is over: a round that crashes is simply done again, and the
version folder is written atomically, so a half-trained adapter is never published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

from learner.config import Knobs, LearnerConfig, TeacherMode, resolve
from learner.contexts import Template, load_template
from learner.episodes import Episode, collect
from learner.gate import evaluate, generate_greedy
from learner.publish import write_version
from learner.responses import sample, teacher_regenerations
from learner.spec import Support
from learner.trainer import AnchorItem, SelfDistillationTrainer, TrainItem, load_student
from serving.client import admin_call, server_state, store_query
from serving.config import Config
from serving.model_cache import ensure_embedded_model
from serving.registry import DEFAULT_ALIAS

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
_ANSWER_SOURCES = ("correction", "demonstration", "sibling_success")
_PAST_PROMPTS_SQL = """
SELECT messages FROM episodes
WHERE NOT has_signal AND status = 'ok'
ORDER BY created_at DESC LIMIT ?
"""
_CURRENT_SQL = """
SELECT a.version, v.path FROM aliases a LEFT JOIN adapter_versions v USING (version)
WHERE a.alias = ?
"""


def run_round(cfg: Config, max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one round and return its JSON-able summary (status: published, rejected, written,
    or skipped)."""
    started = time.monotonic()
    lcfg = cfg.learner
    knobs = resolve(lcfg)
    template = load_template(lcfg.template)

    def query(sql: str, params: list[Any]) -> Any:
        return store_query(cfg, sql, params)

    state_path = cfg.data_path / "learner" / STATE_FILE
    state = _read_state(state_path)
    episodes = collect(query, state["last_signal_at"], knobs.context)
    summary: dict[str, Any] = {"preset": lcfg.preset, "episodes": len(episodes)}
    if len(episodes) < lcfg.min_episodes:
        return {**summary, "status": "skipped",
                "reason": f"{len(episodes)} new episodes with a usable signal; "
                          f"learner.min_episodes is {lcfg.min_episodes}"}

    alias = DEFAULT_ALIAS
    current = query(_CURRENT_SQL, [alias]).rows
    parent, parent_path = (current[0][0], current[0][1]) if current else ("base", None)
    model_dir = cfg.engine.model or str(ensure_embedded_model(cfg.model_cache_path, progress))
    model, tokenizer = load_student(model_dir, lcfg, parent_path)

    heldout, train = _split(episodes)
    items = _train_items(model, tokenizer, train, knobs, template, lcfg)
    heldout_items = _train_items(model, tokenizer, heldout, replace(knobs, responses="logged"),
                                 template, lcfg)
    if not items or not heldout_items:
        return {**summary, "status": "skipped",
                "reason": "no training example could be built (no response passed the filter)"}
    anchors = _anchors(model, tokenizer, query, lcfg) if knobs.anchor_weight else []

    trainer = SelfDistillationTrainer(model, tokenizer, lcfg, knobs)
    # Judged on the full vocabulary against the frozen teacher, whatever the training knobs.
    judge = SelfDistillationTrainer(model, tokenizer, lcfg, replace(
        knobs, teacher=TeacherMode("frozen"),
        loss=replace(knobs.loss, support=Support("full_vocab"), is_cap=None)))
    before = judge.divergence(heldout_items)
    result = trainer.train(items, anchors, max_steps=max_steps, progress=progress)
    after = judge.divergence(heldout_items)
    gate = evaluate(model, tokenizer, before, after, lcfg.retention_max_drop, lcfg.drift_max)

    version = _next_version(query, cfg.adapters_path, alias)
    record = {
        "preset": lcfg.preset, "knobs": knobs.as_dict(),
        "episodes": [e.completion_id for e in episodes],
        "heldout_episodes": [e.completion_id for e in heldout],
        "heldout_is_train": heldout is train,
        "train": {"steps": result.steps, "items": len(items), "anchors": len(anchors),
                  "loss_first": result.losses[0] if result.losses else None,
                  "loss_last": result.losses[-1] if result.losses else None},
        "gate": gate.as_dict(),
    }
    folder = write_version(model, tokenizer, cfg.adapters_path, version, model_dir, parent,
                           [(it.student_messages, it.response) for it in items], record)
    server = server_state(cfg)
    if server is not None:
        answer = admin_call(server, "POST", "/admin/adapters/publish",
                            {"path": str(folder), "promote": gate.passed})
        status = answer["status"] if gate.passed else "rejected"
    else:
        status = "written"  # no server to publish to: `sdloop adapters publish` later
    _write_state(state_path, {"last_signal_at": max(e.signal_at for e in episodes),
                              "rounds": state.get("rounds", 0) + 1})
    return {**summary, "status": status, "version": version, "parent": parent,
            "path": str(folder), "steps": result.steps, "items": len(items),
            "gate": gate.as_dict(), "seconds": round(time.monotonic() - started, 1)}


def _split(episodes: list[Episode]) -> tuple[list[Episode], list[Episode]]:
    """Every fifth episode (by a hash of its id) is held out, once there are five or more;
    with fewer, the training episodes are also the held-out ones (recorded as such)."""
    if len(episodes) < 5:
        return episodes, episodes
    held = [e for e in episodes if int(hashlib.sha256(e.completion_id.encode()).hexdigest(), 16) % 5 == 0]
    held = held or episodes[:1]
    return held, [e for e in episodes if e not in held]


def _train_items(model: Any, tokenizer: Any, episodes: list[Episode], knobs: Knobs,
                 template: Template, lcfg: LearnerConfig) -> list[TrainItem]:
    items = []
    for ep in episodes:
        for signal in ep.signals:
            teacher = template.teacher_messages(ep.messages, signal.source, signal.text)
            for response in _responses(model, tokenizer, ep, signal, teacher, knobs, lcfg):
                items.append(TrainItem(ep.messages, teacher, response, signal.source,
                                       ep.completion_id))
    return items


def _responses(model: Any, tokenizer: Any, ep: Episode, signal: Any,
               teacher: list[dict[str, Any]], knobs: Knobs, lcfg: LearnerConfig) -> list[list[int]]:
    out: list[list[int]] = []
    if knobs.responses in ("logged", "mix") and ep.token_ids:
        out.append(list(ep.token_ids))
    if knobs.responses in ("teacher", "mix"):
        kept = teacher_regenerations(model, tokenizer, ep.messages, teacher, signal.text,
                                     lcfg.regen_samples, lcfg.regen_temperature,
                                     lcfg.max_new_tokens, lcfg.seed)
        if not kept and signal.source in _ANSWER_SOURCES:  # the signal itself is an answer
            kept = [tokenizer(signal.text.strip(), add_special_tokens=False)["input_ids"]
                    + [tokenizer.eos_token_id]]
        out.extend(kept)
    if knobs.responses == "on_policy":
        out.extend(sample(model, tokenizer, ep.messages, lcfg.regen_samples,
                          lcfg.regen_temperature or 1.0, lcfg.max_new_tokens, lcfg.seed))
    return [r for r in out if r]


def _anchors(model: Any, tokenizer: Any, query: Any, lcfg: LearnerConfig) -> list[AnchorItem]:
    """Past prompts nobody asked to change (shipped general prompts where the store has too
    few), answered by the frozen base model."""
    rows = query(_PAST_PROMPTS_SQL, [lcfg.anchor_prompts]).rows
    conversations = [json.loads(r[0]) if isinstance(r[0], str) else r[0] for r in rows]
    if len(conversations) < lcfg.anchor_prompts:
        shipped = json.loads(resources.files("learner").joinpath(
            "data", "anchor_prompts.json").read_text())["prompts"]
        conversations += [[{"role": "user", "content": p}]
                          for p in shipped[: lcfg.anchor_prompts - len(conversations)]]
    with model.disable_adapter():
        answers = generate_greedy(model, tokenizer, conversations, lcfg.max_new_tokens)
    return [AnchorItem(c, a) for c, a in zip(conversations, answers, strict=True) if a]


def _next_version(query: Any, adapters: Path, alias: str) -> str:
    numbers = [0]
    for (version,) in query("SELECT version FROM adapter_versions WHERE alias = ?", [alias]).rows:
        numbers.append(int(version.rsplit("@v", 1)[1]))
    if adapters.is_dir():
        pattern = re.compile(rf"^\.?{re.escape(alias)}@v(\d+)(\.partial)?$")
        numbers += [int(m.group(1)) for p in adapters.iterdir() if (m := pattern.match(p.name))]
    return f"{alias}@v{max(numbers) + 1}"


def _read_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"last_signal_at": "1970-01-01 00:00:00", "rounds": 0}


def _write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)
