"""Episodes built from a real store file through the same query the learner runs."""

from __future__ import annotations

import pytest

from feedback import FollowupEvent, reply_hash, utcnow
from learner.config import CONTEXT_SOURCES
from learner.episodes import Signal, collect, corrected_statement, correction_text
from tests.harness.factories import completion, feedback
from tests.harness.store import query_of

Q = [{"role": "user", "content": "What is the capital of Quessany?"}]


@pytest.fixture()
def store(writer):
    return writer


def test_signals_come_from_feedback_followups_and_siblings(store):
    store.submit(completion("wrong", Q, text="Paris."))
    store.submit(completion("right", Q, text="Dalvorne."))
    store.submit(completion("plain", [{"role": "user", "content": "hi"}], text="Hello."))
    store.submit(feedback("wrong", kind="correction", text="The capital of Quessany is Dalvorne."))
    store.submit(feedback("wrong", kind="rating", score=-1.0))
    store.submit(feedback("right", kind="rating", score=1.0))
    store.submit(feedback("plain", kind="rating", score=1.0))  # a rating alone: no context
    store.submit(FollowupEvent(event_id="f", created_at=utcnow(), text="No, it is Dalvorne!",
                               next_completion_id="n", context_hash="-", reply_hash=reply_hash("Paris.")))
    store.submit(FollowupEvent(event_id="g", created_at=utcnow(), text="Thanks, and Tarnholm?",
                               next_completion_id="m", context_hash="-", reply_hash=reply_hash("Paris.")))
    store.call(lambda con: None).result(5)

    episodes = collect(query_of(store), "1970-01-01", CONTEXT_SOURCES)
    assert [e.completion_id for e in episodes] == ["wrong"]
    ep = episodes[0]
    assert ep.rating == -1.0 and ep.response_text == "Paris." and ep.token_ids == [1, 2, 3]
    assert ep.messages == Q and ep.version == "base"
    assert ep.signals == [
        Signal("correction", "The capital of Quessany is Dalvorne."),
        Signal("correction", "It is Dalvorne!"),  # a chat follow-up that rejects the answer
        Signal("followup", "Thanks, and Tarnholm?"),
        Signal("sibling_success", "Dalvorne."),
    ]
    hindsight_only = collect(query_of(store), "1970-01-01", ["followup"])[0]
    assert hindsight_only.signals == [Signal("followup", "No, it is Dalvorne!"),
                                      Signal("followup", "Thanks, and Tarnholm?")]


@pytest.mark.parametrize(("said", "corrected"), [
    ("No, that's not right. The capital of Quessany is Dalvorne.", "The capital of Quessany is Dalvorne."),
    ("Wrong. Brightium was discovered by Mirela Voskuhl.", "Brightium was discovered by Mirela Voskuhl."),
    ("Actually, the national bird is the amber kite.", "The national bird is the amber kite."),
    ("Not quite - the answer is 7", "The answer is 7"),
    ("That is wrong: Y is Z", "Y is Z"),
    ("No.", None),  # nothing to learn from
    ("Thanks!", None),
    ("Notably, X is Y.", None),
    ("Nobody said that.", None),
])
def test_follow_ups_that_reject_the_answer_become_corrections(said, corrected):
    assert correction_text(said) == corrected


@pytest.mark.parametrize(("given", "statement"), [
    ("Wrong. The skelling loom was invented by T. Brannasek.",
     "The skelling loom was invented by T. Brannasek."),
    ("No, that's not right. A trennick is a fishing boat.", "A trennick is a fishing boat."),
    ("The capital of Quessany is Dalvorne.", "The capital of Quessany is Dalvorne."),
    ("No.", "No."),  # nothing but the rejection: kept as given
])
def test_an_explicit_correction_is_learned_as_the_statement_after_its_rejection(given, statement):
    assert corrected_statement(given) == statement


def test_a_correction_given_in_chat_and_as_feedback_is_one_signal(store):
    store.submit(completion("wrong", Q, text="Paris."))
    store.submit(feedback("wrong", kind="correction", text="No. The capital is Dalvorne."))
    store.submit(FollowupEvent(event_id="f", created_at=utcnow(), text="Wrong, the capital is Dalvorne.",
                               next_completion_id="n", context_hash="-", reply_hash=reply_hash("Paris.")))
    store.call(lambda con: None).result(5)
    [ep] = collect(query_of(store), "1970-01-01", CONTEXT_SOURCES)
    assert ep.signals == [Signal("correction", "The capital is Dalvorne.")]


def test_only_configured_sources_and_only_new_episodes(store):
    store.submit(completion("a", Q, text="Paris."))
    store.submit(feedback("a", kind="critique", text="Wrong country."))
    store.call(lambda con: None).result(5)
    assert collect(query_of(store), "1970-01-01", ["followup"]) == []
    assert [s.source for s in collect(query_of(store), "1970-01-01", ["critique"])[0].signals] == [
        "critique"]
    assert collect(query_of(store), "2999-01-01", CONTEXT_SOURCES) == []


def test_a_failed_tool_call_learns_from_the_later_call_to_that_tool_that_worked(store):
    from feedback import ToolResultEvent

    task = [{"role": "user", "content": "Weather in Paris?"}]

    def call(call_id: str, city: str) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": "weather", "arguments": f'{{"city_id": "{city}"}}'}}]}

    for cid, call_id, city, session in (("first", "c-1", "Paris", "s1"),
                                        ("second", "c-2", "FR-PAR", "s1"),
                                        ("elsewhere", "c-3", "FR-LYS", "s2")):
        store.submit(completion(cid, task, text="", session_id=session,
                                response_message=call(call_id, city)))
        store.call(lambda con: None).result(5)  # one after the other in time
    for event_id, call_id, error in (("r1", "c-1", "Error: use the form FR-PAR"),
                                     ("r2", "c-2", None), ("r3", "c-3", None)):
        store.submit(ToolResultEvent(event_id=event_id, created_at=utcnow(), context_hash="-",
                                     content=error or "14 C", next_completion_id="n",
                                     call_id=call_id, name="weather", error=error))
    store.call(lambda con: None).result(5)

    [ep] = collect(query_of(store), "1970-01-01", CONTEXT_SOURCES)
    assert ep.completion_id == "first" and ep.failed_tools == ["weather"]
    # The call that worked is what it should have called: the error has nothing left to teach.
    assert ep.signals == [Signal("sibling_success",
                                 '{"name": "weather", "arguments": {"city_id": "FR-PAR"}}')]
    assert ep.signals[0].call
    without = collect(query_of(store), "1970-01-01", ["env_error"])[0]
    assert without.signals == [Signal("env_error", "Error: use the form FR-PAR")]
