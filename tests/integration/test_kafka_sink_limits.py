"""The Kafka sink against a real Kafka-protocol broker (tansu, no engine needed): with
`feedback.redact` it produces redacted events, in order; its backlog is bounded in bytes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer

from feedback import FeedbackEvent, SinkFull, new_id, utcnow
from feedback.kafka import KafkaSink
from ops.bench.broker import Broker
from serving.config import load_config
from tests.harness.factories import completion


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "tansu.log").start()
    yield b
    b.stop()


def _config(broker: Broker, **extra: str):
    return load_config(env={"SDLOOP_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
                            "SDLOOP_KAFKA__EVENTS_TOPIC": f"events-{uuid.uuid4().hex[:8]}",
                            "SDLOOP_KAFKA__PARTITIONS": "2", **extra})


def test_a_redacting_sink_produces_only_redacted_events_in_order(broker: Broker):
    cfg = _config(broker)
    sink = KafkaSink(cfg.kafka, redact=True).open()
    question = [{"role": "user", "content": "I am ann@example.com, call +1 415 555 0100."}]
    event = completion("chatcmpl-1", question, session_id="s1", params={"user": "ann@example.com"})
    sent = [event] + [FeedbackEvent(event_id=new_id("fb"), completion_id="chatcmpl-1",
                                    created_at=utcnow(), type="critique",
                                    text=f"{i}: write to ann@example.com") for i in range(20)]
    try:
        for fut in [sink.submit(ev) for ev in sent]:
            fut.result(30)
        assert event.messages == question  # the caller's event is left as it was
    finally:
        sink.close(10)
    consumer = KafkaConsumer(cfg.kafka.events_topic, bootstrap_servers=broker.bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    values = [m.value for m in consumer]
    consumer.close()
    assert len(values) == len(sent)
    assert not [v for v in values if b"ann@example.com" in v or b"555 0100" in v]
    first = json.loads(values[0])
    assert first["messages"][0]["content"] == "I am [EMAIL], call [PHONE]."
    assert first["prompt_token_ids"] is None and first["params"] == {"user": "[EMAIL]"}
    # One conversation, one partition, in the order submitted: the completion, then feedback.
    assert [json.loads(v).get("text", "").split(":")[0] for v in values[1:]] == \
        [str(i) for i in range(20)]


def test_the_backlog_is_bounded_in_bytes_while_the_broker_is_away(broker: Broker):
    cfg = _config(broker, SDLOOP_KAFKA__BUFFER_MAX_BYTES=str(1024 * 1024),
                  SDLOOP_KAFKA__DELIVERY_TIMEOUT_S="60")
    sink = KafkaSink(cfg.kafka).open()
    broker.stop()  # nothing is acknowledged from now on
    big = [{"role": "user", "content": "x" * (200 * 1024)}]
    try:
        accepted = 0
        with pytest.raises(SinkFull, match="kafka.buffer_max_bytes"):
            for i in range(20):  # 20 x 200 KiB: refused past 1 MiB, long before buffer_max
                sink.submit(completion(f"chatcmpl-{i}", big))
                accepted += 1
        assert 4 <= accepted <= 6 and not sink.has_capacity()
    finally:
        started = time.monotonic()
        sink.close(2)
        assert time.monotonic() - started < 30
