"""The LoRA self-distillation trainer (transformers + peft).

Teacher and student are one network. For each item the teacher scores the response token ids
with the feedback in its prompt, the student scores the same ids without it, and the loss
(learner.losses) pulls the student's next-token distributions toward the teacher's at every
response position. The teacher's weights are those the round started from — the version being
improved, the base model in a first round (`frozen`) —, the adapter as it trains (`live`), or an
exponential moving average of it (`ema(rate)`). Optional extras, each with its own named weight:
cross-entropy on the response text (`ce_weight`) and the rehearsal anchor — forward KL from the
starting weights to the student on past prompts nobody asked to change, which is what kept
retention at base level on the embedded model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from learner.config import Knobs, LearnerConfig, parse_layers, settle
from learner.inference import answer_hidden, pad_id, prompt_ids
from learner.losses import (
    TokenLossConfig,
    chunked_token_losses,
    reduce_token_losses,
)
from learner.spec import Divergence, Support

log = logging.getLogger(__name__)

_ANCHOR_LOSS = TokenLossConfig(divergence=Divergence("forward_kl"), support=Support("full_vocab"))


@dataclass
class TrainItem:
    """One teacher-forced distillation example; prompts are chat messages, `response` token ids."""

    student_messages: list[dict[str, Any]]
    teacher_messages: list[dict[str, Any]]
    response: list[int]
    source: str = ""
    episode_id: str = ""
    engine_logprobs: list[float] | None = None  # of each response token, where the engine sampled it


@dataclass
class AnchorItem:
    """A past prompt and the starting version's own answer to it."""

    messages: list[dict[str, Any]]
    response: list[int]


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    anchor_losses: list[float]
    resumed_at: int = 0  # the step a checkpoint let this run start from


def load_student(model_dir: str | Path, cfg: LearnerConfig, parent_adapter: str | Path | None = None):
    """Base model in float32 with a trainable LoRA (a fresh one, or the parent version's)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = settle(cfg)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if parent_adapter is not None:
        model = PeftModel.from_pretrained(base, str(parent_adapter), is_trainable=True)
    else:
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.lora_target_names() or "all-linear",
                          layers_to_transform=parse_layers(cfg.lora_layers) or None,
                          task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
    return model, tokenizer


class SelfDistillationTrainer:
    def __init__(self, model: Any, tokenizer: Any, cfg: LearnerConfig, knobs: Knobs,
                 constraint: Callable[[], None] | None = None) -> None:
        """`constraint`: called after every optimizer step to put the adapter back where it
        may be (learner.subspace.Projection)."""
        self.model = model
        self.constraint = constraint
        self.tokenizer = tokenizer
        self.cfg = settle(cfg)
        self.knobs = knobs
        self.device = next(model.parameters()).device
        self._pad = pad_id(tokenizer)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._ema = ([p.detach().clone() for p in self._trainable]
                     if knobs.teacher.name == "ema" else None)
        # The weights the round started from: the version being improved (a fresh adapter adds
        # nothing, so in a first round they are the base model's). The frozen teacher and the
        # anchor's reference, so that a round on top of a learned version keeps what earlier
        # rounds taught instead of distilling the model back toward base.
        self._start = [p.detach().clone() for p in self._trainable]
        # Every item is scored once per pass: template its prompts once, and keep the hidden
        # states of the weights that never change (the starting weights: a frozen teacher, the
        # anchor's reference) instead of running them again every step.
        self._prompts: dict[str, list[int]] = {}
        self._frozen: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    # -- teacher weights -------------------------------------------------------------------

    @contextlib.contextmanager
    def _weights(self, values: list[torch.Tensor]) -> Iterator[None]:
        """The adapter with `values` swapped in for one forward pass, then put back."""
        saved = [p.detach().clone() for p in self._trainable]
        with torch.no_grad():
            for p, v in zip(self._trainable, values, strict=True):
                p.copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self._trainable, saved, strict=True):
                    p.copy_(s)

    @contextlib.contextmanager
    def _teacher_weights(self) -> Iterator[None]:
        if self.knobs.teacher.name == "live":
            yield
        else:  # ema: swap the averaged adapter in for the teacher's forward pass
            assert self._ema is not None
            with self._weights(self._ema):
                yield

    def _update_ema(self) -> None:
        if self._ema is None:
            return
        rate = self.knobs.teacher.rate
        with torch.no_grad():
            for p, e in zip(self._trainable, self._ema, strict=True):
                e.mul_(1.0 - rate).add_(p.detach(), alpha=rate)

    # -- scoring ---------------------------------------------------------------------------

    def _prompt(self, messages: list[dict[str, Any]]) -> tuple[str, list[int]]:
        key = json.dumps(messages, sort_keys=True)
        prompt = self._prompts.get(key)
        if prompt is None:
            prompt = self._prompts[key] = prompt_ids(self.tokenizer, messages)
        return key, prompt

    def _hidden(self, messages: list[dict[str, Any]], response: list[int]) -> torch.Tensor:
        """Final hidden states at the positions that predict each response token."""
        return self._hiddens([(messages, response)])[0]

    def _hiddens(self, pairs: Sequence[tuple[list[dict[str, Any]], list[int]]]) -> list[torch.Tensor]:
        """`_hidden` of several (messages, response) pairs, in one forward pass."""
        return answer_hidden(self.model, [self._prompt(m)[1] for m, _ in pairs],
                             [r for _, r in pairs], self._pad)

    @torch.no_grad()
    def _start_hidden(self, messages: list[dict[str, Any]], response: list[int]) -> torch.Tensor:
        """`_hidden` under the weights the round started from, once per (prompt, response)."""
        key = (self._prompt(messages)[0], tuple(response))
        hidden = self._frozen.get(key)
        if hidden is None:
            with self._weights(self._start):
                # A copy: the slice is a view that would keep the whole forward's states.
                hidden = self._frozen[key] = self._hidden(messages, response).clone()
        return hidden

    def _teacher_hidden(self, item: TrainItem) -> torch.Tensor:
        if self.knobs.teacher.name == "frozen":
            return self._start_hidden(item.teacher_messages, item.response)
        with torch.no_grad(), self._teacher_weights():
            return self._hidden(item.teacher_messages, item.response)

    def item_loss(self, item: TrainItem) -> torch.Tensor:
        """`distill_weight` × the teacher–student loss of one item + `ce_weight` × cross-entropy
        on its response; with no distillation weight the teacher is never run."""
        lm_head = self.model.get_base_model().lm_head
        targets = torch.tensor(item.response, device=self.device)
        # The teacher first: an EMA teacher swaps weights in place.
        t_hidden = self._teacher_hidden(item) if self.knobs.distill_weight else None
        s_hidden = self._hidden(item.student_messages, item.response)
        per_token, student_y = chunked_token_losses(s_hidden, t_hidden, lm_head, targets,
                                                    self.knobs.loss)
        loss = s_hidden.new_zeros(())
        if t_hidden is not None:
            positions = torch.arange(len(item.response), device=self.device)
            engine_y = (None if item.engine_logprobs is None
                        else torch.tensor(item.engine_logprobs, device=self.device))
            loss = loss + self.knobs.distill_weight * reduce_token_losses(
                per_token, torch.ones_like(positions), self.knobs.loss,
                student_logp_y=student_y.detach(), engine_logp_y=engine_y,
                position_in_response=positions)
        if self.knobs.ce_weight:
            loss = loss - self.knobs.ce_weight * student_y.mean()
        return loss

    def anchor_loss(self, anchors: Sequence[AnchorItem]) -> torch.Tensor:
        """Mean over `anchors` of each one's mean per-token KL(start ‖ student), all of them in
        one forward pass."""
        lm_head = self.model.get_base_model().lm_head
        base = torch.cat([self._start_hidden(a.messages, a.response) for a in anchors])
        student = torch.cat(self._hiddens([(a.messages, a.response) for a in anchors]))
        targets = torch.tensor([t for a in anchors for t in a.response], device=self.device)
        per_token, _ = chunked_token_losses(student, base, lm_head, targets, _ANCHOR_LOSS)
        return torch.stack([part.mean() for part in
                            per_token.split([len(a.response) for a in anchors])]).mean()

    # -- training --------------------------------------------------------------------------

    def train(self, items: Sequence[TrainItem], anchors: Sequence[AnchorItem] = (),
              max_steps: int | None = None, progress: bool = True,
              resume: dict[str, Any] | None = None,
              save: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
        """Train; with `save`, hand a checkpoint to it every `checkpoint_every` steps, and
        with `resume` (such a checkpoint) continue where it was taken. The step order is a
        function of the seed, so a resumed run takes the same steps as an unbroken one."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        batches = step_plan(len(items), cfg)
        if max_steps is not None:
            batches = batches[:max_steps]
        total = max(len(batches), 1)
        warmup = max(int(total * cfg.warmup_ratio), 0)
        optimizer = torch.optim.AdamW(self._trainable, lr=cfg.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: _linear_warmup_decay(step, warmup, total))
        losses: list[float] = []
        anchor_losses: list[float] = []
        first = 0
        if resume is not None:
            first = self._restore(resume, optimizer, scheduler)
            losses, anchor_losses = list(resume["losses"]), list(resume["anchor_losses"])
            log.info("resuming training at step %d of %d", first, len(batches))
        self._warm_start_hidden(items, anchors)
        self.model.train()
        bar = tqdm(range(first, len(batches)), desc="distilling", unit="step",
                   disable=not progress, initial=first, total=len(batches))
        for step in bar:
            batch = batches[step]
            optimizer.zero_grad(set_to_none=True)
            loss = sum(self.item_loss(items[i]) for i in batch) / len(batch)
            if anchors and self.knobs.anchor_weight:
                k = min(cfg.anchors_per_step, len(anchors))
                a_loss = self.anchor_loss([anchors[(step * k + j) % len(anchors)]
                                           for j in range(k)])
                anchor_losses.append(float(a_loss.detach()))
                loss = loss + self.knobs.anchor_weight * a_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self._trainable, cfg.grad_clip)
            optimizer.step()
            if self.constraint is not None:
                self.constraint()
            scheduler.step()
            self._update_ema()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            done = step + 1
            if save is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                    and done < len(batches):
                save({"step": done, "adapter": [p.detach().clone() for p in self._trainable],
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "ema": self._ema, "losses": losses, "anchor_losses": anchor_losses})
        self.model.eval()
        return TrainResult(len(batches), losses, anchor_losses, resumed_at=first)

    def _warm_start_hidden(self, items: Sequence[TrainItem], anchors: Sequence[AnchorItem]) -> None:
        """Everything the starting weights will be asked during training, asked now: swapping
        them in mid-step would change parameters a step's graph still needs for its backward."""
        if self.knobs.teacher.name == "frozen" and self.knobs.distill_weight:
            for it in items:
                self._start_hidden(it.teacher_messages, it.response)
        if self.knobs.anchor_weight:
            for anchor in anchors:
                self._start_hidden(anchor.messages, anchor.response)

    def _restore(self, state: dict[str, Any], optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> int:
        with torch.no_grad():
            for p, saved in zip(self._trainable, state["adapter"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if self._ema is not None and state.get("ema") is not None:
            self._ema = [e.to(self.device) for e in state["ema"]]
        return int(state["step"])

    @torch.no_grad()
    def divergence(self, items: Sequence[TrainItem]) -> float:
        """Mean teacher–student loss over items, no update: what the gate compares."""
        self.model.eval()
        values = [float(self.item_loss(it)) for it in items]
        return sum(values) / len(values) if values else float("nan")


def step_plan(items: int, cfg: LearnerConfig) -> list[list[int]]:
    """The item indices of each training step: whole passes over the items in an order drawn
    from the seed (a resumed run takes the same steps as an unbroken one), at least `passes`
    of them and as many more as a small round needs to reach `min_steps` — one correction's
    two items would otherwise get a dozen steps, too few for the fact to be said in other
    words than the trained question's."""
    rng = random.Random(cfg.seed)
    order: list[int] = []
    while items and (len(order) < cfg.passes * items or len(order) < cfg.min_steps * cfg.batch_size):
        order += rng.sample(range(items), items)
    return [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]


def _linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))

