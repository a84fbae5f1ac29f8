"""Events/s into the feedback store: the direct writer and Kafka → `sdloop ingest`, side by side.

    python ops/bench/ingest.py [--events 100000] [--repeats 3]

The same generated events go through both paths, fresh store (and fresh topic) per run:
- direct: `StoreWriter.submit` for every event, timed until the writer closed (the last commit
  and the checkpoint that moves the write-ahead log into the file; what one
  `sdloop serve` does with its own store);
- kafka produce: `KafkaSink.submit` (the gateway's producer, acks=all, idempotent) until
  every event is acknowledged by the broker;
- kafka ingest: the ingester's loop (`store.ingest.Ingester`: poll, decode and check, group
  commits, dead letters, offset commit) over the backlog, until every event is stored and the
  writer closed (its checkpoint).
The broker is `tansu` (in memory) on loopback, on the same cores as everything else.
The process collects garbage as `sdloop serve` and `sdloop ingest` do (`serving.commands.tune_gc`,
after the events are generated: they are the harness's input, alive throughout, and would
otherwise be walked by every full collection, which a serving process never holds).

Events look like real traffic: 60 % completions (a short multi-turn prompt, ~150 prompt and ~60
response token ids), 25 % follow-ups linked to an earlier completion, 15 % feedback.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from prometheus_client import REGISTRY  # noqa: E402

from feedback import (  # noqa: E402
    CompletionEvent,
    Event,
    FeedbackEvent,
    FollowupEvent,
    context_hash,
    new_id,
    reply_hash,
    utcnow,
)
from feedback.kafka import KafkaSink  # noqa: E402
from ops.bench.broker import Broker  # noqa: E402
from serving.commands import tune_gc  # noqa: E402
from serving.config import load_config  # noqa: E402
from store import StoreWriter, query_file  # noqa: E402
from store.ingest import Ingester  # noqa: E402

TARGET_DIRECT = 50_000
TARGET_KAFKA = 25_000


def make_events(n: int, seed: int = 0) -> list[Event]:
    rng = random.Random(seed)
    events: list[Event] = []
    done: list[CompletionEvent] = []
    for i in range(n):
        r = rng.random()
        if r < 0.60 or len(done) < 10:
            messages = [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Question {i}: " + "tell me about the weather " * 8},
            ]
            answer = f"Answer {i}: " + "it is sunny with a light breeze " * 6
            ev = CompletionEvent(
                event_id=new_id("cmpl"), completion_id=f"chatcmpl-{uuid.uuid4().hex}",
                created_at=utcnow(), alias="default", version="base", messages=messages,
                params={"temperature": 0.7, "max_tokens": 128}, stream=bool(i % 2),
                response_text=answer, response_message={"role": "assistant", "content": answer},
                finish_reason="stop", prompt_token_ids=[rng.randrange(49152) for _ in range(150)],
                token_ids=[rng.randrange(49152) for _ in range(60)], prompt_tokens=150,
                completion_tokens=60, latency_ms=812.5, ttft_ms=40.1,
                context_hash=context_hash([*messages, {"role": "assistant", "content": answer}]),
                reply_hash=reply_hash(answer), session_id=f"conv-{i % 500}")
            done.append(ev)
            events.append(ev)
        elif r < 0.85:
            parent = rng.choice(done)
            events.append(FollowupEvent(
                event_id=new_id("fu"), created_at=utcnow(), context_hash=parent.context_hash or "",
                reply_hash=parent.reply_hash or "", text="No, that's not right. Try again.",
                next_completion_id=f"chatcmpl-{uuid.uuid4().hex}", session_id=parent.session_id))
        else:
            parent = rng.choice(done)
            events.append(FeedbackEvent(
                event_id=new_id("fb"), completion_id=parent.completion_id, created_at=utcnow(),
                type="rating", score=rng.choice([1.0, -1.0])))
    return events


def check_stored(path: Path, events: list[Event]) -> None:
    """Nothing lost, nothing twice: every event sent is one row (feedback, follow-ups and
    completions are keyed by their ids)."""
    sql = ("SELECT count(*), count(DISTINCT id) FROM (SELECT id FROM completions UNION ALL "
           "SELECT id FROM followups UNION ALL SELECT id FROM feedback)")
    count, distinct = query_file(path, sql, 60, 10).rows[0]
    if not count == distinct == len(events):
        sys.exit(f"{path.name}: {count} rows, {distinct} distinct, {len(events)} sent")


def direct(events: list[Event], tmp: Path) -> float:
    store = load_config(env={}).store  # the defaults `sdloop serve` runs with
    path = tmp / f"direct-{uuid.uuid4().hex[:6]}.duckdb"
    writer = StoreWriter(path, store.batch_max,
                         store.queue_max, store.queue_max_bytes,
                         checkpoint_mb=store.checkpoint_mb).open()
    try:
        started = time.perf_counter()
        futures = [writer.submit(ev) for ev in events]
        for fut in futures:
            fut.result()
        writer.close()  # its checkpoint: the write-ahead log moved into the file
        rate = len(events) / (time.perf_counter() - started)
        check_stored(path, events)
        return rate
    finally:
        writer.close()


def through_kafka(events: list[Event], broker: Broker, tmp: Path) -> tuple[float, float]:
    tag = uuid.uuid4().hex[:8]
    cfg = load_config(env={
        "SDLOOP_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "SDLOOP_KAFKA__EVENTS_TOPIC": f"bench-{tag}", "SDLOOP_KAFKA__CONTROL_TOPIC": f"ctl-{tag}",
        "SDLOOP_KAFKA__GROUP_ID": f"bench-{tag}", "SDLOOP_KAFKA__PARTITIONS": "4",
        "SDLOOP_KAFKA__BUFFER_MAX": str(len(events) + 1)})
    sink = KafkaSink(cfg.kafka).open()
    started = time.perf_counter()
    futures = [sink.submit(ev) for ev in events]
    for fut in futures:
        fut.result()
    produce = len(events) / (time.perf_counter() - started)
    sink.close()

    path = tmp / f"kafka-{tag}.duckdb"
    writer = StoreWriter(path, cfg.store.batch_max, cfg.store.queue_max,
                         cfg.store.queue_max_bytes, checkpoint_mb=cfg.store.checkpoint_mb).open()
    ingester = Ingester(cfg.kafka, writer).open()
    try:
        handled = 0
        while handled == 0:  # the group join is not part of the rate
            handled = ingester.step(timeout_ms=1000)
        first = handled
        started = time.perf_counter()
        while handled < len(events):
            handled += ingester.step(timeout_ms=1000)
        ingester.drain()  # the last batch stored and its offsets committed
        lag = ingester.lag()
        writer.close()  # its checkpoint
        ingest = (len(events) - first) / (time.perf_counter() - started)
        assert sum(lag.values()) == 0, lag
        check_stored(path, events)
        return produce, ingest
    finally:
        ingester.close()
        writer.close()


def mean_batch(metric: str) -> float:
    """Mean events per batch so far, off the store's / ingester's histogram."""
    total = REGISTRY.get_sample_value(f"{metric}_sum") or 0.0
    count = REGISTRY.get_sample_value(f"{metric}_count") or 0.0
    return total / count if count else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    events = make_events(args.events)
    tune_gc()
    rates: dict[str, list[float]] = {"direct": [], "produce": [], "ingest": []}
    with tempfile.TemporaryDirectory(prefix="sdloop-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        broker = Broker(tmp / "tansu.log").start()
        try:
            for run in range(args.repeats):
                rates["direct"].append(direct(events, tmp))
                produce, ingest = through_kafka(events, broker, tmp)
                rates["produce"].append(produce)
                rates["ingest"].append(ingest)
                print(f"run {run + 1}: direct {rates['direct'][-1]:,.0f}  kafka produce "
                      f"{produce:,.0f}  kafka ingest {ingest:,.0f} events/s", flush=True)
        finally:
            broker.stop()

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{args.events:,} events x {args.repeats} runs (medians, events/s)")
    print(f"{'path':<36}{'events/s':>10}{'target':>13}{'vs direct':>11}")
    rows = [("direct DuckDB writer", med["direct"], TARGET_DIRECT),
            ("Kafka: gateway producer (acks=all)", med["produce"], None),
            ("Kafka -> ingest -> DuckDB", med["ingest"], TARGET_KAFKA)]
    for name, rate, target in rows:
        mark = "" if target is None else (f"{target:,}" + (" ok" if rate >= target else " MISS"))
        print(f"{name:<36}{rate:>10,.0f}{mark:>13}{rate / med['direct']:>10.2f}x")
    cfg = load_config(env={})
    per_commit = mean_batch("sdloop_store_write_batch_size")
    print(f"batches: store.batch_max {cfg.store.batch_max} (mean {per_commit:,.0f} events per "
          f"commit), store.checkpoint_mb "
          f"{cfg.store.checkpoint_mb}; producer batch_size 256 KiB, linger_ms "
          f"{cfg.kafka.linger_ms}, no compression (loopback); ingester max_poll_records "
          f"{cfg.kafka.max_poll_records} (mean {mean_batch('sdloop_ingest_batch_size'):,.0f} "
          "messages per batch)")


if __name__ == "__main__":
    main()
