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

Whoever can produce to the control topic would otherwise change the served version on every
replica, so commands are signed (`sign_command`: HMAC-SHA256 with `kafka.control_secret`,
shared by the ingester and the replicas) and a replica applies only what `CommandGate` admits:
signed with that secret, naming this control topic, and with an id it has not applied before
(a copied old command cannot be replayed). Anything else, and any record that is not a
well-formed command, is refused with a warning, a count in `sdloop_control_commands_refused`
and a `refused` report, and the replica goes on with the next command. Without a secret
neither side starts (`control_secret`).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

import duckdb
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from feedback import ReplicaVersionEvent, Sink, SinkFull, new_id, utcnow
from feedback.config import KafkaConfig
from feedback.kafka import client_options, new_producer
from serving import metrics
from serving.config import ConfigError
from serving.engine.manager import EngineManager
from serving.version_folder import RegistryError, confined, open_version
from serving.versions.registry import PUBLISH_DIRS_KNOB, AdapterRegistry, store_call
from store import BASE_VERSION, DEFAULT_ALIAS, StoreWriter, versions
from store.keys import SCOPES, active_keys
from store.migrations import migrate
from store.writer import in_transaction

log = logging.getLogger(__name__)

ACTIONS = ("publish", "promote", "rollback", "keys")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

# -- signed commands -------------------------------------------------------------------------

# The Kafka record header that carries a command's signature, "hmac-sha256=<hex>".
SIGNATURE_HEADER = "sdloop-signature"
_SCHEME = b"hmac-sha256="
MIN_SECRET_CHARS = 16
_SECRET_KEY = "kafka.control_secret (SDLOOP_KAFKA__CONTROL_SECRET)"


def control_secret(kafka: KafkaConfig) -> bytes:
    """The key that signs control commands; ConfigError naming the setting when there is none.

    Refusing to start is the safe default: an ingester without it could not command replicas
    that check signatures, and a replica without it could only apply unsigned commands, which
    is exactly what anyone able to produce to the topic could send.
    """
    secret = kafka.control_secret.strip()
    if len(secret) < MIN_SECRET_CHARS:
        what = "is not set" if not secret else f"is shorter than {MIN_SECRET_CHARS} characters"
        raise ConfigError(
            f"{_SECRET_KEY} {what}: control-topic commands are signed with it, and the ingester "
            "and every replica need the same value. Generate one with "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return secret.encode()


def sign_command(secret: bytes, value: bytes) -> bytes:
    """The signature header's value for a command record whose value is `value`.

    The MAC is over the record value's exact bytes and travels out of band, in a record
    header, rather than in a JSON envelope around the command: no canonical JSON is needed
    (what is verified is byte for byte what was signed, whatever a JSON library does with
    spacing or key order), the command body keeps the shape it always had, and a replica
    checks the signature before it acts on anything in the body. The scheme prefix
    leaves room for another algorithm later. A tool that copies records without their headers
    makes them unsigned: they are refused, which is the safe way to fail.
    """
    return _SCHEME + hmac.new(secret, value, hashlib.sha256).hexdigest().encode()


class RefusedCommand(Exception):
    """A control record this replica will not apply; `reason` is the metric label
    (unsigned, bad_signature, malformed, wrong_topic, replayed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class CommandGate:
    """What a replica applies from the control topic: commands signed with the shared secret,
    for this topic, each id at most once.

    The id check is what stops a replay: a captured signed command produced to the topic
    again verifies, but its id was applied already (the replica replays the whole topic at
    start, so it has seen every earlier command, and the seen ids survive reconnects). The
    topic, inside the signed bytes, keeps a command signed for one deployment's control topic
    from being applied from another's that shares the secret.
    """

    def __init__(self, secret: bytes, topic: str) -> None:
        self._secret = secret
        self._topic = topic
        self._applied: set[str] = set()

    def admit(self, value: bytes | None,
              headers: list[tuple[str, bytes | None]] | None) -> dict[str, Any]:
        """The command to apply, its id now marked applied; RefusedCommand otherwise."""
        signatures = [v for k, v in headers or () if k == SIGNATURE_HEADER]
        if not signatures:
            raise RefusedCommand("unsigned", f"no {SIGNATURE_HEADER} header")
        expected = sign_command(self._secret, value or b"")
        if len(signatures) != 1 or not isinstance(signatures[0], bytes) \
                or not hmac.compare_digest(expected, signatures[0]):
            raise RefusedCommand("bad_signature", "the signature does not match the command "
                                 "(another secret, or the command was changed)")
        command = _check_command(value)
        if command.get("topic") != self._topic:
            raise RefusedCommand("wrong_topic", f"signed for control topic {command.get('topic')!r}, "
                                 f"not {self._topic!r}")
        if command["id"] in self._applied:
            raise RefusedCommand("replayed", f"command {command['id']} was applied already")
        self._applied.add(command["id"])
        return command


def _check_command(value: bytes | None) -> dict[str, Any]:
    """The command as JSON, with the fields its action needs of the types it needs; a
    RefusedCommand("malformed") naming what is wrong otherwise (even a signed command: the
    follower must not stop on a bad one)."""
    try:
        command = json.loads(value or b"")
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeDecodeError: a ValueError
        raise RefusedCommand("malformed", f"not a JSON document: {exc}") from None
    if not isinstance(command, dict):
        raise RefusedCommand("malformed", f"expected a JSON object, got {type(command).__name__}")
    action = command.get("action")
    if action not in ACTIONS:
        raise RefusedCommand("malformed", f"unknown action {action!r:.100}")
    required: dict[str, type] = {"id": str}
    if action == "publish":
        required["path"] = str
    elif action == "promote":
        required["version"] = str
    optional: dict[str, type] = {"version": str, "alias": str, "path": str, "promote": bool,
                                 "topic": str, "at": str}
    for name, typ in required.items():
        if not isinstance(command.get(name), typ) or not command[name]:
            raise RefusedCommand("malformed", f"{action}: `{name}` must be a non-empty "
                                 f"{typ.__name__}")
    for name, typ in optional.items():
        if command.get(name) is not None and not isinstance(command[name], typ):
            raise RefusedCommand("malformed", f"{action}: `{name}` must be a {typ.__name__}")
    if action == "keys":
        command["active"] = _active_keys(command.get("keys"))
    return command


def _active_keys(entries: Any) -> dict[str, tuple[str, frozenset[str]]]:
    """A `keys` command's key list as `ActiveKeys.replace` takes it; malformed otherwise."""
    if not isinstance(entries, list):
        raise RefusedCommand("malformed", "keys: `keys` must be a list")
    active = {}
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("digest"), str)
                and _DIGEST.match(entry["digest"]) and isinstance(entry.get("name"), str)
                and isinstance(entry.get("scopes"), list)
                and all(s in SCOPES for s in entry["scopes"])):
            raise RefusedCommand("malformed", "keys: each entry needs a sha256 `digest`, a "
                                 f"`name` and `scopes` among {', '.join(SCOPES)}")
        active[entry["digest"]] = (entry["name"], frozenset(entry["scopes"]))
    return active


def _claimed(value: bytes | None) -> tuple[str, str, str | None]:
    """(action, version, alias) a refused record claims, for its report: best effort, cut
    short, never trusted."""
    try:
        command = json.loads(value or b"")
    except (ValueError, TypeError, RecursionError):
        command = None
    if not isinstance(command, dict):
        return "unknown", "", None
    action = command.get("action") if command.get("action") in ACTIONS else "unknown"
    version, alias = command.get("version"), command.get("alias")
    return (str(action), version[:200] if isinstance(version, str) else "",
            alias[:200] if isinstance(alias, str) else None)


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

    def __init__(self, writer: StoreWriter, kafka: KafkaConfig,
                 publish_dirs: Sequence[Path] = ()) -> None:
        self._secret = control_secret(kafka)  # before anything connects: no secret, no start
        # Where version folders may come from (`server.publish_dirs`), as on `sdloop serve`: a
        # publish names a path and every replica loads what is there. None: every publish is
        # refused.
        self.publish_dirs = list(publish_dirs)
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
        found = open_version(confined(folder, self.publish_dirs, PUBLISH_DIRS_KNOB))
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

    async def share_keys(self) -> None:
        """Send the store's active keys to every replica (digests, names and scopes: a key
        itself is never stored or sent). Each `keys` command is the whole set, so the last one
        on the topic is what a replica replaying it ends with."""
        active = await self._store(active_keys)
        async with self._lock:
            await self._command({"action": "keys", "keys": [
                {"digest": digest, "name": name, "scopes": sorted(scopes)}
                for digest, (name, scopes) in sorted(active.items())]})

    async def _flip(self, alias: str, version: str) -> None:
        await self._store(lambda con: versions.flip_alias(con, alias, version))

    async def _command(self, command: dict[str, Any]) -> None:
        """Append a signed command and wait until the broker has it. Its unique id is what
        replicas refuse to apply twice; the topic it names is checked by them too."""
        topic = self._kafka.control_topic
        command = {"id": new_id("ctl"), "at": utcnow().isoformat(), "topic": topic, **command}
        value = json.dumps(command).encode()
        try:
            sent = self._producer.send(topic, key=b"registry", value=value,
                                       headers=[(SIGNATURE_HEADER, sign_command(self._secret, value))])
            await asyncio.to_thread(sent.get, self._kafka.ack_timeout_s)
        except KafkaError as exc:
            raise RegistryError(503, f"the control topic did not take the command: {exc}") from None

    async def _store(self, fn: Any) -> Any:
        return await store_call(self._writer, fn)


# -- each replica's side ---------------------------------------------------------------------


class ActiveKeys(Protocol):
    """The gateway's key ring as the follower changes it (`serving.gateway.auth.KeyRing`)."""

    def replace(self, active: dict[str, tuple[str, frozenset[str]]]) -> None: ...

    def settle(self) -> None: ...


class ControlFollower:
    """Applies the control topic's commands to this replica's registry, in order, for ever.

    No record stops it: one its `CommandGate` refuses, or that fails to apply, is logged,
    counted and reported, and the next one is applied.
    """

    def __init__(self, kafka: KafkaConfig, registry: AdapterRegistry, engine: EngineManager, sink: Sink,
                 replica: str, keys: ActiveKeys | None = None) -> None:
        self._gate = CommandGate(control_secret(kafka), kafka.control_topic)
        self._keys = keys  # the gateway's: settled once the topic is replayed
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
            except Exception:  # noqa: BLE001 - a dead follower strands this replica's versions
                log.exception("control topic: following failed; starting again from offset %s",
                              self._position)
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
                self._settle()
            while not self._stop.is_set():
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        self._handle(record)
                        self._position = record.offset + 1
                if not self._caught_up.is_set() and consumer.position(tp) >= end:
                    log.info("control topic replayed: %d command(s)", end)
                    self._settle()
        finally:
            consumer.close()

    def _settle(self) -> None:
        """Every command that was on the topic at start is applied: the keys too."""
        if self._keys is not None:
            self._keys.settle()
        self._caught_up.set()

    def _handle(self, record: Any) -> None:
        """One control record (a kafka ConsumerRecord): applied, or refused; never raises."""
        try:
            command = self._gate.admit(record.value, record.headers)
        except RefusedCommand as exc:
            self._refuse(record, exc)
            return
        if command["action"] == "keys":  # no engine involved: applied here, at once
            if self._keys is not None:
                self._keys.replace(command["active"])
            log.info("replica %s: %d active API key(s) from the control topic", self.replica,
                     len(command["active"]))
            return
        try:
            self._apply(command)
        except Exception:  # noqa: BLE001 - one command must not stop the replica following
            log.exception("control topic: command %s at offset %d failed", command["id"],
                          record.offset)
            metrics.CONTROL_REFUSED.labels("error").inc()

    def _refuse(self, record: Any, exc: RefusedCommand) -> None:
        log.warning("control topic: refused the record at offset %d (%s): %s", record.offset,
                    exc.reason, exc)
        metrics.CONTROL_REFUSED.labels(exc.reason).inc()
        action, version, alias = _claimed(record.value)
        self._report(action, version, "refused", alias,
                     f"record at offset {record.offset} of {record.topic} refused "
                     f"({exc.reason}): {exc}")

    def _report(self, action: str, version: str, status: str, alias: str | None,
                detail: str | None) -> None:
        """This replica's outcome for a command, into the store's replica_versions table."""
        report = ReplicaVersionEvent(
            event_id=new_id("rv"), created_at=utcnow(), replica=self.replica, version=version,
            action=action, status=status, alias=alias, detail=detail)
        try:
            self._sink.submit(report)
        except SinkFull as exc:
            log.error("could not report %s of %s: %s", action, version, exc)

    def _apply(self, command: dict[str, Any]) -> None:
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
                    result = await self._registry.publish(command["path"],
                                                          command.get("promote") is not False)
                elif action == "promote":
                    result = await self._registry.promote(command["version"])
                else:
                    result = await self._registry.rollback(command.get("alias") or DEFAULT_ALIAS)
                status, detail = result.get("status", "promoted"), None
            except RegistryError as exc:
                if exc.status == 503:  # the engine went away mid-swap: try again when it is back
                    await asyncio.sleep(1)
                    continue
                status, detail = "failed", str(exc)
                log.error("replica %s: %s of %s failed: %s", self.replica, action,
                          command.get("version"), exc)
            except Exception as exc:  # noqa: BLE001 - reported; the next command still applies
                status, detail = "failed", f"{type(exc).__name__}: {exc}"
                log.exception("replica %s: %s of %s failed", self.replica, action,
                              command.get("version"))
            break
        version = command.get("version") or self._registry.aliases().get(command.get("alias", ""),
                                                                         BASE_VERSION)
        log.info("replica %s: %s %s -> %s (%.1f s)", self.replica, action, version, status,
                 time.perf_counter() - started)
        self._report(action, version, status, command.get("alias"), detail)
