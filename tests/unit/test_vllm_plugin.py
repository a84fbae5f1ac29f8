"""The vLLM plugin's CPU LoRA ops, against vLLM's own: a token of slot -1 (a request without an
adapter) gets no adapter's delta; every other token gets what vLLM's ops give it. The
engine-level proof (base answers beside LoRA requests) is in tests/integration/test_hot_swap.py."""

from __future__ import annotations

import importlib

import pytest
import torch

from serving.engine import vllm_plugin

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

SLOTS, RANK, HIDDEN, OUT = 2, 4, 8, 6
INDICES = torch.tensor([0, -1, 1, -1, 1])
REPLACED = vllm_plugin.PER_SLOT_OPS


def _stacked(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.randn(SLOTS, 1, rows, cols, generator=torch.Generator().manual_seed(seed))


def _shrink(op, indices=INDICES):
    x = torch.randn(len(indices), HIDDEN, generator=torch.Generator().manual_seed(1))
    out = torch.full((len(indices), RANK), 7.0)
    op(x, _stacked(RANK, HIDDEN, 2), out, indices, 0.5)
    return out


def _expand(op, indices=INDICES, add_inputs=True):
    x = torch.randn(len(indices), RANK, generator=torch.Generator().manual_seed(3))
    out = torch.ones(len(indices), OUT)
    op(x, _stacked(OUT, RANK, 4), out, indices, add_inputs=add_inputs)
    return out


def _expand_slice(op, indices=INDICES, add_inputs=True):
    x = torch.randn(len(indices), RANK, generator=torch.Generator().manual_seed(5))
    out = torch.ones(len(indices), OUT + 2)
    op(x, _stacked(OUT, RANK, 6), out, indices, 2, OUT, add_inputs=add_inputs)
    return out


OPS = [  # (name, run, what a row with no delta holds)
    ("bgmv_shrink", _shrink, 0.0),  # the shrink writes its buffer: no delta is zeros
    ("bgmv_expand", _expand, 1.0),  # the expands add: no delta leaves the output as it was
    ("bgmv_expand_slice", _expand_slice, 1.0),
]


@pytest.mark.parametrize(("name", "run", "untouched"), OPS)
def test_vllms_cpu_ops_give_tokens_without_an_adapter_the_last_slots(name, run, untouched):
    """What the plugin is for: if this fails, vLLM mended its ops (and `register` leaves them)."""
    assert not torch.all(run(getattr(lora_ops, name))[INDICES < 0] == untouched)


@pytest.mark.parametrize("mend", ["per_slot", "wrapped"])
@pytest.mark.parametrize(("name", "run", "untouched"), OPS)
def test_tokens_without_an_adapter_get_no_delta_and_the_rest_what_vllm_gives(
        name, run, untouched, mend):
    original = getattr(lora_ops, name)
    mended = REPLACED[name] if mend == "per_slot" else vllm_plugin._skip_no_lora_tokens(original)  # noqa: SLF001
    before, after = run(original), run(mended)
    lora_rows = INDICES >= 0
    assert torch.allclose(after[lora_rows], before[lora_rows], rtol=1e-5, atol=1e-5)
    assert torch.all(after[~lora_rows] == untouched)


@pytest.mark.parametrize("run", [_expand, _expand_slice])
def test_expands_that_overwrite_give_what_vllm_gives(run):
    every_token_on_a_slot = torch.tensor([1, 0, 0, 1])
    name = run.__name__.lstrip("_")
    want = run(getattr(lora_ops, f"bgmv_{name}"), every_token_on_a_slot, add_inputs=False)
    got = run(REPLACED[f"bgmv_{name}"], every_token_on_a_slot, add_inputs=False)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_row_of_a_single_token_expand_applies_to_every_output_row_as_in_vllm():
    x, w, idx = torch.randn(1, RANK), _stacked(OUT, RANK, 7), torch.tensor([1])
    want, got = torch.ones(3, OUT), torch.ones(3, OUT)
    lora_ops.bgmv_expand(x, w, want, idx, True)
    vllm_plugin.bgmv_expand(x, w, got, idx, True)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_per_slot_products_stay_within_rounding_of_vllms():
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(8)).bfloat16()
    w = (torch.randn(SLOTS, 1, 16, 576, generator=torch.Generator().manual_seed(9)) / 24).bfloat16()
    idx = torch.randint(0, SLOTS, (64,), generator=torch.Generator().manual_seed(10))
    want, got = torch.zeros(64, 16, dtype=torch.bfloat16), torch.zeros(64, 16, dtype=torch.bfloat16)
    lora_ops.bgmv_shrink(x, w, want, idx, 1.0)
    vllm_plugin.bgmv_shrink(x, w, got, idx, 1.0)
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_register_installs_the_per_slot_ops_where_vllm_calls_them_once_and_only_if_needed(
        monkeypatch):
    punica_cpu = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    package = importlib.import_module("vllm.lora.ops.torch_ops")
    for module in (lora_ops, package, punica_cpu):
        for name in vllm_plugin.PER_SLOT_OPS:  # put back after the test
            if hasattr(module, name):
                monkeypatch.setattr(module, name, getattr(module, name))
    originals = {name: getattr(lora_ops, name) for name in vllm_plugin.PER_SLOT_OPS}
    wrong = not vllm_plugin._skips_no_lora_tokens(originals["bgmv_shrink"])  # noqa: SLF001

    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins more than once in a process
    assert vllm_plugin._skips_no_lora_tokens(lora_ops.bgmv_shrink)  # noqa: SLF001
    if not wrong:  # a vLLM that skips slot -1 itself is left as it is
        assert all(getattr(lora_ops, name) is op for name, op in originals.items())
        return
    for name, replaced in REPLACED.items():
        assert getattr(lora_ops, name) is replaced
        assert getattr(punica_cpu, name) is replaced and getattr(package, name) is replaced


def test_register_falls_back_to_wrapping_vllms_ops_if_the_per_slot_ones_disagree(monkeypatch):
    for name in vllm_plugin.PER_SLOT_OPS:
        monkeypatch.setattr(lora_ops, name, getattr(lora_ops, name))
    originals = {name: getattr(lora_ops, name) for name in vllm_plugin.PER_SLOT_OPS}
    monkeypatch.setattr(vllm_plugin, "_agrees", lambda originals, replaced: False)
    monkeypatch.setattr(vllm_plugin, "_MODULES", vllm_plugin._MODULES[:1])  # noqa: SLF001
    vllm_plugin.register()
    vllm_plugin.register()  # vLLM may load plugins more than once in a process
    for name, original in originals.items():
        assert getattr(lora_ops, name).__wrapped__ is original  # wrapped once, not twice


def test_with_an_api_key_every_engine_route_but_the_health_checks_needs_it():
    """vLLM checks its key under /v1 and a few prefixes only; /invocations answers chat bodies
    too, so the plugin makes the check cover every route but the health checks."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    auth = pytest.importorskip(vllm_plugin._AUTH_MODULE)  # noqa: SLF001
    vllm_plugin._guard_every_route()  # noqa: SLF001 - what register() does in vLLM's processes
    vllm_plugin._guard_every_route()  # noqa: SLF001 - idempotent, as register() may run twice

    async def ok(request):
        return PlainTextResponse("ok")

    guarded = ("/invocations", "/tokenize", "/scale_elastic_ep", "/metrics", "/v1/completions",
               "/v1/unload_lora_adapter", "/health/")
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"])
                            for p in (*guarded, *vllm_plugin.OPEN_PATHS)])
    app.add_middleware(auth.AuthenticationMiddleware, tokens=["the-key"])
    client = TestClient(app)
    for path in guarded:
        assert client.post(path).status_code == 401, path
        assert client.post(path, headers={"authorization": "Bearer wrong"}).status_code == 401
        assert client.post(path, headers={"authorization": "Bearer the-key"}).status_code == 200
    for path in vllm_plugin.OPEN_PATHS:
        assert client.get(path).status_code == 200, path
