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
    # Replace emails, phone numbers and payment-card numbers by placeholders before storage.
    redact: bool = False
    # Where the gateway sends events: "store" (this process writes the DuckDB file) or "kafka"
    # (the events topic; `sdloop ingest` writes the store).
    sink: str = "store"
    # A tool result an agent sends back (a `tool` message after the assistant's `tool_calls`)
    # counts as a failed call, and so as an `env_error` signal on the answer that made it, when
    # the message says `"is_error": true` (or `metadata.is_error`), else when its content is a
    # JSON object whose key here says so: `error`-like keys when they hold a value, `ok` /
    # `success` when false, `exit_code` / `returncode` when not 0, `status_code` when >= 400,
    # `status` / `state` / `outcome` when "error", "failed", ... (dotted paths reach nested keys).
    tool_error_keys: list[str] = field(default_factory=lambda: [
        "error", "errors", "is_error", "isError", "exception", "ok", "success", "status",
        "exit_code", "returncode", "status_code"])
    # ... else when its text reads as a failure: a Python traceback, or a line opening with an
    # error label ("Error: ...", "ValueError: ...", "fatal: ...", "FAILED ...").
    tool_error_text: bool = True

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
    # Comma-separated host:port list of brokers.
    bootstrap_servers: str = "127.0.0.1:9092"
    # Completions, follow-ups, feedback and replica reports, keyed by conversation.
    events_topic: str = "sdloop.events"
    # Adapter publish/promote/rollback commands, one partition, read by every replica.
    control_topic: str = "sdloop.control"
    # Shared secret (16+ characters) that signs control-topic commands (HMAC-SHA256): the
    # ingester signs, every replica refuses a command without a valid signature, so producing
    # to the topic is not enough to change the served version. Needed by `sdloop ingest` and
    # every Kafka replica, the same value on all of them; set it from the environment
    # (SDLOOP_KAFKA__CONTROL_SECRET), never in a config file.
    control_secret: str = ""
    # Create missing topics at start (needs the broker's create permission).
    create_topics: bool = True
    partitions: int = 12
    replication_factor: int = 1
    client_id: str = "sdloop"
    # Events handed to the producer and not yet acknowledged; past it the gateway answers 503.
    buffer_max: int = 20_000
    # The same bound in bytes (the events' JSON; before redaction, an estimate): a flood of
    # large events is refused (503) long before `buffer_max` of them fill memory.
    buffer_max_bytes: int = 256 * 1024 * 1024
    # How long POST /v1/feedback waits for the broker's acknowledgement before answering 503.
    ack_timeout_s: float = 10.0
    # How long the producer keeps retrying an event while the broker is away.
    delivery_timeout_s: float = 300.0
    linger_ms: int = 5
    # The ingesters' consumer group.
    group_id: str = "sdloop-ingest"
    max_poll_records: int = 5000
    session_timeout_s: float = 10.0
    # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL, with the SASL settings below when used.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
