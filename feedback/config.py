"""The feedback package's config sections: `[feedback]` and `[kafka]` (the event bus).

Registered under the `sdloop.config` entry points (pyproject.toml); the command line loads
them with every other package's section into one config (TOML file, then `SDLOOP_*`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from feedback.tools import ToolErrorRules


@dataclass
class FeedbackConfig:
    """What the gateway does with the events it captures: where it sends them, whether it
    redacts them first, and which tool results count as failed calls."""

    redact: bool = False
    """Replace emails, phone numbers and payment-card numbers by placeholders before storage.
    The sink redacts every event on a thread of its own: the store writer, or the Kafka sink
    before the event reaches the topic. Also the default of `sdloop export --redact`."""
    sink: str = "store"
    """Where the gateway sends events: "store" (this process writes the DuckDB file) or "kafka"
    (the events topic; `sdloop ingest` writes the store). "kafka" needs
    `kafka.bootstrap_servers` and `kafka.control_secret`, and starts no learner beside the
    gateway."""
    tool_error_keys: list[str] = field(default_factory=lambda: [
        "error", "errors", "is_error", "isError", "exception", "ok", "success", "status",
        "exit_code", "returncode", "status_code"])
    """A tool result (a `tool` message after the assistant's `tool_calls`) is a failed call, an
    `env_error` signal on the answer that made it, when the message says `"is_error": true` (or
    `metadata.is_error`), else when its content is a JSON object whose key listed here says so:
    `error`-like keys when they hold a value, `ok` / `success` when false, `exit_code` /
    `returncode` when not 0, `status_code` when >= 400, `status` / `state` / `outcome` when
    "error", "failed", ... Dotted paths reach nested keys; empty: no key is looked at."""
    tool_error_text: bool = True
    """Also count a tool result as failed when its text reads as a failure: a Python
    traceback, or a line opening with an error label ("Error: ...", "ValueError: ...",
    "fatal: ...", "FAILED ..."). Checked after `tool_error_keys`."""

    def tool_error_rules(self) -> ToolErrorRules:
        return ToolErrorRules(tuple(k for k in self.tool_error_keys if k.strip()),
                              self.tool_error_text)

    def check(self, cfg: Any) -> None:
        """Called by the config loader with the whole config; raise ValueError naming the key."""
        if self.sink not in ("store", "kafka"):
            raise ValueError(f"feedback.sink: expected \"store\" or \"kafka\", got {self.sink!r}")
        if self.sink == "kafka" and not cfg.kafka.bootstrap_servers.strip():
            raise ValueError("kafka.bootstrap_servers: feedback.sink = \"kafka\" needs at least one "
                             "broker (host:port)")


@dataclass
class KafkaConfig:
    """The event bus: read when `feedback.sink = "kafka"` (the gateway produces its events to
    Kafka) and by `sdloop ingest` (which consumes them into the store and publishes version
    commands to the replicas)."""

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of brokers."""
    events_topic: str = "sdloop.events"
    """Topic of completions, follow-ups, feedback and replica reports, keyed by conversation."""
    control_topic: str = "sdloop.control"
    """Topic of adapter publish/promote/rollback commands, one partition, read by every
    replica."""
    control_secret: str = ""
    """Shared secret (16+ characters) that signs control-topic commands (HMAC-SHA256): the
    ingester signs, every replica refuses a command without a valid signature, so producing to
    the topic is not enough to change the served version. Needed by `sdloop ingest` and every
    Kafka replica, the same value on all of them, or they refuse to start; set it from the
    environment (`SDLOOP_KAFKA__CONTROL_SECRET`), never in a config file."""
    create_topics: bool = True
    """Create the events and control topics at start when they are missing (needs the broker's
    create permission). False: sdloop creates no topic."""
    partitions: int = 12
    """Partitions of the events topic when sdloop creates it: bounds how many ingesters share
    the work. The control topic always gets one."""
    replication_factor: int = 1
    """Replication factor of both topics when sdloop creates them."""
    client_id: str = "sdloop"
    """The client id every Kafka producer, consumer and admin client of sdloop connects with."""
    buffer_max: int = 20_000
    """Events handed to the producer and not yet acknowledged by the broker; past it the
    gateway answers 503."""
    buffer_max_bytes: int = 256 * 1024 * 1024
    """The same bound in bytes (the events' JSON; with `feedback.redact`, an estimate made
    before redaction): a flood of large events is refused (503) long before `buffer_max` of them
    fill memory. An event larger than this alone is taken when nothing else waits."""
    ack_timeout_s: float = 10.0
    """Seconds POST /v1/feedback waits for the broker's acknowledgement before answering 503;
    also how long the ingester waits for a control command to be acknowledged."""
    delivery_timeout_s: float = 300.0
    """Seconds the producer keeps retrying an event while the broker is away; an event it gives
    up on is counted and logged. One broker request times out after 30 s, or this when shorter."""
    linger_ms: int = 5
    """Milliseconds the producer waits to batch events before sending (Kafka's `linger.ms`)."""
    group_id: str = "sdloop-ingest"
    """The ingesters' consumer group: ingesters with the same group share the events topic's
    partitions."""
    max_poll_records: int = 5000
    """Most messages the ingester takes in one poll: one batch, written to the store and its
    offsets committed together."""
    session_timeout_s: float = 10.0
    """The ingesters' consumer-group session timeout, seconds (Kafka's `session.timeout.ms`):
    an ingester not heard from this long loses its partitions to the others. Heartbeats go
    every third of it."""
    # Connection security, used by every Kafka client of sdloop.
    security_protocol: str = "PLAINTEXT"
    """PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, with the SASL settings below when used."""
    sasl_mechanism: str = ""
    """The SASL mechanism, passed to kafka-python as is. Empty: no SASL, and `sasl_username` /
    `sasl_password` are not used."""
    sasl_username: str = ""
    """The SASL user name (with `sasl_mechanism`)."""
    sasl_password: str = ""
    """The SASL password (with `sasl_mechanism`); better set from the environment
    (`SDLOOP_KAFKA__SASL_PASSWORD`) than in a config file."""
    ssl_cafile: str = ""
    """CA certificate file to check the brokers' certificates against (SSL, SASL_SSL). Empty:
    none is given to kafka-python."""
