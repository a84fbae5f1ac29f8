"""Prometheus metrics of the event bus's producer (the Kafka sink); the ingester's are the
store's (store.metrics)."""

from prometheus_client import Counter, Gauge

BUS_PENDING = Gauge(
    "sdloop_bus_pending_events", "Events handed to the Kafka producer and not yet acknowledged."
)
BUS_ACKED = Counter("sdloop_bus_acked_events", "Events the Kafka broker acknowledged, by kind.", ["kind"])
BUS_FAILED = Counter(
    "sdloop_bus_failed_events",
    "Events the Kafka producer gave up on (broker away past kafka.delivery_timeout_s), by kind.",
    ["kind"],
)
