import pytest

from learner.config import PRESETS, LearnerConfig, TeacherMode, resolve
from learner.losses import Divergence, Support


def test_presets_resolve_to_their_published_defaults():
    sdft = resolve(LearnerConfig(preset="sdft"))
    assert (sdft.loss.divergence, sdft.loss.support, sdft.teacher, sdft.responses) == (
        Divergence("forward_kl"), Support("full_vocab"), TeacherMode("ema", 0.01), "on_policy")
    sdpo = resolve(LearnerConfig(preset="sdpo"))
    assert (sdpo.loss.divergence, sdpo.loss.support, sdpo.teacher, sdpo.loss.is_cap) == (
        Divergence("jsd", 0.5), Support("topk", 100), TeacherMode("ema", 0.05), 2.0)
    opsd = resolve(LearnerConfig(preset="opsd"))
    assert (opsd.teacher, opsd.loss.token_clip) == (TeacherMode("frozen"), 0.05)
    hindsight = resolve(LearnerConfig(preset="hindsight"))
    assert (hindsight.context, hindsight.loss.divergence, hindsight.loss.support,
            hindsight.teacher) == (("followup",), Divergence("reverse_kl"),
                                   Support("sampled_token"), TeacherMode("live"))
    sft = resolve(LearnerConfig(preset="sft"))
    assert (sft.responses, sft.distill_weight, sft.ce_weight, sft.anchor_weight) == ("signal", 0, 1, 0)
    default = resolve(LearnerConfig())
    assert (default.preset, default.responses, default.teacher, default.ce_weight,
            default.anchor_weight) == ("sdloop", "teacher", TeacherMode("frozen"), 0.5, 16.0)


def test_explicit_knobs_win_over_the_preset():
    knobs = resolve(LearnerConfig(preset="sdpo", divergence="reverse_kl", is_cap=0.0,
                                  context=["followup"], ce_weight=0.5))
    assert knobs.loss.divergence == Divergence("reverse_kl")
    assert knobs.loss.is_cap is None  # 0 turns it off
    assert knobs.context == ("followup",) and knobs.ce_weight == 0.5
    assert knobs.loss.support == Support("topk", 100)  # untouched knobs keep the preset's
    assert knobs.as_dict()["divergence"] == "reverse_kl"


@pytest.mark.parametrize(("cfg", "words"), [
    (LearnerConfig(preset="dpo"), "learner.preset"),
    (LearnerConfig(context=["gossip"]), "learner.context"),
    (LearnerConfig(responses="random"), "learner.responses"),
    (LearnerConfig(teacher="ema(2)"), "ema"),
    (LearnerConfig(divergence="kl"), "divergence"),
    (LearnerConfig(support="topk"), "support"),
    (LearnerConfig(ce_weight=-0.5), "ce_weight"),
    (LearnerConfig(anchor_weight=-1.5), "anchor_weight"),
    (LearnerConfig(preset="sft", ce_weight=0.0), "nothing to train on"),
    (LearnerConfig(anchors_per_step=0), "learner.anchors_per_step"),
    (LearnerConfig(replay_prompts=-1), "learner.replay_prompts"),
    (LearnerConfig(near_miss_anchors=-4), "learner.near_miss_anchors"),
    (LearnerConfig(threads=-1), "learner.threads"),
    (LearnerConfig(anchor_tokens=-16), "learner.anchor_tokens"),
    (LearnerConfig(min_steps=-1), "learner.min_steps"),
])
def test_bad_knobs_name_the_key(cfg, words):
    with pytest.raises(ValueError, match=words):
        resolve(cfg)


def test_every_preset_resolves():
    for name in PRESETS:
        assert resolve(LearnerConfig(preset=name)).preset == name
