"""The null-space projector on synthetic inputs: preserved keys are left alone, others are not."""

from __future__ import annotations

import pytest
import torch

from learner.config import LearnerConfig, parse_layers
from learner.subspace import Moments, NullSpace, module_key

D = 64


def _moments(keys: torch.Tensor) -> Moments:
    k = keys.double()
    return Moments({"layers.3.mlp.down_proj": k.T @ k}, keys.shape[0])


def test_an_update_in_the_null_space_leaves_preserved_keys_and_moves_others():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g))[0]
    used, unused = basis[:, :48], basis[:, 48:]  # preserved inputs live in 48 of 64 directions
    preserved = torch.randn(2000, 48, generator=g) @ used.T
    space = NullSpace.of(_moments(preserved), 1e-3)
    projector = space.projectors["layers.3.mlp.down_proj"]
    assert space.report["layers.3.mlp.down_proj"]["null_dim"] == 16
    a = torch.randn(4, D, generator=g) @ projector  # a LoRA's A kept in the null space
    b = torch.randn(D, 4, generator=g)
    delta = b @ a
    assert (preserved @ delta.T).norm() / preserved.norm() < 1e-5
    novel = torch.randn(10, 16, generator=g) @ unused.T
    assert (novel @ delta.T).norm() / novel.norm() > 0.1
    outside = space.share_outside(_moments(novel))["layers.3.mlp.down_proj"]
    assert outside == pytest.approx(1.0, abs=1e-6)


def test_the_null_space_holds_at_most_its_share_of_the_preserved_energy():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([10.0] * 8 + [1.0] * 8 + [0.01] * (D - 16))
    keys = torch.randn(20_000, D, generator=g) * scales
    # Energy per direction ~100, ~1 and ~1e-4: of 808 in all, 48 x 1e-4 is 6e-6 of it and
    # 8 x 1 another 1 %; a 2 % budget frees both groups, 1e-4 only the smallest, and one
    # below a single direction's share (1.2e-7) none.
    for energy, null_dim in ((2e-2, D - 8), (1e-4, D - 16), (5e-8, 0)):
        for scale in (1.0, 1000.0):  # relative: the inputs' scale does not matter
            report = NullSpace.of(_moments(keys * scale), energy).report["layers.3.mlp.down_proj"]
            assert report["null_dim"] == null_dim and report["energy_in_null"] <= energy, report


def test_module_keys_are_the_same_under_any_wrapper():
    assert module_key("base_model.model.model.layers.4.mlp.down_proj") == "layers.4.mlp.down_proj"
    assert module_key("model.layers.12.mlp.down_proj.lora_A.default") == \
        "layers.12.mlp.down_proj.lora_A.default"
    assert module_key("lm_head") is None


@pytest.mark.parametrize(("knobs", "words"), [
    ({"projection": "sideways"}, "learner.projection"),
    ({"projection": "null_space", "lora_targets": "down_proj", "lora_layers": "all"},
     "learner.lora_layers"),
    ({"projection": "null_space", "lora_layers": "3-8", "lora_targets": "up_proj,down_proj"},
     "learner.lora_targets"),
    ({"projection": "null_space", "lora_layers": "3-8", "lora_targets": "down_proj",
      "null_space_energy": 1.5}, "learner.null_space_energy"),
    ({"lora_layers": "8-3"}, "runs backwards"),
    ({"method": "rewrite"}, "learner.method"),
    ({"method": "edit", "lora_targets": "all-linear"}, "learner.lora_targets = down_proj"),
    ({"preset": "dense", "method": "edit"}, "learner.lora_targets = down_proj"),
    ({"method": "edit", "lora_targets": "down_proj", "lora_layers": "3-8", "edit_ridge": 0},
     "learner.edit_ridge"),
    ({"phrasings": -2}, "learner.phrasings"),
    ({"lr": -2.0}, "learner.lr"),
    ({"lora_layers": "three"}, "not a layer index"),
    ({"lora_r": 32}, "learner.lora_r: must be between 1 and learner.max_rank"),
])
def test_a_bad_projection_setting_names_the_key_to_fix(knobs, words):
    with pytest.raises(ValueError, match=words):
        LearnerConfig(**knobs).check(None)


def test_a_max_rank_over_what_vllm_serves_names_both_keys():
    from types import SimpleNamespace

    served = SimpleNamespace(engine=SimpleNamespace(max_lora_rank=16))
    with pytest.raises(ValueError, match="learner.max_rank = 32.*engine.max_lora_rank = 16"):
        LearnerConfig(max_rank=32).check(served)
    LearnerConfig(max_rank=16).check(served)


def test_layer_ranges_parse():
    assert parse_layers("3-5, 8") == [3, 4, 5, 8] and parse_layers("") == []
