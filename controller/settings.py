"""The controller's settings: one validated value from flags, environment, a TOML file, defaults.

Layer: configuration, at the edge of the imperative shell. The CLI calls `load_settings` once and
hands the resulting `ControllerSettings` to everything else; no other module reads the
environment or the config file. Any problem becomes a `ConfigError` with one readable line per
field, and the CLI exits with `EXIT_BAD_CONFIG` so that systemd's `RestartPreventExitStatus=`
stops a crash loop.

Precedence, highest first: flags (`load_settings(**overrides)`), environment
(`GPU_CONTROLLER_*`; `GPU_CONTROLLER_AGENTS` and `GPU_CONTROLLER_QUALITY` as JSON), the TOML file
(agents as an array of tables, `[[agents]]`), defaults. Loading, and the fields and checks both
services have, are shared with the agent (`gpu_common.layered_settings`).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import SettingsConfigDict

from controller.domain.types import PolicyConfig
from gpu_common.layered_settings import (
    EXIT_BAD_CONFIG,
    ServiceSettings,
    check_base_url,
    strip_secret,
)

__all__ = [
    "AGENT_TOKEN_ENV",
    "DEFAULT_AGENT_PORT",
    "DEFAULT_PORT",
    "ENV_PREFIX",
    "EXIT_BAD_CONFIG",
    "AgentEndpoint",
    "ControllerSettings",
    "agent_name_from_url",
    "load_settings",
]

ENV_PREFIX = "GPU_CONTROLLER_"
AGENT_TOKEN_ENV = "GPU_AGENT_TOKEN"
"""The environment variable holding the token of every agent that has none of its own."""

DEFAULT_PORT = 8766
DEFAULT_AGENT_PORT = 8765
AGENT_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"

_MIB = 1024 * 1024
_GIB = 1024 * _MIB

QualityScore = Annotated[float, Field(ge=0.0, le=100.0)]


def _default_data_dir() -> Path:
    return Path("~/.local/share/gpu-controller").expanduser()


class AgentEndpoint(BaseModel):
    """One GPU agent the controller schedules on: `[[agents]]` in the TOML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=AGENT_NAME_PATTERN, description="Unique name; appears in logs, the API and metrics."
    )
    url: str = Field(description="The agent's base URL, e.g. http://desktop1:8765.")
    token: SecretStr | None = Field(
        default=None, description="The agent's bearer token; default: GPU_AGENT_TOKEN."
    )

    @field_validator("name", mode="before")
    @classmethod
    def _strip_name(cls, value: object) -> object:
        return value.strip() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        return check_base_url(value)

    @field_validator("token", mode="before")
    @classmethod
    def _strip_token(cls, value: object) -> object:
        return strip_secret(value)


def agent_name_from_url(url: str) -> str:
    """A name for an agent given only by URL: its host, plus `-<port>` unless the port is 8765.

    Characters a name cannot hold (the colons of an IPv6 address) become `-`; an URL without a
    host gives "agent", and the URL check then reports the real problem.
    """
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or "agent"
    name = host if port in (None, DEFAULT_AGENT_PORT) else f"{host}-{port}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:64]


class ControllerSettings(ServiceSettings):
    """Everything the controller can be configured with; immutable once built.

    Construct it through `load_settings` to get the TOML layer and `ConfigError`s; constructing it
    directly reads only keyword arguments, the environment and defaults. The bind address, token
    and log level are `ServiceSettings`' fields; a token inside `agents` is never echoed either.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)
    unauthenticated_power = "use the GPUs"

    port: int = Field(
        default=DEFAULT_PORT,
        ge=0,
        le=65535,
        description="TCP port the API binds to (0: any free port).",
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir, description="Writable state directory (job store)."
    )
    agents: list[AgentEndpoint] = Field(
        default_factory=list, description="The GPU agents to schedule on; names unique."
    )
    reserve_bytes: int = Field(
        default=512 * _MIB,
        ge=0,
        le=8 * _GIB,
        description="GPU memory kept free on every agent, for drivers and the desktop.",
    )
    min_residency_s: float = Field(
        default=30.0, ge=0.0, le=3600.0, description="A model loaded this recently is not evicted."
    )
    max_hold_s: float = Field(
        default=60.0,
        gt=0.0,
        le=86_400.0,
        description="An image job held longer than this stops new LLM loads on its agent.",
    )
    image_yield_s: float = Field(
        default=20.0,
        ge=0.0,
        le=3600.0,
        description="An image job held less than this lets waiting LLM requests go first.",
    )
    auto_quality_slack: float = Field(
        default=12.0,
        ge=0.0,
        le=100.0,
        description="auto: fastest model within this many quality points of the best.",
    )
    quality: dict[str, QualityScore] = Field(
        default_factory=dict,
        description="Quality score per model name, overriding the built-in catalogue's.",
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600.0, description="Timeout of one ordinary request to an agent."
    )
    load_timeout_s: float = Field(
        default=300.0, gt=0.0, le=3600.0, description="Longest wait for a model to load."
    )
    llm_wait_s: float = Field(
        default=30.0,
        ge=0.0,
        le=3600.0,
        description="How long an LLM request may wait for capacity before a 503.",
    )
    stale_after_s: float = Field(
        default=10.0, gt=0.0, le=3600.0, description="An agent's older telemetry is not trusted."
    )
    tick_interval_s: float = Field(
        default=0.5, ge=0.01, le=60.0, description="Seconds between scheduling passes."
    )
    max_image_attempts: int = Field(
        default=3, ge=1, le=100, description="Tries of one image job before it fails."
    )
    max_body_bytes: int = Field(
        default=16 * _MIB, ge=1024, le=_GIB, description="Largest request body the API accepts."
    )
    max_input_bytes: int = Field(
        default=32 * _MIB,
        ge=1024,
        le=_GIB,
        description="Largest input picture of an image job (PNG, JPEG or WebP).",
    )
    max_input_pixels: int = Field(
        default=64 * 1024 * 1024,
        ge=1,
        le=16384 * 16384,
        description="Most pixels (width x height) an input picture may have.",
    )
    max_inputs: int = Field(
        default=8, ge=1, le=64, description="Most input pictures one image job may carry."
    )

    _shared_agent_token: SecretStr | None = PrivateAttr(default=None)

    @field_validator("data_dir")
    @classmethod
    def _expand_user(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _read_shared_agent_token(self) -> ControllerSettings:
        # Read with the rest of the environment, so the settings stay one immutable snapshot.
        shared = os.environ.get(AGENT_TOKEN_ENV, "").strip()
        self._shared_agent_token = SecretStr(shared) if shared else None
        return self

    def cross_field_problems(self) -> list[str]:
        """Agent names must be unique: they key the API, the logs and the metrics."""
        counts = Counter(agent.name for agent in self.agents)
        duplicates = sorted(name for name, count in counts.items() if count > 1)
        if duplicates:
            return [
                f"agents: names must be unique; {', '.join(map(repr, duplicates))} "
                f"given more than once (name each [[agents]] entry differently)"
            ]
        return []

    def agent_token(self, endpoint: AgentEndpoint) -> str | None:
        """The token to send to `endpoint`: its own, else `GPU_AGENT_TOKEN`, else None."""
        if endpoint.token is not None:
            return endpoint.token.get_secret_value()
        if self._shared_agent_token is not None:
            return self._shared_agent_token.get_secret_value()
        return None

    def agent(self, name: str) -> AgentEndpoint | None:
        """The configured agent called `name`, if any."""
        return next((agent for agent in self.agents if agent.name == name), None)

    def policy_config(self) -> PolicyConfig:
        """The policy core's knobs from these settings; the rest keep the core's defaults."""
        return PolicyConfig(
            min_residency_s=self.min_residency_s,
            max_hold_s=self.max_hold_s,
            auto_quality_slack=self.auto_quality_slack,
            image_yield_s=self.image_yield_s,
            stale_after_s=self.stale_after_s,
        )


def load_settings(config_file: Path | None = None, **overrides: Any) -> ControllerSettings:
    """Build the settings from flags > environment (`GPU_CONTROLLER_*`) > TOML file > defaults.

    `overrides` are the command-line flags by field name; None means "flag not given"; `agents`
    given as a list replaces the file's list. Raises `ConfigError` for a missing or unparsable
    file, an unknown key in it, or any invalid value, with one line per field naming it (e.g.
    `agents.0.url`), the problem and where the value came from; tokens are never echoed.
    """
    return ControllerSettings.load(config_file, **overrides)
