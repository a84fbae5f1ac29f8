"""Start a throwaway `sdloop serve` for a benchmark: the one way every bench gets a server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serving.process import free_port, stop_child
from serving.state import running_server


def start_server(data_dir: Path, env: dict[str, str] | None = None,
                 ) -> tuple[subprocess.Popen[bytes], dict]:
    """`sdloop serve --no-learner` on a free port; returns once /readyz answers 200.

    Output goes to `<data_dir>/serve.out`; `env` adds SDLOOP_* overrides to the child's."""
    port = free_port()
    log = open(data_dir / "serve.out", "ab")  # noqa: SIM115 - the child writes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.commands", "serve", "--data-dir", str(data_dir),
         "--port", str(port), "--no-learner"], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})})
    wait_until_up(proc, f"http://127.0.0.1:{port}/readyz", "sdloop serve",
                  data_dir / "serve.out")
    return proc, running_server(data_dir) or {}


def wait_until_up(proc: subprocess.Popen[bytes], probe_url: str, name: str, log: Path,
                  timeout_s: float = 900) -> None:
    """Poll `probe_url` until it answers 200; exit the bench if `proc` dies or never gets there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited; see {log}")
        try:
            with urllib.request.urlopen(probe_url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"{name} did not become ready")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    stop_child(proc, timeout_s=60)


@contextmanager
def bench_server(label: str, prefix: str, env: dict[str, str],
                 keep: bool) -> Iterator[tuple[Path, dict]]:
    """A server on a fresh temporary data dir for one run: (data dir, state file). Stopped on
    exit; the dir is removed after a run that finished unless `keep` — a failed run's stays,
    for its logs."""
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"[{label}] serving on {data_dir}", flush=True)
    proc, state = start_server(data_dir, env)
    try:
        yield data_dir, state
    finally:
        stop_server(proc)
    if not keep:
        shutil.rmtree(data_dir, ignore_errors=True)
