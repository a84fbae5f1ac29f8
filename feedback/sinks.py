"""Where captured events go. The gateway talks to a Sink and nothing else.

A sink accepts an event and returns a future that resolves once the event is durable (the
store committed it, or the Kafka broker acknowledged it). The gateway waits on that future for
explicit feedback — a 2xx means durable — and does not wait for completions and follow-ups,
which are written off the request path.

A sink raises, and fails its futures with, only the two errors below, so its callers never
need to know which sink they hold: `SinkFull` (take it again later: backlog at its bound, the
sink closed, the broker away) and `UnknownCompletion` (feedback on a completion the store
has never seen; only a sink that `stores` can know).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from feedback.events import Event


class SinkFull(RuntimeError):
    """The sink cannot take or deliver events now; the caller answers 503 and the client retries."""


class UnknownCompletion(LookupError):
    """Feedback names a completion id the store has never seen."""

    def __init__(self, completion_id: str) -> None:
        super().__init__(f"no completion with id '{completion_id}'")
        self.completion_id = completion_id


class Sink(Protocol):
    # Who makes an event durable, for messages: "feedback store" or "Kafka broker".
    name: str
    # True: a resolved future means the event is committed to the store (and feedback's
    # completion is known). False: the bus has it and an ingester stores it later.
    stores: bool
    # How long a caller that needs durability waits on a future before giving up.
    ack_timeout_s: float

    def submit(self, event: Event) -> Future[None]:
        """Queue an event; raises SinkFull instead of growing without bound."""
        ...

    @property
    def alive(self) -> bool:
        """False once the sink can no longer deliver anything (stopped or failed)."""
        ...

    def has_capacity(self) -> bool:
        """False when the backlog is near its bound: new work should be refused (503) before
        it produces events that could not be queued."""
        ...
