"""Control-topic commands as a publisher writes them, and their signatures: for tests of what a
replica admits (serving.versions.control) and of who may publish them."""

from __future__ import annotations

import json
from typing import Any

from feedback import new_id
from serving.versions.control import SIGNATURE_HEADER
from tests.harness.replica_fakes import hmac_sha256

SECRET = b"unit-test-control-secret"
TOPIC = "control-test"


def command(action: str = "promote", topic: str = TOPIC, **fields: Any) -> bytes:
    """A command's record value: `action` for `topic`, a promote of default@v2 unless told."""
    body = {"id": new_id("ctl"), "at": "2026-01-01T00:00:00", "topic": topic, "action": action,
            **({"version": "default@v2", "alias": "default"} if action == "promote" else {}),
            **fields}
    return json.dumps(body).encode()


def signed(value: bytes, secret: bytes = SECRET) -> list[tuple[str, bytes | None]]:
    """The headers of a record whose value is `value`, signed with `secret`."""
    return [(SIGNATURE_HEADER, hmac_sha256(secret, value))]
