"""Replay: a round anchors the questions its starting version's lineage was taught (real store)."""

from __future__ import annotations

import pytest

from learner.episodes import Episode, Signal
from learner.round import taught_prompts
from store.versions import record_version
from tests.harness.factories import completion
from tests.harness.store import query_of


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture()
def lineage(writer):
    """base <- default@v1 (taught c1) <- default@v2 (taught c2, and junk) <- default@v3
    (rejected, taught c3): what a learner's manifests record."""
    for cid, question in [("c1", "Capital of Veloria?"), ("c2", "Who invented the loom?"),
                          ("c3", "What is a trennick?")]:
        writer.submit(completion(cid, ask(question)))
    versions = [("default@v1", "base", ["c1"], "retired"),
                ("default@v2", "default@v1", ["c2", "no-such-id", 7], "promoted"),
                ("default@v3", "default@v2", ["c3"], "rejected")]
    for version, parent, episodes, status in versions:
        manifest = {"version": version, "alias": "default", "parent": parent, "episodes": episodes}
        writer.call(lambda con, m=manifest, s=status: record_version(con, m, f"/a/{m['version']}", s)
                    ).result(5)
    return query_of(writer)


def test_replay_takes_the_lineage_newest_round_first(lineage):
    assert taught_prompts(lineage, "default@v2", [], 10) == [
        ask("Who invented the loom?"), ask("Capital of Veloria?")]
    assert taught_prompts(lineage, "default@v2", [], 1) == [ask("Who invented the loom?")]


def test_replay_leaves_out_other_branches_base_and_questions_asked_again(lineage):
    assert ask("What is a trennick?") not in taught_prompts(lineage, "default@v2", [], 10)
    assert taught_prompts(lineage, "base", [], 10) == []
    assert taught_prompts(lineage, "default@v2", [], 0) == []
    again = Episode("c9", "", "default@v2", ask("Capital of Veloria?"), "", None,
                    [Signal("correction", "The capital of Veloria is Marenthal.")])
    assert taught_prompts(lineage, "default@v2", [again], 10) == [ask("Who invented the loom?")]


def test_replay_ends_on_a_loop_of_parent_links(writer):
    for version, parent in [("default@v7", "default@v8"), ("default@v8", "default@v7")]:
        manifest = {"version": version, "alias": "default", "parent": parent, "episodes": []}
        writer.call(lambda con, m=manifest: record_version(con, m, "/a", "promoted")).result(5)
    assert taught_prompts(query_of(writer), "default@v7", [], 10) == []
