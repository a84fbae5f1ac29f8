"""The Kafka ingester (`sdloop ingest`): the events topic into the store, at least once, no
duplicates.

One batch is: poll → decode and check every message → write the events through the store's
single writer (group commits) → record what could not be stored in `dead_letters` → commit the
batch's offsets. The next batch is polled and decoded while the writer commits the previous.
Offsets are committed only after the store committed, so a crash anywhere redelivers the
batch; every row is keyed by its event id, so redelivery writes nothing twice.

A message that is not an event (no value, not JSON, unknown kind, a field of the wrong type or
out of range) is kept in `dead_letters` with the reason and ingestion goes on: one bad producer
must not stop the partition. Whatever else decoding one message raises is kept there too
(`undecodable`): a message the ingester stopped on would stop it again on every restart.
Feedback naming a completion that is not stored yet — it was produced by another replica and
travelled on another partition — is parked there too and stored as soon as the completion
arrives. A store that cannot write at all stops the ingester instead (nothing is
committed; the supervisor restarts it and the batch is redelivered).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import duckdb
from kafka import KafkaConsumer
from kafka.errors import (
    CommitFailedError,
    IllegalGenerationError,
    KafkaError,
    RebalanceInProgressError,
    UnknownMemberIdError,
)
from kafka.structs import OffsetAndMetadata

from feedback.config import KafkaConfig
from feedback.events import CompletionEvent, Event, FeedbackEvent, InvalidEvent, utcnow
from feedback.kafka import client_options
from feedback.sinks import UnknownCompletion
from feedback.tool_calls import InvalidToolCall
from store import dead_letters, metrics
from store.writer import StoreWriter, apply_events

log = logging.getLogger(__name__)

LAG_INTERVAL_S = 5.0
# An offset commit the group refused because it is (or was) rebalancing — after a broker
# restart, say: the batch is stored, so it is redelivered to whoever owns the partition now
# and written nothing twice. Not a reason to stop ingesting.
_REBALANCED = (CommitFailedError, RebalanceInProgressError, IllegalGenerationError,
               UnknownMemberIdError)
# Data errors: this event can never be written, whatever is retried. Anything else (I/O, a
# closed store) is the store's problem and stops the ingester before offsets move.
_EVENT_ERRORS = (duckdb.ConversionException, duckdb.ConstraintException,
                 duckdb.InvalidInputException, duckdb.OutOfRangeException,
                 duckdb.TypeMismatchException)


@dataclass
class _Batch:
    size: int
    started: float
    offsets: dict[Any, OffsetAndMetadata]  # TopicPartition ->
    events: list[tuple[Any, Event]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    recorded: Future[None] | None = None


@dataclass
class DeadLetter:
    message: Any  # a kafka ConsumerRecord
    code: str
    reason: str
    event_id: str | None = None
    completion_id: str | None = None

    @property
    def id(self) -> str:
        m = self.message
        return f"{m.topic}:{m.partition}:{m.offset}"

    def row(self) -> list[Any]:
        m = self.message
        return [self.id, utcnow(), m.topic, m.partition, m.offset,
                _text(m.key), _text(m.value) or "", self.code, self.reason, self.event_id,
                self.completion_id]


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


class Ingester:
    def __init__(self, kafka: KafkaConfig, writer: StoreWriter) -> None:
        self.kafka = kafka
        self.writer = writer
        self._consumer: KafkaConsumer | None = None
        self._lag_checked = 0.0
        self._in_flight: _Batch | None = None
        self.batches = 0  # committed ones, for /readyz

    def open(self) -> Ingester:
        session_ms = int(self.kafka.session_timeout_s * 1000)
        self._consumer = KafkaConsumer(
            self.kafka.events_topic,
            **client_options(self.kafka),
            group_id=self.kafka.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.kafka.max_poll_records,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(session_ms // 3, 100),
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=8 * 1024 * 1024,
            fetch_min_bytes=1024 * 1024,  # fewer, larger fetches under load
            fetch_max_wait_ms=100,
        )
        return self

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()  # leaves the group: the others take its partitions at once
            self._consumer = None

    def run(self, stop: threading.Event) -> None:
        """Ingest until `stop` is set; the batches in hand are finished first."""
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.drain()

    def step(self, timeout_ms: int = 500) -> int:
        """Poll and hand one batch to the store; returns how many messages it had.

        Two batches overlap: the next is polled and decoded while the writer commits this one,
        whose offsets are committed once its rows and dead letters are.
        """
        assert self._consumer is not None
        polled = self._consumer.poll(timeout_ms=timeout_ms)
        messages = [m for records in polled.values() for m in records]
        batch = self._submit(messages, {tp: OffsetAndMetadata(records[-1].offset + 1, "", -1)
                                        for tp, records in polled.items() if records}) \
            if messages else None
        self.drain()
        self._in_flight = batch
        if time.monotonic() - self._lag_checked > LAG_INTERVAL_S:
            self._report_lag()
        return len(messages)

    def drain(self) -> None:
        """Finish the batch in flight: wait for its rows and dead letters, commit its offsets."""
        batch, self._in_flight = self._in_flight, None
        if batch is None:
            return
        assert batch.recorded is not None and self._consumer is not None
        batch.recorded.result()
        try:
            self._consumer.commit(batch.offsets)
        except _REBALANCED as exc:  # rebalanced meanwhile: redelivered, written once
            log.warning("offsets not committed (%s); the batch will be redelivered", exc)
        metrics.INGEST_BATCH_SECONDS.observe(time.perf_counter() - batch.started)
        metrics.INGEST_BATCH_SIZE.observe(batch.size)
        self.batches += 1

    def _submit(self, messages: list[Any], offsets: dict[Any, OffsetAndMetadata]) -> _Batch:
        batch = _Batch(len(messages), time.perf_counter(), offsets)
        for m in messages:
            try:
                batch.events.append((m, Event.from_json(m.value)))
            except InvalidEvent as exc:
                batch.dead.append(DeadLetter(m, exc.code, str(exc)))
            except Exception as exc:  # noqa: BLE001 - a decoding bug must not stop the partition
                # `from_json` should have said InvalidEvent; whatever else one record raises,
                # it is kept rather than retried for ever (the offset could never move past it).
                log.error("could not decode %s:%s:%s", m.topic, m.partition, m.offset,
                          exc_info=True)
                batch.dead.append(DeadLetter(m, "undecodable", f"{type(exc).__name__}: {exc}"))
        stored = self.writer.submit_batch([ev for _, ev in batch.events])
        # Queued right behind the rows, so the writer runs it as soon as they are committed
        # (`stored` has resolved by then), without waiting for this thread.
        batch.recorded = self.writer.call(lambda con: self._record(con, batch, stored.result()))
        return batch

    def _record(self, con: duckdb.DuckDBPyConnection, batch: _Batch,
                errors: list[Exception | None]) -> None:
        """On the writer: the batch's dead letters, and the parked feedback its completions
        free, in one transaction."""
        dead = batch.dead
        arrived: list[str] = []
        ingested: Counter[str] = Counter()
        for (m, ev), exc in zip(batch.events, errors, strict=True):
            if exc is None:
                ingested[ev.kind] += 1
                if isinstance(ev, CompletionEvent):
                    arrived.append(ev.completion_id)
            elif isinstance(exc, UnknownCompletion):
                assert isinstance(ev, FeedbackEvent)
                dead.append(DeadLetter(m, "unknown_completion", f"parked: {exc}", ev.event_id,
                                       ev.completion_id))
            elif isinstance(exc, InvalidToolCall):
                dead.append(DeadLetter(m, "invalid_tool_call", str(exc), ev.event_id,
                                       getattr(ev, "completion_id", None)))
            elif isinstance(exc, _EVENT_ERRORS):
                dead.append(DeadLetter(m, "write_failed", f"{type(exc).__name__}: {exc}",
                                       ev.event_id))
            else:  # the store cannot write: stop before any offset moves
                raise exc
        for kind, n in ingested.items():
            metrics.INGESTED.labels(kind).inc(n)
        if dead:
            dead_letters.record(con, [d.row() for d in dead])
            for d in dead:
                metrics.DEAD_LETTERS.labels(d.code).inc()
                if d.code != "unknown_completion":
                    log.warning("dead letter %s: %s", d.id, d.reason)
        ready = dead_letters.parked_for(con, arrived)
        if not ready:
            return
        events = [Event.from_json(payload) for _, payload in ready]
        # A redelivered copy of a parked feedback may have been stored meanwhile.
        replayed = apply_events(con, events, skip_duplicates=True).errors
        stored = [row_id for (row_id, _), err in zip(ready, replayed, strict=True) if err is None]
        dead_letters.remove(con, stored)
        refused = [(row_id, str(err)) for (row_id, _), err in zip(ready, replayed, strict=True)
                   if isinstance(err, InvalidToolCall)]
        if refused:
            dead_letters.refuse(con, refused)
            metrics.DEAD_LETTERS.labels("invalid_tool_call").inc(len(refused))
        metrics.UNPARKED.inc(len(stored))

    def _report_lag(self) -> None:
        self._lag_checked = time.monotonic()
        try:
            for partition, lag in self.lag().items():
                metrics.LAG.labels(str(partition)).set(lag)
        except KafkaError as exc:
            log.warning("could not measure the consumer lag: %s", exc)

    def lag(self) -> dict[int, int]:
        """Messages not committed yet, per assigned partition: the partition's high-water mark
        from the last fetch (a ListOffsets request where none was fetched yet) minus the
        group's committed offset."""
        assert self._consumer is not None
        assigned = list(self._consumer.assignment())
        missing = [tp for tp in assigned if self._consumer.highwater(tp) is None]
        ends = self._consumer.end_offsets(missing) if missing else {}
        return {tp.partition: max((self._consumer.highwater(tp) or ends.get(tp, 0))
                                  - (self._consumer.committed(tp) or 0), 0)
                for tp in assigned}
