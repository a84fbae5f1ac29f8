"""Prometheus metrics of the feedback store's writer and the Kafka ingester (module-level,
registered once)."""

from prometheus_client import Counter, Gauge, Histogram

BATCH_SIZE = Histogram(
    "sdloop_store_write_batch_size",
    "Events written in one group commit.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
)
COMMIT_SECONDS = Histogram(
    "sdloop_store_commit_seconds",
    "Time to write and commit one batch of events.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
QUEUE_DEPTH = Gauge("sdloop_store_queue_depth", "Events waiting for the store writer.")
EVENTS_WRITTEN = Counter("sdloop_store_events_written", "Events committed, by kind.", ["kind"])
WRITE_ERRORS = Counter("sdloop_store_write_errors", "Events the store failed to write.")
FOLLOWUPS_UNMATCHED = Counter(
    "sdloop_store_followups_unmatched",
    "Follow-up messages whose earlier reply is not in the store (history from elsewhere).",
)
TOOL_RESULTS_UNMATCHED = Counter(
    "sdloop_store_tool_results_unmatched",
    "Tool results whose call was made by no answer in the store (or for another principal).",
)

# The Kafka ingester (store.ingest).
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
INGEST_BATCH_SECONDS = Histogram(
    "sdloop_ingest_batch_seconds",
    "Poll to offset commit for one batch: decode, store commit, commit.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
INGEST_BATCH_SIZE = Histogram(
    "sdloop_ingest_batch_size", "Messages in one ingested batch.",
    buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000),
)
