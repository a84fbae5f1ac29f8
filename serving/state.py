"""How other commands find a running server: a lock and a state file in the data dir.

`serve` holds an exclusive lock on `serve.lock` for its lifetime (the kernel drops it if the
process dies, even by SIGKILL), so there is never a second server on one store, and a state
file written next to it says where the server listens and how to reach its admin API.
A state file whose lock is free is left over from a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "serve.lock"
# The process umask of the commands that write the data dir: the store and its WAL, logs,
# adapters, checkpoints — conversations and what was learned from them — for this user only.
PRIVATE_UMASK = 0o077


class AlreadyServing(RuntimeError):
    pass


class ServeLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            state = read_state_file(self.path.parent) or {}
            raise AlreadyServing(
                f"another `sdloop serve` (pid {state.get('pid', '?')}, {state.get('url', '?')}) "
                f"is using {self.path.parent}; stop it or pass another --data-dir"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def keep_private(data_dir: Path, *files: Path) -> None:
    """Make what this process writes readable by its user only, from now on: umask 0077 (which
    covers files others create for it, DuckDB's store and WAL among them), the data dir 0700 —
    created so, or tightened if this user owns it and others could read it, with a log line —
    and `files` (e.g. a store kept outside the data dir, and its WAL) 0600 where they exist.
    Called first thing by `sdloop serve`, `ingest` and `learn`."""
    os.umask(PRIVATE_UMASK)
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _tighten(data_dir, 0o700)
    for file in files:
        _tighten(file, 0o600)


def _tighten(path: Path, mode: int) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    if not stat.S_IMODE(st.st_mode) & 0o077:
        return
    if st.st_uid != os.getuid():
        log.warning("%s (mode %o) is readable by other users and not ours to change; its owner "
                    "should make it %o", path, stat.S_IMODE(st.st_mode), mode)
        return
    os.chmod(path, mode)
    log.warning("%s was readable by other users (mode %o); made it %o", path,
                stat.S_IMODE(st.st_mode), mode)


def is_locked(data_dir: Path) -> bool:
    path = data_dir / LOCK_FILE
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    path = data_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(state, fh, indent=2)
    os.replace(tmp, path)


def read_state_file(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def running_server(data_dir: Path) -> dict[str, Any] | None:
    """The state of the server that holds this data dir now, or None."""
    if not is_locked(data_dir):
        return None
    return read_state_file(data_dir)


def remove_state(data_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (data_dir / STATE_FILE).unlink()
