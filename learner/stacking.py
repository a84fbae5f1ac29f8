"""A constrained round on top of a learned version: the parent's update kept, frozen, beside
the round's own factors.

A projected update (learner.subspace) or an edit (learner.edit) must not rewrite what earlier
rounds taught. Training the parent's own factors would, and so would writing an edit into them.
So a round that improves a learned version gets one adapter of rank `p + lora_r` on the union
of the parent's and its own modules: factors `0..p-1` hold the parent's update, frozen (their
gradients are zeroed, and the projection leaves them alone), and factors `p..` are the round's,
initialised as a fresh LoRA would be. The version it writes is both, concatenated — served and
hot-swapped like any version, with the gate judging it against the base model as always. What
the parent was taught is kept by the null space too: its questions are among the round's
anchors (replay), so the round's own factors act on them as little as on anything else kept.

vLLM serves adapters up to `engine.max_lora_rank`, so the stack is consolidated: the parent's
update ΔW = s·B·A of each module, by its singular value decomposition, keeps its
`max_rank - lora_r` strongest directions (exactly all of it while it has no more); the share
of its energy that had to go is reported per round. Each factor pair is folded to the round's
scaling (`lora_alpha / lora_r`), so the round's own factors learn as a fresh adapter's do.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from learner.config import LearnerConfig, parse_layers, settle
from learner.subspace import module_key

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Stack:
    """A stacked adapter: factors `0..frozen-1` of every module are the parent's."""

    frozen: int  # the parent's factors (and padding), never trained
    rank: int  # the adapter's rank: frozen + the round's lora_r
    report: dict[str, Any]


def parent_updates(parent: Path) -> dict[str, torch.Tensor]:
    """The parent version's update ΔW = scaling·B·A of each adapted module, by `module_key`
    (float64)."""
    from safetensors.torch import load_file

    config = json.loads((parent / ADAPTER_CONFIG).read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{parent}: an adapter with per-module ranks or alphas cannot be stacked on")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    weights = load_file(str(parent / ADAPTER_WEIGHTS))
    updates = {}
    for name, a in weights.items():
        if ".lora_A." not in name:
            continue
        key = module_key(name.split(".lora_A.")[0])
        b = weights[name.replace(".lora_A.", ".lora_B.")]
        if key is None:
            raise ValueError(f"{parent}: adapter weight {name} is not in a decoder layer")
        updates[key] = scaling * (b.double() @ a.double())
    if not updates:
        raise ValueError(f"{parent}: the adapter holds no LoRA factors")
    return updates


def consolidate(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`update` ≈ B·A with A of `rank` rows at most (its strongest singular directions, split
    evenly between the factors), and the share of its energy (squared Frobenius norm) left out."""
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    kept = int(min(rank, int((s > s[0] * 1e-9).sum()) if s.numel() and s[0] > 0 else 0))
    root = s[:kept].sqrt()
    total = float(s.pow(2).sum())
    lost = float(s[kept:].pow(2).sum()) / total if total > 0 else 0.0
    return u[:, :kept] * root, root[:, None] * vh[:kept], lost


def stacked_student(model_dir: str | Path, cfg: LearnerConfig,
                    parent: str | Path) -> tuple[Any, Any, Stack]:
    """The base model in float32 with one adapter holding the parent's update (frozen, in its
    first factors) and a fresh trainable LoRA of rank `cfg.lora_r` on the round's modules."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = settle(cfg)
    budget = cfg.max_rank - cfg.lora_r
    if budget < 1:
        raise ValueError(f"learner.lora_r = {cfg.lora_r} leaves no room for the parent's update "
                         f"within learner.max_rank = {cfg.max_rank}: lower learner.lora_r (a "
                         "stacked round keeps the parent in max_rank - lora_r factors)")
    updates = parent_updates(Path(parent))
    parts = {k: consolidate(u, budget) for k, u in updates.items()}
    frozen = max(a.shape[0] for _, a, _ in parts.values())
    rank = frozen + cfg.lora_r
    scaling = cfg.lora_alpha / cfg.lora_r

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    own_layers = set(parse_layers(cfg.lora_layers) or range(base.config.num_hidden_layers))
    own_names = set(cfg.lora_target_names())
    if not own_names:
        raise ValueError("a stacked round adapts named modules (learner.lora_targets), not all-linear")
    names = own_names | {k.rsplit(".", 1)[1] for k in updates}
    layers = own_layers | {int(k.split(".")[1]) for k in updates}
    alpha = scaling * rank
    lora = LoraConfig(r=rank, lora_alpha=int(alpha) if alpha.is_integer() else alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=sorted(names),
                      layers_to_transform=sorted(layers), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)

    own, lost = 0, {}
    for name, module in model.named_modules():
        key = module_key(name)
        if key is None or not hasattr(module, "lora_A") or not module.lora_A:
            continue
        adapter = next(iter(module.lora_A))
        a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        trains = int(key.split(".")[1]) in own_layers and key.rsplit(".", 1)[1] in own_names
        with torch.no_grad():
            a[:frozen].zero_()
            b[:, :frozen].zero_()
            if key in parts:
                pb, pa, lost[key] = parts[key]
                a[:pa.shape[0]] = pa.to(a.dtype)
                b[:, :pa.shape[0]] = (pb / scaling).to(b.dtype)
            if not trains:
                a[frozen:].zero_()
                b[:, frozen:].zero_()
        if trains:
            own += 1
            _freeze_first(a, frozen, dim=0)
            _freeze_first(b, frozen, dim=1)
        else:
            a.requires_grad_(False)
            b.requires_grad_(False)
    if not own:
        raise ValueError("no module of the round's (learner.lora_targets, learner.lora_layers) "
                         "is in the stacked adapter")
    report = {"parent_rank": frozen, "rank": rank, "parent_modules": len(updates),
              "parent_energy_lost_max": max(lost.values(), default=0.0)}
    return model, tokenizer, Stack(frozen, rank, report)


def _freeze_first(param: torch.Tensor, count: int, dim: int) -> None:
    """Zero the gradient of the first `count` rows (dim 0) or columns (dim 1) of `param`:
    with AdamW without weight decay (the trainer's), a zero gradient leaves them as they are."""
    mask = torch.ones_like(param)
    mask.narrow(dim, 0, count).zero_()
    param.register_hook(lambda grad: grad * mask)
