"""Token-level self-distillation losses.

Teacher and student score the same response token ids; at each response position the loss
pulls the student's next-token distribution S toward the teacher's T. No gradient reaches the
teacher. Names are explicit because the literature is not: SDFT and OPSD *describe* a reverse
KL but their published results used the forward one.

- `forward_kl`   KL(T ‖ S) = Σ T (log T − log S)   — mass-covering; SDFT / OPSD as run.
- `reverse_kl`   KL(S ‖ T) = Σ S (log S − log T)   — mode-seeking.
- `jsd(α)`       α·KL(T ‖ M) + (1−α)·KL(S ‖ M), M = α·T + (1−α)·S (generalised JSD, as in GKD).

Supports (which part of the vocabulary the sum runs over):
- `full_vocab`     every token. Logits are formed chunk by chunk from hidden states under
                   activation checkpointing, so memory grows with the chunk, never with
                   batch × length × vocabulary.
- `topk(k)`        the teacher's k most likely tokens plus one tail bucket holding the rest of
                   each distribution's mass, so both sides stay proper distributions.
- `sampled_token`  only the response token y itself: the score-function estimator of the
                   reverse KL, sg(log S(y) − log T(y)) · log S(y), whose gradient is the
                   reverse-KL gradient in expectation when y was sampled from the student.

Stabilisers: skip the first N response tokens, truncated importance weights
min(S_trainer(y) / S_engine(y), cap) when the response came from the serving engine, and an
optional per-token point-wise clip (OPSD): each vocabulary entry's term of the divergence is
capped before the sum (for `sampled_token`, the log-ratio is clamped to ±clip).
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from learner.spec import Divergence, Support, TokenLossConfig

__all__ = [
    "Divergence", "Support", "TokenLossConfig", "chunked_token_losses", "divergence",
    "reduce_token_losses", "token_losses_from_logits", "token_losses_from_teacher_topk",
    "with_tail",
]

def divergence(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, div: Divergence,
    clip: float | None = None,
) -> torch.Tensor:
    """Per-position divergence between two log-distributions over the last dimension.

    `clip` caps each vocabulary entry's point-wise term before the sum (OPSD's per-token
    point-wise KL clipping: a few tokens with huge ratios must not dominate the signal).
    """
    def total(terms: torch.Tensor) -> torch.Tensor:
        return (terms.clamp(max=clip) if clip is not None else terms).sum(-1)

    if div.name == "forward_kl":
        return total(teacher_logp.exp() * (teacher_logp - student_logp))
    if div.name == "reverse_kl":
        return total(student_logp.exp() * (student_logp - teacher_logp))
    a = div.alpha
    mixture = torch.logsumexp(
        torch.stack([teacher_logp + math.log(a), student_logp + math.log(1.0 - a)]), dim=0
    )
    return total(a * teacher_logp.exp() * (teacher_logp - mixture)
                 + (1.0 - a) * student_logp.exp() * (student_logp - mixture))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def with_tail(logp_top: torch.Tensor) -> torch.Tensor:
    """k log-probabilities → k+1, the last being the mass of everything else."""
    tail = log1mexp(torch.logsumexp(logp_top, dim=-1, keepdim=True))
    return torch.cat([logp_top, tail], dim=-1)


def token_losses_from_logits(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    cfg: TokenLossConfig,
) -> torch.Tensor:
    """Per-position loss [N] from full logits [N, V] of both sides (teacher detached)."""
    with torch.no_grad():
        t_logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    return _token_losses(torch.log_softmax(student_logits.float(), dim=-1), t_logp, targets, cfg)


def _token_losses(s_logp: torch.Tensor, t_logp: torch.Tensor, targets: torch.Tensor,
                  cfg: TokenLossConfig) -> torch.Tensor:
    if cfg.support.name == "full_vocab":
        return divergence(t_logp, s_logp, cfg.divergence, cfg.token_clip)
    if cfg.support.name == "topk":
        idx = t_logp.topk(min(cfg.support.k, t_logp.shape[-1]), dim=-1).indices
        return divergence(with_tail(t_logp.gather(-1, idx)), with_tail(s_logp.gather(-1, idx)),
                          cfg.divergence, cfg.token_clip)
    s_y = s_logp.gather(-1, targets[:, None])[:, 0]
    t_y = t_logp.gather(-1, targets[:, None])[:, 0]
    log_ratio = (s_y - t_y).detach()
    if cfg.token_clip is not None:
        log_ratio = log_ratio.clamp(-cfg.token_clip, cfg.token_clip)
    return log_ratio * s_y


def token_losses_from_teacher_topk(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logp: torch.Tensor,
    cfg: TokenLossConfig,
) -> torch.Tensor:
    """Per-position loss when the teacher is known only by its top-k (e.g. engine logprobs)."""
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    return divergence(with_tail(teacher_logp.float()), with_tail(s_logp.gather(-1, teacher_ids)),
                      cfg.divergence, cfg.token_clip)


def chunked_token_losses(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    lm_head: torch.nn.Module,
    targets: torch.Tensor,
    cfg: TokenLossConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position loss [N] from final hidden states [N, H], `chunk_size` positions at a time,
    and the student's log-probability of each response token [N] from the same logits (with
    gradient: cross-entropy is minus its mean; detached, it is the importance weight's
    numerator). With no teacher the losses are zero and only the log-probabilities are made.

    Each chunk's logits are made, used and dropped; backward makes them again (activation
    checkpointing), so peak memory is chunk × vocabulary whatever the batch and length.
    """
    losses, logp_y = [], []
    for start in range(0, student_hidden.shape[0], cfg.chunk_size):
        stop = start + cfg.chunk_size
        loss, lp = checkpoint(
            _chunk_losses, student_hidden[start:stop],
            None if teacher_hidden is None else teacher_hidden[start:stop], lm_head,
            targets[start:stop], cfg, use_reentrant=False,
        )
        losses.append(loss)
        logp_y.append(lp)
    if not losses:
        return student_hidden.new_zeros(0), student_hidden.new_zeros(0)
    return torch.cat(losses), torch.cat(logp_y)


def _chunk_losses(s_hidden: torch.Tensor, t_hidden: torch.Tensor | None, lm_head: torch.nn.Module,
                  targets: torch.Tensor, cfg: TokenLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    s_logp = torch.log_softmax(lm_head(s_hidden).float(), dim=-1)
    s_y = s_logp.gather(-1, targets[:, None])[:, 0]
    if t_hidden is None:
        return torch.zeros_like(s_y), s_y
    with torch.no_grad():
        t_logp = torch.log_softmax(lm_head(t_hidden).float(), dim=-1)
    return _token_losses(s_logp, t_logp, targets, cfg), s_y


def reduce_token_losses(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    cfg: TokenLossConfig,
    student_logp_y: torch.Tensor | None = None,
    engine_logp_y: torch.Tensor | None = None,
    position_in_response: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over the positions that count, after skipping and importance weights.

    `mask` marks response positions (1) vs padding (0); `position_in_response` is each
    position's index within its response (for skipping the first N); the log-probabilities of
    the response token under the trainer's student and under the engine that sampled it give
    the truncated importance weight.
    """
    weights = mask.float()
    if cfg.skip_first_tokens and position_in_response is not None:
        weights = weights * (position_in_response >= cfg.skip_first_tokens).float()
    if cfg.is_cap is not None and student_logp_y is not None and engine_logp_y is not None:
        ratio = torch.exp(student_logp_y.detach() - engine_logp_y).clamp(max=cfg.is_cap)
        weights = weights * ratio
    denom = mask.float().sum().clamp(min=1.0)
    return (per_token * weights).sum() / denom
