"""The single writer of the feedback store.

DuckDB allows one writing process per file, and appends are cheapest in large transactions,
so one thread owns the write connection and commits whatever has queued while the previous
commit ran (group commit): under load many events share a commit, when idle each event
commits at once. The request path only enqueues; a caller that needs durability (explicit
feedback) waits on the future, which resolves after COMMIT returned.

Ordering is what makes linking simple: events are applied in the order they were submitted,
so a follow-up or feedback always finds the completion it refers to if that completion was
submitted before it, committed or not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from feedback.events import CompletionEvent, Event, FeedbackEvent, FollowupEvent, new_id
from feedback.sinks import SinkFull
from store import metrics
from store.migrations import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")


class UnknownCompletion(LookupError):
    """Feedback names a completion id the store has never seen."""

    def __init__(self, completion_id: str) -> None:
        super().__init__(f"no completion with id '{completion_id}'")
        self.completion_id = completion_id


class StoreClosed(RuntimeError):
    """The writer is stopped; nothing more can be written."""


_STOP = object()

_COMPLETION_COLUMNS = (
    "id", "event_id", "created_at", "session_id", "alias", "version", "messages", "params",
    "stream", "response_text", "response_message", "finish_reason", "prompt_token_ids",
    "token_ids", "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms", "status",
    "error", "context_hash", "reply_hash",
)
_INSERT_COMPLETION = (
    f"INSERT OR IGNORE INTO completions ({', '.join(_COMPLETION_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COMPLETION_COLUMNS)})"
)
_INSERT_FEEDBACK = (
    "INSERT OR IGNORE INTO feedback (id, completion_id, created_at, type, score, text, metadata) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_FOLLOWUP = (
    "INSERT OR IGNORE INTO followups "
    "(id, completion_id, next_completion_id, created_at, text, matched_by) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False)


def _completion_row(ev: CompletionEvent) -> list[Any]:
    return [
        ev.completion_id, ev.event_id, ev.created_at, ev.session_id, ev.alias, ev.version,
        _json(ev.messages), _json(ev.params), ev.stream, ev.response_text,
        _json(ev.response_message), ev.finish_reason, ev.prompt_token_ids, ev.token_ids,
        ev.prompt_tokens, ev.completion_tokens, ev.latency_ms, ev.ttft_ms, ev.status, ev.error,
        ev.context_hash, ev.reply_hash,
    ]


class StoreWriter:
    """Owns the DuckDB file for writing; implements `feedback.Sink`."""

    def __init__(self, path: Path, batch_max: int = 1024, queue_max: int = 100_000) -> None:
        self.path = Path(path)
        self.batch_max = batch_max
        self._queue: queue.Queue[tuple[object, Future[Any]] | object] = queue.Queue(queue_max)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def open(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(str(self.path))
        applied = migrate(self._con)
        if applied:
            log.info("store %s migrated: %s", self.path, ", ".join(applied))
        self._thread = threading.Thread(target=self._run, name="sdloop-store-writer", daemon=True)
        self._thread.start()
        return self

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

    def submit(self, event: Event) -> Future[None]:
        """Queue an event; the future resolves after its transaction committed."""
        return self._enqueue(event)

    def has_capacity(self) -> bool:
        # Headroom for the events already-admitted requests will still produce.
        return self._queue.qsize() < self._queue.maxsize * 0.9

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> Future[T]:
        """Run `fn` on the writer's connection in a transaction of its own, in queue order.

        For the few writes that are not events (the alias table) and reads that must see
        everything submitted before them.
        """
        return self._enqueue(fn)

    def _enqueue(self, item: object) -> Future[Any]:
        if self._closed.is_set():
            raise StoreClosed("the feedback store is closed")
        fut: Future[Any] = Future()
        try:
            self._queue.put_nowait((item, fut))
        except queue.Full as exc:
            raise SinkFull("the feedback store's write queue is full; retry shortly") from exc
        metrics.QUEUE_DEPTH.set(self._queue.qsize())
        return fut

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
            first = self._queue.get()
            batch: list[tuple[object, Future[Any]]] = []
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
            metrics.QUEUE_DEPTH.set(self._queue.qsize())
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
                log.exception("store writer failed on a batch of %d", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)

    def _process(self, batch: list[tuple[object, Future[Any]]]) -> None:
        events: list[tuple[Event, Future[Any]]] = []
        for item, fut in batch:
            if isinstance(item, Event):
                events.append((item, fut))
                continue
            # A call() keeps its place in the order: flush the events queued before it.
            self._write_events(events)
            events = []
            self._run_call(item, fut)  # type: ignore[arg-type]
        self._write_events(events)

    def _run_call(self, fn: Callable[[duckdb.DuckDBPyConnection], Any], fut: Future[Any]) -> None:
        assert self._con is not None
        con = self._con
        try:
            con.execute("BEGIN TRANSACTION")
            result = fn(con)
            con.execute("COMMIT")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            _rollback(con)
            fut.set_exception(exc)
            return
        fut.set_result(result)

    def _write_events(self, items: list[tuple[Event, Future[Any]]]) -> None:
        if not items:
            return
        assert self._con is not None
        con = self._con
        started = time.perf_counter()
        try:
            con.execute("BEGIN TRANSACTION")
            errors = self._apply(con, [ev for ev, _ in items])
            con.execute("COMMIT")
        except Exception as exc:
            _rollback(con)
            if len(items) == 1:
                log.error("store write failed for %s: %s", items[0][0].kind, exc)
                metrics.WRITE_ERRORS.inc()
                items[0][1].set_exception(exc)
                return
            # One bad event must not take the others down: write them one by one.
            for item in items:
                self._write_events([item])
            return
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(items))
        for (ev, fut), err in zip(items, errors, strict=True):
            if err is None:
                metrics.EVENTS_WRITTEN.labels(ev.kind).inc()
                fut.set_result(None)
            else:
                fut.set_exception(err)

    def _apply(self, con: duckdb.DuckDBPyConnection, events: list[Event]) -> list[Exception | None]:
        errors: list[Exception | None] = [None] * len(events)
        completions = [_completion_row(e) for e in events if isinstance(e, CompletionEvent)]
        if completions:
            con.executemany(_INSERT_COMPLETION, completions)

        followups = []
        for ev in events:
            if isinstance(ev, FollowupEvent):
                parent = _resolve_reply(con, ev)
                if parent is not None:
                    completion_id, matched_by = parent
                    followups.append([
                        new_id("fu"), completion_id, ev.next_completion_id, ev.created_at,
                        ev.text, matched_by,
                    ])
                else:
                    metrics.FOLLOWUPS_UNMATCHED.inc()
        if followups:
            con.executemany(_INSERT_FOLLOWUP, followups)

        feedback = [(i, e) for i, e in enumerate(events) if isinstance(e, FeedbackEvent)]
        if feedback:
            wanted = sorted({e.completion_id for _, e in feedback})
            known = {
                row[0]
                for row in con.execute(
                    "SELECT id FROM completions WHERE id IN (SELECT unnest(?::VARCHAR[]))", [wanted]
                ).fetchall()
            }
            rows = []
            for i, ev in feedback:
                if ev.completion_id not in known:
                    errors[i] = UnknownCompletion(ev.completion_id)
                    continue
                rows.append([ev.event_id, ev.completion_id, ev.created_at, ev.type, ev.score,
                             ev.text, _json(ev.metadata)])
            if rows:
                con.executemany(_INSERT_FEEDBACK, rows)
        return errors


def _resolve_reply(con: duckdb.DuckDBPyConnection, ev: FollowupEvent) -> tuple[str, str] | None:
    """The completion a follow-up answers: same conversation first, else same reply text."""
    for column, matched_by in (("context_hash", "context"), ("reply_hash", "reply")):
        value = ev.context_hash if column == "context_hash" else ev.reply_hash
        row = con.execute(
            f"SELECT id FROM completions WHERE {column} = ? AND status = 'ok' "
            "ORDER BY created_at DESC LIMIT 1",
            [value],
        ).fetchone()
        if row:
            return row[0], matched_by
    return None


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # no transaction was open
        con.execute("ROLLBACK")
