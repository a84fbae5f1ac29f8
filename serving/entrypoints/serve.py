"""`sdloop serve`: the store writer, the engine, the gateway, wired together and run.

Start-up order follows the data flow backwards — the store first (nothing may be accepted
that cannot be written), then the gateway starts listening (health answers at once, chat
answers 503 until the engine is up), then the engine. Shutdown runs the other way: stop
accepting, stop the engine, then drain and close the store so nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from feedback import Sink
from feedback.kafka import KafkaSink
from serving.config import Config
from serving.engine.manager import EngineManager
from serving.engine.merged import MergedServing
from serving.gateway.app import create_app
from serving.gateway.auth import KeyRing
from serving.gateway.deps import Gateway
from serving.model_cache import ensure_embedded_model
from serving.process import die_with_parent, kill_process_group, stop_child
from serving.state import ServeLock, read_state_file, remove_state, write_state
from serving.versions.control import ControlFollower, LocalTables, control_secret
from serving.versions.registry import AdapterRegistry
from store import DEFAULT_ALIAS, StoreWriter

log = logging.getLogger("sdloop.serve")


def run_server(cfg: Config, config_path: str | None = None, learner: bool = True) -> int:
    """Serve until stopped; with `learner`, `sdloop learn` runs beside it as a child process."""
    data_dir = cfg.data_path
    if cfg.feedback.sink == "kafka":  # a replica that cannot check commands must not start
        control_secret(cfg.kafka)
    lock = ServeLock(data_dir)
    lock.acquire()
    try:
        _clean_up_after_crash(data_dir)
        # The base model's folder: what the engine child serves, and what versions are merged
        # into. An external engine (`engine.url`) has one only if `engine.model` names it.
        model = cfg.engine.model or None
        if not cfg.engine.url and not model:
            model = str(ensure_embedded_model(cfg.model_cache_path))
        if cfg.feedback.sink == "kafka":
            if learner:  # its store is the ingester's: run `sdloop learn` on that data dir
                log.info("feedback.sink = kafka: no learner beside this replica; run `sdloop "
                         "learn` with the ingester's data dir")
            sink: Any = KafkaSink(cfg.kafka, redact=cfg.feedback.redact).open()
            try:
                return _serve(cfg, sink, None, model, None, learner=False)
            finally:
                sink.close()
                remove_state(data_dir)
        store = StoreWriter(cfg.store_path, cfg.store.batch_max, cfg.store.queue_max,
                            cfg.store.queue_max_bytes, redact=cfg.feedback.redact,
                            checkpoint_mb=cfg.store.checkpoint_mb).open()
        try:
            return _serve(cfg, store, store, model, config_path if learner else None, learner)
        finally:
            store.close()
            remove_state(data_dir)
    finally:
        lock.release()


def _clean_up_after_crash(data_dir: Any) -> None:
    """A state file with no live server means the last one died; its engine may not have."""
    stale = read_state_file(data_dir) or {}
    compiled = stale.get("compiled_engines")
    for pgid in [stale.get("engine_pgid"),
                 *(e.get("pgid") for e in (compiled.values() if isinstance(compiled, dict) else ())
                   if isinstance(e, dict))]:
        if isinstance(pgid, int) and kill_process_group(pgid):
            log.warning("stopped engine processes left by a server that died (pgid %s)", pgid)
    remove_state(data_dir)


def _serve(cfg: Config, sink: Sink, store: StoreWriter | None, model: str | None,
           config_path: str | None, learner: bool) -> int:
    """With a store, this process keeps the registry's tables in it; without (Kafka), a local
    copy follows the control topic."""
    engine = EngineManager(cfg.engine, model, cfg.data_path / "logs" / "engine.log")
    registry = AdapterRegistry(store if store is not None else LocalTables(), engine,
                               publish_dirs=cfg.publish_paths)
    engine.on_ready = registry.restore  # a (re)started engine gets the promoted versions back
    if cfg.engine.merged_alias and model:
        registry.merged = MergedServing(cfg.engine, model, cfg.data_path / "merged",
                                        cfg.data_path / "logs" / "engine-merged.log",
                                        registry.drain)
    elif cfg.engine.merged_alias:
        log.info("engine.url without engine.model: the live version is served with runtime "
                 "LoRA (set engine.model to the base model's folder to serve it merged)")
    admin_token = cfg.server.admin_token or secrets.token_urlsafe(24)
    gateway = Gateway(cfg, engine, registry, sink, store, admin_token)
    url = f"http://{cfg.server.host}:{cfg.server.port}"
    follower = None
    if store is None:
        replica = cfg.server.replica_id or f"{socket.gethostname()}:{cfg.server.port}"
        gateway.keys = KeyRing(cfg.server.api_key, settled=False)  # from the control topic
        follower = ControlFollower(cfg.kafka, registry, engine, sink, replica, gateway.keys)
        gateway.versions_ready = lambda: follower.caught_up

    def save_state() -> None:
        write_state(cfg.data_path, {
            "pid": os.getpid(), "url": url, "admin_token": admin_token,
            "engine_url": engine.base_url, "engine_pgid": engine.pgid,
            # The engine's bearer key (the learner samples from it); the file is 0600.
            "engine_api_key": engine.api_key,
            "compiled_engines": registry.merged.engines if registry.merged else {},
            "store": str(cfg.store_path), "started_at": time.time(),
        })

    async def announce_when_ready() -> None:
        while True:
            if await engine.wait_ready(3600):
                save_state()  # engine_url / pgid after a (re)start
                print(f"sdloop serving {url}/v1 (alias '{DEFAULT_ALIAS}' -> "
                      f"{registry.resolve(DEFAULT_ALIAS)}); feedback store {cfg.store_path}",
                      flush=True)
                compiled = registry.merged.engines if registry.merged else {}
                while engine.ready:
                    await asyncio.sleep(1)
                    if registry.merged and registry.merged.engines != compiled:
                        compiled = registry.merged.engines
                        save_state()  # so that a server starting after a crash can stop them
                save_state()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await registry.load()
        await gateway.open()
        await gateway.reload_keys()
        if gateway.keys.open and cfg.server.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("no API key is set and the gateway listens on %s: anyone who can reach "
                        "it may chat and teach the model (`sdloop keys add`)", cfg.server.host)
        await engine.start()
        if follower is not None:
            follower.start()
        save_state()
        announcer = asyncio.create_task(announce_when_ready())
        learner_proc = _start_learner(cfg, config_path) if learner else None
        try:
            yield
        finally:
            announcer.cancel()
            if follower is not None:
                await asyncio.to_thread(follower.stop)
            if learner_proc is not None:
                await asyncio.to_thread(stop_child, learner_proc)
            if registry.merged is not None:
                await registry.merged.stop()
            await engine.stop()
            await gateway.close()

    app = create_app(gateway, lifespan=lifespan)
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.server.host, port=cfg.server.port, log_level=cfg.log_level,
        access_log=False, timeout_graceful_shutdown=30, lifespan="on",
    ))
    print(f"sdloop: gateway on {url}, starting the engine (log: {engine.log_path})",
          file=sys.stderr, flush=True)
    server.run()
    return 0 if server.started else 1


def _start_learner(cfg: Config, config_path: str | None) -> subprocess.Popen[bytes]:
    """`sdloop learn` as a child: its own process (training must not stall the event loop),
    same data dir and config (environment overrides are inherited), stopped with the server."""
    log_path = cfg.data_path / "logs" / "learner.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "serving.commands", "learn", "--data-dir", str(cfg.data_path)]
    if config_path:
        cmd += ["--config", str(Path(config_path).resolve())]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509
    log.info("learner daemon started (pid %d), log: %s", proc.pid, log_path)
    return proc
