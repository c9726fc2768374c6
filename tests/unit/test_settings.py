"""Agent settings: layering of defaults, TOML file, environment and flags, and readable errors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from gpu_agent.settings import (
    EXIT_BAD_CONFIG,
    AgentSettings,
    is_loopback_host,
    load_settings,
)
from gpu_common.errors import ConfigError

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU_AGENT_* variable from the machine running the tests leaks into them."""
    for name in list(os.environ):
        if name.upper().startswith("GPU_AGENT_"):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(config_file: Path | None = None, **overrides: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file, **overrides)
    return str(caught.value)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8765
    assert settings.token is None
    assert settings.effective_token() is None
    assert settings.ollama_url == "http://127.0.0.1:11434"
    assert settings.comfyui_url == "http://127.0.0.1:8188"
    assert settings.comfyui_client_id == f"gpu-agent-{socket.gethostname()}"
    assert settings.sample_interval_s == 1.0
    assert settings.stale_after_s == 5.0
    assert settings.request_timeout_s == 10.0
    assert settings.load_timeout_s == 300.0
    assert settings.unload_timeout_s == 15.0
    assert settings.free_timeout_s == 120.0
    assert settings.max_body_bytes == 8 * 1024 * 1024
    assert settings.data_dir == Path("/var/lib/gpu-agent")
    assert settings.simulate is False
    assert settings.sim_speed == 1.0
    assert settings.log_level == "INFO"
    assert EXIT_BAD_CONFIG == 78


def test_client_id_is_stable_across_loads() -> None:
    assert load_settings().comfyui_client_id == load_settings().comfyui_client_id


def test_toml_file_sets_values(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        'host = "0.0.0.0"\n'
        "port = 9000\n"
        f'token = "{TOKEN}"\n'
        'ollama_url = "http://gpu-box:11434/"\n'
        "sample_interval_s = 0.5\n"
        f'data_dir = "{tmp_path}"\n'
        'log_level = "debug"\n'
        "simulate = true\n",
    )
    settings = load_settings(path)
    assert settings.host == "0.0.0.0"
    assert settings.port == 9000
    assert settings.effective_token() == TOKEN
    assert settings.ollama_url == "http://gpu-box:11434"
    assert settings.sample_interval_s == 0.5
    assert settings.data_dir == tmp_path
    assert settings.log_level == "DEBUG"
    assert settings.simulate is True


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, "port = 9000\nsim_speed = 2.0\n")
    monkeypatch.setenv("GPU_AGENT_PORT", "9100")
    settings = load_settings(path)
    assert settings.port == 9100
    assert settings.sim_speed == 2.0


def test_flags_override_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, "port = 9000\n")
    monkeypatch.setenv("GPU_AGENT_PORT", "9100")
    monkeypatch.setenv("GPU_AGENT_LOG_LEVEL", "WARNING")
    settings = load_settings(path, port=9200, log_level=None)
    assert settings.port == 9200
    # A flag given as None means "not given", so the environment still applies.
    assert settings.log_level == "WARNING"


def test_empty_environment_variable_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_AGENT_TOKEN", "")
    assert load_settings().token is None


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    token_path = tmp_path / "token"
    token_path.write_text(f"  {TOKEN}\n", encoding="utf-8")
    settings = load_settings(host="0.0.0.0", token_file=token_path)
    assert settings.effective_token() == TOKEN
    assert TOKEN not in repr(settings)


@pytest.mark.parametrize("content", [None, "", "  \n"], ids=["missing", "empty", "blank"])
def test_unusable_token_file_names_it(tmp_path: Path, content: str | None) -> None:
    token_path = tmp_path / "token"
    if content is not None:
        token_path.write_text(content, encoding="utf-8")
    message = config_error(token_file=token_path)
    assert message.startswith("token_file:")
    assert str(token_path) in message


def test_token_and_token_file_together_are_refused(tmp_path: Path) -> None:
    token_path = tmp_path / "token"
    token_path.write_text(TOKEN, encoding="utf-8")
    assert config_error(token=TOKEN, token_file=token_path).startswith("token_file:")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost", "LocalHost"])
def test_loopback_host_needs_no_token(host: str) -> None:
    assert is_loopback_host(host)
    assert load_settings(host=host).host == host


def test_bracketed_ipv6_host_is_unwrapped() -> None:
    assert load_settings(host="[::1]").host == "::1"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "gpu-box.lan"])
def test_non_loopback_host_without_token_is_refused(host: str) -> None:
    assert not is_loopback_host(host)
    message = config_error(host=host)
    assert message.startswith("token:")
    assert "loopback" in message
    assert load_settings(host=host, token=TOKEN).effective_token() == TOKEN


def test_secret_is_never_echoed_in_errors(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'token = "{TOKEN}"\nport = -1\n')
    message = config_error(path)
    assert TOKEN not in message
    assert message.startswith("port:")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", -1),
        ("port", 70000),
        ("port", "http"),
        ("sample_interval_s", 0.01),
        ("sample_interval_s", 61),
        ("sample_interval_s", float("nan")),
        ("request_timeout_s", 0),
        ("ollama_url", "ftp://127.0.0.1:11434"),
        ("ollama_url", "127.0.0.1:11434"),
        ("comfyui_url", "http://127.0.0.1:99999"),
        ("comfyui_url", "http://127.0.0.1:8188/?x=1"),
        ("log_level", "VERBOSE"),
        ("comfyui_client_id", "has space"),
    ],
)
def test_bad_value_names_the_field(field: str, value: object) -> None:
    message = config_error(None, **{field: value})
    assert message.startswith(f"{field}:")
    assert "\n" not in message
    assert "command line" in message
    assert "pydantic" not in message


def test_error_says_where_the_value_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "sample_interval_s = 100\n")
    monkeypatch.setenv("GPU_AGENT_PORT", "70000")
    lines = config_error(path).splitlines()
    assert len(lines) == 2
    by_field = {line.split(":", 1)[0]: line for line in lines}
    assert "GPU_AGENT_PORT" in by_field["port"]
    assert "70000" in by_field["port"]
    assert str(path) in by_field["sample_interval_s"]


def test_stale_after_must_exceed_sample_interval() -> None:
    message = config_error(sample_interval_s=2.0, stale_after_s=1.0)
    assert message.startswith("stale_after_s:")


def test_unknown_toml_key_is_refused_with_a_hint(tmp_path: Path) -> None:
    path = write_config(tmp_path, "prot = 9000\n")
    message = config_error(path)
    assert message.startswith("prot:")
    assert "unknown key" in message
    assert "'port'" in message


def test_unknown_flag_is_refused() -> None:
    assert config_error(colour="blue").startswith("colour: unknown setting")


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    message = config_error(path)
    assert message.startswith("config file:")
    assert str(path) in message


def test_unparsable_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "port = \n")
    message = config_error(path)
    assert message.startswith("config file:")
    assert "not valid TOML" in message


def test_settings_are_immutable() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_direct_construction_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_AGENT_SIM_SPEED", "50")
    assert AgentSettings().sim_speed == 50.0


def test_example_config_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parents[2] / "systemd" / "gpu-agent.toml.example"
    # The example binds off loopback, so it needs the token the env file would provide.
    monkeypatch.setenv("GPU_AGENT_TOKEN", TOKEN)
    settings = load_settings(example)
    assert settings.effective_token() == TOKEN
