"""Management operations while other clients chat: versions are published, promoted and rolled
back every couple of seconds under eight concurrent clients (streaming and not, on the alias
being flipped), and no request fails and the engine never restarts. The probe of every publish
and promote runs while the engine batches the clients' requests — where a `prompt_logprobs`
probe killed vLLM-CPU's engine core."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.harness.server import (
    Server,
    back_to_base,
    clients_chatting,
    fresh_version,
    metric,
)

CLIENTS = 8
FLIPS = 6  # publish, rollback, promote, rollback, ...: one management call every ~2 s


def _admin(server: Server, action: str, body: dict) -> tuple[int, dict]:
    status, _, raw = server.request("POST", f"/admin/adapters/{action}", body, headers={
        "authorization": f"Bearer {server.state()['admin_token']}"})
    return status, json.loads(raw)


def test_versions_flip_while_eight_clients_chat_and_no_request_fails(
        server: Server, taught_adapter: str, tmp_path: Path):
    back_to_base(server)
    restarts = metric(server, 'sdloop_engine_restarts_total{role="primary"}')
    swaps = metric(server, "sdloop_adapter_swap_seconds_count")
    calls = []
    with clients_chatting(server, CLIENTS) as answers:
        folder = fresh_version(server, taught_adapter, tmp_path)
        version = Path(folder).name
        for flip in range(FLIPS):
            if flip == 0:
                calls.append(_admin(server, "publish", {"path": folder}))
            elif flip % 2:
                calls.append(_admin(server, "rollback", {"alias": "default"}))
            else:
                calls.append(_admin(server, "promote", {"version": version}))
            time.sleep(2)

    assert [status for status, _ in calls] == [200] * FLIPS, calls
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:3]}"
    served = {version_ for _, version_ in answers}
    assert {"base", version} <= served, served  # the clients saw both sides of the flips
    assert len(answers) >= CLIENTS * 2
    assert metric(server, 'sdloop_engine_restarts_total{role="primary"}') == restarts
    assert metric(server, "sdloop_adapter_swap_seconds_count") >= swaps + 1
    back_to_base(server)
