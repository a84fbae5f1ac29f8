"""The vLLM plugin's mend of the CPU LoRA ops, on vLLM's own ops: a token of slot -1 (a request
without an adapter) gets no adapter's delta; every other token gets exactly what it got before.
The engine-level proof (base answers beside LoRA requests) is in
tests/integration/test_hot_swap.py."""

from __future__ import annotations

import importlib

import pytest
import torch

from serving import vllm_plugin

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, RANK, HIDDEN, OUT = 2, 4, 8, 6
INDICES = torch.tensor([0, -1, 1, -1])


def _stacked(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(SLOTS, 1, rows, cols, generator=torch.Generator().manual_seed(seed))


def _shrink(op):
    x = torch.randn(len(INDICES), HIDDEN, generator=torch.Generator().manual_seed(1))
    out = torch.full((len(INDICES), RANK), 7.0)
    op(x, _stacked(RANK, HIDDEN, 2), out, INDICES, 0.5)
    return out


def _expand(op):
    x = torch.randn(len(INDICES), RANK, generator=torch.Generator().manual_seed(3))
    out = torch.ones(len(INDICES), OUT)
    op(x, _stacked(OUT, RANK, 4), out, INDICES, add_inputs=True)
    return out


def _expand_slice(op):
    x = torch.randn(len(INDICES), RANK, generator=torch.Generator().manual_seed(5))
    out = torch.ones(len(INDICES), OUT + 2)
    op(x, _stacked(OUT, RANK, 6), out, INDICES, 2, OUT, add_inputs=True)
    return out


@pytest.mark.parametrize(("name", "run", "untouched"), [
    ("bgmv_shrink", _shrink, 0.0),  # the shrink writes its buffer: no delta is zeros
    ("bgmv_expand", _expand, 1.0),  # the expands add: no delta leaves the output as it was
    ("bgmv_expand_slice", _expand_slice, 1.0),
])
def test_tokens_without_an_adapter_get_no_delta_and_the_rest_are_unchanged(name, run, untouched):
    original = getattr(lora_ops, name)
    mended = vllm_plugin._skip_no_lora_tokens(original)  # noqa: SLF001
    before, after = run(original), run(mended)
    base_rows, lora_rows = INDICES < 0, INDICES >= 0
    assert torch.equal(after[lora_rows], before[lora_rows])
    assert torch.all(after[base_rows] == untouched)
    assert not torch.all(before[base_rows] == untouched)  # the unmended op gave them slot 1's


def test_register_mends_the_ops_vllm_calls_once_and_only_where_they_are_wrong(monkeypatch):
    punica_cpu = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    package = importlib.import_module("vllm.lora.ops.torch_ops")
    for module in (lora_ops, package, punica_cpu):
        for name in vllm_plugin._OPS:  # noqa: SLF001 - put back after the test
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    originals = {name: getattr(lora_ops, name) for name in vllm_plugin._OPS}  # noqa: SLF001
    wrong = not vllm_plugin._skips_no_lora_tokens(originals["bgmv_shrink"])  # noqa: SLF001

    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins more than once in a process
    assert vllm_plugin._skips_no_lora_tokens(lora_ops.bgmv_shrink)  # noqa: SLF001
    if not wrong:  # a vLLM that skips slot -1 itself is left as it is
        assert all(getattr(lora_ops, name) is op for name, op in originals.items())
        return
    for name, original in originals.items():
        mended = getattr(lora_ops, name)
        assert mended.__wrapped__ is original  # wrapped once, not twice
        assert getattr(punica_cpu, name) is mended and getattr(package, name) is mended
