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


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Requests with a larger body get 413. Chat histories are text; 4 MiB is generous.
    max_body_bytes: int = 4 * 1024 * 1024
    # Levels of arrays and objects a chat or feedback body may nest; deeper gets 400 (a chat
    # needs about 5, a tool's JSON schema a few more). Deep nesting would exhaust the recursion
    # of every part that walks the body.
    max_json_depth: int = 64
    # Messages one chat request may carry; more get 422.
    max_messages: int = 1000
    # Bytes of JSON of a chat request's sampling parameters that are stored with its completion
    # (`params`); larger ones are stored as a marker naming their keys and size. They are sent to
    # the engine whole either way.
    max_params_bytes: int = 16 * 1024
    # Bearer token for /admin/*. Empty: a random one is made at start and written to the
    # state file (mode 0600), where `sdloop sql` and `sdloop adapters` read it.
    admin_token: str = ""
    # Bearer token for /v1/*. Empty: the OpenAI-compatible routes are open (loopback default).
    api_key: str = ""
    # Wall-clock limit of one read-only SQL query through the admin API.
    sql_timeout_s: float = 30.0
    sql_max_rows: int = 100_000
    # Bytes of JSON one answer of /admin/sql may hold; rows past it are cut (`truncated`).
    sql_max_bytes: int = 64 * 1024 * 1024
    # This gateway's name in the replica_versions table (which version each replica serves).
    # Empty: <hostname>:<port>.
    replica_id: str = ""
    # A request the engine dropped before anything reached the client (the engine died or is
    # restarting) waits up to this long for the restarted engine and is sent once more; 0:
    # answer 503 at once.
    retry_after_restart_s: float = 120.0
    # Folders versions may be published from (`sdloop adapters publish`, the admin API): a
    # version folder must lie inside one of them, symlinks resolved; others get 403. Empty: the
    # data dir, where the learner writes its versions (<data_dir>/adapters) and which sdloop
    # keeps private to its user (0700).
    publish_dirs: list[str] = field(default_factory=list)


@dataclass
class EngineConfig:
    # URL of an external vLLM OpenAI server to attach to. Empty: start vLLM as a child.
    url: str = ""
    # The API key of the external engine at `url` (what its vLLM was given as --api-key or
    # VLLM_API_KEY), sent as a bearer token with every request to it. A child engine gets a
    # random key of its own instead: no other local process can reach it past the gateway.
    api_key: str = ""
    # The base model vLLM serves: an HF folder or hub id. Empty: the embedded SmolLM2-135M.
    model: str = ""
    # Name vLLM serves the base model under; the version name `base` in the alias table.
    served_model_name: str = "base"
    # auto: bfloat16 where the CPU has avx512_bf16 (or on a GPU), float32 otherwise.
    dtype: str = "auto"
    max_model_len: int = 2048
    max_loras: int = 2
    max_lora_rank: int = 16
    max_logprobs: int = 20
    # vLLM's tool-call parser (`--tool-call-parser`, with `--enable-auto-tool-choice`): what
    # turns the model's text into `tool_calls` for requests with `tools`. vLLM refuses every
    # `tool_choice` but "none" without one. `hermes` suits the embedded model and Hermes/Qwen
    # style models; see vLLM's tool-calling docs for others (`llama3_json`, `mistral`, ...).
    # Empty: off.
    tool_call_parser: str = "hermes"
    # vLLM-CPU KV cache, GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kvcache_gb: int = 2
    # The alias served by engines without LoRA (`serving.engine.merged`): the base model's folder at
    # rest, a version's merged weights once promoted (a promote waits for that engine: a
    # minute or two on 2 cores). vLLM-CPU compiles only without LoRA. Empty: the primary
    # engine serves every alias.
    merged_alias: str = "default"
    # VLLM_CPU_OMP_THREADS_BIND of those engines on the CPU build. `auto`, vLLM's default,
    # pins the compute threads and keeps a core for the server process: what a plain `vllm
    # serve` does (measured at 1 stream: `nobind` 0.82x of it, at 16 streams 1.17x).
    merged_cpu_bind: str = "auto"
    startup_timeout_s: float = 900.0
    health_interval_s: float = 2.0
    # Time allowed for in-flight requests when the engine is stopped.
    stop_timeout_s: float = 20.0
    extra_args: list[str] = field(default_factory=list)

    def check(self, cfg: Config) -> None:
        if not _CPU_BIND.match(self.merged_cpu_bind):
            raise ValueError(
                f"engine.merged_cpu_bind = {self.merged_cpu_bind!r}: use \"nobind\", \"auto\" or "
                "CPU ids as vLLM's VLLM_CPU_OMP_THREADS_BIND takes them (e.g. \"0-3\", \"0,2|1,3\")")


@dataclass
class ModelConfig:
    # Where the embedded GGUF is converted to an HF folder. Empty: <data_dir>/models.
    cache_dir: str = ""


@dataclass
class IngestConfig:
    # `sdloop ingest` answers /metrics, /healthz, /readyz and the admin API (SQL, adapters)
    # here; other commands on the same data dir find it through the state file.
    host: str = "127.0.0.1"
    port: int = 8002


class Config:
    """`data_dir`, `log_level`, and one attribute per registered section (`cfg.server`,
    `cfg.store`, `cfg.learner`, …). Built by `load_config`."""

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
    fields = [("data_dir", str, field(default="./sdloop-data")),
              ("log_level", str, field(default="info"))]
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
