"""The learning benchmark's own logic: its arms set what they name, and a promoted round that
loses more than the bound on the disjoint retention set is counted as the gate's false pass."""

from __future__ import annotations

from ops.bench.learning import Setup, false_passes


def _eval(right: int, of: int = 10) -> dict:
    return {"retention": {f"q{i}": i < right for i in range(of)}}


def test_a_promoted_round_that_loses_more_than_the_bound_is_a_false_pass():
    rounds = [{"wave": 1, "promoted": True}, {"wave": 2, "promoted": True},
              {"wave": 3, "promoted": False}]
    evals = [_eval(99, 100), _eval(97, 100), _eval(90, 100)]  # -1, -3, -10 points
    base = _eval(100, 100)
    assert false_passes(rounds, evals, base) == [2]  # wave 3 was rejected: not the gate's pass


def test_an_arm_runs_its_preset_with_the_command_lines_knobs_on_top():
    env = Setup("sdloop", True).env(2, {"": {"lr": "1e-3"}, "sdloop": {"phrasings": "1"},
                                        "dense": {"lr": "9"}})
    assert env["SDLOOP_LEARNER__PRESET"] == "sdloop"
    assert "SDLOOP_LEARNER__PROJECTION" not in env  # the preset's own mechanism
    assert (env["SDLOOP_LEARNER__LR"], env["SDLOOP_LEARNER__PHRASINGS"]) == ("1e-3", "1")
    assert env["SDLOOP_LEARNER__SEED"] == "2" and env["SDLOOP_LEARNER__ENFORCE_GATE"] == "true"
    sft = Setup("sft", False).env(0, {})
    assert sft["SDLOOP_LEARNER__PRESET"] == "sft" and sft["SDLOOP_LEARNER__ENFORCE_GATE"] == "false"
