"""Prometheus metrics of the gateway and engine manager (module-level, registered once)."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("sdloop_http_requests", "HTTP requests by route and status.", ["route", "status"])
REQUEST_SECONDS = Histogram(
    "sdloop_http_request_seconds",
    "Time from request to the last byte of the response, by route.",
    ["route"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
TTFT_SECONDS = Histogram(
    "sdloop_time_to_first_token_seconds",
    "Time from a streaming chat request to its first generated token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TOKENS = Counter(
    "sdloop_tokens", "Prompt (in) and generated (out) tokens, by alias.", ["direction", "alias"]
)
FEEDBACK_EVENTS = Counter("sdloop_feedback_events", "Feedback events captured, by type.", ["type"])
FOLLOWUPS_SEEN = Counter(
    "sdloop_followups_seen", "Requests whose last user message follows an assistant reply."
)
TOOL_RESULTS_SEEN = Counter(
    "sdloop_tool_results_seen", "Tool results sent back after an assistant's tool calls, by "
    "outcome (failed: an env_error signal on the answer that made the call).", ["outcome"]
)
CAPTURE_DROPPED = Counter(
    "sdloop_capture_dropped", "Completions not captured because the store queue was full."
)
ENGINE_UP = Gauge(
    "sdloop_engine_up", "1 while the engine answers its health check, by role (primary: base "
    "model and runtime LoRA; compiled: an engine without LoRA on base or merged weights).",
    ["role"])
ENGINE_RESTARTS = Counter(
    "sdloop_engine_restarts", "Times an engine process died and was restarted, by role.", ["role"])
RETRIED_AFTER_RESTART = Counter(
    "sdloop_requests_retried_after_restart",
    "Chat requests the engine dropped, sent once more to the restarted engine.")
ALIAS_VERSION = Gauge(
    "sdloop_alias_version", "1 for the version each alias points to now.", ["alias", "version"]
)
SWAP_SECONDS = Histogram(
    "sdloop_adapter_swap_seconds",
    "Management call (publish, promote, rollback) to the alias flip — hash check, load, probe, "
    "flip: from then on new requests get the new version (draining the old one comes after).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
SWAP_FAILURES = Counter("sdloop_adapter_swap_failures", "Versions rejected at publish.")
RESTORE_FALLBACKS = Counter(
    "sdloop_adapter_restore_fallbacks",
    "Aliases moved back to their previous version or base because the version they pointed to "
    "failed its checks (hashes, load, probe) when restored into a restarted engine, by alias.",
    ["alias"])
CONTROL_REFUSED = Counter(
    "sdloop_control_commands_refused",
    "Control-topic records a replica did not apply, by reason: unsigned, bad_signature (not "
    "signed with kafka.control_secret, or changed), replayed (a command id applied already), "
    "wrong_topic (signed for another control topic), malformed, error (raised while applied).",
    ["reason"])
PROBE_MISMATCHES = Counter(
    "sdloop_adapter_probe_mismatches",
    "Versions whose engine log-probabilities did not match the trainer's probe.",
)
MERGED_STATE = Gauge(
    "sdloop_merged_engine_state",
    "1 for the state of the compiled engine of the merged alias's live version (base or merged "
    "weights): waiting, merging, starting, serving (requests go there), restarting, failed "
    "(the primary engine serves the version).", ["state"])
