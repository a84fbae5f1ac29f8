"""The request path's limits against the real server (vLLM, DuckDB): deeply nested bodies, what
is stored of a request, redaction of adversarial text, and a disk that fills up under the
store. What each refusal answers is checked in-process too (tests/unit/test_request_limits.py)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.harness.server import Server, metric, start_gateway, wait_for_rows

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "Say hi."}]


def _tracebacks(server: Server) -> int:
    return server.log.read_text(errors="replace").count("Traceback")


def _chat(server: Server, **extra: object) -> dict:
    status, _, body = server.request("POST", CHAT, {"model": "default", "messages": HI,
                                                    "max_tokens": 4, **extra})
    assert status == 200, body[:500]
    return json.loads(body)


def test_a_body_nested_100k_deep_is_a_400_and_logs_no_traceback(server: Server):
    before = _tracebacks(server)
    deep_lists = b"[" * 100_000 + b"]" * 100_000
    deep_objects = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
    for route, raw in [
        (CHAT, deep_lists),
        (CHAT, b'{"model": "default", "messages": [{"role": "user", "content": "hi"}], '
               b'"x": ' + deep_objects + b"}"),
        ("/v1/feedback", b'{"completion_id": "c", "type": "rating", "score": 1, "metadata": '
                         + deep_objects + b"}"),
    ]:
        status, _, body = server.request("POST", route, raw=raw)
        assert status == 400, body[:300]
        error = json.loads(body)["error"]
        assert "deeper than 64 levels" in error["message"] and error["code"] == "json_too_deep"
    _chat(server)  # and it still serves
    assert _tracebacks(server) == before


def test_unknown_parameters_reach_the_engine_but_only_sampling_parameters_are_stored(
        server: Server):
    reply = _chat(server, temperature=0, seed=7, junk="x" * (3 * 1024 * 1024))
    rows = wait_for_rows(server, f"SELECT params FROM completions WHERE id = '{reply['id']}'")
    assert rows[0]["params"] == {"max_tokens": 4, "temperature": 0, "seed": 7}


@pytest.fixture()
def own_gateway(server: Server, tmp_path: Path):
    """A gateway of its own on the session's engine, redacting, with a store of its own."""
    with start_gateway(server, tmp_path / "own", {"SDLOOP_FEEDBACK__REDACT": "true"}) as gw:
        yield gw


def test_redacting_a_100k_adversarial_feedback_does_not_stall_other_requests(own_gateway: Server):
    gw = own_gateway
    reply = _chat(gw)
    pings: list[tuple[int, float]] = []  # (status, seconds); a request that raised: 0
    done = threading.Event()

    def ping() -> None:  # another client, all along: the event loop must keep answering it
        while not done.is_set():
            started = time.monotonic()
            try:
                status = gw.request("GET", "/healthz")[0]
            except Exception:  # noqa: BLE001 - counted as a failed ping, asserted below
                status = 0
            pings.append((status, time.monotonic() - started))
            time.sleep(0.02)

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    try:
        for text in ("-1" * 50_000, "a." * 50_000, "1 " * 49_999 + "x"):  # 10 s each before
            started = time.monotonic()
            status, _, body = gw.request("POST", "/v1/feedback", {
                "completion_id": reply["id"], "type": "critique", "text": text})
            assert status == 201, body
            assert time.monotonic() - started < 3
    finally:
        done.set()
        pinger.join(10)
    assert not pinger.is_alive()
    assert pings and all(status == 200 for status, _ in pings), pings
    assert max(seconds for _, seconds in pings) < 1.0
    assert len(gw.sql("SELECT id FROM feedback")) == 3


def test_a_full_disk_answers_feedback_503_and_readyz_503_until_there_is_space(own_gateway: Server):
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "prlimit"):
        pytest.skip("needs prlimit (Linux)")
    gw = own_gateway
    reply = _chat(gw)
    status, _, _ = gw.request("POST", "/v1/feedback", {"completion_id": reply["id"],
                                                       "type": "rating", "score": 1})
    assert status == 201
    errors_before = metric(gw, "sdloop_store_write_errors_total")
    soft, hard = resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE)
    # The server may grow no file from now on: its writes fail as on a full disk (EFBIG, the
    # way ENOSPC does), the store's WAL and its log alike.
    resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (0, hard))
    try:
        status, _, body = gw.request("POST", "/v1/feedback", {
            "completion_id": reply["id"], "type": "critique", "text": "while full"})
        assert status == 503, body
        error = json.loads(body)["error"]
        assert error["code"] == "store_unavailable" and "retry" in error["message"]
        status, _, body = gw.request("GET", "/readyz")
        assert status == 503 and "cannot write" in json.dumps(json.loads(body)["reasons"])
        _chat(gw)  # answered; its completion is not stored, and that is counted
        deadline = time.monotonic() + 10
        while metric(gw, "sdloop_store_write_errors_total") <= errors_before + 1 and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric(gw, "sdloop_store_write_errors_total") >= errors_before + 2
    finally:
        resource.prlimit(gw.proc.pid, resource.RLIMIT_FSIZE, (soft, hard))  # space again
    deadline = time.monotonic() + 30  # the writer's probe notices, with no traffic
    while gw.request("GET", "/readyz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert gw.request("GET", "/readyz")[0] == 200
    status, _, _ = gw.request("POST", "/v1/feedback", {
        "completion_id": reply["id"], "type": "critique", "text": "after"})
    assert status == 201
    rows = gw.sql("SELECT type, text FROM feedback ORDER BY created_at")
    assert rows == [{"type": "rating", "text": None}, {"type": "critique", "text": "after"}]
