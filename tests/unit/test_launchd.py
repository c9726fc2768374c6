"""The launchd property lists parse, say what launchd needs, and match `launchd/README.md`.

Each list is read with `plistlib`: its label is its file name, it starts at load and is kept
alive, it logs to a file the README names, its program is in the virtual environment the README
builds, its arguments are what the program itself accepts (the controller's own parser; the
Celery worker's settings from its environment), and no token is written in it: tokens come from
files the README creates.
"""

from __future__ import annotations

import plistlib
import re
from pathlib import Path
from typing import Any

import pytest

from controller.cli import build_parser
from controller.settings import load_settings
from controller.workflows.settings import ENV_PREFIX, WorkflowSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHD = REPO_ROOT / "launchd"
README = (LAUNCHD / "README.md").read_text(encoding="utf-8")
CONTROLLER = "com.gpu-agent.controller"
WORKER = "com.gpu-agent.workflows-worker"
VENV_BIN = "/opt/gpu-controller/venv/bin/"
LOG_DIR = "/opt/gpu-controller/log/"
# Anything that looks like a secret: a long run of token characters with digits among them
# (`openssl rand -hex 32`, or base64); names like GPU_WORKFLOWS_CONTROLLER_TOKEN_FILE are not.
SECRET_LIKE = re.compile(r"(?=[A-Za-z0-9+=_-]*[0-9])[A-Za-z0-9+=_-]{32,}")


def load(label: str) -> dict[str, Any]:
    with (LAUNCHD / f"{label}.plist").open("rb") as handle:
        plist: dict[str, Any] = plistlib.load(handle)
    return plist


def strings(value: Any) -> list[str]:
    """Every string in a property list, keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for key, item in value.items() for s in (key, *strings(item))]
    if isinstance(value, list):
        return [s for item in value for s in strings(item)]
    return []


@pytest.mark.parametrize("label", [CONTROLLER, WORKER])
def test_each_daemon_starts_at_load_is_kept_alive_and_logs_where_the_readme_says(
    label: str,
) -> None:
    plist = load(label)
    assert plist["Label"] == label
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 10
    assert plist["ExitTimeOut"] >= 20
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith(LOG_DIR)
        assert plist[key] in README
    program = plist["ProgramArguments"][0]
    assert program.startswith(VENV_BIN)
    assert "-m venv /opt/gpu-controller/venv" in README
    assert plist["UserName"] == "gpucontroller"
    assert "dscl . -create /Users/gpucontroller" in README
    assert plist["WorkingDirectory"] == "/opt/gpu-controller"
    assert f"launchctl bootstrap system /Library/LaunchDaemons/{label}.plist" in README
    assert f"launchctl bootout system/{label}" in README
    assert f"{label}.plist" in README


@pytest.mark.parametrize("label", [CONTROLLER, WORKER])
def test_no_token_is_written_in_a_property_list(label: str) -> None:
    plist = load(label)
    for text in strings(plist):
        assert not SECRET_LIKE.search(text.replace("/", " ")), text
    environment = plist.get("EnvironmentVariables", {})
    assert not [key for key in environment if key.endswith("TOKEN")]
    assert "--token" not in plist["ProgramArguments"]


def test_the_controllers_arguments_are_its_own_and_its_files_are_in_the_readme(
    tmp_path: Path,
) -> None:
    plist = load(CONTROLLER)
    arguments = plist["ProgramArguments"]
    assert arguments[0] == VENV_BIN + "gpu-controller"
    args = build_parser().parse_args(arguments[1:])
    assert args.command == "run"
    for path in (args.config, args.token_file, args.data_dir):
        assert str(path) in README
    assert plist["SoftResourceLimits"]["NumberOfFiles"] >= 1024
    # The settings those arguments give load, with stand-ins for the installed files.
    token = tmp_path / "controller.token"
    token.write_text("a-controller-t0ken\n")
    config = tmp_path / "config.toml"
    config.write_text('host = "0.0.0.0"\ntrusted_networks = ["192.168.1.0/24"]\n')
    settings = load_settings(config, data_dir=tmp_path / "data", token_file=token)
    assert settings.effective_token() == "a-controller-t0ken"


def test_the_worker_runs_celery_with_its_settings_from_the_environment(tmp_path: Path) -> None:
    plist = load(WORKER)
    arguments = plist["ProgramArguments"]
    assert arguments[:6] == [
        VENV_BIN + "celery",
        "-A",
        "controller.workflows",
        "worker",
        "--concurrency",
        "2",
    ]
    assert "celery -A controller.workflows worker --concurrency 2" in README
    assert "'.[workflows]'" in README
    environment = dict(plist["EnvironmentVariables"])
    token_file = environment[f"{ENV_PREFIX}CONTROLLER_TOKEN_FILE"]
    assert token_file in README
    assert f'token_file = "{token_file}"' in README  # the controller knows it as a client
    fields = {ENV_PREFIX + name.upper() for name in WorkflowSettings.model_fields}
    ours = {key for key in environment if key.startswith(ENV_PREFIX)}
    assert ours <= fields
    stand_in = tmp_path / "workflows.token"
    stand_in.write_text("a-worker-t0ken\n")
    values = {
        key.removeprefix(ENV_PREFIX).lower(): value
        for key, value in environment.items()
        if key.startswith(ENV_PREFIX)
    }
    values["controller_token_file"] = stand_in
    settings = WorkflowSettings(**values)
    assert settings.token() == "a-worker-t0ken"
    assert settings.controller_url == "http://127.0.0.1:8766"
