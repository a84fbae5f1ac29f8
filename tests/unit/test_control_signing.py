"""Control-topic commands change the served version on every replica, so a replica applies
only those signed with the shared secret (HMAC-SHA256 over the record value, in the
`sdloop-signature` header), for its own control topic, each command id once; whatever else
is on the topic is refused, counted and reported, and the next command is applied."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

import serving.versions.control
from feedback import ReplicaVersionEvent
from feedback.config import KafkaConfig
from serving.commands import main
from serving.config import ConfigError, load_config
from serving.versions.control import (
    SIGNATURE_HEADER,
    CommandGate,
    ControlFollower,
    ControlPublisher,
    RefusedCommand,
    control_secret,
    sign_command,
)
from tests.harness.control import SECRET, TOPIC, command, signed
from tests.harness.replica_fakes import (
    ControlRecord,
    ListSink,
    ReadyEngine,
    RecordingRegistry,
    hmac_sha256,
)


def refusal(gate: CommandGate, value: bytes | None, headers: Any) -> RefusedCommand:
    with pytest.raises(RefusedCommand) as err:
        gate.admit(value, headers)
    return err.value


def refused_count(reason: str) -> float:
    return REGISTRY.get_sample_value("sdloop_control_commands_refused_total",
                                     {"reason": reason}) or 0.0


def test_the_signature_is_hmac_sha256_of_the_exact_record_value():
    value = command()
    assert sign_command(SECRET, value) == hmac_sha256(SECRET, value)
    assert sign_command(SECRET, value + b" ") != sign_command(SECRET, value)


def test_a_command_signed_with_the_shared_secret_is_admitted():
    value = command(version="default@v3")
    admitted = CommandGate(SECRET, TOPIC).admit(value, [("other", b"x"), *signed(value)])
    assert admitted["action"] == "promote" and admitted["version"] == "default@v3"


@pytest.mark.parametrize("headers", [[], None, [("sdloop-signature-v2", b"x")]],
                         ids=["no-headers", "headers-none", "other-header"])
def test_a_command_without_a_signature_is_refused_as_unsigned(headers: Any):
    assert refusal(CommandGate(SECRET, TOPIC), command(), headers).reason == "unsigned"


def test_a_command_signed_with_another_secret_is_refused():
    value = command()
    err = refusal(CommandGate(SECRET, TOPIC), value, signed(value, b"another-secret-entirely"))
    assert err.reason == "bad_signature"


def test_a_command_changed_after_it_was_signed_is_refused():
    value = command(version="default@v2")
    tampered = value.replace(b"default@v2", b"default@v1")
    err = refusal(CommandGate(SECRET, TOPIC), tampered, signed(value))
    assert err.reason == "bad_signature"


@pytest.mark.parametrize("signature", [None, b"", b"hmac-sha256=", "not bytes"])
def test_an_empty_or_mangled_signature_is_refused(signature: Any):
    err = refusal(CommandGate(SECRET, TOPIC), command(), [(SIGNATURE_HEADER, signature)])
    assert err.reason == "bad_signature"


def test_two_signature_headers_are_refused_even_if_one_is_right():
    value = command()
    err = refusal(CommandGate(SECRET, TOPIC), value, [*signed(value), *signed(value, b"x" * 20)])
    assert err.reason == "bad_signature"


def test_a_replayed_command_id_is_refused_though_its_signature_is_valid():
    gate = CommandGate(SECRET, TOPIC)
    value = command(action="rollback", alias="default")
    gate.admit(value, signed(value))
    err = refusal(gate, value, signed(value))
    assert err.reason == "replayed" and "applied already" in str(err)
    fresh = command(action="rollback", alias="default")  # a new id: a new command
    assert gate.admit(fresh, signed(fresh))["action"] == "rollback"


def test_a_command_signed_for_another_control_topic_is_refused():
    value = command(topic="control-of-another-deployment")
    err = refusal(CommandGate(SECRET, TOPIC), value, signed(value))
    assert err.reason == "wrong_topic" and "control-of-another-deployment" in str(err)
    unnamed = json.dumps({"id": "ctl-1", "action": "rollback"}).encode()
    assert refusal(CommandGate(SECRET, TOPIC), unnamed, signed(unnamed)).reason == "wrong_topic"


@pytest.mark.parametrize(("value", "says"), [
    (None, "not a JSON document"),
    (b"", "not a JSON document"),
    (b"\xff\xfe{", "not a JSON document"),
    (b"[" * 100_000 + b"]" * 100_000, "not a JSON document"),
    (b'["promote"]', "expected a JSON object, got list"),
    (b'{"id": "ctl-1", "action": "delete", "topic": "control-test"}', "unknown action 'delete'"),
    (b'{"id": "ctl-1", "action": ["promote"]}', "unknown action"),
    (b'{"action": "rollback", "topic": "control-test"}', "`id` must be a non-empty str"),
    (b'{"id": "", "action": "rollback"}', "`id` must be a non-empty str"),
    (b'{"id": "ctl-1", "action": "publish", "topic": "control-test"}', "`path` must be"),
    (b'{"id": "ctl-1", "action": "promote", "version": 2}', "`version` must be a non-empty str"),
    (b'{"id": "ctl-1", "action": "publish", "path": "/a", "promote": "no"}', "`promote` must be a bool"),
    (b'{"id": "ctl-1", "action": "rollback", "alias": ["default"]}', "`alias` must be a str"),
])
def test_a_signed_record_that_is_not_a_well_formed_command_is_refused(value: bytes | None,
                                                                      says: str):
    err = refusal(CommandGate(SECRET, TOPIC), value, signed(value or b""))
    assert err.reason == "malformed" and says in str(err)


# -- the secret: required to start ----------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "   ", "short-secret"])
def test_without_a_long_enough_secret_neither_side_starts(secret: str):
    kafka = KafkaConfig(control_secret=secret)
    with pytest.raises(ConfigError) as err:
        control_secret(kafka)
    assert "kafka.control_secret (SDLOOP_KAFKA__CONTROL_SECRET)" in str(err.value)
    with pytest.raises(ConfigError):  # before it connects to any broker
        ControlPublisher(None, kafka)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ControlFollower(kafka, RecordingRegistry(), ReadyEngine(), ListSink(),  # type: ignore[arg-type]
                        "replica-1")


def test_the_control_secret_is_set_from_the_environment():
    cfg = load_config(env={"SDLOOP_KAFKA__CONTROL_SECRET": "from-the-env-0123456789"})
    assert cfg.kafka.control_secret == "from-the-env-0123456789"
    assert control_secret(cfg.kafka) == b"from-the-env-0123456789"


@pytest.mark.parametrize("argv", [["ingest"], ["serve", "--no-learner"]])
def test_ingest_and_a_kafka_replica_refuse_to_start_without_a_secret(
        argv: list[str], tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SDLOOP_KAFKA__CONTROL_SECRET", raising=False)
    monkeypatch.setenv("SDLOOP_FEEDBACK__SINK", "kafka")
    monkeypatch.setattr("serving.entrypoints.cli.tune_gc", lambda: None)  # not in the test process
    assert main([*argv, "--data-dir", str(tmp_path)]) == 2
    assert "kafka.control_secret (SDLOOP_KAFKA__CONTROL_SECRET) is not set" in capsys.readouterr().err


def test_what_the_publisher_sends_a_replica_admits_once(monkeypatch):
    sent: list[dict[str, Any]] = []

    class Acked:
        def get(self, timeout: float) -> None:
            return None

    class Producer:
        def send(self, topic: str, **kwargs: Any) -> Acked:
            sent.append({"topic": topic, **kwargs})
            return Acked()

    monkeypatch.setattr(serving.versions.control, "new_producer", lambda kafka: Producer())
    kafka = KafkaConfig(control_topic=TOPIC, control_secret=SECRET.decode())
    publisher = ControlPublisher(None, kafka)  # type: ignore[arg-type] - no store needed here
    asyncio.run(publisher._command({"action": "rollback", "alias": "default", "version": "base"}))
    (record,) = sent
    assert record["topic"] == TOPIC
    gate = CommandGate(control_secret(kafka), TOPIC)
    admitted = gate.admit(record["value"], record["headers"])
    assert admitted["action"] == "rollback" and admitted["topic"] == TOPIC
    assert admitted["id"].startswith("ctl-")
    assert refusal(gate, record["value"], record["headers"]).reason == "replayed"


# -- a replica following the topic ----------------------------------------------------------


@pytest.fixture()
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """The gateway's event loop, on which the follower applies commands."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def follower(loop: asyncio.AbstractEventLoop, registry: RecordingRegistry,
             sink: ListSink) -> ControlFollower:
    kafka = KafkaConfig(control_topic=TOPIC, control_secret=SECRET.decode())
    f = ControlFollower(kafka, registry, ReadyEngine(), sink, "replica-1")  # type: ignore[arg-type]
    f._loop = loop  # what start() records, without a thread reading a broker
    return f


def test_a_replica_refuses_forged_records_reports_them_and_applies_the_signed_ones(loop, caplog):
    registry, sink = RecordingRegistry(), ListSink()
    follow = follower(loop, registry, sink)
    good = command(version="default@v7")
    rollback = command(action="rollback", alias="default")
    forged = command(version="default@v6")
    records = [
        ControlRecord(0, forged, []),                                   # unsigned
        ControlRecord(1, forged, signed(forged, b"guessed-secret-123456")),  # another secret
        ControlRecord(2, good, signed(good)),                           # applied
        ControlRecord(3, good, signed(good)),                           # a copy: replayed
        ControlRecord(4, None, []),                                     # a tombstone
        ControlRecord(5, b"{oops", signed(b"{oops")),                   # signed, malformed
        ControlRecord(6, rollback, signed(rollback)),                   # applied
    ]
    before = {r: refused_count(r) for r in ("unsigned", "bad_signature", "replayed", "malformed")}
    for record in records:
        follow._handle(record)
    assert registry.calls == [("promote", "default@v7"), ("rollback", "default")]
    reports = sink.events
    assert all(isinstance(r, ReplicaVersionEvent) and r.replica == "replica-1" for r in reports)
    assert [r.status for r in reports] == ["refused", "refused", "promoted", "refused", "refused",
                                          "refused", "promoted"]
    assert reports[0].action == "promote" and reports[0].version == "default@v6"  # as claimed
    assert "offset 0" in (reports[0].detail or "") and "(unsigned)" in (reports[0].detail or "")
    assert "(replayed)" in (reports[3].detail or "")
    assert reports[4].action == "unknown" and reports[4].version == ""
    after = {r: refused_count(r) - before[r] for r in before}
    assert after == {"unsigned": 2, "bad_signature": 1, "replayed": 1, "malformed": 1}
    assert "refused the record at offset 1 (bad_signature)" in caplog.text


def test_a_command_that_fails_unexpectedly_is_reported_and_the_next_is_applied(loop):
    registry, sink = RecordingRegistry(fail_on="default@v8"), ListSink()
    follow = follower(loop, registry, sink)
    broken, after = command(version="default@v8"), command(version="default@v9")
    follow._handle(ControlRecord(0, broken, signed(broken)))
    follow._handle(ControlRecord(1, after, signed(after)))
    assert [(r.version, r.status) for r in sink.events] == [("default@v8", "failed"),
                                                            ("default@v9", "promoted")]
    assert "KeyError" in (sink.events[0].detail or "")
    assert registry.calls == [("promote", "default@v9")]
