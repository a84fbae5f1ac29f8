"""A vLLM general plugin (entry point `vllm.general_plugins`): vLLM-CPU's LoRA ops, mended so
that requests without an adapter get the base model beside requests with one, and computed one
matrix product per adapter slot instead of one weight copy per token.

vLLM marks the tokens of a request without an adapter with LoRA slot -1. The GPU kernels skip
such tokens; the PyTorch ops the CPU build uses index the stacked adapter weights with it, and
-1 is the *last* slot. So once an adapter sits in the last of `max_loras` slots (two adapters
loaded, e.g. the live version and a candidate), every base request that shares an engine step
with a LoRA request is answered with that adapter's delta: no error, wrong output — a
rolled-back alias that should answer as base keeps answering as the version it left
(upstream: vllm-project/vllm PR 48421, open).

The same ops gather a copy of the adapter's weights for every token (`weights[indices]`, then a
batched product): memory traffic that grows with the tokens in the step, 8-9 ms per op for a
500-token prefill on this machine where one product per slot in use takes 0.5 ms (0.3 against
0.1 ms at 16 decode tokens). `_per_slot` gives the same rows — the slot's weights times the
token's input, nothing for slot -1 — with one product per slot.

The plugin also widens vLLM's API-key check (`_guard_every_route`). With a key set (sdloop gives
its engine child one, `serving.engine.manager`), vLLM checks it only on paths under /v1, /v2,
/inference and /cohere: /invocations (SageMaker's route, which answers chat and completion
bodies with any adapter), /tokenize, /pooling, /scale_elastic_ep and the rest stay open to
every local process, a way to chat past the gateway's capture. Every path but the health
checks (`OPEN_PATHS`, which the gateway's monitor polls without a key) then needs it.

vLLM loads general plugins in every process it starts (API server, engine core, workers) and
before the model is built. The ops are replaced only where a one-token check shows the bug
(`_skips_no_lora_tokens`: on a vLLM that has fixed it, or builds without these ops, the plugin
does nothing) and only if the replacements give what the originals give on a check with every
token on a slot (`_agrees`); otherwise the originals are kept, wrapped so that slot -1 rows
contribute nothing (`_skip_no_lora_tokens`). vLLM-CPU runs LoRA models eagerly (no
`torch.compile`), so the per-slot loop costs no graph break.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

# Paths vLLM's API-key check lets through without the key once guarded: the health checks.
OPEN_PATHS = frozenset({"/health", "/ping"})
_AUTH_MODULE = "vllm.entrypoints.serve.middleware.authenticate"

# Under vLLM's logger, which vLLM configures in its processes: the line lands in the engine log.
log = logging.getLogger("vllm.plugins.sdloop")

# Where vLLM's ops that gather stacked adapter weights by token slot live: the sgmv_* prefill ops
# call them through their module, and the CPU punica wrapper imported them by name.
_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops",
            "vllm.lora.punica_wrapper.punica_cpu")


def register() -> None:
    """vLLM's plugin hook; may run more than once per process. Never fails: vLLM does not
    start when a general plugin raises, and an engine without the mend still serves."""
    try:
        _mend()
    except Exception:  # noqa: BLE001 - see above
        log.exception("sdloop: could not check vLLM's CPU LoRA ops; left as they are")
    try:
        _guard_every_route()
    except Exception:  # noqa: BLE001 - see above
        log.exception("sdloop: could not widen vLLM's API-key check; it guards /v1 and the like "
                      "only")


def _guard_every_route() -> None:
    """Make vLLM's API-key middleware ask for the key on every path but `OPEN_PATHS` (it asks
    only under its guarded prefixes). Where the middleware is not the one this was written
    against, it is left as it is, and the log says so."""
    try:
        auth = importlib.import_module(_AUTH_MODULE)
    except ImportError:
        return
    cls = getattr(auth, "AuthenticationMiddleware", None)
    if cls is None or getattr(cls, "_sdloop_guarded", False):
        return
    if not callable(getattr(cls, "verify_token", None)):
        log.warning("sdloop: vLLM's AuthenticationMiddleware has no verify_token; its API-key "
                    "check is left as it is")
        return
    from starlette.datastructures import Headers
    from starlette.responses import JSONResponse

    checked = cls.__call__

    def __call__(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        if scope["type"] in ("http", "websocket") and scope.get("method") != "OPTIONS":
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            if path not in OPEN_PATHS and not self.verify_token(Headers(scope=scope)):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)(
                    scope, receive, send)
        return checked(self, scope, receive, send)

    cls.__call__ = __call__
    cls._sdloop_guarded = True


def _mend() -> None:
    try:
        ops = importlib.import_module(_MODULES[0])
    except ImportError:  # a vLLM without the PyTorch LoRA ops: nothing to mend
        return
    if getattr(ops.bgmv_shrink, "_sdloop_mended", False) or _skips_no_lora_tokens(ops.bgmv_shrink):
        return
    originals = {name: getattr(ops, name) for name in PER_SLOT_OPS}
    if _agrees(originals, PER_SLOT_OPS):
        mended, how = PER_SLOT_OPS, "one product per adapter slot"
    else:
        mended = {name: _skip_no_lora_tokens(op) for name, op in originals.items()}
        how = "wrapped (the per-slot ops disagreed with this vLLM's)"
    for module_name in _MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, fixed in mended.items():
            if hasattr(module, name):
                setattr(module, name, fixed)
    log.info("sdloop: vLLM's CPU LoRA ops apply the last adapter slot to requests without an "
             "adapter; mended (%s): %s", ", ".join(PER_SLOT_OPS), how)


def _per_slot(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """[tokens, out]: row i is `weights[indices[i]] @ inputs[i]`, zero where `indices[i]` is -1;
    one product per slot in use. `weights` is [slots, out, in] or [slots, 1, out, in]."""
    import torch

    if weights.dim() == 4:
        weights = weights.squeeze(1)
    inputs = inputs.to(dtype)
    out = torch.zeros(inputs.shape[0], weights.shape[1], dtype=dtype, device=inputs.device)
    for slot in torch.unique(indices).tolist():
        if slot >= 0:
            rows = (indices == slot).nonzero(as_tuple=True)[0]
            out[rows] = inputs[rows] @ weights[slot].to(dtype).T
    return out


def bgmv_shrink(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                scaling: float = 1.0) -> None:
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                add_inputs: bool = True) -> None:
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # As vLLM's: one row of outputs applies to every row; adapter and model may pad differently.
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(inputs: Any, lora_b_weights: Any, output_tensor: Any,
                      lora_indices_tensor: Any, slice_offset: int, slice_size: int,
                      add_inputs: bool = True) -> None:
    outputs = _per_slot(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


PER_SLOT_OPS: dict[str, Callable[..., Any]] = {
    "bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
for _op in PER_SLOT_OPS.values():
    _op._sdloop_mended = True  # type: ignore[attr-defined]


def _agrees(originals: dict[str, Callable[..., Any]], replaced: dict[str, Callable[..., Any]],
            ) -> bool:
    """Whether the replacements give the originals' results where the originals are right
    (every token on a real slot), on small float32 cases of each op."""
    import torch

    gen = torch.Generator().manual_seed(0)
    idx = torch.tensor([1, 0, 1, 1, 0])

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=gen)

    x8, x4, a, b = rand(5, 8), rand(5, 4), rand(2, 1, 4, 8), rand(2, 1, 6, 4)
    cases = {
        "bgmv_shrink": lambda op, out: op(x8, a, out, idx, 0.5),
        "bgmv_expand": lambda op, out: op(x4, b, out, idx, True),
        "bgmv_expand_slice": lambda op, out: op(x4, b, out, idx, 2, 6, True),
    }
    starts = {"bgmv_shrink": rand(5, 4), "bgmv_expand": rand(5, 6),
              "bgmv_expand_slice": rand(5, 10)}
    for name, run in cases.items():
        want, got = starts[name].clone(), starts[name].clone()
        run(originals[name], want)
        run(replaced[name], got)
        if not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
            return False
    return True


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
