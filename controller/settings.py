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

import ipaddress
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
    read_token_file,
    strip_secret,
)

__all__ = [
    "AGENT_TOKEN_ENV",
    "DEFAULT_AGENT_PORT",
    "DEFAULT_PORT",
    "ENV_PREFIX",
    "EXIT_BAD_CONFIG",
    "AgentEndpoint",
    "ClientToken",
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
    token_file: Path | None = Field(
        default=None, description="A file holding the agent's bearer token, instead of token."
    )

    _file_token: SecretStr | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _read_token_file(self) -> AgentEndpoint:
        if self.token_file is not None:
            if self.token is not None:
                raise ValueError("set token or token_file, not both")
            self._file_token = read_token_file(self.token_file.expanduser())
        return self

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


class ClientToken(BaseModel):
    """One studio tool's own token: `[[clients]]` in the TOML file. Each tool gets its own, so
    one can be revoked alone, and `/metrics` counts requests per client name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        pattern=AGENT_NAME_PATTERN, description="The tool's name, as /metrics labels its requests."
    )
    token: SecretStr | None = Field(default=None, description="Its bearer token.")
    token_file: Path | None = Field(
        default=None, description="A file holding its bearer token (read once, stripped)."
    )

    _file_token: SecretStr | None = PrivateAttr(default=None)

    @field_validator("token", mode="before")
    @classmethod
    def _strip_token(cls, value: object) -> object:
        return strip_secret(value)

    @model_validator(mode="after")
    def _one_token(self) -> ClientToken:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("give exactly one of token and token_file")
        if self.token_file is not None:
            self._file_token = read_token_file(self.token_file.expanduser())
        return self

    def secret(self) -> str:
        """The token this client sends."""
        token = self.token if self.token is not None else self._file_token
        assert token is not None  # one of them is set, checked at construction
        return token.get_secret_value()


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
    clients: list[ClientToken] = Field(
        default_factory=list,
        description="Named tokens, one per studio tool, each accepted like `token`.",
    )
    trusted_networks: list[str] = Field(
        default_factory=list,
        description=(
            "CIDRs (e.g. 192.168.1.0/24) whose clients may use the LLM routes (/api/*, the "
            "OpenAI routes) without a token; everything that changes state still needs one."
        ),
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

    @field_validator("trusted_networks")
    @classmethod
    def _check_networks(cls, value: list[str]) -> list[str]:
        networks = []
        for entry in value:
            text = entry.strip()
            if "/" not in text:
                raise ValueError(f"{entry!r} needs its prefix length, e.g. {text}/32")
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not a network: {exc}") from None
            networks.append(str(network))
        return networks

    @model_validator(mode="after")
    def _read_shared_agent_token(self) -> ControllerSettings:
        # Read with the rest of the environment, so the settings stay one immutable snapshot.
        shared = os.environ.get(AGENT_TOKEN_ENV, "").strip()
        self._shared_agent_token = SecretStr(shared) if shared else None
        return self

    def cross_field_problems(self) -> list[str]:
        """Agent and client names must be unique (they key the API, the logs and the metrics),
        and so must every token."""
        problems = []
        for field, names in (
            ("agents", [agent.name for agent in self.agents]),
            ("clients", [client.name for client in self.clients]),
        ):
            counts = Counter(names)
            duplicates = sorted(name for name, count in counts.items() if count > 1)
            if duplicates:
                problems.append(
                    f"{field}: names must be unique; {', '.join(map(repr, duplicates))} "
                    f"given more than once (name each [[{field}]] entry differently)"
                )
        secrets = [client.secret() for client in self.clients]
        if self.effective_token() is not None:
            secrets.append(self.effective_token() or "")
        if len(set(secrets)) != len(secrets):
            problems.append("clients: every client needs a token of its own (two are the same)")
        return problems

    def agent_token(self, endpoint: AgentEndpoint) -> str | None:
        """The token to send to `endpoint`: its own (or its file's), else `GPU_AGENT_TOKEN`,
        else None."""
        if endpoint.token is not None:
            return endpoint.token.get_secret_value()
        if endpoint._file_token is not None:
            return endpoint._file_token.get_secret_value()
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
