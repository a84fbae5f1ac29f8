"""Which of the model's rewrites of a corrected question are kept as other phrasings of it."""

from __future__ import annotations

import pytest

from learner.phrasings import is_rephrasing, subject_words

QUESTION = "What is the capital of Norlund?"
SIGNAL = "No, that's wrong. The capital of Norlund is Tessary."


def test_the_subject_is_what_the_question_and_the_feedback_share():
    assert subject_words(QUESTION, SIGNAL) == {"capital", "norlund"}


@pytest.mark.parametrize("candidate", [
    "Which city is the capital of Norlund?",
    "Norlund is governed from which capital?",
    "What is the political capital of Norlund?",
])
def test_a_rewrite_that_asks_the_same_is_kept(candidate):
    assert is_rephrasing(candidate, QUESTION, SIGNAL)


@pytest.mark.parametrize(("candidate", "why"), [
    ("What is the capital of Norlund?", "the question itself"),
    ("what is the CAPITAL of Norlund ?", "the question itself, up to case and spacing"),
    ("What is the capital of Norway?", "another subject: the name is gone"),
    ("Is Tessary the capital of Norlund?", "gives the answer away"),
    ("The capital of Norlund is Denmark.", "an answer, not a question"),
    ("What is the capital of Norlund?\nNo answer.", "more than one line"),
    ("Which city is it?", "the subject is gone"),
    ("What is the capital of Norlund, the northern kingdom of many lakes and rivers and old "
     "forests and mountains where people live?", "too long to be the same question"),
])
def test_a_rewrite_that_does_not_ask_the_same_is_dropped(candidate, why):
    assert not is_rephrasing(candidate, QUESTION, SIGNAL), why


def test_one_common_subject_word_may_be_reworded_but_not_a_name():
    question, signal = "Who invented the skelling loom?", "The skelling loom was invented by Ada Brenn."
    assert is_rephrasing("Who created the skelling loom?", question, signal)
    assert not is_rephrasing("Who created the loom?", question, signal)
