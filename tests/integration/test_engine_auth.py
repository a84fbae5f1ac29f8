"""The vLLM child answers only the gateway: every request to it needs the engine's API key (a
random one per server, in the state file for the learner), so no other local process chats
past the capture or unloads the serving adapter. Its health check stays open: the gateway's
monitor polls it without a key."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from tests.harness.server import QUESSANY, Server, engine_headers

CHAT = {"model": "base", "messages": QUESSANY, "max_tokens": 2}


def _engine(server: Server, method: str, path: str, body: dict | None = None,
            headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(
        server.state()["engine_url"] + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_requests_straight_to_the_engine_without_its_key_get_401_while_chat_goes_through(
        server: Server):
    for method, path, body in [
        ("POST", "/v1/chat/completions", CHAT),
        ("POST", "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 2}),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "default@v1"}),
        ("POST", "/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": "/tmp"}),
        ("GET", "/v1/models", None),
        # Outside vLLM's own guarded prefixes: SageMaker's route answers chat bodies.
        ("POST", "/invocations", CHAT),
        ("POST", "/tokenize", {"model": "base", "prompt": "Hi"}),
    ]:
        assert _engine(server, method, path, body) == 401, path
        assert _engine(server, method, path, body,
                       {"authorization": "Bearer not-the-key"}) == 401, path
    assert _engine(server, "GET", "/health") == 200  # what the gateway's monitor polls
    assert _engine(server, "POST", "/v1/chat/completions", CHAT, engine_headers(server)) == 200

    status, headers, body = server.request("POST", "/v1/chat/completions", {
        "model": "default", "messages": QUESSANY, "max_tokens": 4})
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"]


def test_the_engine_key_is_not_on_its_command_line(server: Server):
    """Every local user can read a process's command line (/proc/PID/cmdline, ps); the key is
    in the engine's environment, which only its user can read."""
    state = server.state()
    cmdline = Path(f"/proc/{state['engine_pgid']}/cmdline").read_bytes()
    assert b"vllm" in cmdline and state["engine_api_key"].encode() not in cmdline
    assert b"--api-key" not in cmdline
    assert state["engine_api_key"]
