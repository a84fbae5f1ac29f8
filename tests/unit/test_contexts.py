import pytest

from learner.config import CONTEXT_SOURCES
from learner.contexts import load_template

QUESTION = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of Quessany?"}]


def test_sdft_template_puts_the_signal_right_after_the_question_as_an_example():
    t = load_template("sdft_example")
    out = t.teacher_messages(QUESTION, "correction", " The capital of Quessany is Dalvorne. ")
    assert out[0] == QUESTION[0]
    assert out[1]["content"] == (
        "What is the capital of Quessany?\n\nThis is an example for a response to the question:\n"
        "The capital of Quessany is Dalvorne.\n\nNow answer with a response of your own.")
    assert QUESTION[1]["content"] == "What is the capital of Quessany?"  # the student's is untouched


def test_every_shipped_template_places_every_source():
    for name in ("sdft_example", "feedback_note"):
        t = load_template(name)
        assert set(t.suffixes) == set(CONTEXT_SOURCES)
        for source in CONTEXT_SOURCES:
            assert "{x}" in t.teacher_messages(QUESTION, source, "{x}")[-1]["content"]


def test_signal_goes_into_the_last_user_turn_of_a_multi_turn_conversation():
    convo = [*QUESTION, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "Are you sure?"}]
    out = load_template("feedback_note").teacher_messages(convo, "critique", "Wrong country.")
    assert out[3]["content"].startswith("Are you sure?") and "Wrong country." in out[3]["content"]
    assert out[1] == convo[1]


def test_custom_template_file_and_its_errors(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text('name = "mine"\n[sources.correction]\nsuffix = " (hint: {signal})"\n')
    t = load_template(str(good))
    assert t.teacher_messages(QUESTION, "correction", "D")[1]["content"].endswith("(hint: D)")
    with pytest.raises(ValueError, match="no placement for source 'followup'"):
        t.teacher_messages(QUESTION, "followup", "x")
    bad = tmp_path / "bad.toml"
    bad.write_text('[sources.correction]\nsuffix = "no placeholder"\n')
    with pytest.raises(ValueError, match="containing \\{signal\\}"):
        load_template(str(bad))
    with pytest.raises(ValueError, match="shipped: feedback_note, sdft_example"):
        load_template("nope")
