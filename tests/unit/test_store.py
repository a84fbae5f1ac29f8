"""The store writer and read-only queries, on real DuckDB files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import wait

import duckdb
import pytest

from feedback import (
    CompletionEvent,
    Event,
    FollowupEvent,
    ReplicaVersionEvent,
    SinkFull,
    UnknownCompletion,
    context_hash,
    new_id,
    reply_hash,
    utcnow,
)
from store import QueryError, StoreWriter, query_file, run_read_only
from store.migrations import available, current_version
from tests.harness.factories import completion, feedback


def test_migrations_apply_once(tmp_path):
    path = tmp_path / "m.duckdb"
    StoreWriter(path).open().close()
    StoreWriter(path).open().close()
    con = duckdb.connect(str(path), read_only=True)
    assert current_version(con) == available()[-1][0]
    assert con.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == len(available())


def test_feedback_future_resolves_after_commit(writer, tmp_path):
    writer.submit(completion("c1"))
    writer.submit(feedback("c1", score=1.0)).result(5)
    cur = writer.cursor()
    assert cur.execute("SELECT completion_id, score FROM feedback").fetchall() == [("c1", 1.0)]


def test_unknown_completion_fails_alone_and_the_batch_commits(writer):
    futures = [writer.submit(completion("c1")), writer.submit(feedback("missing", score=1.0)),
               writer.submit(feedback("c1", kind="critique", text="x"))]
    wait(futures, 5)
    assert futures[0].result() is None and futures[2].result() is None
    with pytest.raises(UnknownCompletion, match="missing"):
        futures[1].result()
    assert writer.cursor().execute("SELECT count(*) FROM feedback").fetchone()[0] == 1


def test_followup_links_by_conversation_then_by_reply_text(writer):
    q_a = [{"role": "system", "content": "A"}, {"role": "user", "content": "hi"}]
    q_b = [{"role": "system", "content": "B"}, {"role": "user", "content": "hi"}]
    writer.submit(completion("a", q_a, text="Hello!"))
    writer.submit(completion("b", q_b, text="Hello!"))
    in_a = FollowupEvent(event_id="f1", created_at=utcnow(), text="more", next_completion_id="n1",
                         context_hash=context_hash([*q_a, {"role": "assistant", "content": "Hello!"}]),
                         reply_hash=reply_hash("Hello!"))
    elsewhere = FollowupEvent(event_id="f2", created_at=utcnow(), text="again",
                              next_completion_id="n2", context_hash="unknown-context",
                              reply_hash=reply_hash("  Hello! "))
    nowhere = FollowupEvent(event_id="f3", created_at=utcnow(), text="?", next_completion_id="n3",
                            context_hash="x", reply_hash="y")
    wait([writer.submit(e) for e in (in_a, elsewhere, nowhere)], 5)
    rows = writer.cursor().execute(
        "SELECT next_completion_id, completion_id, matched_by FROM followups ORDER BY 1").fetchall()
    assert rows == [("n1", "a", "context"), ("n2", "b", "reply")]  # latest same-text reply


def test_a_followup_links_only_to_a_reply_its_own_principal_got_in_its_session(writer):
    question = [{"role": "user", "content": "Capital of France?"}]
    said = [*question, {"role": "assistant", "content": "Paris."}]
    writer.submit(completion("alice", question, principal="alice", session_id="s1"))

    def followup(eid: str, who: str, session: str, ctx: str) -> FollowupEvent:
        return FollowupEvent(event_id=eid, created_at=utcnow(), text="No, it is Berlin.",
                             next_completion_id=f"n-{eid}", context_hash=ctx,
                             reply_hash=reply_hash("Paris."), principal=who, session_id=session)

    wait([writer.submit(e) for e in (
        followup("stranger-same-reply", "mallory", "s9", "other"),
        followup("stranger-same-conversation", "mallory", "s1", context_hash(said)),
        followup("alice-other-session", "alice", "s2", "other"),
        followup("alice-rewritten-history", "alice", "s1", "other"),
    )], 5)
    rows = writer.cursor().execute(
        "SELECT id, completion_id, matched_by, principal FROM followups").fetchall()
    assert rows == [("alice-rewritten-history", "alice", "reply", "alice")]


def test_episodes_view_joins_feedback_and_followups(writer):
    writer.submit(completion("c1"))
    writer.submit(completion("c2", text="Lyon."))
    writer.submit(feedback("c1", kind="correction", text="Paris, yes."))
    fu = FollowupEvent(event_id="f", created_at=utcnow(), text="thanks", next_completion_id="c9",
                       context_hash="none", reply_hash=reply_hash("Paris."))
    writer.submit(fu).result(5)
    rows = writer.cursor().execute(
        "SELECT completion_id, len(feedback), len(followups), has_signal, token_ids "
        "FROM episodes ORDER BY 1").fetchall()
    assert rows == [("c1", 1, 1, True, [1, 2, 3]), ("c2", 0, 0, False, [1, 2, 3])]


def test_group_commit_batches_under_load(writer):
    from store import metrics

    def commits() -> float:  # the process-wide histogram's count: one observation per commit
        return sum(b.get() for b in metrics.BATCH_SIZE._buckets)  # noqa: SLF001 - our own metric

    before = commits()
    futures = [writer.submit(completion(f"c{i}")) for i in range(2000)]
    wait(futures, 30)
    assert writer.cursor().execute("SELECT count(*) FROM completions").fetchone()[0] == 2000
    assert 0 < commits() - before < 2000  # committed, in fewer commits than events


def test_redelivered_event_is_written_once(writer):
    ev = completion("c1")
    writer.submit(ev).result(5)
    writer.submit(ev).result(5)
    fb = feedback("c1", score=1.0)
    writer.submit(fb).result(5)
    writer.submit(fb).result(5)
    fu = FollowupEvent(event_id=new_id("fu"), created_at=utcnow(), context_hash=ev.context_hash,
                       reply_hash=ev.reply_hash, text="No.", next_completion_id="c2")
    rv = ReplicaVersionEvent(event_id=new_id("rv"), created_at=utcnow(), replica="a",
                             version="default@v1", action="publish", status="promoted")
    for event in (fu, fu, rv, rv):
        writer.submit(event).result(5)
    cur = writer.cursor()
    for table in ("completions", "feedback", "followups", "replica_versions"):
        assert cur.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 1, table


def test_redelivered_batch_stores_its_new_events_and_skips_the_rest(writer):
    # Large enough for the staged insert; half of it is stored already (a redelivered poll
    # batch), and one event comes twice within the batch itself.
    first = [completion(f"c{i}") for i in range(400)]
    assert writer.submit_batch(first).result(10) == [None] * 400
    fresh = [completion(f"n{i}") for i in range(400)]
    again = first[200:] + fresh + fresh[:1]
    assert writer.submit_batch(again).result(10) == [None] * len(again)
    cur = writer.cursor()
    assert cur.execute("SELECT count(*), count(DISTINCT id) FROM completions").fetchone() == (800, 800)


def test_events_off_the_wire_store_the_same_rows_as_the_gateways(writer):
    # The gateway's events carry token ids as lists, the ingester's (off the events topic)
    # as the JSON text they arrived in: both land as the same INTEGER[] rows, in a lone event's
    # transaction or in a large batch, NULLs and non-ASCII text included.
    def full(cid: str) -> CompletionEvent:
        ev = completion(cid, text="Paris, \u00e9t\u00e9 \U0001f600")
        ev.session_id, ev.latency_ms, ev.ttft_ms, ev.prompt_tokens = "s1", 12.5, 3.0, 2
        ev.prompt_token_ids, ev.token_ids = [1, 2**31 - 1], [0, 7]
        ev.response_message = {"role": "assistant", "content": ev.response_text,
                               "tool_calls": [{"id": "t", "arguments": "{}"}]}
        return ev

    def off_the_wire(ev: CompletionEvent) -> Event:
        return Event.from_json(ev.to_json())

    writer.submit(full("single")).result(5)
    writer.submit(off_the_wire(full("wire"))).result(5)
    batch = [full(f"bulk{i}") for i in range(300)]
    batch[1].status, batch[1].error, batch[1].token_ids = "engine_error", "boom", None
    assert writer.submit_batch(batch).result(10) == [None] * len(batch)
    wired = [off_the_wire(full(f"wbulk{i}")) for i in range(300)]
    assert writer.submit_batch(wired).result(10) == [None] * len(wired)
    cur = writer.cursor()

    def row(cid: str) -> tuple:
        return cur.execute("SELECT * EXCLUDE (id, event_id, created_at) FROM completions "
                           "WHERE id = ?", [cid]).fetchone()

    assert row("bulk0") == row("single") == row("wire") == row("wbulk7")
    assert cur.execute("SELECT token_ids FROM completions WHERE id = 'wire'").fetchone() == ([0, 7],)
    assert cur.execute("SELECT status, error, token_ids FROM completions WHERE id = 'bulk1'"
                       ).fetchone() == ("engine_error", "boom", None)
    types = cur.execute("SELECT typeof(created_at), typeof(token_ids), typeof(messages) "
                        "FROM completions WHERE id = 'bulk0'").fetchone()
    assert types == ("TIMESTAMP", "INTEGER[]", "JSON")


def test_a_token_id_out_of_range_fails_its_event_only(writer):
    bad = completion("bad")
    bad.token_ids = [2**31]
    futures = [writer.submit(completion("ok1")), writer.submit(bad), writer.submit(completion("ok2"))]
    assert futures[0].result(5) is None and futures[2].result(5) is None
    with pytest.raises(Exception, match="(?i)too large|overflow|out of range|cast"):
        futures[1].result(5)
    ids = {r[0] for r in writer.cursor().execute("SELECT id FROM completions").fetchall()}
    assert ids == {"ok1", "ok2"}


def test_a_caller_giving_up_on_its_future_fails_nothing(writer):
    # The gateway cancels a feedback future on timeout; the event is written all the same and
    # the others committed with it still resolve.
    futures = [writer.submit(completion(f"c{i}")) for i in range(50)]
    futures[0].cancel()
    assert [f.result(10) for f in futures] == [None] * 50
    assert writer.cursor().execute("SELECT count(*) FROM completions").fetchone()[0] == 50


def test_close_writes_everything_already_accepted(tmp_path):
    path = tmp_path / "s.duckdb"
    w = StoreWriter(path).open()
    for i in range(500):
        w.submit(completion(f"c{i}"))
    w.close()
    assert query_file(path, "SELECT count(*) FROM completions", 10, 5).rows == [(500,)]


def test_acknowledged_writes_survive_kill_9(tmp_path):
    """A writer process prints each id once its future resolved, then is killed mid-stream."""
    path = tmp_path / "k.duckdb"
    script = textwrap.dedent(f"""
        import sys
        from tests.harness.factories import completion, feedback
        from store import StoreWriter
        w = StoreWriter({str(path)!r}).open()
        w.submit(completion("c"))
        i = 0
        while True:
            fb = feedback("c", score=float(i))
            w.submit(fb).result()
            print(fb.event_id, flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=os.getcwd())
    acked = []
    for line in proc.stdout:
        acked.append(line.strip())
        if len(acked) == 300:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    stored = {r[0] for r in query_file(path, "SELECT id FROM feedback", 10**6, 30).rows}
    assert len(acked) == 300, "the writer was killed before it acknowledged 300 writes"
    assert set(acked) <= stored


@pytest.mark.parametrize("sql", [
    "DELETE FROM completions", "DROP TABLE feedback", "INSERT INTO aliases VALUES ('a','b',NULL,now())",
    "EXPLAIN ANALYZE DELETE FROM feedback", "SELECT 1; DELETE FROM feedback", "SET threads = 1",
    "COPY completions TO 'x.csv'", "PRAGMA version", "",
])
def test_read_only_queries_refuse_anything_else(writer, sql):
    with pytest.raises(QueryError):
        run_read_only(writer.cursor(), sql, 10, 5)


@pytest.mark.parametrize("sql, says", [
    ("WITH u AS (UPDATE aliases SET version = 'x' RETURNING *) SELECT * FROM u", "UPDATE"),
    ("SELECT (WITH d AS (DELETE FROM feedback RETURNING id) SELECT count(*) FROM d)", "DELETE"),
    ("WITH i AS (INSERT INTO aliases VALUES ('a', 'b', NULL, now()) RETURNING *) FROM i",
     "INSERT"),
    ("EXPLAIN ANALYZE WITH u AS (UPDATE aliases SET version = 'x' RETURNING *) SELECT * FROM u",
     "UPDATE"),
    ("SELECT * FROM checkpoint()", "checkpoint"),
    ("SELECT * FROM force_checkpoint()", "force_checkpoint"),
    ("SELECT * FROM query('SELECT 1')", "query"),
    ("SELECT * FROM read_text('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM glob('/*')", "file system operations are disabled"),
    ("SELECT * FROM read_text('**/state.json')", "file system operations are disabled"),
    ("SELECT * FROM read_json_auto('https://example.com/x.json')", "disabled"),
    ("LOAD httpfs", "not LOAD"),
    ("INSTALL httpfs", "not LOAD"),
    ("SET enable_external_access = true", "not SET"),
    ("ATTACH '/tmp/other.duckdb'", "not ATTACH"),
])
def test_queries_cannot_write_read_host_files_or_load_extensions(writer, sql, says):
    writer.submit(completion("c0"))
    writer.call(lambda con: None).result(5)
    before = run_read_only(writer.cursor(), "SELECT * FROM aliases ORDER BY alias", 100, 5).rows
    with pytest.raises(QueryError, match=says):
        run_read_only(writer.cursor(), sql, 10, 5)
    assert run_read_only(writer.cursor(), "SELECT * FROM aliases ORDER BY alias", 100, 5).rows \
        == before
    assert run_read_only(writer.cursor(), "SELECT count(*) FROM feedback", 1, 5).rows == [(0,)]


def test_a_sealed_store_cannot_be_unsealed_by_a_statement(writer):
    cur = writer.cursor()
    with pytest.raises(duckdb.Error, match="locked"):
        cur.execute("SET enable_external_access = true")
    assert cur.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)


def test_a_store_opened_from_its_file_is_sealed_too(writer, tmp_path):
    writer.close()
    with pytest.raises(QueryError, match="file system operations are disabled"):
        query_file(writer.path, "SELECT * FROM read_text('/etc/passwd')", 10, 5)
    with pytest.raises(QueryError, match="UPDATE"):
        query_file(writer.path, "WITH u AS (UPDATE aliases SET version = 'x' RETURNING *) "
                                "SELECT * FROM u", 10, 5)


def test_read_only_query_returns_json_values_and_truncates(writer):
    for i in range(3):
        writer.submit(completion(f"c{i}"))
    writer.call(lambda con: None).result(5)
    res = run_read_only(writer.cursor(), "SELECT id, params FROM completions ORDER BY id", 2, 5)
    assert res.columns == ["id", "params"] and res.truncated
    assert res.rows == [("c0", {"temperature": 0}), ("c1", {"temperature": 0})]
    assert run_read_only(writer.cursor(), "EXPLAIN SELECT 1", 10, 5).rows
    assert json.dumps(run_read_only(writer.cursor(), "DESCRIBE completions", 100, 5).rows, default=str)


def test_slow_query_is_cancelled(writer):
    with pytest.raises(QueryError, match="cancelled"):
        run_read_only(writer.cursor(), "SELECT count(*) FROM range(10000000000) a", 1, 0.3)


def test_full_queue_refuses_instead_of_growing(tmp_path):
    w = StoreWriter(tmp_path / "full.duckdb", queue_max=10)  # not opened: nothing drains it
    for i in range(9):
        assert w.has_capacity()
        w.submit(completion(f"c{i}"))
    assert not w.has_capacity()  # 90 % full: new requests are refused, queued events still fit
    w.submit(completion("c9"))
    with pytest.raises(SinkFull, match="full"):
        w.submit(completion("c10"))
