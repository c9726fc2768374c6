"""The agent's settings: one validated value built from flags, environment, a TOML file, defaults.

Layer: configuration, at the edge of the imperative shell. The CLI calls `load_settings` once and
hands the resulting `AgentSettings` to everything else; no other module reads the environment or
the config file. Any problem becomes a `ConfigError` with one readable line per field, and the CLI
exits with `EXIT_BAD_CONFIG` so that systemd's `RestartPreventExitStatus=` stops a crash loop.

Precedence, highest first: flags (`load_settings(**overrides)`), environment (`GPU_AGENT_*`), the
TOML file, defaults.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpu_common.errors import ConfigError
from gpu_common.hosts import check_allowed_host_entry
from gpu_common.layered_settings import (
    check_base_url,
    is_loopback_host,
    load_layered,
    open_host_problem,
    strip_host,
    strip_secret,
    token_sources,
)

__all__ = [
    "ENV_PREFIX",
    "EXIT_BAD_CONFIG",
    "AgentSettings",
    "LogLevel",
    "is_loopback_host",
    "load_settings",
]

EXIT_BAD_CONFIG = 78
"""Exit status for invalid settings (sysexits.h EX_CONFIG); the unit file must not restart on it."""

ENV_PREFIX = "GPU_AGENT_"

_MIB = 1024 * 1024
_GIB = 1024 * _MIB
# Fields whose values must never be echoed back in an error message.
_SECRET_FIELDS = frozenset({"token"})

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _default_comfyui_client_id() -> str:
    # Derived from the hostname rather than random, so a restarted agent reattaches to the
    # ComfyUI websocket under the same client id and keeps receiving its own prompts' events.
    return f"gpu-agent-{socket.gethostname()}"


class AgentSettings(BaseSettings):
    """Everything the agent can be configured with; immutable once built.

    Construct it through `load_settings` to get the TOML layer and `ConfigError`s; constructing it
    directly reads only keyword arguments, the environment and defaults.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        # An empty `GPU_AGENT_TOKEN=` left in an env file means "not set", not "empty token".
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        validate_default=True,
    )

    host: str = Field(default="127.0.0.1", min_length=1, description="Address the API binds to.")
    port: int = Field(
        default=8765, ge=0, le=65535, description="TCP port the API binds to (0: any free port)."
    )
    token: SecretStr | None = Field(
        default=None, description="Bearer token the API requires; required off loopback."
    )
    token_file: Path | None = Field(
        default=None, description="File holding the bearer token (read once, stripped)."
    )
    ollama_url: str = Field(default="http://127.0.0.1:11434", description="Ollama base URL.")
    comfyui_url: str = Field(default="http://127.0.0.1:8188", description="ComfyUI base URL.")
    comfyui_client_id: str = Field(
        default_factory=_default_comfyui_client_id,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="ComfyUI websocket client id; stable across restarts.",
    )
    sample_interval_s: float = Field(
        default=1.0, ge=0.05, le=60.0, description="Seconds between GPU telemetry samples."
    )
    stale_after_s: float = Field(
        default=5.0,
        gt=0.0,
        le=3600.0,
        description="Telemetry older than this stops the systemd watchdog pings.",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600.0, description="Timeout of one ordinary HTTP request."
    )
    load_timeout_s: float = Field(
        default=300.0, gt=0.0, le=3600.0, description="Longest wait for a model to load."
    )
    unload_timeout_s: float = Field(
        default=15.0, gt=0.0, le=600.0, description="Longest wait for a confirmed unload."
    )
    free_timeout_s: float = Field(
        default=120.0, gt=0.0, le=3600.0, description="Longest wait for GPU memory to free."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Host names, beyond the defaults, that requests may carry in Host and Origin: "
            "exact names, '*.example.org' for every name under it, or '*' for any."
        ),
    )
    max_body_bytes: int = Field(
        default=8 * _MIB, ge=1024, le=_GIB, description="Largest request body the API accepts."
    )
    data_dir: Path = Field(
        default=Path("/var/lib/gpu-agent"), description="Writable state directory."
    )
    simulate: bool = Field(default=False, description="Run against the simulated desktop.")
    sim_speed: float = Field(
        default=1.0, gt=0.0, le=10_000.0, description="Simulated seconds per real second."
    )
    log_level: LogLevel = Field(default="INFO", description="Root log level.")

    _file_token: SecretStr | None = PrivateAttr(default=None)

    @field_validator("host", mode="before")
    @classmethod
    def _strip_host(cls, value: object) -> object:
        return strip_host(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: list[str]) -> list[str]:
        return [check_allowed_host_entry(entry) for entry in value]

    @field_validator("token", mode="before")
    @classmethod
    def _strip_token(cls, value: object) -> object:
        return strip_secret(value)

    @field_validator("ollama_url", "comfyui_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_together(self) -> AgentSettings:
        # Each problem is one line starting with the field it is about; see `_describe`.
        problems, self._file_token = token_sources(self.token, self.token_file)
        if self.stale_after_s <= self.sample_interval_s:
            problems.append(
                f"stale_after_s: must be greater than sample_interval_s "
                f"({self.stale_after_s} <= {self.sample_interval_s}), or the watchdog never pings"
            )
        if not problems:
            open_host = open_host_problem(
                self.host, self.effective_token() is not None, power="control the GPU"
            )
            problems += [open_host] if open_host else []
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def effective_token(self) -> str | None:
        """The token the API must require: `token`, else `token_file`'s content, else None."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self._file_token is not None:
            return self._file_token.get_secret_value()
        return None


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Build the settings from flags > environment (`GPU_AGENT_*`) > TOML file > defaults.

    `overrides` are the command-line flags by field name; None means "flag not given". Raises
    `ConfigError` for a missing or unparsable file, an unknown key in it, or any invalid value,
    with one line per field naming it, the problem and where the value came from.
    """
    return load_layered(
        AgentSettings,
        config_file,
        overrides,
        env_prefix=ENV_PREFIX,
        error_cls=ConfigError,
        secret_fields=_SECRET_FIELDS,
    )
