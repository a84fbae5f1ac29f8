"""Where a round's update may write: the null space of what must not change.

A dense LoRA update tips near-even answers everywhere (measured on the embedded model: 12-21 of
the gate's 269 questions lost per round, whatever was taught), and rehearsal anchors only
penalise change on the prompts they happen to cover. The structural answer (AlphaEdit, InfLoRA,
LoRA-Null; `constrained_updates.md` in the project's shared learning notes): for each module the
learner changes, the uncentred second moment of its inputs over what must not change,
C = E[k kᵀ], says which input directions those inputs use. Its eigenvectors of smallest
eigenvalue, as many as hold at most a small share of the energy (`null_space_energy`), span the
directions they barely use; P = U Uᵀ projects onto them. An adapter whose input side lies in
range(P) — ΔW = B·A with A = A·P — changes the module's output on a preserved key k by
B·A·P·k, which is as small as P·k is.

What must not change comes in two parts:
- general, once per model and cached beside the model cache (like the gate's base reference):
  the shipped anchor and near-miss prompt pools in the chat template with the model's own greedy
  answers, and a general text sample the model writes from plain openers. Never the gate's
  retention questions nor a benchmark's: they must stay an independent measure of what was kept.
- the round's own, on the version the round improves: its rehearsal anchors (the store's past
  prompts nobody asked to change, the near-miss prompts of this round's questions, and the
  questions earlier rounds taught) with that version's answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from learner.inference import generate_greedy, pad_id, prompt_ids
from learner.retention_data import shipped_prompts

log = logging.getLogger(__name__)

# Plain openers the model continues into the general text sample: prose of several kinds,
# instructions, code, dialogue, lists — the shapes of text a chat model's traffic is made of.
OPENERS = (
    "The", "In", "Once upon a time", "Today", "Scientists have", "Here is a recipe for",
    "def ", "import ", "Dear", "The history of", "To get started,", "Q: ", "1.", "I think",
    "According to", "The best way to", "When I was", "In mathematics,", "The city of",
    "Yesterday", "Step 1:", "Our team", "If you", "Many people", "The following",
    "SELECT", "It is important to", "Thank you for", "The weather", "How to", "My name is",
    "The company", "Water", "Music", "After the war,", "The rules of", "Please", "Why do",
    "A good", "There are three", "The main", "In 1990,", "The human body", "Computers",
    "The story", "Summary:", "Note:", "The first", "For example,", "We",
)
GENERAL_ANSWER_TOKENS = 48
GENERAL_TEXT_TOKENS = 96
GENERAL_SAMPLE = 2  # how the general sample is drawn; a new value recomputes cached moments
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def module_key(name: str) -> str | None:
    """`layers.<i>.<path>` of a module name, whatever wraps the model (peft, `model.`)."""
    m = _LAYER.search(name)
    return f"layers.{m.group(1)}.{m.group(2)}" if m else None


def target_modules(model: Any, layers: Sequence[int], module: str) -> dict[str, torch.nn.Module]:
    """The modules an update may change, by `module_key`: `module` (e.g. `mlp.down_proj`) of
    each layer in `layers`; peft's LoRA wrapper where there is one (its input is the base
    layer's)."""
    wanted = {f"layers.{i}.{module}" for i in layers}
    found = {}
    for name, mod in model.named_modules():
        key = module_key(name)
        if key in wanted and key not in found:  # the outermost: peft's wrapper, or the Linear
            found[key] = mod
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"the model has no module {sorted(missing)[0]} (learner.lora_layers, "
                         "learner.lora_targets)")
    return found


@dataclass
class Moments:
    """Σ k kᵀ of each module's inputs (float64) and how many inputs (tokens) were summed."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0

    def __add__(self, other: Moments) -> Moments:
        keys = set(self.sums) | set(other.sums)
        return Moments({k: self.sums.get(k, 0) + other.sums.get(k, 0) for k in keys},
                       self.tokens + other.tokens)


@contextmanager
def _recording(modules: dict[str, torch.nn.Module], out: Moments,
               rows: list[torch.Tensor]) -> Iterator[None]:
    """Add every input row that `rows[0]` (a [batch, seq] mask, set per batch) marks as a real
    token to `out`, for each module, while the block runs."""
    def hook(key: str):
        def pre(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])[rows[0].reshape(-1)].float()
            # One batch's product in float32 (fast), the running sum in float64 (exact enough
            # over many batches).
            out.sums[key] = out.sums.get(key, 0) + (x.T @ x).double()
        return pre

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_moments(model: Any, tokenizer: Any, modules: dict[str, torch.nn.Module],
                  sequences: Iterable[list[int]], batch_size: int = 8,
                  counted_from: Sequence[int] | None = None) -> Moments:
    """The moments of `modules`' inputs over the tokens of `sequences` (token ids): every
    token, or those from `counted_from[i]` on in sequence i."""
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    out, rows = Moments(), [torch.zeros(0)]
    seqs = list(sequences)
    starts = list(counted_from) if counted_from is not None else [0] * len(seqs)
    order = sorted((i for i in range(len(seqs)) if seqs[i]), key=lambda i: len(seqs[i]))
    model.eval()
    with _recording(modules, out, rows):
        for first in range(0, len(order), batch_size):  # alike lengths pad least
            batch = [seqs[i] for i in order[first:first + batch_size]]
            skip = [starts[i] for i in order[first:first + batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in batch], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in batch],
                                device=device)
            counted = mask.clone()
            for row, k in enumerate(skip):
                counted[row, :k] = 0
            rows[0] = counted.bool()
            model(input_ids=ids, attention_mask=mask)
            out.tokens += int(counted.sum())
    return out


def conversation_sequences(tokenizer: Any, conversations: Sequence[list[dict[str, Any]]],
                           answers: Sequence[list[int]]) -> list[list[int]]:
    """Each conversation in the chat template followed by its answer, as the model reads it."""
    return [prompt_ids(tokenizer, c) + list(a) for c, a in zip(conversations, answers, strict=True)]


@torch.no_grad()
def general_sequences(model: Any, tokenizer: Any, seed: int = 0,
                      prompts: int = 0) -> list[list[int]]:
    """The general sample: the shipped anchor and near-miss pools (their first `prompts`; 0:
    all) with the model's own greedy answers, and text the model writes from `OPENERS`
    (sampled, temperature 1)."""
    pool = shipped_prompts("anchor_prompts.json") + shipped_prompts("near_miss_prompts.json")
    pools = [[{"role": "user", "content": p}] for p in pool[:prompts or len(pool)]]
    answers = generate_greedy(model, tokenizer, pools, GENERAL_ANSWER_TOKENS, batch_size=32)
    # All openers in one batch, left-padded (one at a time took minutes on 2 cores).
    pad = pad_id(tokenizer)
    starts = [tokenizer(o)["input_ids"] for o in OPENERS]
    width = max(len(s) for s in starts)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in starts], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in starts], device=device)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                         top_p=None, top_k=None, max_new_tokens=GENERAL_TEXT_TOKENS,
                         pad_token_id=pad)
    texts = [s + row[width:] for s, row in zip(starts, out.tolist(), strict=True)]
    # Text past an end-of-text the model wrote is padding.
    eos = tokenizer.eos_token_id
    texts = [t[: t.index(eos, len(s)) + 1] if eos in t[len(s):] else t
             for s, t in zip(starts, texts, strict=True)]
    return conversation_sequences(tokenizer, pools, answers) + texts


def general_moments(model: Any, tokenizer: Any, modules: dict[str, torch.nn.Module],
                    cache: Path | None, cache_key: str, prompts: int = 0) -> Moments:
    """`input_moments` over `general_sequences` (of `prompts` pool prompts; 0: all) with the
    adapter off (the base model's), from `cache` when it was made for the same model, modules
    and sample."""
    digest = hashlib.sha256(json.dumps([cache_key, sorted(modules), OPENERS, GENERAL_SAMPLE,
                                        GENERAL_ANSWER_TOKENS, GENERAL_TEXT_TOKENS, prompts]).encode()
                            ).hexdigest()
    if cache is not None and cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            if saved.get("digest") == digest:
                return Moments(dict(saved["sums"]), int(saved["tokens"]))
        except (OSError, RuntimeError, KeyError, ValueError):
            pass
    with _base_weights(model):
        moments = input_moments(model, tokenizer, modules,
                                general_sequences(model, tokenizer, prompts=prompts))
    if cache is not None:  # replaced whole: rounds of other data dirs may read it meanwhile
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        torch.save({"digest": digest, "sums": moments.sums, "tokens": moments.tokens}, tmp)
        tmp.replace(cache)
    return moments


@contextmanager
def _base_weights(model: Any) -> Iterator[None]:
    disable = getattr(model, "disable_adapter", None)
    if disable is None:
        yield
    else:
        with disable():
            yield


@dataclass(frozen=True)
class NullSpace:
    """Per module: the projector onto the directions the preserved inputs barely use, and
    what the spectrum looked like."""

    projectors: dict[str, torch.Tensor]
    report: dict[str, dict[str, float]]

    @classmethod
    def of(cls, moments: Moments, energy: float) -> NullSpace:
        """Per module, the eigenvectors of E[k kᵀ] with the smallest eigenvalues, as many as
        together hold at most `energy` of the preserved inputs' energy (its trace): an update
        confined to them acts on a preserved input with at most that share of its squared norm,
        on average. (A threshold on the eigenvalue alone would not bound that: on the embedded
        model's `down_proj` the 97 % of directions below 1 % of the largest eigenvalue hold 10 %
        of the energy.)"""
        projectors, report = {}, {}
        for key in sorted(moments.sums, key=_layer_order):
            second = moments.sums[key] / max(moments.tokens, 1)
            values, vectors = torch.linalg.eigh(second)  # ascending
            values = values.clamp(min=0.0)
            free = torch.cumsum(values, 0) <= energy * values.sum()
            basis = vectors[:, free]
            projectors[key] = (basis @ basis.T).float()
            report[key] = {"dim": second.shape[0], "null_dim": int(free.sum()),
                           "energy_in_null": float(values[free].sum() / values.sum()),
                           "eig_max": float(values[-1]),
                           "eig_median": float(values[len(values) // 2])}
        return cls(projectors, report)

    def share_outside(self, moments: Moments) -> dict[str, float]:
        """For inputs summed in `moments`: the share of their energy in the null space,
        tr(P C) / tr(C) — how much of them an update confined to it can act on."""
        # tr(P C) of two symmetric matrices: the sum of their elementwise product.
        return {k: float((self.projectors[k].double() * m).sum() / torch.trace(m))
                for k, m in moments.sums.items() if k in self.projectors}


def _layer_order(key: str) -> tuple[int, str]:
    m = _LAYER.search(key)
    return (int(m.group(1)), m.group(2)) if m else (-1, key)


class Projection:
    """Keeps a LoRA's input side in the null space: A ← A·P for each adapted module that has a
    projector, at the start and after every optimizer step. Projecting the gradient would not
    do: Adam rescales it element-wise, out of range(P). The first `frozen` factors (a parent's,
    learner.stacking) are left as they are."""

    def __init__(self, model: Any, null_space: NullSpace, frozen: int = 0) -> None:
        self.frozen = frozen
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, param in model.named_parameters():
            if ".lora_A." not in name or not param.requires_grad:
                continue
            key = module_key(name.split(".lora_A.")[0])
            if key not in null_space.projectors:
                raise ValueError(f"no null space for the adapted module {key}: the LoRA's "
                                 "modules and the projected modules must be the same")
            self.pairs.append((param, null_space.projectors[key].to(param.device, param.dtype)))
        if not self.pairs:
            raise ValueError("the model has no trainable LoRA to project")
        self()

    @torch.no_grad()
    def __call__(self) -> None:
        for a, projector in self.pairs:
            own = a[self.frozen:]
            own.copy_(own @ projector)
