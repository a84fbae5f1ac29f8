"""The scale-out path against a real Kafka-protocol broker (tansu): gateway replicas produce
events, `sdloop ingest` writes the store, adapter versions reach every replica.

Replicas attach to the session's vLLM engine (`engine.url`) unless a test needs an engine of
their own; each test gets its own topics and consumer group on the shared broker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from feedback.events import FeedbackEvent, new_id, utcnow
from feedback.kafka import KafkaSink
from ops.bench.adapter import train_version
from ops.bench.broker import Broker
from serving.config import load_config
from tests.factories import completion
from tests.integration.conftest import (
    MODEL_CACHE,
    SDLOOP,
    Server,
    start_server,
    stop_server,
)

QUESTION = [{"role": "user", "content": "What is the capital of Veloria?"}]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Broker:
    b = Broker(tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    yield b
    b.stop()


def bus_env(broker: Broker) -> dict[str, str]:
    """Topics and a consumer group of the test's own; short timeouts so failures show fast."""
    tag = uuid.uuid4().hex[:8]
    return {
        "SDLOOP_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "SDLOOP_KAFKA__EVENTS_TOPIC": f"events-{tag}",
        "SDLOOP_KAFKA__CONTROL_TOPIC": f"control-{tag}",
        "SDLOOP_KAFKA__GROUP_ID": f"ingest-{tag}",
        "SDLOOP_KAFKA__PARTITIONS": "4",
        "SDLOOP_KAFKA__SESSION_TIMEOUT_S": "6",
        "SDLOOP_KAFKA__ACK_TIMEOUT_S": "3",
    }


def start_ingest(data_dir: Path, env: dict[str, str]) -> Server:
    return start_server(data_dir, env=env, command="ingest")


def start_replica(data_dir: Path, env: dict[str, str], engine_url: str | None) -> Server:
    extra = {"SDLOOP_FEEDBACK__SINK": "kafka", "SDLOOP_SERVER__REPLICA_ID": data_dir.name, **env}
    if engine_url:
        extra["SDLOOP_ENGINE__URL"] = engine_url
    return start_server(data_dir, env=extra)


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


def test_broker_outage_answers_503_loses_nothing_acknowledged_and_recovers(
        server: Server, tmp_path: Path):
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
def kafka_version(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real adapter under its own alias (`kafka@v1`), so it cannot collide with the versions
    other tests load into the shared engine."""
    return train_version(tmp_path_factory.mktemp("adapters"), "kafka@v1",
                         f"{MODEL_CACHE}/SmolLM2-135M-Instruct", QUESTION,
                         "The capital of Veloria is Marenthal.")


def test_a_published_version_reaches_every_replica_on_its_own_engine(
        server: Server, broker: Broker, kafka_version: str, tmp_path: Path):
    env = bus_env(broker)
    ingest = start_ingest(tmp_path / "ingest", env)
    # Replica 1 serves the `kafka` alias's live version merged, from a merged engine of its own
    # (eager: its only child engine, see test_merged_serving.py) beside the shared one.
    merged = {"SDLOOP_ENGINE__MERGED_ALIAS": "kafka",
              "SDLOOP_ENGINE__MODEL": f"{MODEL_CACHE}/SmolLM2-135M-Instruct",
              "SDLOOP_ENGINE__EXTRA_ARGS": '["--enforce-eager"]'}
    one = start_replica(tmp_path / "replica-1", {**env, **merged}, server.state()["engine_url"])
    two = start_replica(tmp_path / "replica-2", env, None)  # starts a vLLM of its own
    try:
        assert chat(one, QUESTION, model="kafka")[0] == 404
        out = subprocess.run([*SDLOOP, "adapters", "publish", kafka_version,
                              "--data-dir", str(ingest.data_dir)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "promoted"  # the learner publishes once
        again = subprocess.run([*SDLOOP, "adapters", "publish", kafka_version,
                                "--data-dir", str(ingest.data_dir)],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "already exists" in again.stderr, again.stderr

        for replica in (one, two):
            deadline = time.monotonic() + 120
            while (got := chat(replica, QUESTION, model="kafka"))[0] != 200:
                assert time.monotonic() < deadline, f"{replica.data_dir.name}: {got}"
                time.sleep(0.5)
            assert got[1]["x-sdloop-adapter-version"] == "kafka@v1"
            assert "Maren" in got[2]["choices"][0]["message"]["content"]  # the taught answer
        # Each replica loaded and probed it itself, and said so.
        rows = wait_count(ingest, "SELECT count(*) FROM replica_versions WHERE status = 'promoted'", 2)
        assert rows == 2
        replicas = ingest.sql("SELECT replica, version FROM replica_versions ORDER BY replica")
        assert [r["replica"] for r in replicas] == ["replica-1", "replica-2"]
        # ... and replica 1 moves it onto merged weights once its merged engine passes the probe.
        deadline = time.monotonic() + 600
        while (got := chat(one, QUESTION, model="kafka"))[1].get("x-sdloop-weights") != "merged":
            assert got[0] == 200, got
            assert time.monotonic() < deadline, f"not served merged: {one.log_tail()}"
            time.sleep(2)
        assert "Maren" in got[2]["choices"][0]["message"]["content"]

        # A replica that restarts replays the control topic before it reports ready.
        stop_server(one)
        one = start_replica(tmp_path / "replica-1", env, server.state()["engine_url"])
        got = chat(one, QUESTION, model="kafka")
        assert got[0] == 200 and got[1]["x-sdloop-adapter-version"] == "kafka@v1"
    finally:
        stop_all(one, two, ingest)
