"""One typed configuration for every sdloop command, composed of each package's own section.

Each package declares its sections as dataclasses and registers them under the `sdloop.config`
entry points (pyproject.toml): `[server]` here, `[store]` in `store.config`, `[learner]` in
`learner.config`, and so on. `load_config` builds one `Config` with an attribute per section,
so that no package imports the ones above it to know their keys, and one TOML file serves
every command.

Sources, later wins: dataclass defaults → TOML file (`--config`) → `SDLOOP_*` environment
variables → command-line flags. A nested key is addressed in the environment with a double
underscore: `[engine] max_model_len` is `SDLOOP_ENGINE__MAX_MODEL_LEN`, top-level `data_dir` is
`SDLOOP_DATA_DIR`. Values from the environment are parsed by the field's declared type, so a
typo gives an error that names the variable instead of a surprise deep inside the server. A
section may define `check(cfg)`, called once everything is loaded, raising ValueError that
names the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ENV_PREFIX = "SDLOOP_"
SECTIONS_GROUP = "sdloop.config"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_CPU_IDS = r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*"  # "0-3,8": one rank's CPUs
_CPU_BIND = re.compile(rf"^(auto|nobind|{_CPU_IDS}(\|{_CPU_IDS})*)$")  # ranks split by "|"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class RootConfig:
    """The keys outside any section, at the top of the file (`SDLOOP_DATA_DIR`,
    `SDLOOP_LOG_LEVEL` in the environment)."""

    data_dir: str = "./sdloop-data"
    """The folder of everything sdloop keeps: the feedback store, adapter versions, the model
    cache, logs and the state file. sdloop keeps it private to its user (mode 0700). A relative
    path is taken from the working directory; `--data-dir` overrides it."""
    log_level: str = "info"
    """How much the commands log: "debug", "info", "warning" or "error" (the Python logging
    level, also given to the HTTP server and a learner child); `--log-level` overrides it."""


@dataclass
class ServerConfig:
    """The gateway `sdloop serve` runs: where it listens, what it accepts, and who may use
    it."""

    host: str = "127.0.0.1"
    """The address the gateway listens on; `--host` overrides it. Away from loopback with no
    API key, sdloop warns that anyone who reaches it may chat and teach the model."""
    port: int = 8000
    """The port the gateway listens on; `--port` overrides it."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Requests with a larger body get 413 (every route: chat, feedback, admin). Chat histories
    are text; 4 MiB is generous."""
    max_json_depth: int = 64
    """Levels of arrays and objects a chat or feedback body may nest; deeper gets 400 (a chat
    needs about 5, a tool's JSON schema a few more). Deep nesting would exhaust the recursion
    of every part that walks the body."""
    max_messages: int = 1000
    """Messages one chat request may carry; more get 422."""
    max_params_bytes: int = 16 * 1024
    """Bytes of JSON of a chat request's sampling parameters that are stored with its completion
    (`params`); of larger ones only the numbers, flags and nulls are stored, with a marker
    (`_omitted`) naming the other keys and their size. They are sent to the engine whole either
    way."""
    admin_token: str = ""
    """Bearer token for `/admin/*`, on the gateway and on `sdloop ingest`. Empty: a random one
    is made at start and written to the state file (mode 0600), where `sdloop sql` and `sdloop
    adapters` read it."""
    api_key: str = ""
    """One shared bearer key for `/v1/*`, the principal `api_key` with the `chat` and `feedback`
    scopes; keys made with `sdloop keys` are the finer way. Empty, and no key in the store: the
    OpenAI-compatible routes are open to everyone (the loopback default)."""
    sql_timeout_s: float = 30.0
    """Wall-clock limit, seconds, of one read-only SQL query (the admin API, `sdloop sql`);
    a query past it is cancelled."""
    sql_max_rows: int = 100_000
    """Most rows one read-only SQL query on the store returns, the rest cut (`truncated`): the
    admin API's, `sdloop sql`'s, and those of the learner, `sdloop report` and `sdloop export`.
    A request's own `max_rows` is capped by it; `sdloop sql --max-rows` replaces it when no
    server holds the store."""
    sql_max_bytes: int = 64 * 1024 * 1024
    """Bytes of JSON one answer of /admin/sql may hold; rows past it are cut (`truncated`)."""
    replica_id: str = ""
    """This gateway's name in the replica_versions table (which version each replica serves),
    on a Kafka replica (`feedback.sink = "kafka"`). Empty: `<hostname>:<port>`."""
    retry_after_restart_s: float = 120.0
    """Seconds a request the engine dropped before anything reached the client (the engine died
    or is restarting) waits for the restarted engine before it is sent once more; 0: answer 503
    at once. A stream already relayed ends with an error event instead."""
    publish_dirs: list[str] = field(default_factory=list)
    """Folders versions may be published from (`sdloop adapters publish`, the admin API): a
    version folder must lie inside one of them, symlinks resolved; others get 403. Empty: the
    data dir, where the learner writes its versions (`<data_dir>/adapters`) and which sdloop
    keeps private to its user (0700)."""


@dataclass
class EngineConfig:
    """The vLLM engine behind the gateway: a child process sdloop starts and watches, or an
    external server it attaches to."""

    url: str = ""
    """URL of an external vLLM OpenAI server to attach to. Empty: start vLLM as a child."""
    api_key: str = ""
    """The API key of the external engine at `url` (what its vLLM was given as --api-key or
    VLLM_API_KEY), sent as a bearer token with every request to it. A child engine gets a
    random key of its own instead: no other local process can reach it past the gateway."""
    model: str = ""
    """The base model vLLM serves and the learner trains on: an HF folder or hub id. Empty: the
    embedded SmolLM2-135M-Instruct, converted into `model.cache_dir` (an external engine at
    `url` serves its own model; the learner still trains on the embedded one)."""
    served_model_name: str = "base"
    """Name vLLM serves the base model under; the version name `base` in the alias table. On an
    external engine that does not serve this name, its first base model is used."""
    dtype: str = "auto"
    """vLLM's `--dtype`. auto: bfloat16 where the CPU has avx512_bf16, float32 on other CPUs,
    vLLM's own choice on a GPU."""
    max_model_len: int = 2048
    """vLLM's `--max-model-len`: tokens of prompt and answer together that one request may
    use."""
    max_loras: int = 2
    """vLLM's `--max-loras`: the most adapter versions the LoRA engine serves in one batch."""
    max_lora_rank: int = 16
    """vLLM's `--max-lora-rank`: the highest adapter rank the engine serves; `learner.max_rank`
    may not exceed it."""
    max_logprobs: int = 20
    """vLLM's `--max-logprobs`: the most log-probabilities per token a request may ask for."""
    tool_call_parser: str = "hermes"
    """vLLM's tool-call parser (`--tool-call-parser`, with `--enable-auto-tool-choice`): what
    turns the model's text into `tool_calls` for requests with `tools`. vLLM refuses every
    `tool_choice` but "none" without one. `hermes` suits the embedded model and Hermes/Qwen
    style models; see vLLM's tool-calling docs for others (`llama3_json`, `mistral`, ...).
    Empty: off."""
    cpu_kvcache_gb: int = 2
    """vLLM-CPU KV cache, GiB (`VLLM_CPU_KVCACHE_SPACE`, unless that is set in the environment
    already)."""
    # Serving the alias clients use on compiled weights (serving.engine.merged).
    merged_alias: str = "default"
    """The alias served by engines without LoRA (`serving.engine.merged`): the base model's
    folder at rest, a version's merged weights once promoted (a promote waits for that engine:
    a minute or two on 2 cores). vLLM-CPU compiles only without LoRA. Empty, or an external
    `url` without `model`: the primary engine serves every alias, with runtime LoRA."""
    merged_cpu_bind: str = "auto"
    """`VLLM_CPU_OMP_THREADS_BIND` of those engines on the CPU build: "nobind", "auto" or CPU
    ids ("0-3", "0,2|1,3"). `auto`, vLLM's default, pins the compute threads and keeps a core
    for the server process: what a plain `vllm serve` does (measured at 1 stream: `nobind` 0.82x
    of it, at 16 streams 1.17x)."""
    startup_timeout_s: float = 900.0
    """Seconds a child engine has after it starts to answer its health check; past that, a
    child that does not answer it is restarted."""
    health_interval_s: float = 2.0
    """Seconds between health checks of a ready engine (every 0.5 s while it is not ready)."""
    stop_timeout_s: float = 20.0
    """Seconds a stopped child engine has to finish its in-flight requests and exit after
    SIGTERM, before it is killed."""
    extra_args: list[str] = field(default_factory=list)
    """More command-line arguments for every vLLM child, passed as is after sdloop's own (e.g.
    `["--enable-prefix-caching"]`)."""

    def check(self, cfg: Config) -> None:
        if not _CPU_BIND.match(self.merged_cpu_bind):
            raise ValueError(
                f"engine.merged_cpu_bind = {self.merged_cpu_bind!r}: use \"nobind\", \"auto\" or "
                "CPU ids as vLLM's VLLM_CPU_OMP_THREADS_BIND takes them (e.g. \"0-3\", \"0,2|1,3\")")


@dataclass
class ModelConfig:
    """The embedded model's cache."""

    cache_dir: str = ""
    """Where the embedded GGUF is converted to an HF folder (and the learner keeps what it
    computes once per model). Empty: `<data_dir>/models`."""


@dataclass
class IngestConfig:
    """`sdloop ingest` answers /metrics, /healthz, /readyz and the admin API (SQL, adapters)
    here; other commands on the same data dir find it through the state file."""

    host: str = "127.0.0.1"
    """The address `sdloop ingest` listens on; its `--host` overrides it."""
    port: int = 8002
    """The port `sdloop ingest` listens on; its `--port` overrides it."""


class Config:
    """`data_dir`, `log_level` (the fields of `RootConfig`), and one attribute per registered
    section (`cfg.server`, `cfg.store`, `cfg.learner`, …). Built by `load_config`."""

    data_dir: str
    log_level: str

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def store_path(self) -> Path:
        store = self.store.path  # type: ignore[attr-defined]
        return Path(store).expanduser() if store else self.data_path / "feedback.duckdb"

    @property
    def model_cache_path(self) -> Path:
        cache = self.model.cache_dir  # type: ignore[attr-defined]
        return Path(cache).expanduser().resolve() if cache else self.data_path / "models"

    @property
    def adapters_path(self) -> Path:
        return self.data_path / "adapters"

    @property
    def publish_paths(self) -> list[Path]:
        """The folders versions may be published from (`server.publish_dirs`, else the data
        dir, which holds the learner's `adapters_path`)."""
        dirs = self.server.publish_dirs  # type: ignore[attr-defined]
        return [Path(d).expanduser().resolve() for d in dirs] if dirs else [self.data_path]

    def __getattr__(self, name: str) -> Any:  # a section no installed package registers
        raise AttributeError(f"no config section '{name}' (registered: {', '.join(sections())})")


def sections() -> dict[str, type]:
    """Section name → its dataclass, from every installed package's `sdloop.config` entry points."""
    return dict(_sections())


@functools.cache
def _sections() -> tuple[tuple[str, type], ...]:
    found = {ep.name: ep.load() for ep in entry_points(group=SECTIONS_GROUP)}
    return tuple(sorted(found.items()))


@functools.cache
def _config_class() -> type[Config]:
    root = typing.get_type_hints(RootConfig)
    fields = [(f.name, root[f.name], field(default=f.default)) for f in dataclasses.fields(RootConfig)]
    fields += [(name, cls, field(default_factory=cls)) for name, cls in _sections()]
    return dataclasses.make_dataclass("Config", fields, bases=(Config,))


def load_config(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Build the Config from defaults, an optional TOML file, `SDLOOP_*` env and overrides.

    `overrides` uses dotted keys (`"server.port"`) and skips None values, so CLI flags that
    were not given leave the lower layers alone.
    """
    cfg = _config_class()()
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        _apply_mapping(cfg, data, where=str(path))
    for name, raw in sorted((env if env is not None else os.environ).items()):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX:
            continue
        keys = name[len(ENV_PREFIX):].lower().split("__")
        _set_path(cfg, keys, raw, where=f"environment variable {name}", from_text=True)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_path(cfg, dotted.split("."), value, where=f"option {dotted}", from_text=False)
    if cfg.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level = {cfg.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    for name, _ in _sections():
        check = getattr(getattr(cfg, name), "check", None)
        if check is not None:
            try:
                check(cfg)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return cfg


def _apply_mapping(obj: object, data: Mapping[str, object], where: str, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        hints = typing.get_type_hints(type(obj))
        if key not in hints:
            raise ConfigError(f"{where}: unknown key '{dotted}'")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: '{dotted}' must be a table")
            _apply_mapping(getattr(obj, key), value, where, prefix=f"{dotted}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}: '{dotted}'", from_text=False))


def _set_path(cfg: Config, keys: list[str], value: object, where: str, from_text: bool) -> None:
    obj: object = cfg
    for depth, key in enumerate(keys):
        hints = typing.get_type_hints(type(obj))
        if key not in hints:
            raise ConfigError(f"{where}: unknown setting '{'.'.join(keys[: depth + 1])}'")
        if depth == len(keys) - 1:
            if dataclasses.is_dataclass(hints[key]):
                raise ConfigError(f"{where}: '{key}' is a section; name one of its keys")
            setattr(obj, key, _coerce(value, hints[key], where, from_text=from_text))
            return
        obj = getattr(obj, key)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{where}: '{key}' has no sub-keys")


def _coerce(value: object, typ: object, where: str, from_text: bool) -> object:
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int | float) and (typ is float or isinstance(value, int)):
            return typ(value)
        if from_text and isinstance(value, str):
            try:
                return typ(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected {typ.__name__}, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        if from_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: expected a JSON list, got {value!r}") from exc
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    raise ConfigError(f"{where}: unsupported type {typ}")
