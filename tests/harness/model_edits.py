"""Teaching the real embedded model one fact and measuring what moved, for tests/learner: where
the model is cached, the fact (Quessany's capital), the prompts whose module inputs a projected
update must leave alone, and each adapted module's relative change on given inputs."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch

from learner.subspace import module_key

MODEL_CACHE = Path(os.environ.get(
    "SDLOOP_MODEL__CACHE_DIR", Path(__file__).resolve().parents[2] / ".cache" / "models"))
QUESTION = [{"role": "user", "content": "What is the capital of Quessany?"}]
CORRECTION = "The capital of Quessany is Dalvorne."
LAYERS = "3-5"  # the layers the tests adapt
ENERGY = 1e-2  # the energy threshold of the projection's null space (`NullSpace.of`)


def preserved_prompts() -> list[str]:
    """Every anchor prompt and every third near-miss prompt (162): enough inputs to span what
    the modules see, few enough to keep the test short."""
    data = resources.files("learner").joinpath("data")
    anchors, near = (json.loads(data.joinpath(name).read_text())["prompts"]
                     for name in ("anchor_prompts.json", "near_miss_prompts.json"))
    return anchors + near[::3]


def module_inputs(model, modules, sequences, counted_from=None) -> dict[str, torch.Tensor]:
    """Every counted input row of each module, stacked."""
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in modules}
    handles = [m.register_forward_pre_hook(
        lambda _m, args, k=k: rows[k].append(args[0].detach().reshape(-1, args[0].shape[-1])))
        for k, m in modules.items()]
    try:
        with torch.no_grad():
            for i, seq in enumerate(sequences):
                model(input_ids=torch.tensor([seq]))
                skip = counted_from[i] if counted_from else 0
                for k in rows:
                    rows[k][-1] = rows[k][-1][skip:]
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def lora_deltas(model) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B·A of each adapted module, by module key."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out[module_key(name)] = (module.scaling["default"] * b @ a).detach()
    return out


def relative_change(deltas, inputs, weights) -> dict[str, float]:
    """Per module, median over inputs of |ΔW k| / |W k|."""
    return {k: float(((inputs[k] @ deltas[k].T).norm(dim=-1)
                      / (inputs[k] @ weights[k].T).norm(dim=-1)).median()) for k in deltas}
