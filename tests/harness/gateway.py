"""The gateway in-process for unit tests, without vLLM: a stand-in for vLLM's OpenAI server on
loopback (`FakeEngine`, canned answers in vLLM's shapes), the real app behind Starlette's
TestClient over the real store writer (`gateway`, yielding a `Harness`), a bus sink that does
what it is told (`Bus`), and every bad request a client can send (`CASES`, which
tests/integration sends to the real server too)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from aiohttp import web
from starlette.testclient import TestClient

from feedback import Event, SinkFull
from serving.config import load_config
from serving.gateway.app import create_app
from serving.gateway.deps import Gateway
from serving.process import free_port
from serving.versions.registry import AdapterRegistry
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
    """A gateway under test: its TestClient, the gateway, its engine state and its store."""

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


@contextlib.contextmanager
def gateway(tmp_path: Any, engine_url: str, env: dict[str, str] | None = None,
            sink: Any = None) -> Iterator[Harness]:
    """The real app on a fresh store in `tmp_path`, its engine at `engine_url` (a `FakeEngine`),
    events to `sink` (the store unless given), `env` on top of the admin token."""
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
