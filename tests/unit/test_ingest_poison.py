"""Whatever a producer writes to the events topic, the ingester keeps the record it cannot store
in `dead_letters` and goes on: a record it stopped on would stop it again on every restart,
and the partition's offset could never move past it."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import pytest

import feedback.events
from feedback.config import KafkaConfig
from store import StoreWriter
from store.ingest import DeadLetter, Ingester
from tests.harness.factories import completion

TOPIC = "events-test"


class Record(NamedTuple):
    """The fields of a kafka ConsumerRecord the ingester reads."""

    offset: int
    value: bytes | None
    key: bytes | None = b"k"
    topic: str = TOPIC
    partition: int = 0


def ingest(writer: StoreWriter, records: list[Record]) -> list[dict[str, Any]]:
    """One batch through the ingester's decode-and-record path; the dead letters it kept."""
    batch = Ingester(KafkaConfig(), writer)._submit(list(records), {})
    assert batch.recorded is not None
    batch.recorded.result(30)
    cur = writer.cursor()
    rows = cur.execute('SELECT "offset", key, payload, reason_code, reason FROM dead_letters '
                       'ORDER BY "offset"').fetchall()
    return [dict(zip(("offset", "key", "payload", "code", "reason"), r, strict=True)) for r in rows]


def overflowing() -> bytes:
    data = json.loads(completion("chatcmpl-overflow").to_json())
    data["created_at"] = "0001-01-01T00:00:00+14:00"
    return json.dumps(data).encode()


def test_a_null_and_an_overflowing_record_are_dead_lettered_and_the_rest_stored(writer):
    good = completion("chatcmpl-good")
    dead = ingest(writer, [Record(0, None, key=None), Record(1, overflowing()),
                           Record(2, good.to_json())])
    assert [(d["offset"], d["code"]) for d in dead] == [(0, "empty_value"), (1, "invalid_event")]
    assert dead[0]["key"] is None and dead[0]["payload"] == ""  # a tombstone has neither
    assert "out of range in UTC" in dead[1]["reason"] and "`$.created_at`" in dead[1]["reason"]
    stored = writer.cursor().execute("SELECT id FROM completions").fetchall()
    assert stored == [("chatcmpl-good",)]


def test_anything_decoding_raises_is_dead_lettered_as_undecodable(writer, monkeypatch, caplog):
    real = feedback.events.Event.from_json

    def from_json(text: bytes | None) -> feedback.events.Event:
        if text == b"boom":
            raise RuntimeError("a bug in decoding")
        return real(text)

    monkeypatch.setattr(feedback.events.Event, "from_json", staticmethod(from_json))
    good = completion("chatcmpl-after")
    dead = ingest(writer, [Record(7, b"boom"), Record(8, good.to_json())])
    assert [(d["offset"], d["code"], d["reason"]) for d in dead] == [
        (7, "undecodable", "RuntimeError: a bug in decoding")]
    assert "could not decode events-test:0:7" in caplog.text
    assert writer.cursor().execute("SELECT count(*) FROM completions").fetchone() == (1,)


@pytest.mark.parametrize("value", [None, b"", b"\xff\xfe", b"null", b"{}"])
def test_a_dead_letter_row_copes_with_any_value_and_no_key(value: bytes | None):
    row = DeadLetter(Record(3, value, key=None), "empty_value", "why").row()
    assert row[0] == f"{TOPIC}:0:3" and row[5] is None and isinstance(row[6], str)


@pytest.mark.parametrize("refusal", ["RebalanceInProgressError", "IllegalGenerationError",
                                     "UnknownMemberIdError", "CommitFailedError"])
def test_an_offset_commit_refused_by_a_rebalancing_group_does_not_stop_the_ingester(
        writer, refusal):
    """After a broker restart the group rebalances and may refuse the commit of a batch already
    stored: it is redelivered (and written nothing twice), never a reason to exit."""
    import kafka.errors

    class Consumer:
        def commit(self, offsets: Any) -> None:
            raise getattr(kafka.errors, refusal)()

    ingester = Ingester(KafkaConfig(), writer)
    ingester._consumer = Consumer()  # type: ignore[assignment]
    ingester._in_flight = ingester._submit([Record(0, completion("chatcmpl-x").to_json())], {})
    ingester.drain()
    assert ingester.batches == 1
    assert writer.cursor().execute("SELECT id FROM completions").fetchall() == [("chatcmpl-x",)]
