"""The shipped deployment files (ops/config, ops/compose, ops/systemd) use configuration keys
that exist, publish ports on loopback only and start the commands sdloop has."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

import pytest
import yaml

from serving.config import load_config

OPS = Path(__file__).resolve().parents[2] / "ops"
CONFIGS = sorted((OPS / "config").glob("*.toml"))
UNITS = sorted((OPS / "systemd").glob("*.service"))
COMPOSE = OPS / "compose" / "compose.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_there_is_a_config_per_process():
    assert {p.name for p in CONFIGS} >= {"serve-replica.toml", "ingest.toml", "learn.toml"}
    assert len(UNITS) == 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path, env={})
    for host in (cfg.server.host, cfg.ingest.host):
        assert host == "127.0.0.1", f"{path.name}: listens beyond loopback by default"
    assert all(s.strip().startswith("127.0.0.1:") for s in cfg.kafka.bootstrap_servers.split(","))


def test_replica_config_sends_events_to_kafka():
    cfg = load_config(OPS / "config" / "serve-replica.toml", env={})
    assert cfg.feedback.sink == "kafka"
    assert cfg.engine.served_model_name == "base"
    learn = load_config(OPS / "config" / "learn.toml", env={})
    assert learn.engine.model == cfg.engine.model, "the learner must train on the served model"
    assert learn.learner.max_rank <= cfg.engine.max_lora_rank  # what a stacked version needs


def test_env_example_names_real_keys_and_no_secrets():
    env = env_file(OPS / "config" / "sdloop.env.example")
    sdloop = {k: v for k, v in env.items() if k.startswith("SDLOOP_")}
    assert "SDLOOP_SERVER__ADMIN_TOKEN" in sdloop
    assert not sdloop["SDLOOP_SERVER__ADMIN_TOKEN"] and not sdloop.get("SDLOOP_SERVER__API_KEY")
    load_config(OPS / "config" / "serve-replica.toml", env=sdloop)
    # The commented-out settings are real keys too.
    commented = {}
    for line in (OPS / "config" / "sdloop.env.example").read_text().splitlines():
        body = line.lstrip("#").strip()
        if body.startswith("SDLOOP_") and "=" in body:
            name, _, value = body.partition("=")
            commented[name] = value
    assert "SDLOOP_KAFKA__SASL_PASSWORD" in commented
    load_config(OPS / "config" / "ingest.toml", env=commented)


def test_compose_has_the_services_and_loopback_ports():
    services = compose()["services"]
    assert {"kafka", "vllm", "serve", "ingest", "learn"} <= set(services)
    published = 0
    for name, svc in services.items():
        for port in svc.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert published >= 2
    for name in ("serve", "ingest"):
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "/readyz" in test, name


def test_compose_kafka_is_a_single_kraft_node():
    env = compose()["services"]["kafka"]["environment"]
    assert compose()["services"]["kafka"]["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = str(env["KAFKA_NODE_ID"])
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node}@")
    assert env["CLUSTER_ID"] and env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert ":9092" in env["KAFKA_LISTENERS"] and ":9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert str(env[key]) == "1", key
    assert env["KAFKA_LOG_DIRS"]


def test_compose_vllm_matches_what_the_gateway_expects():
    services = compose()["services"]
    vllm, serve = services["vllm"], services["serve"]
    args = [str(a) for a in vllm["command"]]
    served = load_config(OPS / "config" / "serve-replica.toml", env={}).engine.served_model_name
    assert args[args.index("--served-model-name") + 1] == served
    for flag in ("--enable-lora", "--max-loras", "--max-lora-rank", "--max-logprobs"):
        assert flag in args, flag
    assert str(vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"]).lower() in ("1", "true")
    assert vllm["deploy"]["resources"]["reservations"]["devices"]
    assert services["learn"]["deploy"]["resources"]["reservations"]["devices"]
    # The learner trains on the model vLLM serves.
    assert services["learn"]["environment"]["SDLOOP_ENGINE__MODEL"] == args[0]
    assert serve["environment"]["SDLOOP_ENGINE__URL"].startswith("http://vllm:")
    assert serve["environment"]["SDLOOP_FEEDBACK__SINK"] == "kafka"
    # Version folders are read at the path the learner writes them.
    mounts = {s: {v.split(":")[0]: v.split(":")[1] for v in services[s]["volumes"]}
              for s in ("vllm", "serve", "learn")}
    assert mounts["vllm"]["adapters"] == mounts["serve"]["adapters"] == mounts["learn"]["adapters"]
    assert all(mounts[s]["adapters"] == "/var/lib/sdloop/adapters" for s in mounts)
    assert serve["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert serve["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_every_unit_runs_an_sdloop_command_with_a_shipped_config(path):
    parsed = unit(path)
    service = parsed["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "sdloop"
    command = path.stem.removeprefix("sdloop-")
    assert command in ("serve", "ingest", "learn") and argv[1] == command
    config = argv[argv.index("--config") + 1]
    assert (OPS / "config" / Path(config).name).is_file(), f"{path.name}: no ops/config/{Path(config).name}"
    data_dir = argv[argv.index("--data-dir") + 1]
    assert data_dir in service["ReadWritePaths"].split()
    assert service["User"] == "sdloop" and service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes" and service["Restart"] == "on-failure"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/sdloop/sdloop.env"
    assert "network-online.target" in parsed["Unit"]["After"]
    if command == "serve":
        assert "--no-learner" in argv
        # SIGTERM to the gateway alone: it drains and stops its vLLM process group itself.
        assert service["KillMode"] == "mixed"


def test_the_ingester_and_every_replica_get_one_control_secret_from_the_environment():
    env = env_file(OPS / "config" / "sdloop.env.example")
    assert "SDLOOP_KAFKA__CONTROL_SECRET" in env and not env["SDLOOP_KAFKA__CONTROL_SECRET"]
    services = compose()["services"]
    values = {services[s]["environment"]["SDLOOP_KAFKA__CONTROL_SECRET"] for s in ("serve", "ingest")}
    assert len(values) == 1 and values.pop().startswith("${SDLOOP_CONTROL_SECRET:?")  # required
    for name in ("serve-replica.toml", "ingest.toml"):  # a secret, never in a config file
        assert load_config(OPS / "config" / name, env={}).kafka.control_secret == ""
