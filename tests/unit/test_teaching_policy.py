"""Who may teach: the learner collects, from a real store, only the signals the teaching policy
lets teach — by scope, revocation, review, quota, agreement, share and size — and each
distinct signal once."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from feedback import FeedbackEvent, new_id, utcnow
from learner.config import CONTEXT_SOURCES, LearnerConfig
from learner.episodes import collect
from learner.policy import TeachingPolicy
from learner.round import RoundIO, run_round
from store import keys, review
from tests.harness.factories import completion
from tests.harness.store import query_of

EPOCH = "1970-01-01"


def ask(n: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is the capital of country {n}?"}]


def correct(writer, cid: str, text: str, who: str = "alice", may_teach: bool = True,
            at=None) -> str:
    event = FeedbackEvent(event_id=new_id("fb"), completion_id=cid, created_at=at or utcnow(),
                          type="correction", text=text, principal=who, may_teach=may_teach)
    writer.submit(event).result(5)
    return event.event_id


def answered(writer, cid: str, n: int = 0, who: str = "alice") -> str:
    writer.submit(completion(cid, ask(n), principal=who)).result(5)
    return cid


def taught(writer, policy: TeachingPolicy | None = None, since: str = EPOCH) -> list[tuple]:
    return [(ep.completion_id, s.text, s.principal)
            for ep in collect(query_of(writer), since, CONTEXT_SOURCES, policy) for s in ep.signals]


def test_feedback_from_a_principal_without_the_feedback_scope_is_stored_but_never_taught(writer):
    answered(writer, "c1")
    correct(writer, "c1", "It is Dalvorne.", who="mallory", may_teach=False)
    assert taught(writer) == []
    assert writer.cursor().execute("SELECT principal, may_teach FROM feedback").fetchall() == [
        ("mallory", False)]


def test_a_revoked_principal_stops_teaching_what_it_sent_before(writer):
    writer.call(lambda con: keys.add_key(con, "bob", ["chat", "feedback"])).result(5)
    answered(writer, "c1", who="bob")
    correct(writer, "c1", "It is Dalvorne.", who="bob")
    assert taught(writer) == [("c1", "It is Dalvorne.", "bob")]
    writer.call(lambda con: keys.revoke_key(con, "bob")).result(5)
    assert taught(writer) == []


def test_two_hundred_identical_corrections_teach_as_one(writer):
    for i in range(20):
        answered(writer, f"c{i}")  # the same question, asked twenty times
    for i in range(200):
        correct(writer, f"c{i % 20}", "It is  Dalvorne." if i % 2 else "it is Dalvorne.")
    assert len(taught(writer, TeachingPolicy())) == 1


def test_a_principal_over_its_hourly_quota_teaches_only_its_earliest_signals(writer):
    start = utcnow().replace(minute=0, second=0, microsecond=0)
    for n in range(5):
        answered(writer, f"c{n}", n)
        correct(writer, f"c{n}", f"It is city {n}.", at=start + timedelta(minutes=n))
    answered(writer, "other", 9, who="bob")
    correct(writer, "other", "It is city 9.", who="bob", at=start + timedelta(minutes=9))
    got = taught(writer, TeachingPolicy(principal_quota_per_hour=3))
    assert sorted(got) == [("c0", "It is city 0.", "alice"), ("c1", "It is city 1.", "alice"),
                           ("c2", "It is city 2.", "alice"), ("other", "It is city 9.", "bob")]


def test_with_min_principals_a_signal_teaches_once_enough_principals_agree_across_rounds(writer):
    answered(writer, "a1", who="alice")
    correct(writer, "a1", "It is Dalvorne.", who="alice")
    policy = TeachingPolicy(min_principals=2)
    assert taught(writer, policy) == []  # alone, alice does not teach
    mark = str(utcnow())
    answered(writer, "b1", who="bob")
    correct(writer, "b1", "it is dalvorne.", who="bob")  # a later round: bob agrees
    assert taught(writer, policy, since=mark) == [("b1", "it is dalvorne.", "bob")]
    answered(writer, "m1", 7, who="mallory")
    correct(writer, "m1", "It is Berlin.", who="mallory")
    assert taught(writer, policy, since=mark) == [("b1", "it is dalvorne.", "bob")]


def test_in_review_mode_nothing_teaches_until_approved_and_a_rejection_is_final(writer):
    answered(writer, "c1", 1)
    answered(writer, "c2", 2)
    first = correct(writer, "c1", "It is Dalvorne.")
    second = correct(writer, "c2", "It is Tarnholm.")
    policy = TeachingPolicy(review=True)
    assert taught(writer, policy) == []
    queued = writer.call(lambda con: review.pending(con, 10)).result(5)
    assert {r["id"] for r in queued} == {first, second}
    writer.call(lambda con: review.decide(con, [first], "approved", "ops")).result(5)
    writer.call(lambda con: review.decide(con, [second], "rejected", "ops")).result(5)
    assert taught(writer, policy) == [("c1", "It is Dalvorne.", "alice")]
    assert taught(writer) == [("c1", "It is Dalvorne.", "alice")]  # rejected, review off too
    assert writer.call(lambda con: review.pending(con, 10)).result(5) == []
    with pytest.raises(review.ReviewRefused, match="no signal"):
        writer.call(lambda con: review.decide(con, ["fb-nope"], "approved", "ops")).result(5)


def test_one_principal_takes_at_most_its_share_of_a_round_once_others_teach(writer):
    for n in range(10):
        answered(writer, f"m{n}", n, who="mallory")
        correct(writer, f"m{n}", f"It is Berlin {n}.", who="mallory")
    for n in range(10, 12):
        answered(writer, f"b{n}", n, who="bob")
        correct(writer, f"b{n}", f"It is Paris {n}.", who="bob")
    got = taught(writer, TeachingPolicy(max_principal_share=0.5))
    assert sum(1 for *_, who in got if who == "mallory") == 2
    assert sum(1 for *_, who in got if who == "bob") == 2
    alone = [s for s in taught(writer, TeachingPolicy(max_principal_share=0.5)) if s[2] == "bob"]
    assert len(alone) == 2


def test_a_long_signal_is_cut_and_an_answer_teaches_from_a_bounded_number_of_signals(writer):
    answered(writer, "c1")
    correct(writer, "c1", "It is Dalvorne. " + "x" * 100_000)
    for i in range(20):
        correct(writer, "c1", f"Also note {i}.")
    [(cid, text, _), *rest] = taught(writer, TeachingPolicy(max_signal_chars=2000,
                                                            max_signals_per_episode=8))
    assert len(text) == 2000 and text.startswith("It is Dalvorne.")
    assert len(rest) == 7


def test_the_shipped_policy_is_safe_by_default():
    policy = LearnerConfig().teaching()
    assert policy.principal_quota_per_hour > 0 and policy.max_signal_chars > 0
    assert policy.max_principal_share < 1 and policy.max_signals_per_episode > 0
    assert not policy.review and policy.min_principals == 1  # a single-user install learns


def test_episodes_every_round_died_on_are_quarantined_and_the_learner_moves_on(writer, tmp_path):
    answered(writer, "c1")
    correct(writer, "c1", "It is Dalvorne.")
    work = tmp_path / "work"
    work.mkdir()
    (work / "state.json").write_text(json.dumps(
        {"last_signal_at": "1970-01-01 00:00:00", "rounds": 2, "attempt": 0, "failed_starts": 3}))

    def never(*_):  # nothing past the quarantine may run
        raise AssertionError("a quarantining round loads nothing")

    io = RoundIO(query=query_of(writer), publish=never, policy=never, base_model=never)
    summary = run_round(LearnerConfig(quarantine_after=3), io, work, tmp_path / "adapters")
    assert summary["status"] == "quarantined" and summary["quarantined"] == ["c1"]
    state = json.loads((work / "state.json").read_text())
    assert state["failed_starts"] == 0 and state["last_signal_at"] > "1970"
    assert json.loads((work / "quarantine.json").read_text())[0]["episodes"] == ["c1"]
    assert collect(query_of(writer), state["last_signal_at"], CONTEXT_SOURCES) == []


def test_a_round_that_dies_counts_as_a_failed_start(writer, tmp_path):
    answered(writer, "c1")
    correct(writer, "c1", "It is Dalvorne.")

    def dies() -> str:
        raise RuntimeError("out of memory")

    io = RoundIO(query=query_of(writer), publish=lambda *_: "written", policy=lambda _: None,
                 base_model=dies)
    for expected in (1, 2):
        with pytest.raises(RuntimeError):
            run_round(LearnerConfig(), io, tmp_path / "work", Path(tmp_path / "adapters"))
        state = json.loads((tmp_path / "work" / "state.json").read_text())
        assert state["failed_starts"] == expected
