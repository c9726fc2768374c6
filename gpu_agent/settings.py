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
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from gpu_common.layered_settings import (
    EXIT_BAD_CONFIG,
    LogLevel,
    ServiceSettings,
    check_base_url,
    is_loopback_host,
)

__all__ = [
    "ENV_PREFIX",
    "EXIT_BAD_CONFIG",
    "AgentSettings",
    "LogLevel",
    "is_loopback_host",
    "load_settings",
]

ENV_PREFIX = "GPU_AGENT_"

_MIB = 1024 * 1024
_GIB = 1024 * _MIB


def _default_comfyui_client_id() -> str:
    # Derived from the hostname rather than random, so a restarted agent reattaches to the
    # ComfyUI websocket under the same client id and keeps receiving its own prompts' events.
    return f"gpu-agent-{socket.gethostname()}"


class AgentSettings(ServiceSettings):
    """Everything the agent can be configured with; immutable once built.

    Construct it through `load_settings` to get the TOML layer and `ConfigError`s; constructing it
    directly reads only keyword arguments, the environment and defaults. The bind address, token
    and log level are `ServiceSettings`' fields.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)
    unauthenticated_power = "control the GPU"

    port: int = Field(
        default=8765, ge=0, le=65535, description="TCP port the API binds to (0: any free port)."
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
    prompt_peak_interval_s: float = Field(
        default=0.5,
        ge=0.05,
        le=60.0,
        description="Seconds between readings of ComfyUI's memory while a prompt runs (its peak).",
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
    max_body_bytes: int = Field(
        default=8 * _MIB, ge=1024, le=_GIB, description="Largest request body the API accepts."
    )
    max_upload_bytes: int = Field(
        default=32 * _MIB,
        ge=1024,
        le=_GIB,
        description="Largest picture the API takes for ComfyUI (POST /v1/comfyui/uploads).",
    )
    data_dir: Path = Field(
        default=Path("/var/lib/gpu-agent"), description="Writable state directory."
    )
    simulate: bool = Field(default=False, description="Run against the simulated desktop.")
    sim_speed: float = Field(
        default=1.0, gt=0.0, le=10_000.0, description="Simulated seconds per real second."
    )

    @field_validator("ollama_url", "comfyui_url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return check_base_url(value)

    def cross_field_problems(self) -> list[str]:
        """The watchdog needs telemetry fresher than `stale_after_s` between two samples."""
        if self.stale_after_s <= self.sample_interval_s:
            return [
                f"stale_after_s: must be greater than sample_interval_s "
                f"({self.stale_after_s} <= {self.sample_interval_s}), or the watchdog never pings"
            ]
        return []


def load_settings(config_file: Path | None = None, **overrides: Any) -> AgentSettings:
    """Build the settings from flags > environment (`GPU_AGENT_*`) > TOML file > defaults.

    `overrides` are the command-line flags by field name; None means "flag not given". Raises
    `ConfigError` for a missing or unparsable file, an unknown key in it, or any invalid value,
    with one line per field naming it, the problem and where the value came from.
    """
    return AgentSettings.load(config_file, **overrides)
