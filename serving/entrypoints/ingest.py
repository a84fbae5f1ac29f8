"""`sdloop ingest`: the Kafka ingester as a service — the store's one writer at scale.

It owns the data dir the way `serve` does on one machine (the lock, the state file, the DuckDB
file), so `sdloop sql`, `sdloop adapters` and `sdloop learn` pointed at the same data dir work
unchanged: they reach the store through this process's admin API. Adapter actions sent there
are recorded in the store and become control-topic commands for every replica
(`serving.versions.control`). It also answers /healthz, /readyz and /metrics (ingest rate, lag, dead
letters, store write latency).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from feedback.kafka import ensure_topics
from serving.config import Config
from serving.gateway.app import SHARED_ROUTES, exception_handlers
from serving.gateway.http import check_bearer
from serving.state import ServeLock, remove_state, write_state
from serving.versions.control import ControlPublisher, control_secret
from store import StoreWriter
from store.ingest import Ingester

log = logging.getLogger("sdloop.ingest")


class IngestService:
    """What the shared admin routes read off `app.state.gateway`."""

    def __init__(self, cfg: Config, store: StoreWriter, registry: ControlPublisher,
                 admin_token: str) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.admin_token = admin_token
        self.stop = threading.Event()
        self.failure: str | None = None
        self.ingester: Ingester | None = None

    def check_admin(self, request: Request) -> str:
        check_bearer(request, self.admin_token, "The admin API")
        return "admin-token"

    async def reload_keys(self) -> None:
        """A key was added or revoked here: every replica gets the new set."""
        await self.registry.share_keys()


async def readyz(request: Request) -> Response:
    svc: IngestService = request.app.state.gateway
    problems = []
    if svc.failure:
        problems.append(svc.failure)
    if not svc.store.alive:
        problems.append("the feedback store writer is not running")
    if svc.ingester is None:
        problems.append("not connected to the Kafka broker yet")
    if problems:
        return JSONResponse({"status": "not ready", "reasons": problems}, status_code=503)
    return JSONResponse({"status": "ready", "batches": svc.ingester.batches if svc.ingester else 0})


ROUTES = [Route("/readyz", readyz, methods=["GET"]), *SHARED_ROUTES]


def run_ingest(cfg: Config) -> int:
    """Ingest until SIGTERM/SIGINT; exit 1 if the store or the broker failed for good."""
    control_secret(cfg.kafka)  # it signs the control commands: refuse to start without it
    lock = ServeLock(cfg.data_path)
    lock.acquire()
    store = StoreWriter(cfg.store_path, cfg.store.batch_max, cfg.store.queue_max,
                        cfg.store.queue_max_bytes, checkpoint_mb=cfg.store.checkpoint_mb).open()
    try:
        ensure_topics(cfg.kafka)
        publisher = ControlPublisher(store, cfg.kafka, cfg.publish_paths)
        svc = IngestService(cfg, store, publisher,
                            cfg.server.admin_token or secrets.token_urlsafe(24))
        return _serve(cfg, svc)
    finally:
        store.close()
        remove_state(cfg.data_path)
        lock.release()


def _serve(cfg: Config, svc: IngestService) -> int:
    url = f"http://{cfg.ingest.host}:{cfg.ingest.port}"
    server: uvicorn.Server | None = None

    def consume() -> None:
        try:
            svc.ingester = Ingester(cfg.kafka, svc.store).open()
            svc.ingester.run(svc.stop)
        except Exception as exc:  # noqa: BLE001 - reported, then the process exits non-zero
            log.exception("ingestion stopped")
            svc.failure = f"ingestion stopped: {type(exc).__name__}: {exc}"
            if server is not None:
                server.should_exit = True
        finally:
            if svc.ingester is not None:
                svc.ingester.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await svc.registry.load()
        await svc.registry.share_keys()  # keys added with `sdloop keys` while it was down
        worker = threading.Thread(target=consume, name="sdloop-ingest", daemon=True)
        worker.start()
        write_state(cfg.data_path, {
            "pid": os.getpid(), "url": url, "admin_token": svc.admin_token, "role": "ingest",
            "store": str(cfg.store_path), "started_at": time.time(),
        })
        print(f"sdloop ingesting {cfg.kafka.events_topic} from {cfg.kafka.bootstrap_servers} "
              f"into {cfg.store_path}; admin API and metrics on {url}", flush=True)
        try:
            yield
        finally:
            svc.stop.set()
            worker.join(60)
            svc.registry.close()

    app = Starlette(routes=ROUTES, lifespan=lifespan, exception_handlers=exception_handlers())
    app.state.gateway = svc
    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.ingest.host, port=cfg.ingest.port, log_level=cfg.log_level,
        access_log=False, lifespan="on"))
    server.run()
    return 1 if svc.failure or not server.started else 0
