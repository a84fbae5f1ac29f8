"""The Kafka sink: the gateway's events onto the events topic, acknowledged by the broker.

Events are keyed by conversation, so a completion and the follow-ups and feedback after it
land on one partition, in order, and one ingester applies them in that order. The producer is
idempotent with acks=all: a retried send after a lost acknowledgement is not written twice,
and a future resolves only once every in-sync replica has the event — a 2xx on feedback means
the broker has it. While the broker is away the producer keeps what it was given and retries
it (`kafka.delivery_timeout_s`); the sink counts what is unacknowledged and refuses more past
`kafka.buffer_max` events or `kafka.buffer_max_bytes` bytes (the gateway answers 503), so memory
is bounded and nothing is dropped silently: an event the producer finally gives up on is counted
and logged. (kafka-python 3 has no `buffer_memory`: its accumulator holds whatever it is given,
so the bound in bytes is the sink's.)

With `feedback.redact`, events are redacted before they are produced, on an encoder thread of
the sink's own that takes them in the order they were submitted (`feedback.redaction`): no
unredacted event reaches the topic, and the event loop pays neither the redaction nor the
serialization.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import (
    InvalidProducerEpochError,
    KafkaError,
    OutOfOrderSequenceNumberError,
    TopicAlreadyExistsError,
    UnknownProducerIdError,
)

from feedback import metrics
from feedback.config import KafkaConfig
from feedback.events import (
    CompletionEvent,
    Event,
    FeedbackEvent,
    FollowupEvent,
    ToolResultEvent,
)
from feedback.redaction import redact_event
from feedback.sinks import SinkFull, approx_bytes

log = logging.getLogger(__name__)

# Completion id → conversation key of the completions this process produced, so feedback on
# them joins their partition. Feedback on a completion another replica served goes out under
# the completion id; the ingester parks it until the completion arrives.
_KNOWN_COMPLETIONS = 100_000


def client_options(kafka: KafkaConfig) -> dict[str, Any]:
    """Connection settings shared by producers, consumers and the admin client."""
    opts: dict[str, Any] = {
        "bootstrap_servers": [s.strip() for s in kafka.bootstrap_servers.split(",") if s.strip()],
        "client_id": kafka.client_id,
        "security_protocol": kafka.security_protocol,
    }
    if kafka.sasl_mechanism:
        opts.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                    sasl_plain_password=kafka.sasl_password)
    if kafka.ssl_cafile:
        opts["ssl_cafile"] = kafka.ssl_cafile
    return opts


def ensure_topics(kafka: KafkaConfig) -> None:
    """Create the events and control topics if they are missing (`kafka.create_topics`).

    The control topic has one partition: replicas must apply version commands in one order.
    """
    if not kafka.create_topics:
        return
    admin = KafkaAdminClient(**client_options(kafka), request_timeout_ms=30_000)
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(kafka.events_topic, kafka.partitions, kafka.replication_factor),
            NewTopic(kafka.control_topic, 1, kafka.replication_factor),
        ]
        missing = [t for t in wanted if t.name not in existing]
        if missing:
            try:
                admin.create_topics(missing)
                log.info("created topics %s", ", ".join(t.name for t in missing))
            except TopicAlreadyExistsError:
                pass  # another process created them first
    finally:
        admin.close()


def new_producer(kafka: KafkaConfig) -> KafkaProducer:
    """An idempotent, acks=all producer. `max_block_ms` is short: `send` runs on the gateway's
    event loop and must not stall it when the broker's metadata cannot be had."""
    return KafkaProducer(
        **client_options(kafka),
        acks="all",
        enable_idempotence=True,
        linger_ms=kafka.linger_ms,
        batch_size=256 * 1024,
        max_in_flight_requests_per_connection=5,
        delivery_timeout_ms=int(kafka.delivery_timeout_s * 1000),
        request_timeout_ms=min(30_000, int(kafka.delivery_timeout_s * 1000)),
        max_block_ms=2_000,
    )


@dataclass
class _Outgoing:
    event: Event
    key: bytes
    value: bytes
    future: Future[None]
    submitted: float
    size: int = 0  # what it counts against `kafka.buffer_max_bytes`


def _recoverable(exc: BaseException) -> bool:
    if isinstance(exc, UnknownProducerIdError | OutOfOrderSequenceNumberError |
                  InvalidProducerEpochError):
        return True
    return bool(getattr(exc, "retriable", False)) or "InitProducerId" in str(exc)


def _discard(producer: KafkaProducer) -> None:
    """Close a producer whose batches were aborted (they are being resent elsewhere).
    `close` flushes first and gives up on a broken producer without stopping its I/O thread,
    so that thread is stopped directly."""
    try:
        producer.close(1)
    except KafkaError:
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()


class KafkaSink:
    """Implements `feedback.Sink` on the events topic."""

    name = "Kafka broker"
    stores = False  # the ingester stores what the broker acknowledged

    def __init__(self, kafka: KafkaConfig, redact: bool = False) -> None:
        self.kafka = kafka
        self.ack_timeout_s = kafka.ack_timeout_s
        self.topic = kafka.events_topic
        self.buffer_max = kafka.buffer_max
        self.buffer_max_bytes = kafka.buffer_max_bytes
        self.redact = redact
        self.failure: str | None = None  # the broker's troubles show in `buffer_max` instead
        self._producer: KafkaProducer | None = None
        self._pending = 0
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._generation = 0
        self._closed = False
        self._rebuild = threading.Lock()
        self._resend: queue.Queue[tuple[_Outgoing, int] | None] = queue.Queue()
        self._resender = threading.Thread(target=self._resend_loop, name="sdloop-kafka-resend",
                                          daemon=True)
        # With `redact`: events waiting to be redacted, serialized and produced, in order.
        self._encode: queue.SimpleQueue[tuple[Event, Future[None], int, float] | None] = \
            queue.SimpleQueue()
        self._encoder = threading.Thread(target=self._encode_loop, name="sdloop-kafka-encode",
                                         daemon=True)

    def open(self) -> KafkaSink:
        ensure_topics(self.kafka)
        self._producer = new_producer(self.kafka)
        self._resender.start()
        if self.redact:
            self._encoder.start()
        # Fetch the topic's metadata now, so that no send on the request path waits for it.
        self._producer.partitions_for(self.topic)
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Deliver what was accepted (up to `timeout`), then disconnect."""
        self._closed = True
        if self._encoder.is_alive():  # hand over what was submitted before flushing
            self._encode.put(None)
            self._encoder.join(timeout)
        if self._producer is not None:
            try:
                self._producer.flush(timeout)
            except KafkaError as exc:
                log.error("events still unacknowledged at shutdown: %s", exc)
            with self._rebuild:
                try:
                    self._producer.close(timeout)
                except KafkaError:  # kafka-python 3 flushes in close(): the broker is away
                    _discard(self._producer)
                self._producer = None
            self._resend.put(None)

    @property
    def alive(self) -> bool:
        return self._producer is not None

    def has_capacity(self) -> bool:
        return (self._pending < self.buffer_max * 0.9
                and self._pending_bytes < self.buffer_max_bytes * 0.9)

    def submit(self, event: Event, request_bytes: int | None = None) -> Future[None]:
        if self._closed or self._producer is None and not self._resender.is_alive():
            raise SinkFull("the event bus producer is closed")
        # Redacted and serialized on the encoder thread: counted by estimate until then.
        value = None if self.redact else event.to_json()
        size = approx_bytes(event, request_bytes) if value is None else len(value)
        with self._lock:
            if self._pending >= self.buffer_max:
                raise SinkFull(f"{self._pending} events are waiting for the Kafka broker's "
                               "acknowledgement (kafka.buffer_max); is the broker reachable?")
            # An event larger than the bound on its own is still taken when nothing waits.
            if self._pending_bytes and self._pending_bytes + size > self.buffer_max_bytes:
                raise SinkFull(f"{self._pending_bytes >> 20} MiB of events are waiting for the "
                               "Kafka broker's acknowledgement (kafka.buffer_max_bytes); is the "
                               "broker reachable?")
            self._pending += 1
            self._pending_bytes += size
        fut: Future[None] = Future()
        if value is None:
            self._encode.put((event, fut, size, time.monotonic()))
            metrics.BUS_PENDING.set(self._pending)
            return fut
        item = _Outgoing(event, self._key(event).encode(), value, fut, time.monotonic(), size)
        try:
            self._send(item)
        except KafkaError as exc:  # no metadata within max_block_ms, or the buffer is full
            self._settle(item, exc)
            raise SinkFull(f"the Kafka broker cannot take events now: {exc}") from None
        metrics.BUS_PENDING.set(self._pending)
        return fut

    def _send(self, item: _Outgoing) -> None:
        producer, generation = self._producer, self._generation
        if producer is None:  # being replaced: the new one is there once the rebuild is done
            with self._rebuild:
                producer, generation = self._producer, self._generation
        if producer is None:
            raise KafkaError("the event bus producer is closed")
        sent = producer.send(self.topic, key=item.key, value=item.value)
        sent.add_callback(lambda _meta: self._settle(item, None))
        sent.add_errback(lambda exc: self._failed(item, generation, exc))

    def _failed(self, item: _Outgoing, generation: int, exc: BaseException) -> None:
        """A broker that lost the producer's state (restarted without it, or fenced it) makes
        the idempotent producer unusable: a new producer sends the event again. The ingester
        stores it once, whichever copy arrives."""
        age = time.monotonic() - item.submitted
        if not self._closed and _recoverable(exc) and age < self.kafka.delivery_timeout_s:
            self._resend.put((item, generation))
            return
        self._settle(item, exc)

    def _encode_loop(self) -> None:
        """With `redact`: each event redacted, serialized and produced, in submission order; a
        send that fails here fails the event's future (the gateway's 503 for feedback)."""
        while True:
            entry = self._encode.get()
            if entry is None:
                return
            event, fut, size, submitted = entry
            item = _Outgoing(event, b"", b"", fut, submitted, size)
            try:
                item.event = redact_event(event)
                item.key, item.value = self._key(item.event).encode(), item.event.to_json()
                self._send(item)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any one event
                self._settle(item, exc)

    def _resend_loop(self) -> None:
        while True:
            entry = self._resend.get()
            if entry is None:
                return
            item, generation = entry
            try:
                self._resend_one(item, generation)
            except Exception as exc:  # noqa: BLE001 - this thread must outlive any one event
                log.exception("resending %s %s failed", item.event.kind, item.event.event_id)
                self._settle(item, exc)

    def _resend_one(self, item: _Outgoing, generation: int) -> None:
        with self._rebuild:
            if self._closed or self._producer is None:
                self._settle(item, KafkaError("the sink was closed"))
                return
            if generation == self._generation:  # the first failure of this producer
                log.warning("the Kafka producer lost its broker state; starting a new one")
                old, self._producer = self._producer, None
                _discard(old)
                self._producer = new_producer(self.kafka)
                self._generation += 1
        try:
            self._send(item)
        except KafkaError as exc:
            time.sleep(1)
            self._failed(item, -1, exc)

    def _settle(self, item: _Outgoing, exc: BaseException | None) -> None:
        with self._lock:
            self._pending -= 1
            self._pending_bytes -= item.size
        metrics.BUS_PENDING.set(self._pending)
        event, fut = item.event, item.future
        if exc is None:
            metrics.BUS_ACKED.labels(event.kind).inc()
            if not fut.done():
                fut.set_result(None)
            return
        metrics.BUS_FAILED.labels(event.kind).inc()
        log.error("the broker did not take %s %s: %s", event.kind, event.event_id, exc)
        if not fut.done():
            fut.set_exception(SinkFull(f"the Kafka broker did not take the event ({exc}); "
                                       "it was not acknowledged"))

    def _key(self, event: Event) -> str:
        """The conversation an event belongs to: its partition key."""
        if isinstance(event, CompletionEvent):
            key = event.session_id or event.completion_id
            self._sessions[event.completion_id] = key
            if len(self._sessions) > _KNOWN_COMPLETIONS:
                self._sessions.popitem(last=False)
            return key
        if isinstance(event, FollowupEvent | ToolResultEvent):
            return event.session_id or event.next_completion_id
        if isinstance(event, FeedbackEvent):
            return self._sessions.get(event.completion_id, event.completion_id)
        return event.event_id
