"""Names of the distillation knobs, parsed and checked, without importing torch.

The config layer and the CLI use these; `learner.losses` implements them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

DivergenceName = Literal["forward_kl", "reverse_kl", "jsd"]
SupportName = Literal["full_vocab", "topk", "sampled_token"]


@dataclass(frozen=True)
class Divergence:
    name: DivergenceName
    alpha: float = 0.5  # jsd only

    @classmethod
    def parse(cls, text: str) -> Divergence:
        text = text.strip()
        if text in ("forward_kl", "reverse_kl"):
            return cls(text)  # type: ignore[arg-type]
        match = re.fullmatch(r"jsd(?:\(\s*([0-9.]+)\s*\))?", text)
        if match:
            alpha = float(match.group(1)) if match.group(1) else 0.5
            if not 0.0 < alpha < 1.0:
                raise ValueError(f"jsd(alpha) needs 0 < alpha < 1, got {alpha}")
            return cls("jsd", alpha)
        raise ValueError(f"unknown divergence '{text}': forward_kl, reverse_kl or jsd(alpha)")

    def __str__(self) -> str:
        return f"jsd({self.alpha:g})" if self.name == "jsd" else self.name


@dataclass(frozen=True)
class Support:
    name: SupportName
    k: int = 0  # topk only

    @classmethod
    def parse(cls, text: str) -> Support:
        text = text.strip()
        if text in ("full_vocab", "sampled_token"):
            return cls(text)  # type: ignore[arg-type]
        match = re.fullmatch(r"topk\(\s*(\d+)\s*\)", text)
        if match and int(match.group(1)) > 0:
            return cls("topk", int(match.group(1)))
        raise ValueError(f"unknown support '{text}': full_vocab, topk(k) or sampled_token")

    def __str__(self) -> str:
        return f"topk({self.k})" if self.name == "topk" else self.name


@dataclass(frozen=True)
class TokenLossConfig:
    divergence: Divergence = Divergence("forward_kl")
    support: Support = Support("full_vocab")
    skip_first_tokens: int = 0
    is_cap: float | None = None  # truncated importance weights; None: off
    token_clip: float | None = None  # clip of each token's loss value; None: off
    chunk_size: int = 128  # positions whose logits exist at once


