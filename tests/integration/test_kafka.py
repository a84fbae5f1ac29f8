"""The scale-out path against a real Kafka-protocol broker (tansu): gateway replicas produce
events, `sdloop ingest` writes the store, adapter versions reach every replica.

Replicas attach to the session's vLLM engine (`engine.url`) unless a test needs an engine of
their own; each test gets its own topics and consumer group on the shared broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from prometheus_client import REGISTRY

from feedback.events import FeedbackEvent, ReplicaVersionEvent, new_id, utcnow
from feedback.kafka import KafkaSink
from ops.bench.broker import Broker
from serving.config import load_config
from serving.versions.control import SIGNATURE_HEADER, ControlFollower, ControlPublisher
from store import StoreWriter
from tests.harness.factories import completion
from tests.harness.replica_fakes import ListSink, ReadyEngine, RecordingRegistry, hmac_sha256
from tests.harness.server import (
    MODEL_CACHE,
    QUESSANY,
    SDLOOP,
    Server,
    copy_version,
    start_server,
    stop_server,
    wait_ready,
)

QUESTION = [{"role": "user", "content": "What is the capital of Veloria?"}]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Broker:
    b = Broker(tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    yield b
    b.stop()


CONTROL_SECRET = "test-control-secret-0123456789"


def bus_env(broker: Broker) -> dict[str, str]:
    """Topics and a consumer group of the test's own; short timeouts so failures show fast;
    the control-topic signing secret the ingester and every replica need to start."""
    tag = uuid.uuid4().hex[:8]
    return {
        "SDLOOP_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "SDLOOP_KAFKA__CONTROL_SECRET": CONTROL_SECRET,
        "SDLOOP_KAFKA__EVENTS_TOPIC": f"events-{tag}",
        "SDLOOP_KAFKA__CONTROL_TOPIC": f"control-{tag}",
        "SDLOOP_KAFKA__GROUP_ID": f"ingest-{tag}",
        "SDLOOP_KAFKA__PARTITIONS": "4",
        "SDLOOP_KAFKA__SESSION_TIMEOUT_S": "6",
        "SDLOOP_KAFKA__ACK_TIMEOUT_S": "3",
    }


def start_ingest(data_dir: Path, env: dict[str, str]) -> Server:
    return start_server(data_dir, env=env, command="ingest")


def start_replica(data_dir: Path, env: dict[str, str], engine_url: str | None,
                  wait: bool = True) -> Server:
    extra = {"SDLOOP_FEEDBACK__SINK": "kafka", "SDLOOP_SERVER__REPLICA_ID": data_dir.name, **env}
    if engine_url:
        extra["SDLOOP_ENGINE__URL"] = engine_url
    return start_server(data_dir, env=extra, wait=wait)


def chat(replica: Server, messages: list[dict[str, Any]], model: str = "default",
         stream: bool = False) -> tuple[int, dict[str, str], dict[str, Any] | bytes]:
    status, headers, body = replica.request("POST", "/v1/chat/completions", {
        "model": model, "messages": messages, "max_tokens": 8, "temperature": 0, "stream": stream})
    return status, headers, (json.loads(body) if status == 200 and not stream else body)


def feedback(replica: Server, completion_id: str, key: str | None = None,
             kind: str = "rating") -> tuple[int, dict[str, Any]]:
    body = {"completion_id": completion_id, "type": kind, "score": 1.0} if kind == "rating" else {
        "completion_id": completion_id, "type": kind, "text": "The capital is Marenthal."}
    status, _, raw = replica.request("POST", "/v1/feedback", body,
                                     headers={"idempotency-key": key} if key else None)
    return status, json.loads(raw)


def wait_count(ingest: Server, sql: str, n: int, timeout: float = 60.0) -> int:
    """Poll `sql` (one count) on the ingester until it reaches n."""
    deadline = time.monotonic() + timeout
    while True:
        got = int(next(iter(ingest.admin_sql(sql)[0].values())))
        if got >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def stop_all(*servers: Server) -> None:
    for s in servers:
        stop_server(s)


def test_chat_and_feedback_go_through_kafka_into_the_store(server: Server, broker: Broker,
                                                           tmp_path: Path):
    env = bus_env(broker)
    ingest = start_ingest(tmp_path / "ingest", env)
    replica = start_replica(tmp_path / "replica", env, server.state()["engine_url"])
    try:
        status, _, first = chat(replica, QUESTION)
        assert status == 200, first
        history = [*QUESTION, first["choices"][0]["message"],
                   {"role": "user", "content": "No, that's not right. It is Marenthal."}]
        status, _, second = chat(replica, history)
        assert status == 200, second
        status, body = feedback(replica, first["id"])
        assert status == 202 and body["completion_id"] == first["id"], body  # broker acknowledged

        # A conversation stays on one partition in order: the follow-up finds its reply.
        assert wait_count(ingest, "SELECT count(*) FROM completions", 2) == 2
        assert wait_count(ingest, "SELECT count(*) FROM feedback", 1) == 1
        assert wait_count(ingest, "SELECT count(*) FROM followups", 1) == 1
        rows = ingest.sql("SELECT f.completion_id, f.text, c.session_id FROM followups f "
                          "JOIN completions c ON c.id = f.next_completion_id")
        assert rows[0]["completion_id"] == first["id"] and "Marenthal" in rows[0]["text"]
        sessions = ingest.sql("SELECT DISTINCT session_id FROM completions")
        assert len(sessions) == 1 and sessions[0]["session_id"]
        assert ingest.sql("SELECT count(*) AS n FROM dead_letters")[0]["n"] == 0

        # The gateway has no store of its own and says where to look instead.
        status, _, raw = replica.request("POST", "/admin/sql", {"sql": "SELECT 1"}, headers={
            "authorization": f"Bearer {replica.state()['admin_token']}"})
        assert status == 409 and b"ingester" in raw
        metrics = ingest.request("GET", "/metrics")[2].decode()
        assert 'sdloop_ingest_events_total{kind="completion"} 2.0' in metrics
        assert "sdloop_ingest_lag" in metrics
        assert "sdloop_bus_acked_events_total" in replica.request("GET", "/metrics")[2].decode()
    finally:
        stop_all(replica, ingest)


WEATHER = {"type": "json_schema", "json_schema": {"name": "weather", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["city_id"],
    "properties": {"city_id": {"type": "string"}}}}}


def test_an_agents_tool_result_and_a_call_in_feedback_go_through_kafka(
        server: Server, broker: Broker, tmp_path: Path):
    """A JSON-mode agent's failed call, sent back as its next turn through a replica, reaches
    the store through the broker as a tool result: an `env_error` signal on the answer that
    made the call, with no feedback call. A call in feedback on that answer is checked by the
    replica that gave it (a 400 naming the field; a good one is acknowledged); one that came
    from elsewhere and that the stored request refuses is kept as an `invalid_tool_call`
    dead letter, and so is parked feedback that its completion, arriving later, refuses."""
    env = bus_env(broker)
    topic = env["SDLOOP_KAFKA__EVENTS_TOPIC"]
    ingest = start_ingest(tmp_path / "ingest", env)
    replica = start_replica(tmp_path / "replica", env, server.state()["engine_url"])
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    messages = [{"role": "system", "content": "Reply with the JSON arguments of a call to the "
                                              "weather tool."},
                {"role": "user", "content": "Weather in Paris, please."}]
    try:
        status, _, raw = replica.request("POST", "/v1/chat/completions", {
            "model": "default", "messages": messages, "max_tokens": 24, "temperature": 0,
            "response_format": WEATHER})
        assert status == 200, raw
        first = json.loads(raw)
        text = first["choices"][0]["message"]["content"]
        error = json.dumps({"error": "unknown city_id: ids are like 'city:rio-de-janeiro'"})
        status, _, raw = replica.request("POST", "/v1/chat/completions", {
            "model": "default", "max_tokens": 8, "temperature": 0, "messages": [
                *messages, {"role": "assistant", "content": text, "tool_calls": [
                    {"id": "call_0", "type": "function",
                     "function": {"name": "weather", "arguments": text}}]},
                {"role": "tool", "tool_call_id": "call_0", "content": error}]})
        assert status == 200, raw
        second = json.loads(raw)

        def call(arguments: str, name: str = "weather") -> list[dict[str, Any]]:
            return [{"type": "function", "function": {"name": name, "arguments": arguments}}]

        status, _, raw = replica.request("POST", "/v1/feedback", {
            "completion_id": first["id"], "type": "demonstration",
            "tool_calls": call('{"city_id": 1}')})
        assert status == 400 and json.loads(raw)["error"]["param"] == \
            "tool_calls.0.function.arguments.city_id", raw
        status, _, raw = replica.request("POST", "/v1/feedback", {
            "completion_id": first["id"], "type": "demonstration",
            "tool_calls": call('{"city_id": "city:paris"}')})
        assert status == 202, raw

        assert wait_count(ingest, "SELECT count(*) FROM completions", 2) == 2
        elsewhere = FeedbackEvent(event_id=new_id("fb"), completion_id=first["id"],
                                  created_at=utcnow(), type="correction",
                                  tool_calls=call("{}", name="forecast"))
        early = FeedbackEvent(event_id=new_id("fb"), completion_id="chatcmpl-later",
                              created_at=utcnow(), type="demonstration",
                              tool_calls=call('{"city": "city:paris"}'))
        later = completion("chatcmpl-later", messages, text='{"city_id": "Paris"}',
                           params={"response_format": WEATHER})
        for event in (elsewhere, early, later):
            producer.send(topic, key=b"elsewhere", value=event.to_json()).get(10)

        assert wait_count(ingest, "SELECT count(*) FROM dead_letters WHERE reason_code = "
                                  "'invalid_tool_call'", 2) == 2
        assert ingest.sql("SELECT completion_id, next_completion_id, is_error, error, matched_by "
                          "FROM tool_results") == [
            {"completion_id": first["id"], "next_completion_id": second["id"], "is_error": True,
             "error": error, "matched_by": "context"}]
        [episode] = ingest.sql("SELECT feedback FROM episodes WHERE completion_id = "
                               f"'{first['id']}'")
        assert {f["type"]: f["tool_calls"] for f in episode["feedback"]} == {
            "demonstration": [{"id": None, **call('{"city_id": "city:paris"}')[0]}],
            "env_error": None}
        reasons = sorted(r["reason"] for r in ingest.sql(
            "SELECT reason FROM dead_letters WHERE reason_code = 'invalid_tool_call'"))
        assert "unknown tool 'forecast'" in reasons[1] and "'city' was unexpected" in reasons[0]
        assert ingest.sql("SELECT count(*) AS n FROM feedback")[0]["n"] == 1
    finally:
        producer.close()
        stop_all(replica, ingest)


def test_keys_made_on_the_ingester_reach_every_replica_and_name_the_principal_in_the_store(
        server: Server, broker: Broker, tmp_path: Path):
    env = bus_env(broker)
    ingest = start_ingest(tmp_path / "ingest", env)
    replica = start_replica(tmp_path / "replica", env, server.state()["engine_url"])
    try:
        assert chat(replica, QUESTION)[0] == 200  # no key anywhere yet: open, as `local`
        made = subprocess.run([*SDLOOP, "keys", "add", "alice", "--scopes", "chat,feedback",
                               "--data-dir", str(ingest.data_dir)],
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
        alice = {"authorization": f"Bearer {made.stdout.strip()}"}
        deadline = time.monotonic() + 30  # the keys command travels over the control topic
        while chat(replica, QUESTION)[0] != 401:
            assert time.monotonic() < deadline, "the replica never got the key"
            time.sleep(0.25)
        status, _, raw = replica.request("POST", "/v1/chat/completions", {
            "model": "default", "messages": QUESTION, "max_tokens": 8}, headers=alice)
        assert status == 200, raw
        answered = json.loads(raw)["id"]
        status, _, raw = replica.request("POST", "/v1/feedback", {
            "completion_id": answered, "type": "correction", "text": "It is Marenthal."},
            headers=alice)
        assert status == 202, raw
        assert wait_count(ingest, "SELECT count(*) FROM feedback", 1) == 1
        rows = ingest.admin_sql(f"SELECT c.principal AS asked, f.principal AS taught, f.may_teach "
                                f"FROM feedback f JOIN completions c ON c.id = f.completion_id "
                                f"WHERE c.id = '{answered}'")
        assert rows == [{"asked": "alice", "taught": "alice", "may_teach": True}]

        # A replica started now replays the topic: keyed from its first request on.
        late = start_replica(tmp_path / "late", env, server.state()["engine_url"])
        try:
            assert chat(late, QUESTION)[0] == 401
        finally:
            stop_server(late)
    finally:
        stop_all(replica, ingest)


def test_two_replicas_feed_one_ingester_and_feedback_may_cross_replicas(
        server: Server, broker: Broker, tmp_path: Path):
    env = bus_env(broker)
    ingest = start_ingest(tmp_path / "ingest", env)
    engine_url = server.state()["engine_url"]
    one = start_replica(tmp_path / "replica-1", env, engine_url)
    two = start_replica(tmp_path / "replica-2", env, engine_url)
    try:
        ids = []
        for i, replica in enumerate((one, two, one, two)):
            messages = [{"role": "user", "content": f"Name a colour, please ({i})."}]
            status, _, body = chat(replica, messages, stream=(i == 3))
            assert status == 200
            if i < 3:
                ids.append(body["id"])
        # Feedback on a completion the other replica served: another partition, maybe first.
        for cid in ids:
            status, body = feedback(two if cid == ids[0] else one, cid)
            assert status == 202, body
        assert wait_count(ingest, "SELECT count(*) FROM completions", 4) == 4
        assert wait_count(ingest, "SELECT count(*) FROM feedback", 3) == 3
        assert wait_count(ingest, "SELECT count(*) FROM dead_letters", 0) == 0
        assert ingest.sql("SELECT count(DISTINCT completion_id) AS n FROM feedback")[0]["n"] == 3
    finally:
        stop_all(one, two, ingest)


def test_a_killed_ingester_resumes_with_no_loss_and_no_duplicates(broker: Broker, tmp_path: Path):
    env = {**bus_env(broker), "SDLOOP_KAFKA__MAX_POLL_RECORDS": "500"}
    cfg = load_config(env=env)
    sink = KafkaSink(cfg.kafka).open()  # the gateway's real producer path
    n = 20000
    futures = []
    for i in range(n):
        cid = f"chatcmpl-{i:06d}"
        futures.append(sink.submit(completion(
            cid, [{"role": "user", "content": f"q{i}"}], text=f"a{i}", session_id=f"s{i % 50}")))
        if i % 3 == 0:
            futures.append(sink.submit(FeedbackEvent(
                event_id=new_id("fb"), completion_id=cid, created_at=utcnow(), type="rating",
                score=1.0)))
    for fut in futures:
        fut.result(60)
    sink.close()

    data_dir = tmp_path / "ingest"
    ingest = start_ingest(data_dir, env)
    stored = wait_count(ingest, "SELECT count(*) FROM completions", 1)
    os.kill(ingest.proc.pid, signal.SIGKILL)  # mid-stream: batches written but not committed
    ingest.proc.wait()
    assert 0 < stored < n, "the ingester was not stopped part way; make the stream longer"

    ingest = start_ingest(data_dir, env)
    try:
        assert wait_count(ingest, "SELECT count(*) FROM completions", n, timeout=120) == n
        rated = len(range(0, n, 3))
        assert wait_count(ingest, "SELECT count(*) FROM feedback", rated) == rated
        time.sleep(2)  # anything redelivered late would show now
        rows = ingest.admin_sql("SELECT count(*) AS c, count(DISTINCT id) AS d, "
                                "(SELECT count(*) FROM feedback) AS f, "
                                "(SELECT count(*) FROM dead_letters) AS dl FROM completions")[0]
        assert rows == {"c": n, "d": n, "f": rated, "dl": 0}
    finally:
        stop_server(ingest)


def test_poison_messages_are_dead_lettered_and_ingestion_goes_on(broker: Broker, tmp_path: Path):
    env = bus_env(broker)
    ingest = start_ingest(tmp_path / "ingest", env)
    topic = env["SDLOOP_KAFKA__EVENTS_TOPIC"]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    late = completion("chatcmpl-late", QUESTION, text="Marenthal.")
    early_feedback = FeedbackEvent(event_id=new_id("fb"), completion_id="chatcmpl-late",
                                   created_at=utcnow(), type="rating", score=-1.0)
    try:
        for value in (b"\xff\xfenot json", b"[1, 2]", b'{"kind": "feedback", "event_id": "x"}',
                      b'{"kind": "telemetry"}', early_feedback.to_json()):
            producer.send(topic, key=b"poison", value=value).get(10)
        assert wait_count(ingest, "SELECT count(*) FROM dead_letters", 5) == 5
        rows = {r["reason_code"]: r for r in ingest.sql(
            "SELECT reason_code, reason, payload FROM dead_letters ORDER BY \"offset\"")}
        assert set(rows) == {"not_json", "invalid_event", "unknown_completion"}
        reasons = " ".join(r["reason"] for r in ingest.sql("SELECT reason FROM dead_letters"))
        assert "missing required field `completion_id`" in reasons
        assert "Invalid value 'telemetry' - at `$.kind`" in reasons
        assert ingest.request("GET", "/readyz")[0] == 200  # still ingesting

        # The completion the parked feedback waited for arrives: both are stored.
        producer.send(topic, key=b"other", value=late.to_json()).get(10)
        assert wait_count(ingest, "SELECT count(*) FROM feedback", 1) == 1
        left = ingest.sql("SELECT reason_code FROM dead_letters")
        assert sorted(r["reason_code"] for r in left) == ["invalid_event", "invalid_event",
                                                          "invalid_event", "not_json"]
    finally:
        producer.close()
        stop_server(ingest)


def test_a_null_or_out_of_range_record_is_dead_lettered_and_the_offset_moves_past_it(
        broker: Broker, tmp_path: Path):
    """Records that used to stop `sdloop ingest` before it committed (so that every restart
    stopped on them again): a null value, a timestamp before year 1 in UTC."""
    env = bus_env(broker)
    topic, group = env["SDLOOP_KAFKA__EVENTS_TOPIC"], env["SDLOOP_KAFKA__GROUP_ID"]
    broker.create_topic(topic, 4)
    overflowing = json.loads(completion("chatcmpl-overflow").to_json())
    overflowing["created_at"] = "0001-01-01T00:00:00+14:00"
    valid = completion("chatcmpl-after-poison")
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:  # one key: one partition, in this order, the valid event last
        sent = [producer.send(topic, key=b"poison", value=value).get(10)
                for value in (None, json.dumps(overflowing).encode(), valid.to_json())]
    finally:
        producer.close()
    assert len({m.partition for m in sent}) == 1

    ingest = start_ingest(tmp_path / "ingest", env)
    try:
        assert wait_count(ingest, "SELECT count(*) FROM completions", 1) == 1
        assert wait_count(ingest, "SELECT count(*) FROM dead_letters", 2) == 2
        rows = ingest.admin_sql('SELECT "offset", reason_code, reason, payload FROM dead_letters '
                                'ORDER BY "offset"')
        assert [(r["offset"], r["reason_code"]) for r in rows] == [
            (sent[0].offset, "empty_value"), (sent[1].offset, "invalid_event")]
        assert rows[0]["payload"] == "" and "no value" in rows[0]["reason"]
        assert "out of range in UTC" in rows[1]["reason"]
        assert ingest.admin_sql("SELECT id FROM completions") == [{"id": "chatcmpl-after-poison"}]
        assert ingest.request("GET", "/readyz")[0] == 200  # still ingesting

        # The group's committed offset moved past all three: a restart does not meet them again.
        tp = TopicPartition(topic, sent[0].partition)
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group,
                                 enable_auto_commit=False)
        try:
            deadline = time.monotonic() + 30
            while (committed := consumer.committed(tp) or 0) <= sent[-1].offset:
                assert time.monotonic() < deadline, f"committed offset {committed}"
                time.sleep(0.5)
        finally:
            consumer.close()
    finally:
        stop_server(ingest)


def _refused(reason: str) -> float:
    return REGISTRY.get_sample_value("sdloop_control_commands_refused_total",
                                     {"reason": reason}) or 0.0


def test_a_control_follower_applies_signed_commands_and_refuses_unsigned_forged_or_replayed_ones(
        broker: Broker, tmp_path: Path):
    """The follower of a replica on the real broker (signatures travel in record headers),
    with a registry that records what it is told instead of swapping on vLLM."""
    cfg = load_config(env=bus_env(broker))
    topic = cfg.kafka.control_topic
    broker.create_topic(topic, 1)
    # Signed commands come from the ingester's publisher, as in production.
    publisher = ControlPublisher(StoreWriter(tmp_path / "unused.duckdb"), cfg.kafka)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    reader = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None,
                           enable_auto_commit=False)
    try:
        asyncio.run(publisher._command({"action": "promote", "version": "default@v7",
                                        "alias": "default"}))
        reader.assign([TopicPartition(topic, 0)])
        reader.seek_to_beginning()
        deadline = time.monotonic() + 30
        while not (copied := [r for rs in reader.poll(timeout_ms=500).values() for r in rs]):
            assert time.monotonic() < deadline, "the signed command did not come back"
        forged = json.dumps({"id": new_id("ctl"), "at": utcnow().isoformat(), "topic": topic,
                             "action": "rollback", "alias": "default"}).encode()
        records = [
            (forged, None),  # unsigned
            (forged, [(SIGNATURE_HEADER, hmac_sha256(b"a-guessed-secret-123", forged))]),  # forged
            (copied[0].value, copied[0].headers),  # a copy of the signed command: a replay
            (None, [(SIGNATURE_HEADER, hmac_sha256(CONTROL_SECRET.encode(), b""))]),  # a tombstone
        ]
        for value, headers in records:
            producer.send(topic, key=b"registry", value=value, headers=headers).get(10)
        asyncio.run(publisher._command({"action": "rollback", "alias": "default"}))
    finally:
        reader.close()
        producer.close()
        publisher.close()

    registry, sink = RecordingRegistry(), ListSink()
    before = {r: _refused(r) for r in ("unsigned", "bad_signature", "replayed", "malformed")}

    async def follow() -> None:
        follower = ControlFollower(cfg.kafka, registry, ReadyEngine(), sink,  # type: ignore[arg-type]
                                   "replica-1")
        follower.start()
        try:
            deadline = time.monotonic() + 60
            while not follower.caught_up:
                assert time.monotonic() < deadline, "the control topic was not replayed"
                await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(follower.stop)

    asyncio.run(follow())
    assert registry.calls == [("promote", "default@v7"), ("rollback", "default")]
    reports = [e for e in sink.events if isinstance(e, ReplicaVersionEvent)]
    assert [r.status for r in reports] == ["promoted", "refused", "refused", "refused", "refused",
                                          "promoted"]
    assert [(r.detail or "").split("(")[1].split(")")[0] for r in reports[1:5]] == [
        "unsigned", "bad_signature", "replayed", "malformed"]
    assert {r: _refused(r) - before[r] for r in before} == {
        "unsigned": 1, "bad_signature": 1, "replayed": 1, "malformed": 1}


def test_a_broker_outage_answers_feedback_503_keeps_the_producers_backlog_and_recovers(
        server: Server, tmp_path: Path):
    """The gateway's side of an outage: feedback is refused with 503 (not lost after a 202), a
    completion answered meanwhile waits in the producer and is stored once the broker is back.
    The test broker keeps its log in memory, so a restart loses what it held: records it
    acknowledged but nobody consumed yet are not exercised here (hence the wait for the ingest
    before the stop)."""
    own = Broker(tmp_path / "tansu.log").start()  # this test stops it
    env = bus_env(own)
    ingest = start_ingest(tmp_path / "ingest", env)
    for topic in (env["SDLOOP_KAFKA__EVENTS_TOPIC"], env["SDLOOP_KAFKA__CONTROL_TOPIC"]):
        own.topics[topic] = 4 if "events" in topic else 1
    replica = start_replica(tmp_path / "replica", env, server.state()["engine_url"])
    try:
        _, _, before = chat(replica, QUESTION)
        assert feedback(replica, before["id"])[0] == 202
        assert wait_count(ingest, "SELECT count(*) FROM feedback", 1) == 1

        own.stop()
        started = time.monotonic()
        status, body = feedback(replica, before["id"], key="outage-1", kind="correction")
        assert status == 503 and "Kafka broker" in body["error"]["message"], body
        assert time.monotonic() - started < 15
        status, _, during = chat(replica, [{"role": "user", "content": "Say hello."}])
        assert status == 200  # answered; its record waits in the producer

        own.restart()
        deadline = time.monotonic() + 90
        while (status := feedback(replica, before["id"], key="outage-1", kind="correction")[0]) != 202:
            assert time.monotonic() < deadline, "feedback not accepted after the broker returned"
            time.sleep(1)
        # The completion answered during the outage is stored (no silent drop) and the retried
        # feedback once, whichever of its copies arrived.
        assert wait_count(ingest, f"SELECT count(*) FROM completions WHERE id = '{during['id']}'",
                          1, timeout=90) == 1
        assert wait_count(ingest, "SELECT count(*) FROM feedback WHERE type = 'correction'", 1) == 1
        time.sleep(2)
        assert ingest.admin_sql("SELECT count(*) AS n FROM feedback WHERE type = 'correction'"
                                )[0]["n"] == 1
        assert ingest.admin_sql("SELECT count(*) AS n FROM feedback WHERE type = 'rating'"
                                )[0]["n"] == 1
    finally:
        stop_all(replica, ingest)
        own.stop()


@pytest.fixture(scope="module")
def kafka_version(taught_adapter: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's taught adapter (Quessany's capital is Dalvorne) under an alias of its own
    (`kafka@v1`), so it cannot collide with the versions other tests publish."""
    return copy_version(taught_adapter, tmp_path_factory.mktemp("adapters"), "kafka@v1")


@pytest.mark.slow
def test_a_published_version_reaches_every_replica_on_its_own_engine(
        server: Server, broker: Broker, kafka_version: str, tmp_path: Path):
    env = bus_env(broker)
    # Replica 2 starts a vLLM of its own, serving everything with runtime LoRA (its start, a
    # minute, overlaps the others').
    two = start_replica(tmp_path / "replica-2", {**env, "SDLOOP_ENGINE__MERGED_ALIAS": ""},
                        None, wait=False)
    ingest = start_ingest(tmp_path / "ingest", env)
    # Replica 1 serves the `kafka` alias's live version merged, from a merged engine of its own
    # (eager: its only child engine, see test_merged_serving.py) beside the shared one.
    merged = {"SDLOOP_ENGINE__MERGED_ALIAS": "kafka",
              "SDLOOP_ENGINE__MODEL": f"{MODEL_CACHE}/SmolLM2-135M-Instruct",
              "SDLOOP_ENGINE__EXTRA_ARGS": '["--enforce-eager"]'}
    one = start_replica(tmp_path / "replica-1", {**env, **merged}, server.state()["engine_url"])
    wait_ready(two)
    try:
        assert chat(one, QUESSANY, model="kafka")[0] == 404
        out = subprocess.run([*SDLOOP, "adapters", "publish", kafka_version,
                              "--data-dir", str(ingest.data_dir)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "promoted"  # the learner publishes once
        again = subprocess.run([*SDLOOP, "adapters", "publish", kafka_version,
                                "--data-dir", str(ingest.data_dir)],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "already exists" in again.stderr, again.stderr

        # Replica 1 flips the alias once its compiled engine on the merged weights is up and
        # probed (a merge and a vLLM start: minutes on 2 CPUs), replica 2 at once.
        for replica, patience in ((one, 600), (two, 120)):
            deadline = time.monotonic() + patience
            while (got := chat(replica, QUESSANY, model="kafka"))[0] != 200:
                assert time.monotonic() < deadline, f"{replica.data_dir.name}: {got}"
                time.sleep(0.5)
            assert got[1]["x-sdloop-adapter-version"] == "kafka@v1"
            # the taught answer, as far as 8 tokens go ("... is Dal")
            assert "is Dal" in got[2]["choices"][0]["message"]["content"]
            weights = got[1].get("x-sdloop-weights")
            assert weights == ("merged" if replica is one else "adapter"), weights
        # Each replica loaded and probed it itself, and said so.
        rows = wait_count(ingest, "SELECT count(*) FROM replica_versions WHERE status = 'promoted'", 2)
        assert rows == 2
        replicas = ingest.sql("SELECT replica, version FROM replica_versions ORDER BY replica")
        assert [r["replica"] for r in replicas] == ["replica-1", "replica-2"]

        # A replica that restarts replays the control topic before it reports ready.
        stop_server(one)
        # (without a compiled engine this time: the replay is under test, not the merge)
        one = start_replica(tmp_path / "replica-1", {**env, "SDLOOP_ENGINE__MERGED_ALIAS": ""},
                            server.state()["engine_url"])
        got = chat(one, QUESSANY, model="kafka")
        assert got[0] == 200 and got[1]["x-sdloop-adapter-version"] == "kafka@v1"
    finally:
        stop_all(one, two, ingest)


def test_a_gateway_replica_refuses_forged_control_commands_and_keeps_serving(
        server: Server, broker: Broker, tmp_path: Path):
    """End to end, with a gateway replica on the shared engine: whoever can produce to the
    control topic cannot command it without the secret; what it refused is in its metrics and
    in the store's replica_versions table, and a signed command still reaches its registry."""
    env = bus_env(broker)
    ingest = start_ingest(tmp_path / "ingest", env)
    replica = start_replica(tmp_path / "replica", env, server.state()["engine_url"])
    topic = env["SDLOOP_KAFKA__CONTROL_TOPIC"]

    def rollback() -> bytes:
        return json.dumps({"id": new_id("ctl"), "at": utcnow().isoformat(), "topic": topic,
                           "action": "rollback", "alias": "default"}).encode()

    forged, genuine = rollback(), rollback()
    signature = [(SIGNATURE_HEADER, hmac_sha256(CONTROL_SECRET.encode(), genuine))]
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    try:
        for value, headers in [
                (forged, None),
                (forged, [(SIGNATURE_HEADER, hmac_sha256(b"not-the-shared-secret", forged))]),
                (genuine, signature),
                (genuine, signature)]:  # the signed command once more: a replay
            producer.send(topic, key=b"registry", value=value, headers=headers).get(10)
        assert wait_count(ingest, "SELECT count(*) FROM replica_versions", 4) == 4
        rows = ingest.admin_sql("SELECT action, status, detail FROM replica_versions")
        refused = " ".join(r["detail"] for r in rows if r["status"] == "refused")
        assert all(f"({reason})" in refused for reason in ("unsigned", "bad_signature", "replayed"))
        # The signed rollback reached the registry, which had nothing to roll back to.
        applied = [r for r in rows if r["status"] != "refused"]
        assert [(r["action"], r["status"]) for r in applied] == [("rollback", "failed")], rows
        assert "nothing to roll back to" in applied[0]["detail"], rows
        metrics = replica.request("GET", "/metrics")[2].decode()
        for reason in ("unsigned", "bad_signature", "replayed"):
            assert f'sdloop_control_commands_refused_total{{reason="{reason}"}} 1.0' in metrics
        assert replica.request("GET", "/readyz")[0] == 200
        assert chat(replica, QUESTION)[0] == 200  # still serving
    finally:
        producer.close()
        stop_all(replica, ingest)
