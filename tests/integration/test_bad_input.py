"""Every bad request gets an OpenAI-style JSON error with the right status, and costs nothing
that was accepted before it."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import Server

CHAT = "/v1/chat/completions"
FEEDBACK = "/v1/feedback"
OK_MESSAGES = [{"role": "user", "content": "hi"}]

CASES = [
    # (route, body given as bytes or JSON-able, status, words the message must contain)
    (CHAT, b'{"model": "default", "messages": [', 400, "not valid JSON"),
    (CHAT, b"", 400, "empty"),
    (CHAT, b"[1, 2]", 400, "JSON object"),
    (CHAT, {"messages": OK_MESSAGES}, 422, "model: field required"),
    (CHAT, {"model": "default"}, 422, "messages: field required"),
    (CHAT, {"model": "default", "messages": []}, 422, "messages"),
    (CHAT, {"model": "default", "messages": "hi"}, 422, "messages"),
    (CHAT, {"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, 422, "role"),
    (CHAT, {"model": "default", "messages": [{"content": "x"}]}, 422, "role: field required"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "stream": "yes"}, 422, "stream"),
    (CHAT, {"model": 7, "messages": OK_MESSAGES}, 422, "model"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "n": 2}, 422, "n=1"),
    (CHAT, {"model": "no-such-model", "messages": OK_MESSAGES}, 404, "does not exist"),
    (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "'
     + b"x" * (5 * 1024 * 1024) + b'"}]}', 413, "limit"),
    (FEEDBACK, b"{nope", 400, "not valid JSON"),
    (FEEDBACK, {"type": "rating", "score": 1}, 422, "completion_id: field required"),
    (FEEDBACK, {"completion_id": "chatcmpl-x", "score": 1}, 422, "type: field required"),
    (FEEDBACK, {"completion_id": "chatcmpl-x", "type": "praise", "text": "x"}, 422, "type"),
    (FEEDBACK, {"completion_id": "chatcmpl-x", "type": "rating"}, 422, "score"),
    (FEEDBACK, {"completion_id": "chatcmpl-x", "type": "rating", "score": "high"}, 422, "score"),
    (FEEDBACK, {"completion_id": "chatcmpl-x", "type": "correction"}, 422, "text"),
    (FEEDBACK, {"completion_id": "chatcmpl-x", "type": "correction", "text": "  "}, 422, "text"),
    (FEEDBACK, {"completion_id": "chatcmpl-x", "type": "rating", "score": 1, "colour": 3}, 422,
     "unknown field"),
    (FEEDBACK, {"completion_id": "chatcmpl-never-issued", "type": "rating", "score": 1}, 404,
     "Unknown completion_id"),
    ("/v1/nothing-here", {}, 404, "No route"),
]


@pytest.fixture(scope="module")
def accepted(server: Server, openai_client_module):
    """Feedback accepted before any bad request; it must survive them all."""
    reply = openai_client_module.chat.completions.create(
        model="default", messages=OK_MESSAGES, max_tokens=4)
    status, _, body = server.request(
        "POST", FEEDBACK, {"completion_id": reply.id, "type": "rating", "score": 1})
    assert status == 201
    return json.loads(body)["id"]


@pytest.fixture(scope="module")
def openai_client_module(server: Server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.mark.parametrize(("route", "body", "status", "words"), CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}-{c[2]}" for i, c in enumerate(CASES)])
def test_bad_request_gets_openai_error(server: Server, accepted, route, body, status, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, headers, payload = server.request("POST", route, raw=raw)
    assert got == status, payload[:300]
    assert headers.get("content-type", "").startswith("application/json")
    error = json.loads(payload)["error"]
    assert words in error["message"], error
    assert error["type"] and "Traceback" not in error["message"]


def test_wrong_method_is_405(server: Server):
    status, _, payload = server.request("GET", CHAT)
    assert status == 405 and json.loads(payload)["error"]["message"]


def test_bad_sql_through_admin_api_is_400(server: Server):
    token = server.state()["admin_token"]
    status, _, payload = server.request(
        "POST", "/admin/sql", {"sql": "SELEC nonsense"}, headers={"authorization": f"Bearer {token}"})
    assert status == 400 and "parse" in json.loads(payload)["error"]["message"]


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/admin/sql", {"sql": "SELECT ?", "params": "x"}, 422, "params"),
    ("/admin/sql", {"sql": "SELECT ?, ?", "params": [1]}, 400, ""),
    ("/admin/adapters/publish", {}, 422, "path"),
    ("/admin/adapters/publish", {"path": "/nowhere/default@v9", "promote": "yes"}, 422, "promote"),
    ("/admin/adapters/publish", {"path": "/nowhere/default@v9"}, 404, "no adapter folder"),
    ("/admin/adapters/publish", b"{not json", 400, "json"),
    ("/admin/adapters/promote", {"version": 3}, 422, "version"),
    ("/admin/adapters/promote", {"version": "default@v999"}, 404, "no version"),
    ("/admin/adapters/rollback", {"alias": 7}, 422, "alias"),
    ("/admin/adapters/rollback", {"alias": "nope"}, 404, "no alias"),
    ("/admin/adapters/explode", {}, 404, "publish, promote or rollback"),
])
def test_malformed_admin_requests_say_what_to_fix_and_change_nothing(server: Server, path, body,
                                                                      status, words):
    auth = {"authorization": f"Bearer {server.state()['admin_token']}"}
    aliases = server.admin_sql("SELECT alias, version FROM aliases ORDER BY alias")
    got, _, payload = server.request("POST", path, raw=body if isinstance(body, bytes) else None,
                                     body=None if isinstance(body, bytes) else body, headers=auth)
    message = json.loads(payload)["error"]["message"]
    assert got == status and message and words.lower() in message.lower(), (got, message)
    assert server.admin_sql("SELECT alias, version FROM aliases ORDER BY alias") == aliases


def test_nothing_accepted_is_lost_and_the_server_still_serves(server: Server, accepted):
    for route, body, _, _ in CASES:  # all of them again, back to back
        server.request("POST", route, raw=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert server.sql(f"SELECT id FROM feedback WHERE id = '{accepted}'") == [{"id": accepted}]
    status, _, _ = server.request("POST", CHAT, {"model": "default", "messages": OK_MESSAGES,
                                                 "max_tokens": 2})
    assert status == 200
