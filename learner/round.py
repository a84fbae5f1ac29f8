"""One learner round: collect → responses → train → gate → write the version → publish.

A round is a step over what it is given (`RoundIO`): a read-only query on the store, a way to
publish a written version folder, the serving engine to sample on-policy answers from, and the
base model's folder. The command line wires those to the running server (`learner.cli`), so a
round runs beside `sdloop serve` in its own process and knows nothing of HTTP. Its progress
mark (the newest episode it has used) is saved only when the round is over: a round that
crashes is done again, resuming from its workspace (learner.checkpoint) when it would do the
same work; the version folder is written atomically, so a half-trained adapter is never
published.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from feedback import content_text
from learner.checkpoint import RoundWorkspace, plan_key
from learner.config import (
    ANSWER_SOURCES,
    Knobs,
    LearnerConfig,
    TeacherMode,
    mechanism,
    parse_layers,
    resolve,
    settle,
)
from learner.contexts import Template, last_user_index, load_template
from learner.edit import EditKnobs, apply_edit, build_facts
from learner.episodes import Episode, as_json, collect
from learner.gate import evaluate
from learner.inference import generate_greedy, prompt_ids, sample
from learner.phrasings import rephrasings
from learner.responses import EnginePolicy, draw, teacher_regenerations
from learner.retention_data import retention_set, shipped_prompts
from learner.spec import Divergence, Support, TokenLossConfig
from learner.stacking import stacked_student
from learner.subspace import (
    NullSpace,
    Projection,
    conversation_sequences,
    general_moments,
    input_moments,
    target_modules,
)
from learner.trainer import (
    AnchorItem,
    SelfDistillationTrainer,
    TrainItem,
    TrainResult,
    load_student,
)
from learner.versions import write_version
from serving.version_folder import engine_name
from store import BASE_VERSION, DEFAULT_ALIAS, Query

log = logging.getLogger(__name__)

# Signals whose text states the answer to the question (a correction, a demonstration, the
# user's follow-up): what is reworded and edited.
STATED_SOURCES = (*ANSWER_SOURCES, "followup")


@dataclass(frozen=True)
class RoundIO:
    """What a round takes from outside the trainer."""

    # One read-only statement on the store (values as JSON types).
    query: Query
    # Hand a written version folder to the server, promoted or not; the version's status
    # (`promoted`, `candidate`, `rejected`), or `written` when no server is there to take it.
    publish: Callable[[Path, bool], str]
    # The serving engine to sample on-policy answers (and answers under an agent's
    # structured-output constraint) from, given the name the engine serves the version under
    # (`serving.version_folder.engine_name`; `base`: the base model); None: the trainer's own
    # model samples them.
    policy: Callable[[str], EnginePolicy | None]
    # The base model's folder (the embedded model is converted on first use).
    base_model: Callable[[], str]


_PAST_PROMPTS_SQL = """
SELECT messages FROM episodes
WHERE NOT has_signal AND status = 'ok'
  AND completion_id NOT IN (SELECT next_completion_id FROM followups)
ORDER BY created_at DESC LIMIT ?
"""
# The questions the version a round improves was taught, its own episodes first, then its
# parent's, back to base: the lineage of `parent` links in the learner's own manifests. The
# depth bound ends the walk should the links ever form a loop; entries of `episodes` that are
# not completion ids match nothing. One row per distinct question, where it was taught last.
_TAUGHT_SQL = """
WITH RECURSIVE lineage(version, parent, manifest, depth) AS (
    SELECT version, parent, manifest, 0 FROM adapter_versions WHERE version = ?
    UNION ALL
    SELECT v.version, v.parent, v.manifest, l.depth + 1
    FROM adapter_versions v JOIN lineage l ON v.version = l.parent
    WHERE l.depth < 256
), taught AS (
    SELECT depth, unnest(json_extract_string(manifest, '$.episodes[*]')) AS completion_id
    FROM lineage
)
SELECT e.messages FROM taught t JOIN episodes e USING (completion_id)
GROUP BY e.messages ORDER BY min(t.depth), max(e.created_at) DESC LIMIT ?
"""
_CURRENT_SQL = """
SELECT a.version, v.path, v.manifest FROM aliases a LEFT JOIN adapter_versions v USING (version)
WHERE a.alias = ?
"""


def run_round(lcfg: LearnerConfig, io: RoundIO, workspace: Path, adapters: Path,
              max_steps: int | None = None, progress: bool = True,
              model_cache: Path | None = None) -> dict[str, Any]:
    """Run one round in `workspace` (progress mark, plan, checkpoints), writing its version
    under `adapters`; return its JSON-able summary (status: promoted, candidate, rejected,
    written, or skipped). The base model's retention answers for the gate are kept in
    `model_cache` (shared by every data dir using it; default: the workspace)."""
    started = time.monotonic()
    lcfg = settle(lcfg)
    with RoundWorkspace(workspace) as work:
        mark = work.progress()
        if mark["failed_starts"] >= lcfg.quarantine_after:
            return _quarantine(lcfg, io, work, mark)
        # Counted as failed unless the round gets to the end (a crash, a kill, an exception).
        work.save_progress({**mark, "failed_starts": mark["failed_starts"] + 1})
        attempt = int(mark["attempt"])
        lcfg = retry_config(lcfg, attempt)
        summary, learned_up_to = _round(lcfg, resolve(lcfg), io, work, adapters,
                                        since=mark["last_signal_at"],
                                        max_steps=max_steps, progress=progress,
                                        model_cache=model_cache or workspace)
        summary["attempt"] = attempt
        retry = summary["status"] == "rejected" and attempt < lcfg.retries
        work.save_progress({**mark, "failed_starts": 0} if learned_up_to is None else {
            "last_signal_at": mark["last_signal_at"] if retry else learned_up_to,
            "rounds": mark["rounds"] + (summary["status"] != "skipped"),
            "attempt": attempt + 1 if retry else 0, "failed_starts": 0})
    return {**summary, "retry_next_round": retry, "seconds": round(time.monotonic() - started, 1)}


def _quarantine(lcfg: LearnerConfig, io: RoundIO, work: RoundWorkspace,
                mark: dict[str, Any]) -> dict[str, Any]:
    """Set aside the episodes every round since the mark died on: listed in the workspace's
    quarantine file (with when and why), and the mark moved past them, so one poisoned or
    oversized episode cannot stop the learner for good."""
    episodes = collect(io.query, mark["last_signal_at"], resolve(lcfg).context, lcfg.teaching())
    newest = max((e.signal_at for e in episodes), default=mark["last_signal_at"])
    reason = (f"{mark['failed_starts']} rounds in a row died on these episodes "
              f"(learner.quarantine_after = {lcfg.quarantine_after})")
    work.quarantine({"at": datetime.now(UTC).isoformat(), "reason": reason,
                     "episodes": [e.completion_id for e in episodes],
                     "signals_from": mark["last_signal_at"], "signals_to": newest})
    work.clear()
    work.save_progress({**mark, "last_signal_at": newest, "attempt": 0, "failed_starts": 0})
    log.error("quarantined %d episodes: %s", len(episodes), reason)
    return {"status": "quarantined", "episodes": len(episodes), "reason": reason,
            "quarantined": [e.completion_id for e in episodes]}


def retry_config(lcfg: LearnerConfig, attempt: int) -> LearnerConfig:
    """The knobs of attempt `attempt` (0: the first) of a round's episodes. A rejected round's
    episodes come back `retries` times, each time with another seed (other teacher samples,
    step order and gate answers: at this model size retention moves by a few questions from
    seed to seed) and the rehearsal anchor held twice as hard: what rejects a round is nearly
    always what it forgot, and the anchor's weight is the lever that moved that most
    (docs/experiments/2026-12-03-levers-against-bleed.md). Every attempt is judged to the limit
    the attempts share (learner.gate.forgetting_limit), so retrying cannot buy a pass."""
    if attempt <= 0:
        return lcfg
    weight = resolve(lcfg).anchor_weight
    return replace(lcfg, seed=lcfg.seed + 1000 * attempt, anchor_weight=weight * 2 ** attempt)


def _round(lcfg: LearnerConfig, knobs: Knobs, io: RoundIO, work: RoundWorkspace, adapters: Path,
           *, since: str, max_steps: int | None, progress: bool,
           model_cache: Path) -> tuple[dict[str, Any], str | None]:
    """The round's summary, and the newest signal it consumed (None: nothing was consumed).
    `lcfg` is settled and `knobs` resolved from it once, where the round starts (`run_round`)."""
    template = load_template(lcfg.template)
    query = io.query
    episodes = collect(query, since, knobs.context, lcfg.teaching())
    summary: dict[str, Any] = {"preset": lcfg.preset, "mechanism": mechanism(lcfg),
                               "episodes": len(episodes)}
    if len(episodes) < lcfg.min_episodes:
        return {**summary, "status": "skipped",
                "reason": f"{len(episodes)} new episodes with a usable signal; "
                          f"learner.min_episodes is {lcfg.min_episodes}"}, None
    newest = max(e.signal_at for e in episodes)
    retention = retention_set(lcfg.retention_set)  # a file edited since start-up fails here

    current = query(_CURRENT_SQL, [DEFAULT_ALIAS]).rows
    parent, parent_path, manifest = current[0] if current else (BASE_VERSION, None, None)
    model_dir = io.base_model()
    key = plan_key({"parent": parent, "knobs": knobs.as_dict(), "learner": asdict(lcfg),
                    "max_steps": max_steps, "model": model_dir,
                    "episodes": [(e.completion_id, e.signal_at) for e in episodes]})
    phases = PhaseClock()
    stack = None
    if (lcfg.projection != "none" or lcfg.method == "edit") and parent_path is not None:
        # Training the parent's own factors under the projector, or writing an edit into them,
        # would rewrite what earlier rounds taught: the round learns in factors of its own
        # beside the parent's, frozen (learner.stacking).
        model, tokenizer, stack = stacked_student(model_dir, lcfg, parent_path)
        summary["stack"] = stack.report
    else:
        model, tokenizer = load_student(model_dir, lcfg, parent_path)
    judge = SelfDistillationTrainer(model, tokenizer, lcfg, judge_knobs(knobs))
    phases.done("load")
    plan = work.load_plan(key)
    if plan is None:
        # The engine samples on-policy answers, and any answer that was drawn under a
        # structured-output constraint (learner.responses.draw).
        policy = (io.policy(_served_name(parent, manifest)) if knobs.responses == "on_policy"
                  or any(e.constraint for e in episodes) else None)
        items = _train_items(model, tokenizer, episodes, knobs=knobs, template=template,
                             lcfg=lcfg, policy=policy, progress=progress)
        gate_items = _gate_items(model, tokenizer, episodes, template, lcfg, policy, progress)
        phases.done("responses")
        if not items or not gate_items:  # these knobs will never train on them: move on
            return {**summary, "status": "skipped", "reason": "no training example could be "
                    "built (no response passed the filter)"}, newest
        # What must not change: trained toward (the anchor's weight) and, projected, the
        # prompts whose inputs the update may not act on.
        anchors = (_anchors(model, tokenizer, query, lcfg, episodes, parent)
                   if knobs.anchor_weight or lcfg.projection != "none" else [])
        phases.done("anchors")
        before = judge.divergence(gate_items)
        work.save_plan(key, items, gate_items, anchors, before)
    else:
        items, gate_items, anchors, before = (plan["items"], plan["gate_items"], plan["anchors"],
                                              plan["before"])
    phases.done("heldout_before")
    null_space = None
    if lcfg.projection != "none":
        null_space = preserved_null_space(model, tokenizer, lcfg, anchors, model_cache, model_dir)
        summary["null_space"] = {k: {"null_dim": v["null_dim"], "dim": v["dim"]}
                                 for k, v in null_space.report.items()}
        phases.done("null_space")
    if lcfg.method == "edit":
        result, summary["edit"] = _edit(model, tokenizer, lcfg, episodes, items, null_space,
                                        stack.frozen if stack else 0)
    else:
        projection = (Projection(model, null_space, stack.frozen if stack else 0)
                      if null_space else None)
        trainer = SelfDistillationTrainer(model, tokenizer, lcfg, knobs, projection)
        result = trainer.train(items, anchors, max_steps=max_steps, progress=progress,
                               resume=work.load_checkpoint() if plan else None,
                               save=work.save_checkpoint)
    phases.done("train")
    after = judge.divergence(gate_items)
    gate = evaluate(model, tokenizer, retention, before=before, after=after,
                    retention_max_drop=lcfg.retention_max_drop, drift_max=lcfg.drift_max,
                    retention_nll_max=lcfg.retention_nll_max, confidence=lcfg.gate_confidence,
                    cache=model_cache / gate_base_file(model_dir, lcfg.retention_set),
                    cache_key=model_dir, attempts=lcfg.retries + 1)
    phases.done("gate")
    train = {"steps": result.steps, "resumed_at_step": result.resumed_at,
             "responses_from": _responses_from(knobs, items), "items": len(items),
             "gate_items": len(gate_items), "anchors": len(anchors),
             "loss_first": result.losses[0] if result.losses else None,
             "loss_last": result.losses[-1] if result.losses else None}
    version = _next_version(query, adapters, DEFAULT_ALIAS)
    verdict = {**gate.as_dict(), "enforced": lcfg.enforce_gate}
    record = {"preset": lcfg.preset, "knobs": knobs.as_dict(), "mechanism": mechanism(lcfg),
              "seed": lcfg.seed,
              "episodes": [e.completion_id for e in episodes], "train": train, "gate": verdict}
    folder = write_version(model, tokenizer, adapters, version, model_dir, parent,
                           [(it.student_messages, it.response) for it in items], record)
    phases.done("write")
    status = io.publish(folder, gate.passed or not lcfg.enforce_gate)
    phases.done("publish")
    work.clear()
    return {**summary, "status": status, "version": version, "parent": parent,
            "path": str(folder), **train, "gate": verdict, "phases": phases.seconds}, newest


def _edit(model: Any, tokenizer: Any, lcfg: LearnerConfig, episodes: list[Episode],
          items: list[TrainItem], null_space: NullSpace | None,
          first: int) -> tuple[TrainResult, dict[str, Any]]:
    """The closed-form edit of the round's stated facts (learner.edit) into the adapter's
    factors from `first` on, as a training result (a step per value-fitting step; losses: the
    values' mean teacher-KL before and after) and its report."""
    stated = {ep.completion_id: s.text for ep in episodes for s in ep.signals[::-1]
              if s.source in STATED_SOURCES}
    facts = build_facts(model, tokenizer, items, stated)
    modules = target_modules(model, parse_layers(lcfg.lora_layers), "mlp.down_proj")
    knobs = EditKnobs(steps=lcfg.edit_steps, lr=lcfg.edit_lr, weight_decay=lcfg.edit_weight_decay,
                      clamp=lcfg.edit_clamp, ridge=lcfg.edit_ridge)
    done = apply_edit(model, tokenizer, facts, modules,
                      null_space.projectors if null_space else None, knobs, first)
    losses = [sum(done.losses_first) / done.facts, sum(done.losses_last) / done.facts]
    return TrainResult(lcfg.edit_steps * done.facts, losses, []), {
        "facts": done.facts, "value_kl_before": done.losses_first,
        "value_kl_after": done.losses_last, "modules": done.report}


class PhaseClock:
    """Seconds spent in each phase of a round, in order (the summary's `phases`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.monotonic()

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._mark, 1)
        self._mark = now


def judge_knobs(knobs: Knobs) -> Knobs:
    """What the gate measures, whatever the training knobs: forward KL(teacher ‖ student) over
    the full vocabulary against the frozen teacher, on the teacher's own answers — a Monte
    Carlo estimate of the sequence-level KL that the feedback asks the student to close."""
    loss = TokenLossConfig(divergence=Divergence("forward_kl"), support=Support("full_vocab"),
                           chunk_size=knobs.loss.chunk_size)
    return replace(knobs, teacher=TeacherMode("frozen"), loss=loss, distill_weight=1.0,
                   ce_weight=0.0, anchor_weight=0.0)


def _gate_items(model: Any, tokenizer: Any, episodes: list[Episode], template: Template,
                lcfg: LearnerConfig, engine: EnginePolicy | None = None,
                progress: bool = False) -> list[TrainItem]:
    """Held-out answers: for every signal, `gate_samples` fresh answers of the frozen teacher
    (another seed than training's, unfiltered), never trained on. Holding out whole episodes
    instead would withhold those users' corrections and measure nothing: a fact taught in one
    episode does not move the divergence of another."""
    items = []
    for ep in tqdm(episodes, desc="held-out answers", unit="episode", disable=not progress):
        for signal in ep.signals:
            teacher = template.teacher_messages(ep.messages, signal.source, signal.text)
            answers = draw(model, tokenizer, teacher, n=lcfg.gate_samples,
                           temperature=lcfg.regen_temperature or 1.0,
                           max_new_tokens=lcfg.max_new_tokens, seed=lcfg.seed + 1,
                           engine=engine, constraint=ep.constraint)
            items += [TrainItem(ep.messages, teacher, a, signal.source, ep.completion_id)
                      for a in answers if a]
    return items


def _responses_from(knobs: Knobs, items: list[TrainItem]) -> str:
    if knobs.responses != "on_policy":
        return knobs.responses
    return "engine" if any(it.engine_logprobs is not None for it in items) else "trainer"


def _train_items(model: Any, tokenizer: Any, episodes: list[Episode], *, knobs: Knobs,
                 template: Template, lcfg: LearnerConfig,
                 policy: EnginePolicy | None = None, progress: bool = False) -> list[TrainItem]:
    items = []
    for ep in tqdm(episodes, desc=f"responses ({knobs.responses})", unit="episode",
                   disable=not progress):
        for signal in ep.signals:
            teacher = template.teacher_messages(ep.messages, signal.source, signal.text)
            items += [TrainItem(ep.messages, teacher, ids, signal.source, ep.completion_id,
                                engine_logprobs=logprobs)
                      for ids, logprobs in _responses(model, tokenizer, ep, signal, teacher,
                                                      knobs=knobs, lcfg=lcfg, policy=policy)]
        items += _rephrased_items(model, tokenizer, ep, template, lcfg, policy)
    return items


def rephrased(messages: list[dict[str, Any]], phrasing: str) -> list[dict[str, Any]]:
    """The conversation with its last user turn asked in other words."""
    out = [dict(m) for m in messages]
    out[last_user_index(out)]["content"] = phrasing
    return out


def _rephrased_items(model: Any, tokenizer: Any, ep: Episode, template: Template,
                     lcfg: LearnerConfig, policy: EnginePolicy | None) -> list[TrainItem]:
    """Training pairs on other phrasings of the episode's question (learner.phrasings), for the
    signals that state an answer: the teacher, the same feedback in its context, answers each
    phrasing; kept when it agrees with the feedback. Not for constrained answers (an agent's
    JSON prompt is not a question to reword)."""
    stated = [s for s in ep.signals if s.source in STATED_SOURCES]
    last = last_user_index(ep.messages)
    if lcfg.phrasings <= 0 or not stated or ep.constraint or last is None:
        return []
    question = content_text(ep.messages[last].get("content"))
    items = []
    for phrasing in rephrasings(model, tokenizer, question, stated[0].text, lcfg.phrasings,
                                seed=lcfg.seed):
        student = rephrased(ep.messages, phrasing)
        for signal in stated:
            teacher = template.teacher_messages(student, signal.source, signal.text)
            items += [TrainItem(student, teacher, ids, signal.source, ep.completion_id)
                      for ids in teacher_regenerations(
                          model, tokenizer, student, teacher, signal.text, n=lcfg.regen_samples,
                          temperature=lcfg.regen_temperature, max_new_tokens=lcfg.max_new_tokens,
                          seed=lcfg.seed, engine=policy)]
    return items


def _responses(model: Any, tokenizer: Any, ep: Episode, signal: Any,
               teacher: list[dict[str, Any]], *, knobs: Knobs, lcfg: LearnerConfig,
               policy: EnginePolicy | None) -> list[tuple[list[int], list[float] | None]]:
    """Response token ids for one signal, each with the engine's log-probabilities where the
    serving engine sampled it."""
    out: list[list[int]] = []
    if knobs.responses in ("logged", "mix") and ep.token_ids:
        out.append(list(ep.token_ids))
    if knobs.responses in ("teacher", "mix"):
        kept = teacher_regenerations(
            model, tokenizer, ep.messages, teacher, signal.text, n=lcfg.regen_samples,
            temperature=lcfg.regen_temperature, max_new_tokens=lcfg.max_new_tokens,
            seed=lcfg.seed, engine=policy, constraint=ep.constraint,
            failed=ep.response_text if signal.source == "env_error" else None,
            call=signal.call)
        if not kept and signal.source in ANSWER_SOURCES:  # the signal itself is an answer
            kept = [_signal_ids(tokenizer, signal.text)]
        out.extend(kept)
    if knobs.responses == "signal" and signal.source in ANSWER_SOURCES:
        out.append(_signal_ids(tokenizer, signal.text))
    if knobs.responses == "on_policy" and policy is not None:
        return [(ids, lps) for ids, lps in policy.sample(
            prompt_ids(tokenizer, ep.messages), lcfg.regen_samples,
            lcfg.regen_temperature or 1.0, lcfg.max_new_tokens, lcfg.seed, ep.constraint) if ids]
    if knobs.responses == "on_policy":
        out.extend(sample(model, tokenizer, ep.messages, lcfg.regen_samples,
                          lcfg.regen_temperature or 1.0, lcfg.max_new_tokens, lcfg.seed))
    return [(r, None) for r in out if r]


def _signal_ids(tokenizer: Any, text: str) -> list[int]:
    """The signal's own text as a response, ended like the engine ends a turn."""
    return tokenizer(text.strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def _anchors(model: Any, tokenizer: Any, query: Any, lcfg: LearnerConfig,
             episodes: list[Episode], parent: str) -> list[AnchorItem]:
    """Prompts whose answers the round must not change, answered by the version it improves
    (called before training), in the order the trainer takes them: the questions earlier
    rounds of that version taught (replay: without them every later round would wear down
    what the earlier ones learned), near-miss prompts of the form being taught, then past
    prompts nobody asked to change (shipped general prompts where the store has too few).
    Turns that answer a follow-up are left out of the past prompts: the conversation may hold
    the very correction being learned; so are replayed questions asked again in this round."""
    rows = query(_PAST_PROMPTS_SQL, [lcfg.anchor_prompts]).rows
    conversations = [as_json(r[0]) for r in rows]
    if len(conversations) < lcfg.anchor_prompts:
        shipped = shipped_prompts("anchor_prompts.json")
        conversations += [[{"role": "user", "content": p}]
                          for p in shipped[: lcfg.anchor_prompts - len(conversations)]]
    if lcfg.near_miss_anchors:
        questions = [content_text(m.get("content")) for ep in episodes for m in ep.messages[-1:]]
        conversations = [[{"role": "user", "content": p}]
                         for p in near_misses(questions, shipped_prompts("near_miss_prompts.json"),
                                              lcfg.near_miss_anchors)] + conversations
    conversations = taught_prompts(query, parent, episodes, lcfg.replay_prompts) + conversations
    answers = generate_greedy(model, tokenizer, conversations,
                              lcfg.anchor_tokens or lcfg.max_new_tokens)
    return [AnchorItem(c, a) for c, a in zip(conversations, answers, strict=True) if a]


def taught_prompts(query: Query, version: str, episodes: list[Episode],
                   limit: int) -> list[list[dict[str, Any]]]:
    """Up to `limit` distinct prompts that `version` and its ancestors were trained on, newest
    round first, leaving out those this round learns from again."""
    if limit <= 0 or version == BASE_VERSION:
        return []
    now = [ep.messages for ep in episodes]
    rows = query(_TAUGHT_SQL, [version, limit + len(now)]).rows
    return [m for m in (as_json(r[0]) for r in rows) if m not in now][:limit]


def preserved_null_space(model: Any, tokenizer: Any, lcfg: LearnerConfig,
                         anchors: list[AnchorItem], model_cache: Path, model_dir: str) -> NullSpace:
    """The null space of what the round must not change (learner.subspace): the general
    sample's inputs (once per model, cached in `model_cache`) and the round's anchors' (the
    store's past prompts, near misses, earlier rounds' questions) with the starting version's
    answers. The gate's retention questions are never among them."""
    modules = target_modules(model, parse_layers(lcfg.lora_layers),
                             f"mlp.{lcfg.lora_target_names()[0]}")
    # One file per model and module set: deployments (and tests) adapting other layers of the
    # same model do not overwrite each other's.
    key = json.dumps([model_dir, sorted(modules), lcfg.null_space_prompts])
    cache = model_cache / f"subspace-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    general = general_moments(model, tokenizer, modules, cache, model_dir,
                              lcfg.null_space_prompts)
    gated = {q["q"] for q in retention_set(lcfg.retention_set)["questions"]}
    kept = [a for a in anchors if not any(content_text(m.get("content")) in gated
                                          for m in a.messages)]
    own = input_moments(model, tokenizer, modules,
                  conversation_sequences(tokenizer, [a.messages for a in kept],
                                         [a.response for a in kept]))
    return NullSpace.of(general + own, lcfg.null_space_energy)


def gate_base_file(model_dir: str, retention: str = "") -> str:
    """The base model's retention answers change only with the model and the set: one file
    for each."""
    key = model_dir if not retention else f"{model_dir}\0{retention}"
    return f"gate-base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


_FORM_WORD = re.compile(r"[a-z']+")
# Leading words a pool prompt must share with the question: "who founded", "what is the capital
# of" — the form of the question, before the entity it is about.
NEAR_MISS_MIN_PREFIX = 2


def near_misses(questions: list[str], pool: list[str], per_question: int) -> list[str]:
    """For each question, the `per_question` pool prompts of the most alike form — the longest
    run of leading words in common, then the most words in common — if alike at all: where a
    fact taught for that question would bleed first."""
    def form(a: list[str], b: list[str]) -> tuple[int, float]:
        prefix = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                      min(len(a), len(b)))
        return prefix, len(set(a) & set(b)) / max(len(set(a) | set(b)), 1)

    picked: list[str] = []
    for question in questions:
        asked = _FORM_WORD.findall(question.lower())
        scored = sorted(((form(asked, _FORM_WORD.findall(p.lower())), p) for p in pool),
                        key=lambda sp: sp[0], reverse=True)
        picked += [p for (prefix, _), p in scored[:per_question]
                   if prefix >= NEAR_MISS_MIN_PREFIX and p not in picked]
    return picked


def _served_name(version: str, manifest: Any) -> str:
    """The name the primary engine serves `version` under (its stored manifest's files)."""
    if version == BASE_VERSION or manifest is None:
        return BASE_VERSION
    return engine_name(version, as_json(manifest)["files"])


def _next_version(query: Any, adapters: Path, alias: str) -> str:
    numbers = [0]
    for (version,) in query("SELECT version FROM adapter_versions WHERE alias = ?", [alias]).rows:
        numbers.append(int(version.rsplit("@v", 1)[1]))
    if adapters.is_dir():
        pattern = re.compile(rf"^\.?{re.escape(alias)}@v(\d+)(\.partial)?$")
        numbers += [int(m.group(1)) for p in adapters.iterdir() if (m := pattern.match(p.name))]
    return f"{alias}@v{max(numbers) + 1}"
