"""What `serving.versions.control.ControlFollower` drives on a replica — its registry, engine and sink —
without vLLM, for tests of how a replica follows the control topic (which commands it applies,
which it refuses, what it reports)."""

from __future__ import annotations

import hashlib
import hmac
from concurrent.futures import Future
from typing import Any, NamedTuple

from feedback import Event


class ControlRecord(NamedTuple):
    """The fields of a kafka ConsumerRecord the follower reads."""

    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes | None]]
    topic: str = "control-test"


class RecordingRegistry:
    """Applies nothing; remembers each call. `fail_on` names a version whose promote raises
    something no registry should (a bug), to show one command cannot stop the follower."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_on = fail_on

    async def publish(self, path: str, promote: bool = True) -> dict[str, Any]:
        self.calls.append(("publish", path))
        return {"status": "promoted" if promote else "candidate"}

    async def promote(self, version: str) -> dict[str, Any]:
        if version == self.fail_on:
            raise KeyError(version)
        self.calls.append(("promote", version))
        return {"status": "promoted"}

    async def rollback(self, alias: str) -> dict[str, Any]:
        self.calls.append(("rollback", alias))
        return {"status": "promoted"}

    def aliases(self) -> dict[str, str]:
        return {}


class ReadyEngine:
    async def wait_ready(self, timeout: float) -> bool:
        return True


class ListSink:
    """Keeps the replica's reports (`ReplicaVersionEvent`s) instead of sending them."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def submit(self, event: Event) -> Future[None]:
        self.events.append(event)
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def hmac_sha256(secret: bytes, value: bytes) -> bytes:
    """The signature header's value, computed here independently of `serving.versions.control`."""
    return b"hmac-sha256=" + hmac.new(secret, value, hashlib.sha256).hexdigest().encode()
