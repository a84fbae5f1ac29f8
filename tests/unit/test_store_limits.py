"""The store writer at its limits, on real DuckDB files: a disk that fills up (a file-size limit,
which makes every write that grows a file fail with EFBIG, as a full disk does with ENOSPC), a
connection lost underneath the writer, a queue bounded in bytes, and redaction on its thread."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from feedback import FeedbackEvent, SinkFull, utcnow
from store import StoreWriter
from tests.harness.factories import completion, feedback

ROOT = Path(__file__).resolve().parents[2]


def _wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# In a process of its own: RLIMIT_FSIZE holds for every file the process writes (pytest's too),
# and its output goes through pipes, which the limit does not cover.
_FULL_DISK = textwrap.dedent("""
    import json, resource, sys, time
    from store import StoreWriter
    from store.writer import StoreUnavailable
    from tests.harness.factories import completion, feedback

    def outcome(fut):
        try:
            fut.result(10)
            return "stored"
        except StoreUnavailable:
            return "unavailable"

    w = StoreWriter(sys.argv[1]).open()
    w.probe_interval_s = 0.2
    out = {"before": outcome(w.submit(completion("c1")))}
    w.submit(feedback("c1", score=1.0, text="acknowledged before")).result(10)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # no file may grow: the disk is full
    out["feedback"] = outcome(w.submit(feedback("c1", kind="critique", text="while full")))
    out["completion"] = outcome(w.submit(completion("c2")))
    out["failure"], out["alive"] = w.failure, w.alive
    try:  # a checkpoint that cannot be written invalidates the database in DuckDB
        w.call(lambda con: con.execute("CHECKPOINT")).result(10)
    except Exception as exc:
        out["checkpoint"] = type(exc).__name__
    out["after_checkpoint"] = outcome(w.submit(feedback("c1", kind="critique", text="x")))
    time.sleep(1.0)
    out["still_failing"] = w.failure is not None  # its probes fail while the disk is full
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space again
    deadline = time.monotonic() + 10
    while w.failure is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    out["recovered_without_traffic"] = w.failure is None
    out["again"] = outcome(w.submit(feedback("c1", kind="critique", text="after")))
    out["rows"] = w.cursor().execute(
        "SELECT coalesce(text, '') FROM feedback ORDER BY created_at").fetchall()
    w.close()
    print(json.dumps(out))
""")


def test_a_full_disk_fails_writes_as_retryable_and_the_writer_recovers_once_it_has_space(tmp_path):
    pytest.importorskip("resource")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "full.duckdb")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["before"] == "stored"
    # Not acknowledged, and said so as SinkFull (the gateway's 503), not a DuckDB error.
    assert out["feedback"] == out["completion"] == "unavailable"
    assert out["failure"].startswith("the feedback store cannot write") and out["alive"]
    assert "Traceback" not in proc.stderr  # one error line per failed batch, no stack trace
    assert out["checkpoint"] == "FatalException"  # DuckDB invalidated the database
    assert out["after_checkpoint"] == "unavailable" and out["still_failing"]
    # Readiness comes back by itself (probe, reopening the invalidated database).
    assert out["recovered_without_traffic"] and out["again"] == "stored"
    # What was acknowledged is there; what was refused is not.
    assert out["rows"] == [["acknowledged before"], ["after"]]


def test_a_connection_lost_underneath_is_reopened_and_writing_goes_on(tmp_path):
    w = StoreWriter(tmp_path / "lost.duckdb").open()
    w.probe_interval_s = 0.1
    try:
        w.submit(completion("c1")).result(5)
        w._con.close()  # what a failure that takes the connection down leaves
        with pytest.raises(SinkFull, match="cannot write"):
            w.submit(feedback("c1", score=1.0)).result(5)
        assert w.failure and "ConnectionException" in w.failure and w.alive
        assert _wait_for(lambda: w.failure is None)  # the probe opened the file again
        w.submit(feedback("c1", score=1.0)).result(5)
        assert w.cursor().execute("SELECT count(*) FROM feedback").fetchone() == (1,)
    finally:
        w.close()


def test_a_flood_of_large_events_is_refused_by_bytes_before_memory_grows(tmp_path):
    mib = 1024 * 1024
    w = StoreWriter(tmp_path / "bytes.duckdb", queue_max_bytes=8 * mib)  # not opened: no drain
    for i in range(3):
        assert w.has_capacity()
        w.submit(completion(f"c{i}"), request_bytes=5 * mib // 2)
    assert not w.has_capacity()  # 90 % of the bytes: new requests are refused (503)
    w.submit(completion("c3"), request_bytes=mib // 4)  # queued events still fit
    with pytest.raises(SinkFull, match="queue_max_bytes"):
        w.submit(completion("c4"), request_bytes=mib)
    assert w._depth == 4  # far below queue_max: the bytes bound, not the count, refused it


def test_queued_bytes_are_freed_once_written(writer):
    writer.queue_max_bytes = 4 * 1024 * 1024
    for i in range(20):  # 20 x 1 MiB through a 4 MiB bound: each batch frees its bytes
        writer.submit(completion(f"c{i}"), request_bytes=1024 * 1024).result(5)
    assert writer._bytes == 0 and writer.has_capacity()


def test_the_writer_redacts_on_its_own_thread_before_writing(tmp_path):
    w = StoreWriter(tmp_path / "redact.duckdb", redact=True).open()
    try:
        question = [{"role": "user", "content": "I am ann@example.com"}]
        event = completion("c1", question, params={"user": "ann@example.com"})
        w.submit(event).result(5)
        assert event.messages[0]["content"] == "I am ann@example.com"  # the caller's is as it was
        said = FeedbackEvent(event_id="f1", completion_id="c1", created_at=utcnow(),
                             type="critique", text="call +1 415 555 0100")
        w.submit(said).result(5)
        assert said.text == "call +1 415 555 0100"
        cur = w.cursor()
        assert cur.execute("SELECT messages->>'$[0].content', params->>'$.user', prompt_token_ids "
                           "FROM completions").fetchone() == ("I am [EMAIL]", "[EMAIL]", None)
        assert cur.execute("SELECT text FROM feedback").fetchone() == ("call [PHONE]",)
    finally:
        w.close()
