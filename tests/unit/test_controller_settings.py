"""Controller settings: defaults, TOML with agents, environment and flag layers, readable errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controller.settings import (
    EXIT_BAD_CONFIG,
    AgentEndpoint,
    ControllerSettings,
    agent_name_from_url,
    load_settings,
)
from gpu_common.errors import ConfigError

TOKEN = "0123456789abcdef0123456789abcdef"
AGENT_TOKEN = "fedcba9876543210fedcba9876543210"
EXAMPLE = Path(__file__).resolve().parents[2] / "systemd" / "gpu-controller.toml.example"
MIB = 1024 * 1024

TWO_AGENTS = """
host = "0.0.0.0"
port = 9100
reserve_bytes = 1073741824
llm_wait_s = 5

[quality]
"qwen2.5:7b" = 71.5

[[agents]]
name = "desktop1"
url = "http://desktop1.lan:8765/"

[[agents]]
name = "desktop2"
url = "https://192.168.1.42:9000"
token = "{agent_token}"
"""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU_CONTROLLER_* or GPU_AGENT_* variable from the test machine leaks into the tests."""
    for name in list(os.environ):
        if name.upper().startswith(("GPU_CONTROLLER_", "GPU_AGENT_")):
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
    assert settings.port == 8766
    assert settings.token is None
    assert settings.token_file is None
    assert settings.effective_token() is None
    assert settings.data_dir == Path.home() / ".local" / "share" / "gpu-controller"
    assert settings.agents == []
    assert settings.reserve_bytes == 512 * MIB
    assert settings.min_residency_s == 30.0
    assert settings.max_hold_s == 60.0
    assert settings.auto_quality_slack == 12.0
    assert settings.quality == {}
    assert settings.request_timeout_s == 10.0
    assert settings.load_timeout_s == 300.0
    assert settings.llm_wait_s == 30.0
    assert settings.stale_after_s == 10.0
    assert settings.tick_interval_s == 0.5
    assert settings.max_image_attempts == 3
    assert settings.max_body_bytes == 16 * MIB
    assert settings.log_level == "INFO"
    assert EXIT_BAD_CONFIG == 78


def test_policy_config_carries_the_policy_knobs() -> None:
    policy = load_settings(min_residency_s=5, max_hold_s=60, auto_quality_slack=3).policy_config()
    assert (policy.min_residency_s, policy.max_hold_s, policy.auto_quality_slack) == (5, 60, 3)
    assert policy.stale_after_s == 10.0


def test_toml_with_two_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, TWO_AGENTS.format(agent_token=AGENT_TOKEN))
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", TOKEN)
    settings = load_settings(path)
    assert settings.host == "0.0.0.0"
    assert settings.port == 9100
    assert settings.effective_token() == TOKEN
    assert settings.reserve_bytes == 1024 * MIB
    assert settings.llm_wait_s == 5.0
    assert settings.quality == {"qwen2.5:7b": 71.5}
    assert [(a.name, a.url) for a in settings.agents] == [
        ("desktop1", "http://desktop1.lan:8765"),
        ("desktop2", "https://192.168.1.42:9000"),
    ]
    assert settings.agent("desktop2") == settings.agents[1]
    assert settings.agent("desktop3") is None
    assert AGENT_TOKEN not in repr(settings)


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, TWO_AGENTS.format(agent_token=AGENT_TOKEN))
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", TOKEN)
    monkeypatch.setenv("GPU_CONTROLLER_PORT", "9200")
    monkeypatch.setenv("GPU_CONTROLLER_AGENTS", '[{"name": "env1", "url": "http://env1:8765"}]')
    monkeypatch.setenv("GPU_CONTROLLER_QUALITY", '{"llama3.2:3b": 50}')
    settings = load_settings(path)
    assert settings.port == 9200
    assert [agent.name for agent in settings.agents] == ["env1"]
    assert settings.quality == {"llama3.2:3b": 50.0}
    assert settings.llm_wait_s == 5.0


def test_flags_override_environment_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, TWO_AGENTS.format(agent_token=AGENT_TOKEN))
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", TOKEN)
    monkeypatch.setenv("GPU_CONTROLLER_PORT", "9200")
    monkeypatch.setenv("GPU_CONTROLLER_LOG_LEVEL", "warning")
    settings = load_settings(
        path,
        port=9300,
        data_dir=tmp_path / "state",
        agents=[{"name": "flag1", "url": "http://flag1:8765"}],
        log_level=None,
    )
    assert settings.port == 9300
    assert settings.data_dir == tmp_path / "state"
    assert [agent.name for agent in settings.agents] == ["flag1"]
    # A flag given as None means "not given", so the environment still applies.
    assert settings.log_level == "WARNING"


def test_agent_token_falls_back_to_gpu_agent_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, TWO_AGENTS.format(agent_token=AGENT_TOKEN))
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", TOKEN)
    without_shared = load_settings(path)
    desktop1, desktop2 = without_shared.agents
    assert without_shared.agent_token(desktop1) is None
    assert without_shared.agent_token(desktop2) == AGENT_TOKEN

    monkeypatch.setenv("GPU_AGENT_TOKEN", "  shared-agent-token\n")
    with_shared = load_settings(path)
    assert with_shared.agent_token(with_shared.agents[0]) == "shared-agent-token"
    # An agent's own token wins over the shared one.
    assert with_shared.agent_token(with_shared.agents[1]) == AGENT_TOKEN


def test_empty_environment_variables_count_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", "")
    monkeypatch.setenv("GPU_AGENT_TOKEN", "")
    settings = load_settings(agents=[{"name": "a", "url": "http://a:8765"}])
    assert settings.token is None
    assert settings.agent_token(settings.agents[0]) is None


def test_duplicate_agent_names_are_refused() -> None:
    message = config_error(
        agents=[
            {"name": "desktop1", "url": "http://desktop1:8765"},
            {"name": "desktop1", "url": "http://desktop2:8765"},
        ]
    )
    assert message.startswith("agents:")
    assert "'desktop1'" in message
    assert "unique" in message


def test_bad_agent_url_names_the_entry(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[[agents]]\nname = "desktop1"\nurl = "ftp://desktop1:8765"\ntoken = "agent-secret"\n',
    )
    message = config_error(path)
    assert message.startswith("agents.0.url:")
    assert "http" in message
    assert "'ftp://desktop1:8765'" in message
    assert str(path) in message
    assert "agent-secret" not in message


@pytest.mark.parametrize(
    ("agent", "field"),
    [
        ({"name": "has space", "url": "http://a:8765"}, "agents.0.name"),
        ({"name": "a" * 65, "url": "http://a:8765"}, "agents.0.name"),
        ({"name": "a", "url": "http://a:99999"}, "agents.0.url"),
        ({"name": "a", "url": "http://a:8765?x=1"}, "agents.0.url"),
        ({"url": "http://a:8765", "token": "agent-secret"}, "agents.0.name"),
        ({"name": "a", "url": "http://a:8765", "token": " "}, "agents.0.token"),
        ({"name": "a", "url": "http://a:8765", "colour": "blue"}, "agents.0.colour"),
    ],
)
def test_bad_agent_entry_names_the_field(agent: dict[str, str], field: str) -> None:
    message = config_error(agents=[agent])
    assert message.startswith(f"{field}:")
    assert "\n" not in message
    assert "agent-secret" not in message


def test_unknown_key_inside_agents_gets_a_hint(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[[agents]]\nname = "a"\nulr = "http://a:8765"\n')
    message = config_error(path)
    assert message.startswith("agents.0.ulr: unknown key")
    assert "'url'" in message


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "mini.lan"])
def test_non_loopback_host_without_token_is_refused(host: str) -> None:
    message = config_error(host=host)
    assert message.startswith("token:")
    assert "loopback" in message
    assert load_settings(host=host, token=TOKEN).effective_token() == TOKEN


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost"])
def test_loopback_host_needs_no_token(host: str) -> None:
    assert load_settings(host=host).effective_token() is None


def test_token_file_is_read_and_exclusive(tmp_path: Path) -> None:
    token_path = tmp_path / "token"
    token_path.write_text(f"{TOKEN}\n", encoding="utf-8")
    settings = load_settings(host="0.0.0.0", token_file=token_path)
    assert settings.effective_token() == TOKEN
    assert config_error(token=TOKEN, token_file=token_path).startswith("token_file:")
    assert config_error(token_file=tmp_path / "absent").startswith("token_file:")


def test_secret_is_never_echoed(tmp_path: Path) -> None:
    path = write_config(tmp_path, f'token = "{TOKEN}"\nport = 70000\n')
    message = config_error(path)
    assert message.startswith("port:")
    assert TOKEN not in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("port", 65536),
        ("reserve_bytes", 9 * 1024 * MIB),
        ("reserve_bytes", -1),
        ("tick_interval_s", 0),
        ("max_image_attempts", 0),
        ("llm_wait_s", float("nan")),
        ("log_level", "VERBOSE"),
    ],
)
def test_bad_value_names_the_field(field: str, value: object) -> None:
    message = config_error(None, **{field: value})
    assert message.startswith(f"{field}:")
    assert "command line" in message
    assert "\n" not in message


def test_quality_out_of_range_names_the_model() -> None:
    message = config_error(quality={"qwen2.5:7b": 120})
    assert message.startswith("quality.qwen2.5:7b:")


def test_error_says_which_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_CONTROLLER_MAX_HOLD_S", "-5")
    message = config_error()
    assert message.startswith("max_hold_s:")
    assert "GPU_CONTROLLER_MAX_HOLD_S" in message


def test_unparsable_agents_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_CONTROLLER_AGENTS", '[{"name": ')
    message = config_error()
    assert message.startswith("environment:")
    assert "agents" in message


def test_data_dir_is_expanded() -> None:
    settings = load_settings(data_dir=Path("~/jobs"))
    assert settings.data_dir == Path.home() / "jobs"


def test_settings_are_immutable() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


def test_direct_construction_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_CONTROLLER_TICK_INTERVAL_S", "0.25")
    assert ControllerSettings().tick_interval_s == 0.25


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://desktop1:8765", "desktop1"),
        ("http://desktop1.lan", "desktop1.lan"),
        ("http://192.168.1.42:9000/", "192.168.1.42-9000"),
        ("https://[fe80::1]:8765", "fe80--1"),
    ],
)
def test_agent_name_from_url(url: str, name: str) -> None:
    assert agent_name_from_url(url) == name
    assert AgentEndpoint(name=name, url=url).name == name


def test_example_config_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    # The example binds off loopback, so it needs the token the env file would provide.
    monkeypatch.setenv("GPU_CONTROLLER_TOKEN", TOKEN)
    monkeypatch.setenv("GPU_AGENT_TOKEN", AGENT_TOKEN)
    settings = load_settings(EXAMPLE)
    assert settings.effective_token() == TOKEN
    assert [agent.name for agent in settings.agents] == ["desktop1", "desktop2"]
    assert all(settings.agent_token(agent) == AGENT_TOKEN for agent in settings.agents)
    assert settings.data_dir == Path("/var/lib/gpu-controller")
    # Every setting is spelled out in the example, either set or commented out.
    text = EXAMPLE.read_text(encoding="utf-8")
    for field in ControllerSettings.model_fields:
        assert f"\n{field} = " in text or f"\n# {field} = " in text or f"[{field}]" in text
