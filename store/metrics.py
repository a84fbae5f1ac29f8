"""Prometheus metrics of the feedback store's writer (module-level, registered once)."""

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
