"""Adapter versions across replicas: one control topic, every replica swaps on its own engine.

The learner publishes once — to the ingester's admin API, as on one machine. The ingester
(`ControlPublisher`) checks the version folder, records it in the store and appends a command
to the control topic (one partition, so every replica sees one order). Each gateway
(`ControlFollower`) reads the topic from its beginning at start and then follows it, applying
each command through its own `AdapterRegistry`: hash check, load, probe through its own
engine, flip, drain, unload — so a replica whose engine serves a version wrongly refuses it
alone. Each outcome goes back over the events topic (`ReplicaVersionEvent`) into the store's
`replica_versions` table: which replica serves what, and why one did not.

A replica keeps its registry tables in memory (`LocalTables`); the control topic is their
source of truth, replayed on every start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import duckdb
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from feedback import ReplicaVersionEvent, Sink, SinkFull, new_id, utcnow
from feedback.config import KafkaConfig
from feedback.kafka import client_options, new_producer
from serving.engine import EngineManager
from serving.registry import AdapterRegistry, store_call
from serving.version_folder import RegistryError, open_version
from store import BASE_VERSION, DEFAULT_ALIAS, StoreWriter, versions
from store.migrations import migrate
from store.writer import in_transaction

log = logging.getLogger(__name__)

ACTIONS = ("publish", "promote", "rollback")


class LocalTables:
    """The registry's tables in an in-memory DuckDB with the store's schema (a replica has no
    store). Implements `registry.Tables`."""

    def __init__(self) -> None:
        self._con = duckdb.connect(":memory:")
        migrate(self._con)
        self._lock = threading.Lock()

    def call(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            try:
                fut.set_result(in_transaction(self._con, fn))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)
        return fut


# -- the ingester's side ---------------------------------------------------------------------


class ControlPublisher:
    """The admin API's adapter actions on the ingester: record in the store, command the
    replicas. Same surface as `AdapterRegistry` (`load`, `listing`, `publish`, `promote`,
    `rollback`), so the gateway's admin routes serve both."""

    def __init__(self, writer: StoreWriter, kafka: KafkaConfig) -> None:
        self._writer = writer
        self._kafka = kafka
        self._producer = new_producer(kafka)
        self._lock = asyncio.Lock()

    def close(self) -> None:
        self._producer.close(10)

    async def load(self) -> None:
        await self._store(versions.seed_and_read)

    async def listing(self) -> dict[str, list[dict[str, Any]]]:
        return await self._store(versions.list_versions)

    async def publish(self, folder: str | Path, promote: bool = True) -> dict[str, Any]:
        found = open_version(folder)
        version, alias = found.version, found.alias
        async with self._lock:
            status = found.status
            if status != "rejected":
                await asyncio.to_thread(found.verify_files)  # before any replica loads it
            await self._store(lambda con: versions.record_version(
                con, found.manifest, str(found.path), status))
            if status == "rejected":
                return found.rejected()
            try:
                await self._command({"action": "publish", "version": version, "alias": alias,
                                     "path": str(found.path), "promote": promote})
            except RegistryError:
                await self._store(lambda con: versions.forget_version(con, version))
                raise
            if promote:
                await self._flip(alias, version)
        return {"version": version, "alias": alias, "status": "promoted" if promote else "candidate",
                "replicas": "each replica loads and probes it on its own engine; "
                            "see the replica_versions table"}

    async def promote(self, version: str) -> dict[str, Any]:
        async with self._lock:
            alias, _, _ = await self._store(lambda con: versions.promotable(con, version))
            await self._command({"action": "promote", "version": version, "alias": alias})
            await self._flip(alias, version)
        return {"version": version, "alias": alias, "status": "promoted"}

    async def rollback(self, alias: str = DEFAULT_ALIAS) -> dict[str, Any]:
        async with self._lock:
            current, previous = await self._store(lambda con: versions.rollback_target(con, alias))
            await self._command({"action": "rollback", "alias": alias, "version": previous})
            await self._flip(alias, previous)
        return {"alias": alias, "version": previous, "rolled_back_from": current}

    async def _flip(self, alias: str, version: str) -> None:
        await self._store(lambda con: versions.flip_alias(con, alias, version))

    async def _command(self, command: dict[str, Any]) -> None:
        """Append a command and wait until the broker has it."""
        command = {"id": new_id("ctl"), "at": utcnow().isoformat(), **command}
        try:
            sent = self._producer.send(self._kafka.control_topic, key=b"registry",
                                       value=json.dumps(command).encode())
            await asyncio.to_thread(sent.get, self._kafka.ack_timeout_s)
        except KafkaError as exc:
            raise RegistryError(503, f"the control topic did not take the command: {exc}") from None

    async def _store(self, fn: Any) -> Any:
        return await store_call(self._writer, fn)


# -- each replica's side ---------------------------------------------------------------------


class ControlFollower:
    """Applies the control topic's commands to this replica's registry, in order, for ever."""

    def __init__(self, kafka: KafkaConfig, registry: AdapterRegistry, engine: EngineManager, sink: Sink,
                 replica: str) -> None:
        self._kafka = kafka
        self._registry = registry
        self._engine = engine
        self._sink = sink
        self.replica = replica
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._caught_up = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._position: int | None = None  # next command to apply, across reconnects

    @property
    def caught_up(self) -> bool:
        """True once every command that was on the topic at start has been applied."""
        return self._caught_up.is_set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="sdloop-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._follow()
            except KafkaError as exc:  # the broker went away: reconnect and go on from there
                log.warning("control topic: %s; reconnecting", exc)
                self._stop.wait(2)

    def _follow(self) -> None:
        tp = TopicPartition(self._kafka.control_topic, 0)
        consumer = KafkaConsumer(**client_options(self._kafka), group_id=None,
                                 enable_auto_commit=False)
        try:
            consumer.assign([tp])
            if self._position is None:
                consumer.seek_to_beginning(tp)
                end = consumer.end_offsets([tp])[tp]
            else:
                consumer.seek(tp, self._position)
                end = self._position
            if consumer.position(tp) >= end:
                self._caught_up.set()
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        self._apply(record.value)
                        self._position = record.offset + 1
                if not self._caught_up.is_set() and consumer.position(tp) >= end:
                    log.info("control topic replayed: %d command(s)", end)
                    self._caught_up.set()
        finally:
            consumer.close()

    def _apply(self, raw: bytes) -> None:
        try:
            command = json.loads(raw)
            action = command["action"]
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r}")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("control topic: skipping a malformed command (%s): %r", exc, raw[:200])
            return
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._apply_async(command), self._loop)
        while not self._stop.is_set():
            try:
                future.result(timeout=1)
                return
            except TimeoutError:
                continue
        future.cancel()

    async def _apply_async(self, command: dict[str, Any]) -> None:
        action = command["action"]
        started = time.perf_counter()
        while True:
            # A version is probed on this replica's engine: wait for it to be up.
            await self._engine.wait_ready(3600)
            try:
                if action == "publish":
                    result = await self._registry.publish(command["path"], command.get("promote", True))
                elif action == "promote":
                    result = await self._registry.promote(command["version"])
                else:
                    result = await self._registry.rollback(command.get("alias", DEFAULT_ALIAS))
                status, detail = result.get("status", "promoted"), None
            except RegistryError as exc:
                if exc.status == 503:  # the engine went away mid-swap: try again when it is back
                    await asyncio.sleep(1)
                    continue
                status, detail = "failed", str(exc)
                log.error("replica %s: %s of %s failed: %s", self.replica, action,
                          command.get("version"), exc)
            break
        version = command.get("version") or self._registry.aliases().get(command.get("alias", ""),
                                                                         BASE_VERSION)
        log.info("replica %s: %s %s -> %s (%.1f s)", self.replica, action, version, status,
                 time.perf_counter() - started)
        report = ReplicaVersionEvent(
            event_id=new_id("rv"), created_at=utcnow(), replica=self.replica, version=version,
            action=action, status=status, alias=command.get("alias"), detail=detail)
        try:
            self._sink.submit(report)
        except SinkFull as exc:
            log.error("could not report %s of %s: %s", action, version, exc)
