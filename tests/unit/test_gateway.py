"""The gateway in-process: Starlette's TestClient over the real app, the real store writer on a
DuckDB file, and a stand-in for vLLM's OpenAI server on loopback (canned answers in vLLM's
shapes). Validation, auth, error mapping and the relay are checked here, without starting
vLLM; the paths through the real engine are in tests/integration."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from feedback import CompletionEvent, Event, new_id, utcnow
from serving.engine.manager import engine_session
from serving.gateway.capture import StreamCapture
from serving.gateway.chat import _relay_stream
from serving.process import free_port
from serving.versions.registry import InFlight
from tests.harness.gateway import CASES, CHAT, HI, TOKEN, Bus, FakeEngine, Harness, gateway


@pytest.fixture(scope="module")
def fake_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine().start()
    yield engine
    engine.stop()


@pytest.fixture()
def gw(tmp_path: Any, fake_engine: FakeEngine) -> Iterator[Harness]:
    with gateway(tmp_path, f"http://127.0.0.1:{fake_engine.port}") as harness:
        yield harness


# -- validation: every bad request, in-process ---------------------------------------------


@pytest.mark.parametrize(("route", "body", "status", "words"), CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}-{c[2]}" for i, c in enumerate(CASES)])
def test_bad_request_gets_an_openai_error_naming_what_to_fix(gw: Harness, route, body, status,
                                                             words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = gw.client.post(route, content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text[:300]
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert words in error["message"] and error["type"] and "Traceback" not in error["message"]


def test_bad_requests_reach_neither_the_engine_nor_the_store(gw: Harness, fake_engine: FakeEngine):
    before = len(fake_engine.requests)
    for route, body, _, _ in CASES:
        gw.client.post(route, content=body if isinstance(body, bytes) else json.dumps(body).encode())
    assert len(fake_engine.requests) == before
    assert gw.rows("SELECT count(*) FROM completions") == [(0,)]
    assert gw.rows("SELECT count(*) FROM feedback") == [(0,)]


def test_wrong_method_is_405_with_an_openai_error(gw: Harness):
    resp = gw.client.get("/v1/chat/completions")
    assert resp.status_code == 405 and "not allowed" in resp.json()["error"]["message"]


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/admin/sql", {"sql": ""}, 422, "sql"),
    ("/admin/sql", {"sql": "SELECT 1", "max_rows": -1}, 422, "max_rows"),
    ("/admin/sql", {"sql": "SELECT ?", "params": "x"}, 422, "params"),
    ("/admin/sql", {"sql": "SELECT 1", "colour": 1}, 422, "unknown field"),
    ("/admin/sql", {"sql": "DELETE FROM feedback"}, 400, "read-only"),
    ("/admin/sql", {"sql": "SELEC nonsense"}, 400, "parse"),
    ("/admin/sql", {"sql": "SELECT ?, ?", "params": [1]}, 400, ""),
    ("/admin/adapters/publish", b"{not json", 400, "JSON"),
    ("/admin/adapters/publish", {}, 422, "path"),
    ("/admin/adapters/publish", {"path": "/nowhere/default@v9", "promote": "yes"}, 422, "promote"),
    ("/admin/adapters/publish", {"path": "/nowhere/default@v9"}, 404, "no adapter folder"),
    ("/admin/adapters/promote", {"version": 3}, 422, "version"),
    ("/admin/adapters/promote", {"version": "default@v999"}, 404, "no version"),
    ("/admin/adapters/rollback", {"alias": 7}, 422, "alias"),
    ("/admin/adapters/rollback", {"alias": "default"}, 409, "nothing to roll back"),
    ("/admin/adapters/explode", {}, 404, "publish, promote or rollback"),
])
def test_admin_bodies_are_checked_and_change_nothing(gw: Harness, path, body, status, words):
    aliases = gw.rows("SELECT alias, version, previous FROM aliases")
    resp = gw.client.post(path, content=body if isinstance(body, bytes) else json.dumps(body),
                          headers={"authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]["message"]
    assert gw.rows("SELECT alias, version, previous FROM aliases") == aliases


# -- who may call ----------------------------------------------------------------------------


def test_admin_routes_need_the_admin_token(gw: Harness):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
        resp = gw.client.post("/admin/sql", json={"sql": "SELECT 1"}, headers=headers)
        assert resp.status_code == 401 and "Bearer" in resp.json()["error"]["message"]
    ok = gw.client.post("/admin/sql", json={"sql": "SELECT 41 + 1 AS n"},
                        headers={"authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["rows"] == [[42]]


def test_api_key_guards_the_openai_routes_but_not_the_probes(tmp_path, fake_engine: FakeEngine):
    with gateway(tmp_path, f"http://127.0.0.1:{fake_engine.port}",
                 env={"SDLOOP_SERVER__API_KEY": "s3cret"}) as h:
        assert h.chat().status_code == 401
        assert h.client.get("/v1/models").status_code == 401
        assert h.client.post("/v1/feedback", json={}).status_code == 401
        keyed = h.client.post("/v1/chat/completions", json={"model": "default", "messages": HI},
                              headers={"authorization": "Bearer s3cret"})
        assert keyed.status_code == 200
        assert h.client.get("/healthz").status_code == 200
        assert h.client.get("/metrics").status_code == 200


# -- relaying the engine -----------------------------------------------------------------------


def test_a_non_streaming_answer_is_relayed_as_is_and_stored(gw: Harness, fake_engine: FakeEngine):
    resp = gw.chat(max_tokens=8, temperature=0)
    assert resp.status_code == 200 and resp.headers["x-sdloop-adapter-version"] == "base"
    data = resp.json()
    sent = fake_engine.requests[-1]
    assert sent["model"] == "base" and sent["return_token_ids"] is True  # alias -> engine name
    # vLLM names its answer after X-Request-Id: the id the client sees is the stored one.
    rows = gw.rows("SELECT id, response_text, token_ids, prompt_token_ids, completion_tokens, "
                   "params->>'$.max_tokens', status, finish_reason FROM completions")
    assert rows == [(data["id"], "Hello there.", [7, 8, 2], [1, 2, 3], 3, "8", "ok", "stop")]


def test_a_stream_is_relayed_event_by_event_and_stored_whole(gw: Harness):
    with gw.client.stream("POST", "/v1/chat/completions",
                          json={"model": "default", "messages": HI, "stream": True}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                   for e in events[:-1])
    assert text == "Red, green, blue."
    rows = gw.rows("SELECT response_text, token_ids, completion_tokens, prompt_tokens, ttft_ms, "
                   "latency_ms, stream FROM completions")
    (stored, ids, n_out, n_in, ttft, latency, stream), = rows
    assert stored == text and ids == [7, 8, 9, 2] and n_out == 4 and n_in == 3 and stream
    assert ttft is not None and 0 < ttft <= latency


def test_store_false_is_answered_and_leaves_no_row(gw: Harness, fake_engine: FakeEngine):
    first = gw.chat(store=False).json()
    history = [*HI, first["choices"][0]["message"], {"role": "user", "content": "No, say bye."}]
    assert gw.chat(history, store=False).status_code == 200
    with gw.client.stream("POST", CHAT, json={"model": "default", "messages": HI, "stream": True,
                                              "store": False}) as resp:
        assert [line for line in resp.iter_lines() if line][-1] == "data: [DONE]"
    assert gw.rows("SELECT (SELECT count(*) FROM completions) + (SELECT count(*) FROM followups)"
                   ) == [(0,)]
    assert "store" not in fake_engine.requests[-1]  # the gateway's to honour, not vLLM's


def test_metadata_and_user_are_stored_queryable_and_not_sent_to_the_engine(
        gw: Harness, fake_engine: FakeEngine):
    gw.chat(metadata={"team": "search", "run": "7"}, user="u-42")
    gw.chat(metadata={"team": "ads"})
    assert "metadata" not in fake_engine.requests[-1]
    assert gw.rows("SELECT metadata->>'run', end_user FROM completions "
                   "WHERE metadata->>'team' = 'search'") == [("7", "u-42")]


def test_a_streamed_answers_tool_calls_are_stored_as_a_whole_answers_are():
    event = CompletionEvent(event_id=new_id("ev"), completion_id="chatcmpl-x", created_at=utcnow(),
                            alias="default", version="base", messages=HI, params={}, stream=True)
    capture = StreamCapture(event, 0.0)
    deltas = [{"index": 0, "id": "call_1", "type": "function",
               "function": {"name": "weather", "arguments": ""}},
              {"index": 0, "function": {"arguments": '{"city_id": '}},
              {"index": 1, "id": "call_2", "type": "function", "function": {"name": "clock"}},
              {"index": 0, "function": {"arguments": '"FR-PAR"}'}}]
    capture.read(b"".join(
        b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"tool_calls": [d]},
                                             "token_ids": [i]}]}).encode() + b"\n\n"
        for i, d in enumerate(deltas)))
    capture.finish()
    assert event.response_message["tool_calls"] == [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city_id": "FR-PAR"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": ""}}]


class _SlowStream:
    """An engine response that sends its events a moment apart and then holds the connection
    open, as vLLM may for a moment after `[DONE]`."""

    def __init__(self, events: list[bytes]) -> None:
        self.events, self.released = events, False
        self.content = self

    async def iter_any(self) -> AsyncIterator[bytes]:
        for data in self.events:
            await asyncio.sleep(0.05)
            yield data
        await asyncio.sleep(3600)

    def release(self) -> None:
        self.released = True


class _Captured:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def capture_nowait(self, event: Event, request_bytes: int | None = None) -> None:
        self.events.append(event)


def _hang_up_after(received: int) -> CompletionEvent:
    """Relay a two-event stream as Starlette does; the client hangs up once it has read
    `received` of them."""
    events = [b'data: {"choices": [{"index": 0, "delta": {"content": "Hi."}, "token_ids": [5], '
              b'"finish_reason": "stop"}]}\n\n', b"data: [DONE]\n\n"]
    event = CompletionEvent(event_id=new_id("ev"), completion_id="chatcmpl-x", created_at=utcnow(),
                            alias="default", version="base", messages=HI, params={}, stream=True)
    gw, resp = _Captured(), _SlowStream(events)
    relay = _relay_stream(resp, StreamCapture(event, 0.0),  # type: ignore[arg-type]
                          InFlight(Counter(), "base"), gw.capture_nowait)
    got: list[bytes] = []

    async def send_all() -> None:
        async for chunk in relay:
            got.append(chunk)

    async def client() -> None:
        sending = asyncio.create_task(send_all())
        while len(got) < received:
            await asyncio.sleep(0.01)
        sending.cancel()  # Starlette cancels the response when the client disconnects
        with contextlib.suppress(asyncio.CancelledError):
            await sending

    asyncio.run(client())
    assert resp.released and gw.events == [event] and len(got) == received
    return event


def test_a_client_hanging_up_after_done_has_had_the_whole_answer():
    event = _hang_up_after(2)
    assert event.status == "ok" and event.response_text == "Hi." and event.token_ids == [5]


def test_a_client_hanging_up_before_done_is_recorded_as_disconnected():
    assert _hang_up_after(1).status == "client_disconnected"


def test_a_reply_followed_by_a_user_turn_is_linked_as_its_follow_up(gw: Harness):
    first = gw.chat().json()
    history = [*HI, first["choices"][0]["message"], {"role": "user", "content": "No, say bye."}]
    second = gw.chat(history).json()
    assert gw.rows("SELECT completion_id, next_completion_id, text, matched_by FROM followups") == [
        (first["id"], second["id"], "No, say bye.", "context")]


def test_the_engines_own_openai_error_passes_through(gw: Harness):
    resp = gw.chat(temperature=-1)
    assert resp.status_code == 400 and "temperature" in resp.json()["error"]["message"]


def test_an_engine_failure_that_is_not_json_becomes_a_502(gw: Harness):
    resp = gw.chat([{"role": "user", "content": "crash"}])
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "engine_error"


def test_an_engine_that_is_not_ready_or_unreachable_gives_503(tmp_path):
    with gateway(tmp_path, f"http://127.0.0.1:{free_port()}") as h:  # nothing listens there
        h.engine.ready = False
        resp = h.chat()
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable"
        h.engine.ready = True
        resp = h.chat()
        assert resp.status_code == 503 and "unavailable" in resp.json()["error"]["message"]
        assert h.engine.unreachable and not h.engine.ready  # routed nowhere until healthy again
        assert h.client.get("/readyz").status_code == 503
        assert h.rows("SELECT count(*) FROM completions") == [(0,)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_the_engine_dropped_is_sent_once_more_to_the_restarted_engine(
        gw: Harness, fake_engine: FakeEngine, stream: bool):
    gw.engine.restarts = True
    before = len(fake_engine.requests)
    resp = gw.chat([{"role": "user", "content": "die once"}], stream=stream)
    assert resp.status_code == 200, resp.text
    assert len(fake_engine.requests) == before + 2  # the dropped one, then the retry
    assert gw.engine.unreachable  # routed nowhere until the engine was back
    assert gw.rows("SELECT status, count(*) FROM completions GROUP BY status") == [("ok", 1)]


def test_a_request_dropped_with_no_engine_back_gets_503(gw: Harness):
    resp = gw.chat([{"role": "user", "content": "die once"}])  # the engine does not come back
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable"
    assert gw.rows("SELECT count(*) FROM completions") == [(0,)]  # it never answered


def test_unknown_alias_is_404_naming_the_models_served(gw: Harness):
    resp = gw.client.post("/v1/chat/completions", json={"model": "gpt-5", "messages": HI})
    assert resp.status_code == 404 and "default" in resp.json()["error"]["message"]


# -- feedback: what each sink outcome answers --------------------------------------------------


def test_feedback_is_201_once_committed_and_404_for_an_unknown_completion(gw: Harness):
    reply = gw.chat().json()
    ok = gw.client.post("/v1/feedback", json={"completion_id": reply["id"], "type": "rating",
                                              "score": 1})
    assert ok.status_code == 201 and gw.rows("SELECT id FROM feedback") == [(ok.json()["id"],)]
    missing = gw.client.post("/v1/feedback", json={"completion_id": "chatcmpl-nope",
                                                   "type": "rating", "score": 1})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "completion_id"


@pytest.mark.parametrize(("outcome", "status", "words"), [
    ("ack", 202, ""),
    ("full", 503, "12 events wait"),
    ("lost", 503, "did not take"),
    ("silent", 503, "did not confirm the feedback within 0.2 s"),
])
def test_feedback_on_a_bus_sink_answers_what_the_bus_did(tmp_path, fake_engine, outcome, status,
                                                         words):
    with gateway(tmp_path, f"http://127.0.0.1:{fake_engine.port}", sink=Bus(outcome)) as h:
        resp = h.client.post("/v1/feedback", json={"completion_id": "chatcmpl-elsewhere",
                                                   "type": "critique", "text": "Too long."})
        assert resp.status_code == status, resp.text
        if status == 202:
            assert resp.json()["type"] == "critique"
        else:
            assert words in resp.json()["error"]["message"] and "Kafka broker" in resp.text


VLLM_KEEP_ALIVE_S = 5.0  # vLLM's server closes a connection idle this long (VLLM_HTTP_TIMEOUT_KEEP_ALIVE)


def test_a_connection_to_an_engine_is_reused_only_well_inside_the_engines_keep_alive():
    """A request sent on a connection the engine is closing meets a reset that reads as a dead
    engine (the compiled engine was taken out of routing in CI); such a connection is never
    reused, a fresh one is still reused at once."""
    async def check() -> tuple[int, int, int]:
        async def peer_port(request: web.Request) -> web.Response:
            return web.Response(text=str(request.transport.get_extra_info("peername")[1]))

        app = web.Application()
        app.router.add_get("/health", peer_port)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        session = engine_session(aiohttp.ClientTimeout(total=5))

        async def ask() -> int:
            async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                return int(await resp.text())

        try:
            first, again = await ask(), await ask()
            await asyncio.sleep(VLLM_KEEP_ALIVE_S - 1)  # inside the engine's limit, by a loop's lag
            return first, again, await ask()
        finally:
            await session.close()
            await runner.cleanup()

    first, again, later = asyncio.run(check())
    assert again == first  # reused at once
    assert later != first  # not on a connection the engine may be closing
