"""Bad requests against the real server: they cost nothing that was accepted before them, and
the server still serves. What each one answers is checked in-process
(tests/unit/test_gateway.py), which needs no engine."""

from __future__ import annotations

import json

import pytest

from tests.harness.gateway import CASES, CHAT, FEEDBACK, OK_MESSAGES
from tests.harness.server import Server


@pytest.fixture(scope="module")
def accepted(server: Server):
    """Feedback accepted before any bad request; it must survive them all."""
    status, _, body = server.request("POST", CHAT, {"model": "default", "messages": OK_MESSAGES,
                                                    "max_tokens": 4})
    assert status == 200, body
    status, _, body = server.request(
        "POST", FEEDBACK, {"completion_id": json.loads(body)["id"], "type": "rating", "score": 1})
    assert status == 201
    return json.loads(body)["id"]


def test_nothing_accepted_is_lost_and_the_server_still_serves(server: Server, accepted):
    for route, body, status, _ in CASES:
        got, headers, payload = server.request(
            "POST", route, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
        assert got == status, payload[:300]  # the same answer as in-process
        assert headers.get("content-type", "").startswith("application/json")
    assert server.sql(f"SELECT id FROM feedback WHERE id = '{accepted}'") == [{"id": accepted}]
    status, _, _ = server.request("POST", CHAT, {"model": "default", "messages": OK_MESSAGES,
                                                 "max_tokens": 2})
    assert status == 200
