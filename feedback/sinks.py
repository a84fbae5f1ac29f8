"""Where captured events go. The gateway talks to a Sink and nothing else.

A sink accepts an event and returns a future that resolves once the event is durable (the
store committed it, or the Kafka broker acknowledged it). The gateway waits on that future for
explicit feedback — a 2xx means committed — and does not wait for completions and follow-ups,
which are written off the request path.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Protocol

from feedback.events import Event


class SinkFull(RuntimeError):
    """The sink cannot take more events now; the caller answers 503 and the client retries."""


class Sink(Protocol):
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
