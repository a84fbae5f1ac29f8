from pathlib import Path

import pytest

from serving.config import ConfigError, load_config


def test_defaults_put_everything_under_the_data_dir():
    cfg = load_config(env={})
    assert cfg.server.port == 8000 and cfg.server.host == "127.0.0.1"
    assert cfg.store_path == Path("sdloop-data/feedback.duckdb").resolve()
    assert cfg.model_cache_path == Path("sdloop-data/models").resolve()


def test_toml_then_env_then_overrides_each_win(tmp_path):
    path = tmp_path / "sdloop.toml"
    path.write_text('data_dir = "/srv/a"\n[server]\nport = 9000\nhost = "0.0.0.0"\n'
                    '[engine]\nextra_args = ["--seed", "1"]\n[feedback]\nredact = true\n')
    cfg = load_config(path, env={"SDLOOP_SERVER__PORT": "9100", "SDLOOP_ENGINE__MAX_LORAS": "4",
                                 "SDLOOP_FEEDBACK__REDACT": "false", "OTHER": "x"},
                      overrides={"server.host": "127.0.0.2", "server.port": None})
    assert cfg.data_dir == "/srv/a"
    assert cfg.server.port == 9100  # env over TOML; a None override leaves it
    assert cfg.server.host == "127.0.0.2"
    assert cfg.engine.max_loras == 4 and cfg.engine.extra_args == ["--seed", "1"]
    assert cfg.feedback.redact is False


@pytest.mark.parametrize(("env", "words"), [
    ({"SDLOOP_SERVER__PORT": "eighty"}, "SDLOOP_SERVER__PORT: expected int"),
    ({"SDLOOP_SERVER__PROT": "1"}, "unknown setting 'server.prot'"),
    ({"SDLOOP_FEEDBACK__REDACT": "maybe"}, "expected true or false"),
    ({"SDLOOP_SERVER": "1"}, "is a section"),
    ({"SDLOOP_ENGINE__EXTRA_ARGS": "--x"}, "expected a JSON list"),
    ({"SDLOOP_LOG_LEVEL": "trace"}, "log_level = 'trace': use one of debug, info"),
])
def test_bad_environment_values_name_the_variable(env, words):
    with pytest.raises(ConfigError, match=words):
        load_config(env=env)


def test_bad_toml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[server]\nport = 'x'\n")
    with pytest.raises(ConfigError, match="'server.port'"):
        load_config(path, env={})
    path.write_text("[server\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, env={})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})


def test_learner_section_reads_from_toml_and_env(tmp_path):
    path = tmp_path / "l.toml"
    path.write_text('[learner]\npreset = "sdpo"\ncontext = ["followup"]\nlr = 1e-4\n')
    cfg = load_config(path, env={"SDLOOP_LEARNER__DIVERGENCE": "reverse_kl",
                                 "SDLOOP_LEARNER__IS_CAP": "1.5"})
    assert cfg.learner.preset == "sdpo" and cfg.learner.context == ["followup"]
    assert cfg.learner.lr == 1e-4 and cfg.learner.divergence == "reverse_kl"
    assert cfg.learner.is_cap == 1.5


@pytest.mark.parametrize("bind", ["nobind", "auto", "0-1", "0,2|1,3"])
def test_merged_cpu_bind_takes_what_vllm_takes(bind):
    assert load_config(env={"SDLOOP_ENGINE__MERGED_CPU_BIND": bind}).engine.merged_cpu_bind == bind


@pytest.mark.parametrize("bind", ["nobnd", "0-", "", "0;1"])
def test_a_bad_merged_cpu_bind_stops_the_config_naming_the_key(bind):
    with pytest.raises(ConfigError, match="engine.merged_cpu_bind.*nobind"):
        load_config(env={"SDLOOP_ENGINE__MERGED_CPU_BIND": bind})
