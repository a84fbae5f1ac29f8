import json

import pytest

from learner.config import (
    DENSE,
    PRESETS,
    PROJECTED,
    LearnerConfig,
    TeacherMode,
    mechanism,
    resolve,
    settle,
)
from learner.losses import Divergence, Support
from learner.retention_data import retention_set
from serving.config import ConfigError, load_config


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


def test_sdloop_writes_through_the_null_space_and_the_published_presets_anywhere():
    sdloop = settle(LearnerConfig())
    assert mechanism(sdloop) == PROJECTED and sdloop.projection == "null_space"
    for name in ("sdft", "sdpo", "opsd", "hindsight", "sft", "dense"):
        assert mechanism(settle(LearnerConfig(preset=name))) == DENSE, name
    assert settle(LearnerConfig(preset="edit")).method == "edit"
    assert settle(sdloop) == sdloop  # a round's summary records what it ran


def test_explicit_mechanism_knobs_win_over_the_preset():
    cfg = settle(LearnerConfig(preset="sft", projection="null_space", lora_targets="down_proj",
                               lora_layers="2-4", lr=1e-3))
    assert (cfg.projection, cfg.lora_targets, cfg.lora_layers, cfg.lr) == (
        "null_space", "down_proj", "2-4", 1e-3)
    assert (cfg.lora_r, cfg.phrasings) == (DENSE["lora_r"], DENSE["phrasings"])  # the preset's
    env = load_config(env={"SDLOOP_LEARNER__PRESET": "dense", "SDLOOP_LEARNER__LORA_R": "8"})
    assert mechanism(settle(env.learner)) == {**DENSE, "lora_r": 8}


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


@pytest.mark.parametrize(("content", "words"), [
    (None, "cannot read"),
    ("{not json", "is not JSON"),
    ('["What is 2+2?"]', "must hold a JSON object"),
    ('{"questions": [], "drift_prompts": ["Hi."]}', "non-empty \"questions\""),
    ('{"questions": [{"q": "What is 2+2?", "a": []}], "drift_prompts": ["Hi."]}', r"questions\[0\]"),
    ('{"questions": [{"q": "What is 2+2?", "a": ["4"]}, {"q": "", "a": ["x"]}], '
     '"drift_prompts": ["Hi."]}', r"questions\[1\]"),
    ('{"questions": [{"q": "What is 2+2?", "a": ["4"]}]}', "drift_prompts"),
])
def test_a_bad_retention_file_stops_the_config_naming_the_key(tmp_path, content, words):
    path = tmp_path / "retention.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"learner.retention_set: .*{words}"):
        load_config(env={"SDLOOP_LEARNER__RETENTION_SET": str(path)})


def test_a_retention_file_of_your_own_is_the_gates_set(tmp_path):
    path = tmp_path / "mine.json"
    mine = {"questions": [{"q": "What does our API return on a missing key?", "a": ["404"]}],
            "drift_prompts": ["Describe your morning."]}
    path.write_text(json.dumps(mine))
    cfg = load_config(env={"SDLOOP_LEARNER__RETENTION_SET": str(path)})
    assert retention_set(cfg.learner.retention_set) == mine
    assert len(retention_set("")["questions"]) > 250  # unset: the shipped set


def test_bad_knobs_stop_the_config_when_it_loads():
    with pytest.raises(ConfigError, match="learner.anchors_per_step"):
        load_config(env={"SDLOOP_LEARNER__ANCHORS_PER_STEP": "0"})
