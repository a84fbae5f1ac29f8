"""Child processes: a free loopback port for one, a child that dies with its parent, a
leftover engine's process group stopped after a crash, a child stopped politely then firmly.

Shared by everything that starts processes (the engines, the merge, the learner daemon, the
benches), so that each does it the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def kill_process_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a leftover engine group, but only if its leader still looks like vLLM."""
    try:
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"vllm" not in cmdline:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
        return True
    return False


def stop_child(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
