"""`sdloop export` on a real store file: each format's records, what counts as a better answer,
the teaching policy and redaction, paging, and the files loaded by `datasets` as TRL does."""

from __future__ import annotations

import io
import json
from datetime import timedelta

import pytest

from feedback import FollowupEvent, ToolResultEvent, context_hash, reply_hash, utcnow
from learner.export import FORMATS, export
from learner.policy import TeachingPolicy
from store import review
from tests.harness.factories import completion, feedback
from tests.harness.store import query_of

Q = [{"role": "user", "content": "What is the capital of Quessany?"}]
TASK = [{"role": "user", "content": "Weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def _call(call_id: str, city: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": "weather", "arguments": json.dumps({"city_id": city})}}]}


@pytest.fixture()
def store(writer):
    now = utcnow()
    at = [now + timedelta(seconds=i) for i in range(12)]
    writer.submit(completion("good", Q, text="Dalvorne.", at=at[0]))
    writer.submit(completion("bad", Q, text="Paris.", at=at[1]))
    writer.submit(completion("corrected", [{"role": "user", "content": "Capital of Tarnholm?"}],
                             text="Oslo.", at=at[2]))
    writer.submit(completion("told", [{"role": "user", "content": "Who found brightium?"}],
                             text="Marie Curie.", at=at[3], principal="local"))
    writer.submit(completion("stranger", [{"role": "user", "content": "Sky colour?"}],
                             text="Blue.", at=at[4]))
    # An agent: a call that failed, then in the same conversation one that worked.
    failed_at, fixed_at = at[5], at[6]
    writer.submit(completion("call-1", TASK, text="", at=failed_at, session_id="s1",
                             principal="local", response_message=_call("c-1", "Paris"),
                             params={"tools": TOOLS}))
    retry = [*TASK, _call("c-1", "Paris"),
             {"role": "tool", "tool_call_id": "c-1", "content": '{"error": "use FR-PAR"}'}]
    writer.submit(completion("call-2", retry, text="", at=fixed_at, session_id="s1",
                             principal="local", response_message=_call("c-2", "FR-PAR"),
                             params={"tools": TOOLS}))
    for event_id, call_id, nxt, error, when in (("r1", "c-1", "call-2", "use FR-PAR", at[7]),
                                                 ("r2", "c-2", "after", None, at[8])):
        writer.submit(ToolResultEvent(event_id=event_id, created_at=when, context_hash="-",
                                      content=error or '{"t": 14}', next_completion_id=nxt,
                                      call_id=call_id, name="weather", error=error,
                                      session_id="s1", principal="local"))
    writer.submit(feedback("good", score=1.0))
    writer.submit(feedback("bad", score=-1.0))
    writer.submit(feedback("corrected", kind="correction", text="Wrong. It is Brask."))
    writer.submit(FollowupEvent(event_id="f", created_at=at[9], text="No, it was Mirela Voskuhl.",
                                next_completion_id="n", reply_hash=reply_hash("Marie Curie."),
                                context_hash=context_hash([
                                    {"role": "user", "content": "Who found brightium?"},
                                    {"role": "assistant", "content": "Marie Curie."}]),
                                principal="local"))
    # Someone without the `feedback` scope: stored, never a better answer.
    writer.submit(feedback("stranger", kind="correction", text="It is green.", may_teach=False))
    writer.call(lambda con: None).result(5)
    return writer


def _export(store, fmt: str, **kw) -> list[dict]:
    out = io.StringIO()
    export(query_of(store), out, fmt, TeachingPolicy(), **kw)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_messages_holds_every_answered_conversation_with_its_tools(store):
    records = _export(store, "messages")
    assert len(records) == 7
    assert records[0]["messages"] == [*Q, {"role": "assistant", "content": "Dalvorne."}]
    agent = records[5]
    assert agent["messages"][-1]["tool_calls"][0]["function"]["name"] == "weather"
    assert agent["tools"] == TOOLS


def test_dpo_prefers_corrections_siblings_and_the_tool_call_that_worked(store):
    pairs = {r["rejected"][0].get("content") or r["rejected"][0]["tool_calls"][0]["id"]:
             r for r in _export(store, "dpo")}
    assert set(pairs) == {"Paris.", "Oslo.", "Marie Curie.", "c-1"}  # not the stranger's
    assert pairs["Paris."]["chosen"] == [{"role": "assistant", "content": "Dalvorne."}]
    assert pairs["Oslo."]["chosen"][0]["content"] == "It is Brask."  # without "Wrong."
    assert pairs["Marie Curie."]["chosen"][0]["content"] == "It was Mirela Voskuhl."
    agent = pairs["c-1"]
    assert agent["prompt"] == TASK and agent["tools"] == TOOLS
    assert agent["chosen"][0]["tool_calls"][0]["function"]["arguments"] == '{"city_id": "FR-PAR"}'


def test_sft_takes_better_answers_and_well_rated_ones(store):
    completions = [r["completion"][0]["content"] for r in _export(store, "sft")]
    assert completions == ["Dalvorne.", "It is Brask.", "It was Mirela Voskuhl."]


def test_kto_labels_rated_answers_and_failed_tool_calls(store):
    labels = [(r["completion"][0].get("content"), r["label"]) for r in _export(store, "kto")]
    assert labels == [("Dalvorne.", True), ("Paris.", False), ("", False)]


def test_openai_dpo_is_openais_preference_format(store):
    record = _export(store, "openai-dpo")[0]
    assert set(record) == {"input", "preferred_output", "non_preferred_output"}
    assert record["input"]["messages"] == Q
    assert record["preferred_output"] == [{"role": "assistant", "content": "Dalvorne."}]


def test_since_where_and_paging_select_the_same_answers(store):
    every = _export(store, "messages")
    paged = io.StringIO()
    from learner import export as module

    original = module.read
    module.read = lambda *a, **kw: original(*a, **{**kw, "page": 2})  # type: ignore[assignment]
    try:
        export(query_of(store), paged, "messages", TeachingPolicy())
    finally:
        module.read = original
    assert [json.loads(line) for line in paged.getvalue().splitlines()] == every
    assert len(_export(store, "messages", where="session_id = 's1'")) == 2
    assert len(_export(store, "messages", since="2999-01-01")) == 0


def test_review_mode_exports_only_approved_signals(store):
    def reviewed_sft() -> list[str]:
        out = io.StringIO()
        export(query_of(store), out, "sft", TeachingPolicy(review=True))
        return [json.loads(line)["completion"][0]["content"] for line in out.getvalue().splitlines()]

    def approve(completion_id: str) -> None:
        store.call(lambda con: review.decide(con, [con.execute(
            "SELECT id FROM signals WHERE completion_id = ?", [completion_id]).fetchone()[0]],
            "approved", "ops")).result(5)

    assert reviewed_sft() == []  # the rating too waits for approval
    approve("corrected")
    assert reviewed_sft() == ["It is Brask."]
    approve("good")
    assert reviewed_sft() == ["Dalvorne.", "It is Brask."]


def test_redaction_reaches_every_text(writer):
    writer.submit(completion("pii", [{"role": "user", "content": "Mail me at ann@example.com"}],
                             text="Sure, ann@example.com."))
    writer.call(lambda con: None).result(5)
    out = io.StringIO()
    export(query_of(writer), out, "messages", TeachingPolicy(), redact=True)
    assert "ann@example.com" not in out.getvalue() and "[EMAIL]" in out.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_with_datasets_with_the_columns_trl_expects(store, tmp_path, fmt):
    import datasets  # a dev dependency: what TRL loads its datasets with

    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _export(store, fmt)))
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")
    expected = {"messages": {"messages"}, "sft": {"prompt", "completion"},
                "dpo": {"prompt", "chosen", "rejected"}, "kto": {"prompt", "completion", "label"},
                "openai-dpo": {"input", "preferred_output", "non_preferred_output"}}[fmt]
    assert expected <= set(loaded.column_names) and len(loaded) > 0


def test_a_call_given_in_feedback_is_the_better_answer_in_the_agents_own_form(writer):
    weather = {"type": "object", "properties": {"city_id": {"type": "string"}}}
    json_mode = {"response_format": {"type": "json_schema", "json_schema": {
        "name": "weather", "schema": weather}}}
    writer.submit(completion("tools", TASK, text="", response_message=_call("c-1", "Paris"),
                             params={"tools": TOOLS}))
    writer.submit(completion("json", TASK, text='{"city_id": "Paris"}', params=json_mode))
    demonstrated = [{"type": "function", "function": {"name": "weather",
                                                      "arguments": '{"city_id": "FR-PAR"}'}}]
    for cid, kind in (("tools", "correction"), ("json", "correction")):
        writer.submit(feedback(cid, kind=kind, tool_calls=demonstrated)).result(5)
    chosen = {r["rejected"][0].get("content") or "tools": r["chosen"][0]
              for r in _export(writer, "dpo")}
    assert chosen == {
        "tools": {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {
                "name": "weather", "arguments": '{"city_id": "FR-PAR"}'}}]},
        '{"city_id": "Paris"}': {"role": "assistant", "content": '{"city_id": "FR-PAR"}'}}
