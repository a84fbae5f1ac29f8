"""Prometheus metrics of the event bus: the gateway's producer and the ingester."""

from prometheus_client import Counter, Gauge, Histogram

BUS_PENDING = Gauge(
    "sdloop_bus_pending_events", "Events handed to the Kafka producer and not yet acknowledged."
)
BUS_ACKED = Counter("sdloop_bus_acked_events", "Events the Kafka broker acknowledged, by kind.", ["kind"])
BUS_FAILED = Counter(
    "sdloop_bus_failed_events",
    "Events the Kafka producer gave up on (broker away past kafka.delivery_timeout_s), by kind.",
    ["kind"],
)
INGESTED = Counter("sdloop_ingest_events", "Events the ingester committed to the store, by kind.", ["kind"])
DEAD_LETTERS = Counter(
    "sdloop_ingest_dead_letters", "Messages kept in dead_letters instead of the store, by reason.",
    ["reason"],
)
UNPARKED = Counter(
    "sdloop_ingest_unparked_feedback",
    "Feedback stored late, once the completion it names arrived on another partition.",
)
LAG = Gauge(
    "sdloop_ingest_lag", "Messages on the events topic not yet committed by the ingester, by partition.",
    ["partition"],
)
BATCH_SECONDS = Histogram(
    "sdloop_ingest_batch_seconds",
    "Poll to offset commit for one batch: decode, store commit, commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "sdloop_ingest_batch_size", "Messages in one ingested batch.",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000),
)
