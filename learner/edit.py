"""A closed-form edit of what a correction states (MEMIT / AlphaEdit family), fitted to the
feedback-conditioned teacher and written as a LoRA on `down_proj`.

Gradient training on a dense adapter tips near-even answers everywhere; a locate-then-edit
update writes one vector per fact into a few MLP output projections, and with AlphaEdit's
projector only along input directions that what must not change barely uses
(learner.subspace). Per taught episode (a fact):

- **key** k_l: the input of layer l's `down_proj` at the last token of the question's subject,
  averaged over the phrasings the round trains on (the question as asked and the model's own
  rewordings, learner.phrasings). The subject is the last word of the question that the
  feedback repeats ("Veloria" in "What is the capital of Veloria?" corrected by "... of Veloria
  is Marenthal"), else the question's last word.
- **value**: a vector δ added to the residual stream after the last edited layer, at the
  subject's token in every phrasing, fitted so that the student — no feedback in its prompt —
  matches the teacher's next-token distributions on the teacher's own answers (forward KL over
  the full vocabulary: the self-distillation target, not the likelihood of one string), with
  a weight decay on ‖δ‖ and a clamp to a share of the hidden state's norm.
- **solve**, layer by layer in order (MEMIT's spreading: each layer takes its share of what is
  still missing, keys recomputed on the partly edited model): Δ_l = R_l Qᵀ with
  Q = (P (K Kᵀ) + λ I)⁻¹ P K, P the null-space projector of the preserved inputs (identity
  when the round has no projection), λ = `edit_ridge` times the mean squared key norm. Every
  row of Qᵀ lies in range(P), so Δ_l acts on a preserved input only as much as P does.

Δ_l = R_l Qᵀ has rank ≤ the number of facts and is exactly a LoRA on `down_proj`
(B = R_l / scaling, A = Qᵀ, zero-padded to the adapter's rank), so vLLM serves and hot-swaps
it like any version and the gate judges it like any candidate.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from feedback import content_text
from learner.contexts import last_user_index
from learner.inference import pad_id, prompt_ids, response_log_probs
from learner.phrasings import subject_words
from learner.responses import content_words
from learner.subspace import module_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditKnobs:
    """The edit's named knobs (learner.config's `edit_*`)."""

    steps: int = 25  # Adam steps fitting each fact's δ
    lr: float = 0.5
    weight_decay: float = 0.5  # on ‖δ‖² / ‖h‖²
    clamp: float = 0.75  # ‖δ‖ ≤ clamp · ‖h‖ at the subject's token
    ridge: float = 0.01  # λ of the solve, relative to the mean squared key norm


@dataclass
class Example:
    """One phrasing of a fact: the student's prompt, the subject token's position in it, and
    a teacher answer with the teacher's log-distributions over it."""

    prompt: list[int]
    position: int
    response: list[int]
    teacher_logp: torch.Tensor  # [len(response), V]


@dataclass
class Fact:
    episode_id: str
    examples: list[Example]


@dataclass
class EditResult:
    facts: int
    losses_first: list[float]
    losses_last: list[float]
    report: dict[str, dict[str, float]]  # per module: ‖Δ‖, share of the residual written


def subject_position(tokenizer: Any, messages: list[dict[str, Any]], signal: str) -> int:
    """The index, in `prompt_ids(messages)`, of the last token of the question's subject: the
    last word of the last user turn that the feedback repeats, else its last word."""
    last = last_user_index(messages)
    question = content_text(messages[last].get("content"))
    shared = subject_words(question, signal) or content_words(question)
    spans = [m.span() for m in re.finditer(r"[A-Za-z0-9][A-Za-z0-9'-]*", question)
             if m.group().lower() in shared]
    end = spans[-1][1] if spans else len(question.rstrip(" ?.!"))
    # The prompt up to the end of that word, templated as the model reads it: its length is
    # one past the subject's last token (the chat template only appends after the content).
    marker = "\u0001"
    cut = [*(dict(m) for m in messages[:last]),
           {**messages[last], "content": question[:end] + marker}]
    text = tokenizer.apply_chat_template(cut, add_generation_prompt=False, tokenize=False)
    head = text[: text.rindex(marker)]
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    full = prompt_ids(tokenizer, messages)
    position = len(ids) - 1
    if full[: len(ids)] != ids:  # the tokenizer merged across the cut: find the word's end
        position = len(os.path.commonprefix([full, ids])) - 1
    return max(0, min(position, len(full) - 1))


def build_facts(model: Any, tokenizer: Any, items: Sequence[Any], signals: dict[str, str],
                per_prompt: int = 2) -> list[Fact]:
    """The facts of a round's training items (learner.trainer.TrainItem), one per episode in
    `signals` (episode id → the feedback that states the fact): up to `per_prompt` teacher
    answers per phrasing, each with the teacher's log-distributions (computed once, with the
    weights the round starts from)."""
    facts: dict[str, Fact] = {}
    seen: dict[tuple[str, str], int] = {}
    model.eval()
    for it in items:
        if it.episode_id not in signals:
            continue
        student = prompt_ids(tokenizer, it.student_messages)
        key = (it.episode_id, repr(student))
        if seen.get(key, 0) >= per_prompt:
            continue
        seen[key] = seen.get(key, 0) + 1
        teacher_logp = response_log_probs(model, prompt_ids(tokenizer, it.teacher_messages),
                                          list(it.response))
        position = subject_position(tokenizer, it.student_messages, signals[it.episode_id])
        facts.setdefault(it.episode_id, Fact(it.episode_id, [])).examples.append(
            Example(student, position, list(it.response), teacher_logp))
    return list(facts.values())


class _Hooks:
    """Forward hooks on the model: add δ to a layer's output at given (row, position) pairs,
    and read a module's input or a layer's output there."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def add_at(self, layer: torch.nn.Module, rows: list[int], positions: list[int],
               delta: torch.Tensor) -> None:
        def hook(_m: Any, _args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if hidden.shape[1] <= max(positions):  # a decoding step past the prompt
                return output
            hidden = hidden.clone()
            hidden[rows, positions] = hidden[rows, positions] + delta
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        self.handles.append(layer.register_forward_hook(hook))

    def read_input(self, module: torch.nn.Module, rows: list[int], positions: list[int],
                   out: list[torch.Tensor]) -> None:
        def pre(_m: Any, args: tuple[Any, ...]) -> None:
            out.append(args[0][rows, positions].detach().float())
        self.handles.append(module.register_forward_pre_hook(pre))

    def read_output(self, layer: torch.nn.Module, rows: list[int], positions: list[int],
                    out: list[torch.Tensor]) -> None:
        def hook(_m: Any, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            out.append(hidden[rows, positions].detach().float())
        self.handles.append(layer.register_forward_hook(hook))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()


def _batch(examples: Sequence[Example], pad: int, with_response: bool,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask of the examples' prompts (and responses)."""
    rows = [e.prompt + (e.response if with_response else []) for e in examples]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def decoder_layer(model: Any, index: int) -> torch.nn.Module:
    """The model's decoder layer `index`, whatever wraps the model."""
    pattern = re.compile(rf"(?:^|\.)layers\.{index}$")
    for name, module in model.named_modules():
        if pattern.search(name):
            return module
    raise ValueError(f"the model has no decoder layer {index}")


def fit_value(model: Any, tokenizer: Any, fact: Fact, layer: int,
              knobs: EditKnobs) -> tuple[torch.Tensor, float, float]:
    """δ for one fact at the output of decoder layer `layer`, and the KL before and after."""
    device = next(model.parameters()).device
    ids, mask = _batch(fact.examples, pad_id(tokenizer), True, device)
    rows = list(range(len(fact.examples)))
    positions = [e.position for e in fact.examples]
    block = decoder_layer(model, layer)
    hidden: list[torch.Tensor] = []
    with torch.no_grad(), _Hooks() as hooks:
        hooks.read_output(block, rows, positions, hidden)
        model(input_ids=ids, attention_mask=mask)
    norm = float(hidden[0].norm(dim=-1).mean())
    delta = torch.zeros(hidden[0].shape[-1], device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=knobs.lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    losses = []
    for step in range(knobs.steps + 1):
        with _Hooks() as hooks:
            hooks.add_at(block, rows, positions, delta)
            logits = model(input_ids=ids, attention_mask=mask).logits
        kl = torch.zeros((), device=device)
        for row, e in enumerate(fact.examples):
            start = len(e.prompt) - 1
            student = torch.log_softmax(logits[row, start:start + len(e.response)].float(), -1)
            teacher = e.teacher_logp.to(device)
            kl = kl + (teacher.exp() * (teacher - student)).sum(-1).mean()
        kl = kl / len(fact.examples)
        losses.append(float(kl.detach()))
        if step == knobs.steps:
            break
        loss = kl + knobs.weight_decay * delta.pow(2).sum() / norm ** 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            limit = knobs.clamp * norm
            if delta.norm() > limit:
                delta.mul_(limit / delta.norm())
    for p in trainable:
        p.requires_grad_(True)
    return delta.detach(), losses[0], losses[-1]


def _keys_and_outputs(model: Any, tokenizer: Any, facts: Sequence[Fact], module: torch.nn.Module,
                      block: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per fact (columns): the module's input and the z layer's output at the subject's token,
    averaged over the fact's phrasings, on the model as it is now."""
    device = next(model.parameters()).device
    keys, outputs = [], []
    for fact in facts:
        ids, mask = _batch(fact.examples, pad_id(tokenizer), False, device)
        rows = list(range(len(fact.examples)))
        positions = [e.position for e in fact.examples]
        k: list[torch.Tensor] = []
        z: list[torch.Tensor] = []
        with torch.no_grad(), _Hooks() as hooks:
            hooks.read_input(module, rows, positions, k)
            hooks.read_output(block, rows, positions, z)
            model(input_ids=ids, attention_mask=mask)
        keys.append(k[0].mean(0))
        outputs.append(z[0].mean(0))
    return torch.stack(keys, 1).double(), torch.stack(outputs, 1).double()


def lora_pair(model: Any, key: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter, float]:
    """The adapter's (A, B, scaling) of the module `key` (`layers.<i>.mlp.down_proj`)."""
    for name, module in model.named_modules():
        if module_key(name) == key and hasattr(module, "lora_A"):
            adapter = next(iter(module.lora_A))
            return (module.lora_A[adapter].weight, module.lora_B[adapter].weight,
                    float(module.scaling[adapter]))
    raise ValueError(f"the model has no LoRA on {key}: the edit writes into the round's adapter "
                     "(learner.lora_targets = down_proj, learner.lora_layers)")


def apply_edit(model: Any, tokenizer: Any, facts: Sequence[Fact], modules: dict[str, torch.nn.Module],
               projectors: dict[str, torch.Tensor] | None, knobs: EditKnobs,
               from_factor: int = 0) -> EditResult:
    """Fit each fact's value at the last of `modules`' layers, then write the edit into the
    adapter's factors of each module from factor `from_factor` on (those before it are a parent's,
    learner.stacking), layer by layer (see the module's docstring)."""
    if not facts:
        raise ValueError("nothing to edit: no fact has a teacher answer")
    order = sorted(modules, key=lambda k: int(k.split(".")[1]))
    z_layer = int(order[-1].split(".")[1])
    block = decoder_layer(model, z_layer)
    pairs = {k: lora_pair(model, k) for k in order}
    rank = min(a.shape[0] for a, _, _ in pairs.values()) - from_factor
    if len(facts) > rank:
        raise ValueError(f"{len(facts)} facts in one edit, and the round's rank is {rank}: "
                         "raise learner.lora_r (within learner.max_rank)")
    with torch.no_grad():
        for a, b, _ in pairs.values():
            a[from_factor:].zero_()
            b[:, from_factor:].zero_()
    model.eval()
    deltas, first, last = [], [], []
    for fact in facts:
        delta, before, after = fit_value(model, tokenizer, fact, z_layer, knobs)
        deltas.append(delta.double())
        first.append(before)
        last.append(after)
    _, start_z = _keys_and_outputs(model, tokenizer, facts, modules[order[0]], block)
    targets = start_z + torch.stack(deltas, 1)
    report = {}
    for i, key in enumerate(order):
        keys, now_z = _keys_and_outputs(model, tokenizer, facts, modules[key], block)
        resid = (targets - now_z) / (len(order) - i)  # [d_out, n]
        dim = keys.shape[0]
        projector = (projectors[key].double() if projectors is not None
                     else torch.eye(dim, dtype=torch.float64))
        ridge = knobs.ridge * float(keys.pow(2).sum(0).mean())
        lhs = projector @ (keys @ keys.T) + ridge * torch.eye(dim, dtype=torch.float64)
        q = torch.linalg.solve(lhs, projector @ keys)  # [d_in, n]
        a, b, scaling = pairs[key]
        n = len(facts)
        with torch.no_grad():
            a[from_factor:from_factor + n] = q.T.to(a.dtype)
            b[:, from_factor:from_factor + n] = (resid / scaling).to(b.dtype)
        # What the layer now adds at the facts' keys, against what it was asked to add.
        written = resid @ (q.T @ keys)
        report[key] = {"update_norm": float((resid @ q.T).norm()),
                       "resid_norm": float(resid.norm()),
                       "written_share": float(written.norm() / max(float(resid.norm()), 1e-12))}
    return EditResult(len(facts), first, last, report)
