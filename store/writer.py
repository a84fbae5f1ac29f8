"""The single writer of the feedback store.

DuckDB allows one writing process per file, and appends are cheapest in large transactions,
so one thread owns the write connection and commits whatever has queued while the previous
commit ran (group commit): under load many events share a commit, when idle each event
commits at once. The request path only enqueues; a caller that needs durability (explicit
feedback) waits on the future, which resolves after COMMIT returned.

Ordering is what makes linking simple: events are applied in the order they were submitted,
so a follow-up or feedback always finds the completion it refers to if that completion was
submitted before it, committed or not.

A store that cannot write (disk full, file or folder not writable, the database invalidated by
a failed checkpoint) fails the batch in hand with `StoreUnavailable` — its events were not
acknowledged, the feedback among them gets a retryable 503 — and the writer carries on: it
records the failure (`failure`, which /readyz reports) until a write succeeds again, and while
it fails it tries a harmless write every `PROBE_INTERVAL_S` (reopening a database DuckDB
invalidated), so readiness comes back once the disk does, with no traffic needed.

With `redact`, events are redacted here, on the writer thread, just before they are written
(`feedback.redaction`): nothing unredacted reaches the file, and the request path pays nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from feedback.events import (
    CompletionEvent,
    Event,
    FeedbackEvent,
    FollowupEvent,
    ReplicaVersionEvent,
    ToolResultEvent,
    json_text,
)
from feedback.redaction import redact_event
from feedback.sinks import SinkFull, UnknownCompletion, approx_bytes
from feedback.tool_calls import InvalidToolCall, check_tool_calls
from store import metrics
from store.migrations import migrate
from store.query import seal

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreClosed(SinkFull):
    """The writer is stopped; nothing more can be written."""


class StoreUnavailable(SinkFull):
    """The store failed to write (disk full, not writable): nothing of the batch was stored;
    the caller answers 503 and the client retries."""


_STOP = object()
# Failures of the store, not of an event's data: I/O, a database invalidated by a failed
# checkpoint, a closed connection (and a commit that could not be written: `_is_store_failure`).
# A batch that hits one is failed whole; retrying its events one by one would fail each again.
_STORE_FAILURES = (duckdb.IOException, duckdb.FatalException, duckdb.InternalException,
                   duckdb.PermissionException, duckdb.ConnectionException, OSError,
                   StoreUnavailable)
# After these DuckDB must be restarted: the writer opens the file again before the next write.
_REOPEN_AFTER = (duckdb.FatalException, duckdb.InternalException, duckdb.ConnectionException)
# While the store fails, how often the writer tries a write of its own to see it works again:
# `_PROBE_BYTES` written and synced to a file beside the store's, then removed (DuckDB has no
# write that changes nothing and is still sure to reach the disk).
PROBE_INTERVAL_S = 5.0
_PROBE_BYTES = 256 * 1024  # one DuckDB block


def _is_store_failure(exc: BaseException) -> bool:
    if isinstance(exc, _STORE_FAILURES):
        return True
    # A full disk fails the commit: `TransactionContext Error: Failed to commit: Could not
    # write file "….wal": No space left on device`. Other TransactionExceptions are the
    # aftermath of an event's own error in the transaction ("Current transaction is aborted").
    text = str(exc).lower()
    return (isinstance(exc, duckdb.TransactionException) and "failed to commit" in text
            and "constraint" not in text)

# Column, and its SQL type. Rows are inserted a batch at a time, as one Arrow table
# (`_BulkInsert`), far cheaper than `executemany`. Rows are keyed by event: a redelivered event
# must be a no-op. A plain INSERT still checks the key (and fails on a duplicate) at a third of
# the cost of `INSERT OR IGNORE`, so batches are written plainly first and only a batch that
# hit a duplicate is written again with OR IGNORE (`_commit_events`).
_COMPLETION_COLUMNS = (
    ("id", "VARCHAR"), ("event_id", "VARCHAR"), ("created_at", "TIMESTAMP"),
    ("session_id", "VARCHAR"), ("alias", "VARCHAR"), ("version", "VARCHAR"),
    ("messages", "JSON"), ("params", "JSON"), ("stream", "BOOLEAN"), ("response_text", "VARCHAR"),
    ("response_message", "JSON"), ("finish_reason", "VARCHAR"),
    ("prompt_token_ids", "INTEGER[]"), ("token_ids", "INTEGER[]"), ("prompt_tokens", "INTEGER"),
    ("completion_tokens", "INTEGER"), ("latency_ms", "DOUBLE"), ("ttft_ms", "DOUBLE"),
    ("status", "VARCHAR"), ("error", "VARCHAR"), ("context_hash", "VARCHAR"),
    ("reply_hash", "VARCHAR"), ("principal", "VARCHAR"), ("metadata", "JSON"),
    ("end_user", "VARCHAR"),
)
_FEEDBACK_COLUMNS = (
    ("id", "VARCHAR"), ("completion_id", "VARCHAR"), ("created_at", "TIMESTAMP"),
    ("type", "VARCHAR"), ("score", "DOUBLE"), ("text", "VARCHAR"), ("metadata", "JSON"),
    ("principal", "VARCHAR"), ("may_teach", "BOOLEAN"), ("tool_calls", "JSON"),
)
_FOLLOWUP_COLUMNS = (
    ("id", "VARCHAR"), ("completion_id", "VARCHAR"), ("next_completion_id", "VARCHAR"),
    ("created_at", "TIMESTAMP"), ("text", "VARCHAR"), ("matched_by", "VARCHAR"),
    ("principal", "VARCHAR"), ("may_teach", "BOOLEAN"),
)

_TOOL_CALL_COLUMNS = (
    ("completion_id", "VARCHAR"), ("idx", "INTEGER"), ("call_id", "VARCHAR"), ("name", "VARCHAR"),
    ("arguments", "VARCHAR"),
)
_TOOL_RESULT_COLUMNS = (
    ("id", "VARCHAR"), ("completion_id", "VARCHAR"), ("call_id", "VARCHAR"), ("name", "VARCHAR"),
    ("next_completion_id", "VARCHAR"), ("created_at", "TIMESTAMP"), ("content", "VARCHAR"),
    ("is_error", "BOOLEAN"), ("error", "VARCHAR"), ("matched_by", "VARCHAR"),
    ("principal", "VARCHAR"), ("may_teach", "BOOLEAN"),
)


# DuckDB's type of a column → the Arrow type a batch hands it over in.
_ARROW_TYPES = {
    "VARCHAR": pa.string(), "JSON": pa.string(), "TIMESTAMP": pa.timestamp("us"),
    "BOOLEAN": pa.bool_(), "INTEGER": pa.int32(), "DOUBLE": pa.float64(),
    "INTEGER[]": pa.string(),  # JSON text: DuckDB's JSON reader parses it outside the GIL
}


class _BulkInsert:
    """Rows of one table, a batch at a time, handed to DuckDB as one Arrow table.

    DuckDB scans an Arrow table without converting a Python object per value, and the batch is
    never copied into a staging table. JSON values and token-id lists arrive as JSON text (the
    gateway's encoded here, the ingester's as they came off the topic, `EncodedIds`) and are
    cast or parsed by the INSERT.

    `skip_duplicates` leaves out rows whose key is stored already; without it a duplicate
    raises `duckdb.ConstraintException` (and aborts the transaction). So does a value that does
    not fit its column (a token id out of range): the caller writes the batch's events one by
    one then, and only that event fails.
    """

    def __init__(self, table: str, columns: tuple[tuple[str, str], ...]) -> None:
        self.columns = columns
        self.names = tuple(name for name, _ in columns)
        self._view = f"sdloop_batch_{table}"
        def value(name: str, typ: str) -> str:
            if typ == "INTEGER[]":
                return f"""json_transform_strict({name}, '["INTEGER"]')"""
            return f"{name}::JSON" if typ == "JSON" else name

        scanned = ", ".join(value(name, typ) for name, typ in columns)
        self._sql = {verb: f"{verb} INTO {table} ({', '.join(self.names)}) "
                           f"SELECT {scanned} FROM {self._view}"
                     for verb in ("INSERT", "INSERT OR IGNORE")}

    def __call__(self, con: duckdb.DuckDBPyConnection, rows: list[list[Any]],
                 skip_duplicates: bool) -> None:
        arrays = [pa.array([row[i] for row in rows], _ARROW_TYPES[typ])
                  for i, (_, typ) in enumerate(self.columns)]
        batch = pa.Table.from_arrays(arrays, names=list(self.names))
        verb = "INSERT OR IGNORE" if skip_duplicates else "INSERT"
        con.register(self._view, batch)
        try:
            con.execute(self._sql[verb])
        finally:  # after a failed INSERT the transaction is aborted and its rollback drops it
            with contextlib.suppress(duckdb.TransactionException):
                con.unregister(self._view)


_REPLICA_VERSION_COLUMNS = (
    ("id", "VARCHAR"), ("replica", "VARCHAR"), ("alias", "VARCHAR"), ("version", "VARCHAR"),
    ("action", "VARCHAR"), ("status", "VARCHAR"), ("detail", "VARCHAR"), ("created_at", "TIMESTAMP"),
)
_insert_completions = _BulkInsert("completions", _COMPLETION_COLUMNS)
_insert_feedback = _BulkInsert("feedback", _FEEDBACK_COLUMNS)
_insert_followups = _BulkInsert("followups", _FOLLOWUP_COLUMNS)
_insert_tool_calls = _BulkInsert("tool_calls", _TOOL_CALL_COLUMNS)
_insert_tool_results = _BulkInsert("tool_results", _TOOL_RESULT_COLUMNS)
_insert_replica_versions = _BulkInsert("replica_versions", _REPLICA_VERSION_COLUMNS)

# Each follow-up's reply, for a whole batch in one join: same conversation first (context
# hash), else the same reply text in the same session; the newest answered completion wins.
# Only a reply given to the same principal: a follow-up is what that user said next, and
# another principal's message must not become a signal on someone else's answer.
_RESOLVE_FOLLOWUPS = """
WITH fu AS (
    SELECT unnest($1::INTEGER[]) AS i, unnest($2::VARCHAR[]) AS ctx, unnest($3::VARCHAR[]) AS rep,
           unnest($4::VARCHAR[]) AS who, unnest($5::VARCHAR[]) AS session
), hit AS (
    SELECT fu.i, c.id, 'context' AS matched_by, 0 AS rank, c.created_at
    FROM fu JOIN completions c ON c.context_hash = fu.ctx AND c.status = 'ok'
        AND c.principal IS NOT DISTINCT FROM fu.who
    UNION ALL
    SELECT fu.i, c.id, 'reply', 1, c.created_at
    FROM fu JOIN completions c ON c.reply_hash = fu.rep AND c.status = 'ok'
        AND c.principal IS NOT DISTINCT FROM fu.who
        AND c.session_id IS NOT DISTINCT FROM fu.session
)
SELECT i, arg_min(id, (rank, -epoch_us(created_at))), arg_min(matched_by, (rank, -epoch_us(created_at)))
FROM hit GROUP BY i
"""

# Each tool result's call, for a whole batch in one join: by the call's id where the client
# kept it, else the answer that ends the same conversation (context hash); made for the same
# principal either way (another principal's tool output is not this answer's environment).
_RESOLVE_TOOL_RESULTS = """
WITH tr AS (
    SELECT unnest($1::INTEGER[]) AS i, unnest($2::VARCHAR[]) AS call, unnest($3::VARCHAR[]) AS ctx,
           unnest($4::VARCHAR[]) AS who
), hit AS (
    SELECT tr.i, c.id, 'call_id' AS matched_by, 0 AS rank, c.created_at, t.name
    FROM tr JOIN tool_calls t ON t.call_id = tr.call
    JOIN completions c ON c.id = t.completion_id AND c.status = 'ok'
        AND c.principal IS NOT DISTINCT FROM tr.who
    UNION ALL
    SELECT tr.i, c.id, 'context', 1, c.created_at, NULL
    FROM tr JOIN completions c ON c.context_hash = tr.ctx AND c.status = 'ok'
        AND c.principal IS NOT DISTINCT FROM tr.who
)
SELECT i, arg_min(id, (rank, -epoch_us(created_at))),
       arg_min(matched_by, (rank, -epoch_us(created_at))),
       arg_min(name, (rank, -epoch_us(created_at)))
FROM hit GROUP BY i
"""


def _completion_row(ev: CompletionEvent) -> list[Any]:
    return [
        ev.completion_id, ev.event_id, ev.created_at, ev.session_id, ev.alias, ev.version,
        json_text(ev.messages), json_text(ev.params), ev.stream, ev.response_text,
        json_text(ev.response_message), ev.finish_reason, json_text(ev.prompt_token_ids),
        json_text(ev.token_ids), ev.prompt_tokens, ev.completion_tokens, ev.latency_ms, ev.ttft_ms,
        ev.status, ev.error, ev.context_hash, ev.reply_hash, ev.principal,
        json_text(ev.metadata), ev.user,
    ]


def _tool_call_rows(ev: CompletionEvent) -> list[list[Any]]:
    """The answer's tool calls, one row each (whatever shape the engine gave them)."""
    calls = (ev.response_message or {}).get("tool_calls")
    if not isinstance(calls, list):
        return []
    rows = []
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            continue
        function = call.get("function") if isinstance(call.get("function"), dict) else {}
        arguments = function.get("arguments")
        rows.append([ev.completion_id, i, _text_or_none(call.get("id")),
                     _text_or_none(function.get("name")),
                     arguments if arguments is None or isinstance(arguments, str)
                     else json_text(arguments)])
    return rows


def _json_value(text: str | None) -> Any:
    """A stored JSON column's value (the store wrote it, so it parses)."""
    return json.loads(text) if text is not None else None


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class _EventBatch:
    events: list[Event]


class StoreWriter:
    """Owns the DuckDB file for writing; implements `feedback.Sink`."""

    name = "feedback store"
    stores = True
    # A commit takes milliseconds; this bounds a caller's wait when the disk stalls.
    ack_timeout_s = 30.0

    def __init__(self, path: Path, batch_max: int = 8192, queue_max: int = 100_000,
                 queue_max_bytes: int = 256 * 1024 * 1024, redact: bool = False,
                 checkpoint_mb: int = 256) -> None:
        self.path = Path(path)
        self.checkpoint_mb = checkpoint_mb
        self.batch_max = batch_max
        self.redact = redact
        # SimpleQueue (C, no condition variables) is several times cheaper per event under
        # load than queue.Queue; the bound is kept with a counter of its own.
        self._queue: queue.SimpleQueue[tuple[object, Future[Any], int] | object] = \
            queue.SimpleQueue()
        self.queue_max = queue_max
        self._depth = 0
        # Bytes (`feedback.approx_bytes`) of the events queued or being written: a flood of
        # large events is refused at this bound long before `queue_max` events would be.
        self.queue_max_bytes = queue_max_bytes
        self._bytes = 0
        self._depth_lock = threading.Lock()
        self._failure: str | None = None
        self._reopen = False
        self.probe_interval_s = PROBE_INTERVAL_S
        self._con: duckdb.DuckDBPyConnection | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = self._connect()
        applied = migrate(self._con)
        if applied:
            log.info("store %s migrated: %s", self.path, ", ".join(applied))
        self._thread = threading.Thread(target=self._run, name="sdloop-store-writer", daemon=True)
        self._thread.start()
        return self

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(str(self.path))
        con.execute(f"SET checkpoint_threshold = '{int(self.checkpoint_mb)}MB'")
        seal(con)  # its cursors answer the admin API's SQL
        return con

    def close(self, timeout: float = 30.0) -> None:
        """Write everything already accepted, then stop and close the file."""
        if self._thread is None or self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._con is not None:
            self._con.close()
            self._con = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed.is_set()

    # -- writing ---------------------------------------------------------------------------

    def submit(self, event: Event, request_bytes: int | None = None) -> Future[None]:
        """Queue an event; the future resolves after its transaction committed."""
        return self._enqueue(event, approx_bytes(event, request_bytes))

    def submit_batch(self, events: list[Event]) -> Future[list[Exception | None]]:
        """Queue many events as one transaction (the ingester's poll batches); the future
        resolves after the commit with, per event, None or why it was refused. Cheaper than
        `submit` per event: one queue entry and one future for the lot."""
        return self._enqueue(_EventBatch(events))

    def has_capacity(self) -> bool:
        # Headroom for the events already-admitted requests will still produce.
        return self._depth < self.queue_max * 0.9 and self._bytes < self.queue_max_bytes * 0.9

    @property
    def failure(self) -> str | None:
        """Why the last write failed, until one succeeds again (None: writing works)."""
        return self._failure

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> Future[T]:
        """Run `fn` on the writer's connection in a transaction of its own, in queue order.

        For the few writes that are not events (the alias table) and reads that must see
        everything submitted before them.
        """
        return self._enqueue(fn)

    def _enqueue(self, item: object, size: int = 0) -> Future[Any]:
        """`size`: the item's bytes, counted against `queue_max_bytes` (0 for a call or the
        ingester's batches, which it bounds itself: two in flight)."""
        if self._closed.is_set():
            raise StoreClosed("the feedback store is closed")
        fut: Future[Any] = Future()
        # Accepted means written: a caller that gives up waiting (a feedback timeout cancels
        # its future) must not make the writer's set_result fail for the whole batch.
        fut.set_running_or_notify_cancel()
        with self._depth_lock:
            if self._depth >= self.queue_max:
                raise SinkFull("the feedback store's write queue is full; retry shortly")
            # An event larger than the bound on its own is still taken into an empty queue.
            if self._bytes and self._bytes + size > self.queue_max_bytes:
                raise SinkFull(f"the feedback store's write queue holds {self._bytes >> 20} MiB "
                               "of events (store.queue_max_bytes); retry shortly")
            self._depth += 1
            self._bytes += size
        self._queue.put((item, fut, size))
        return fut  # the queue depth gauge is set by the writer, once per batch

    # -- reading ---------------------------------------------------------------------------

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A new connection to the same database, for reads from any one thread."""
        if self._con is None:
            raise StoreClosed("the feedback store is closed")
        return self._con.cursor()

    # -- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                # While the store fails, wake up now and then to see whether it writes again.
                first = self._queue.get(timeout=self.probe_interval_s if self._failure else None)
            except queue.Empty:
                self._probe()
                continue
            batch: list[tuple[object, Future[Any], int]] = []
            if first is _STOP:
                stopping = True
            else:
                batch.append(first)  # type: ignore[arg-type]
            while len(batch) < self.batch_max:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)  # type: ignore[arg-type]
            with self._depth_lock:
                self._depth -= len(batch)
            metrics.QUEUE_DEPTH.set(self._depth)
            if stopping:  # drain what was accepted before close()
                while True:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is not _STOP:
                        batch.append(item)  # type: ignore[arg-type]
            try:
                self._process(batch)
            except BaseException as exc:  # noqa: BLE001 - keep the writer alive, fail the batch
                if _is_store_failure(exc):
                    self._batch_failed(batch, exc)
                    continue
                log.exception("store writer failed on a batch of %d", len(batch))
                for _, fut, _ in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            finally:  # the batch's events are written or dropped: their bytes are free
                with self._depth_lock:
                    self._bytes -= sum(size for _, _, size in batch)

    def _process(self, batch: list[tuple[object, Future[Any], int]]) -> None:
        if self._reopen:
            self._reopen_database()
        events: list[tuple[Event, Future[Any]]] = []
        for item, fut, _ in batch:
            if isinstance(item, Event):
                events.append((redact_event(item) if self.redact else item, fut))
                continue
            # A batch or a call() keeps its place in the order: flush the events before it.
            self._write_events(events)
            events = []
            if isinstance(item, _EventBatch):
                self._write_batch([redact_event(e) for e in item.events] if self.redact
                                  else item.events, fut)
            else:
                self._run_call(item, fut)  # type: ignore[arg-type]
        self._write_events(events)

    def _batch_failed(self, batch: list[tuple[object, Future[Any], int]],
                      exc: BaseException) -> None:
        """The store could not write: what is left of the batch fails, unacknowledged (the
        feedback among it gets a 503 and is sent again; a completion is counted in
        `sdloop_store_write_errors` and logged), and the failure is kept for /readyz."""
        self._note_failure(exc)
        pending = [(item, fut) for item, fut, _ in batch if not fut.done()]
        lost = sum(len(item.events) if isinstance(item, _EventBatch) else 1
                   for item, _ in pending if isinstance(item, Event | _EventBatch))
        metrics.WRITE_ERRORS.inc(lost)
        log.error("%s; %d events not written (not acknowledged)", self._failure, lost)
        error = StoreUnavailable("it cannot write now (the server log says why); nothing was "
                                 "stored")
        for _, fut in pending:
            fut.set_exception(error)

    def _note_failure(self, exc: BaseException) -> None:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        self._failure = f"the feedback store cannot write: {type(exc).__name__}: {first_line}"
        if isinstance(exc, _REOPEN_AFTER):
            self._reopen = True

    def _wrote(self) -> None:
        if self._failure is not None:
            log.warning("the feedback store writes again (after: %s)", self._failure)
            self._failure = None

    def _probe(self) -> None:
        """While the store fails: can it write again? A block written and synced beside the
        store's file, and the database opened again if DuckDB invalidated it. Passing it clears
        the failure; a write that fails after all sets it again."""
        probe = self.path.with_name(self.path.name + ".probe")
        try:
            if self._reopen:
                self._reopen_database()
            with open(probe, "wb") as fh:
                fh.write(bytes(_PROBE_BYTES))
                fh.flush()
                os.fsync(fh.fileno())
        except Exception as exc:  # noqa: BLE001 - still failing: the next probe tries again
            self._note_failure(exc)
            return
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        self._wrote()

    def _reopen_database(self) -> None:
        """Open the file again: DuckDB refuses every statement once a failed checkpoint has
        invalidated the database, until it is restarted. Raises what opening raises (the disk
        is still full, say): the next batch or probe tries again."""
        old, self._con = self._con, None
        if old is not None:
            with contextlib.suppress(duckdb.Error):
                old.close()
        self._con, self._reopen = self._connect(), False
        log.warning("reopened the feedback store %s", self.path)

    def _write_batch(self, events: list[Event], fut: Future[Any]) -> None:
        try:
            errors = self._commit_events(events)
        except Exception as exc:
            if _is_store_failure(exc):
                raise  # the store's, not an event's: the whole batch fails (`_run`)
            # Find the event that broke the batch: the others are written one by one.
            singles = [Future() for _ in events]
            for single in zip(events, singles, strict=True):
                self._write_events([single])
            fut.set_result([f.exception() for f in singles])
            return
        fut.set_result(errors)

    def _run_call(self, fn: Callable[[duckdb.DuckDBPyConnection], Any], fut: Future[Any]) -> None:
        if self._con is None:
            raise StoreUnavailable("the feedback store could not be opened again")
        try:
            result = in_transaction(self._con, fn)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            if _is_store_failure(exc):
                self._note_failure(exc)
            fut.set_exception(exc)
            return
        fut.set_result(result)

    def _write_events(self, items: list[tuple[Event, Future[Any]]]) -> None:
        if not items:
            return
        try:
            errors = self._commit_events([ev for ev, _ in items])
        except Exception as exc:
            if _is_store_failure(exc):
                raise  # the store's, not an event's: one by one, each would fail again
            if len(items) == 1:
                log.error("store write failed for %s: %s", items[0][0].kind, exc)
                metrics.WRITE_ERRORS.inc()
                items[0][1].set_exception(exc)
                return
            # One bad event must not take the others down: write them one by one.
            for item in items:
                self._write_events([item])
            return
        for (_, fut), err in zip(items, errors, strict=True):
            if err is None:
                fut.set_result(None)
            else:
                fut.set_exception(err)

    def _commit_events(self, events: list[Event]) -> list[Exception | None]:
        """Write events in one transaction; per event, None or why it was refused.

        Written plainly first: a batch holding an event that is stored already (a redelivery,
        a retried feedback) fails on its key and is written again skipping the duplicates.
        """
        if self._con is None:
            raise StoreUnavailable("the feedback store could not be opened again")
        started = time.perf_counter()
        try:
            applied = in_transaction(self._con, lambda con: apply_events(con, events))
        except duckdb.ConstraintException:
            applied = in_transaction(
                self._con, lambda con: apply_events(con, events, skip_duplicates=True))
        self._wrote()
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(events))
        metrics.FOLLOWUPS_UNMATCHED.inc(applied.unmatched_followups)
        metrics.TOOL_RESULTS_UNMATCHED.inc(applied.unmatched_tool_results)
        _count_written(ev for ev, err in zip(events, applied.errors, strict=True) if err is None)
        return applied.errors


@dataclass
class Applied:
    """What `apply_events` did: per event, None or why it was refused; and how many follow-ups
    matched no stored reply (they are not stored: there is nothing to attach them to)."""

    errors: list[Exception | None]
    unmatched_followups: int = 0
    unmatched_tool_results: int = 0


def apply_events(con: duckdb.DuckDBPyConnection, events: list[Event],
                 skip_duplicates: bool = False) -> Applied:
    """Write events inside the caller's transaction.

    An event stored already raises `duckdb.ConstraintException` unless `skip_duplicates`.
    Public for the ingester, which replays parked feedback in a transaction of its own.
    """
    errors: list[Exception | None] = [None] * len(events)
    unmatched = 0
    completions = [e for e in events if isinstance(e, CompletionEvent)]
    if completions:
        _insert_completions(con, [_completion_row(e) for e in completions], skip_duplicates)
        calls = [row for e in completions if e.response_message for row in _tool_call_rows(e)]
        if calls:
            _insert_tool_calls(con, calls, skip_duplicates)

    followups = [e for e in events if isinstance(e, FollowupEvent)]
    if followups:
        parents = {
            i: (completion_id, matched_by)
            for i, completion_id, matched_by in con.execute(_RESOLVE_FOLLOWUPS, [
                list(range(len(followups))), [e.context_hash for e in followups],
                [e.reply_hash for e in followups], [e.principal for e in followups],
                [e.session_id for e in followups]]).fetchall()
        }
        unmatched = len(followups) - len(parents)
        # The follow-up's row id is its event id, so a redelivered event is a no-op.
        rows = [[ev.event_id, parents[i][0], ev.next_completion_id, ev.created_at, ev.text,
                 parents[i][1], ev.principal, ev.may_teach]
                for i, ev in enumerate(followups) if i in parents]
        if rows:
            _insert_followups(con, rows, skip_duplicates)

    results = [e for e in events if isinstance(e, ToolResultEvent)]
    unmatched_results = 0
    if results:
        calls_of = {
            i: (completion_id, matched_by, name)
            for i, completion_id, matched_by, name in con.execute(_RESOLVE_TOOL_RESULTS, [
                list(range(len(results))), [e.call_id for e in results],
                [e.context_hash for e in results], [e.principal for e in results]]).fetchall()
        }
        unmatched_results = len(results) - len(calls_of)
        rows = [[ev.event_id, calls_of[i][0], ev.call_id, calls_of[i][2] or ev.name,
                 ev.next_completion_id, ev.created_at, ev.content, ev.error is not None,
                 ev.error, calls_of[i][1], ev.principal, ev.may_teach]
                for i, ev in enumerate(results) if i in calls_of]
        if rows:
            _insert_tool_results(con, rows, skip_duplicates)

    reports = [[e.event_id, e.replica, e.alias, e.version, e.action, e.status, e.detail,
                e.created_at] for e in events if isinstance(e, ReplicaVersionEvent)]
    if reports:
        _insert_replica_versions(con, reports, skip_duplicates)

    feedback = [(i, e) for i, e in enumerate(events) if isinstance(e, FeedbackEvent)]
    if feedback:
        wanted = sorted({e.completion_id for _, e in feedback})
        with_calls = sorted({e.completion_id for _, e in feedback if e.tool_calls is not None})
        # A call is checked against the tools its completion's request offered: their params.
        known = {
            row[0]: row[1]
            for row in con.execute(
                "SELECT id, CASE WHEN list_contains(?::VARCHAR[], id) THEN params END "
                "FROM completions WHERE id IN (SELECT unnest(?::VARCHAR[]))", [with_calls, wanted]
            ).fetchall()
        }
        rows = []
        for i, ev in feedback:
            if ev.completion_id not in known:
                errors[i] = UnknownCompletion(ev.completion_id)
                continue
            calls = None
            if ev.tool_calls is not None:
                try:
                    calls = check_tool_calls(ev.tool_calls, _json_value(known[ev.completion_id]))
                except InvalidToolCall as exc:
                    errors[i] = exc
                    continue
            rows.append([ev.event_id, ev.completion_id, ev.created_at, ev.type, ev.score,
                         ev.text, json_text(ev.metadata), ev.principal, ev.may_teach,
                         json_text(calls)])
        if rows:
            _insert_feedback(con, rows, skip_duplicates)
    return Applied(errors, unmatched, unmatched_results)


def _count_written(events: Iterable[Event]) -> None:
    for kind, n in Counter(ev.kind for ev in events).items():
        metrics.EVENTS_WRITTEN.labels(kind).inc(n)


def in_transaction(con: duckdb.DuckDBPyConnection,
                   fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
    """`fn(con)` in a transaction of its own: committed, or rolled back and raised."""
    con.execute("BEGIN TRANSACTION")
    try:
        result = fn(con)
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise
    return result


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # no transaction was open
        con.execute("ROLLBACK")
