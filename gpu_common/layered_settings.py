"""Layered settings shared by the agent and the controller (configuration layer).

Both services' settings derive from `ServiceSettings`, which holds what they share: the bind
address, the bearer token (inline or from a file, required off loopback), the allowed Host names,
the log level and the checks on them. `ServiceSettings.load` builds a settings value from four
layers, highest first: command-line flags, environment variables (`<env_prefix><FIELD>`), a TOML
file, defaults. The layers are pydantic-settings' own sources (`InitSettingsSource`,
`EnvSettingsSource`, `TomlConfigSettingsSource`); this module adds the reporting: every problem
becomes one readable line that starts with the field it is about, says what is wrong and where
the value came from, and never echoes a secret.
"""

from __future__ import annotations

import difflib
import ipaddress
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from gpu_common.errors import ConfigError
from gpu_common.hosts import check_allowed_host_entry

EXIT_BAD_CONFIG = 78
"""Exit status for invalid settings (sysexits.h EX_CONFIG); the unit file must not restart on it."""

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]

# What a secret's value is replaced with wherever a rejected input is quoted.
REDACTED = "**********"
COMMAND_LINE = "command line"


def is_loopback_host(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(value: str) -> str:
    """An http(s) base URL with a host and no query or fragment, without its trailing slash.

    Raises ValueError saying what is wrong (meant to be raised from a field validator).
    """
    value = value.strip()
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - property access validates the port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError("must be a base URL without query or fragment")
    # Trailing slash stripped so callers can always join with "/api/...".
    return value.rstrip("/")


def read_token_file(path: Path) -> SecretStr:
    """The stripped content of a token file; ValueError lines start with `token_file:`."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"token_file: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ValueError(f"token_file: cannot read {path} ({exc.strerror or exc})") from None
    if not text:
        raise ValueError(f"token_file: {path} is empty")
    return SecretStr(text)


def strip_secret(value: object) -> object:
    """A token without surrounding whitespace; an empty one is an error, not "no token"."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise ValueError("is empty; remove it, or set a token (openssl rand -hex 32)")
    return value


class ServiceSettings(BaseSettings):
    """The settings every service has, and the layered loading of a service's settings class.

    A subclass adds its fields, sets `env_prefix` in its `model_config`, names what an open port
    would let anyone do (`unauthenticated_power`) and may add checks across its own fields
    (`cross_field_problems`). Build it with `load` to get the TOML layer and `ConfigError`s;
    constructing it directly reads only keyword arguments, the environment and defaults.
    """

    model_config = SettingsConfigDict(
        # An empty `<PREFIX>TOKEN=` left in an env file means "not set", not "empty token".
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        validate_default=True,
    )

    # Completes "anyone who can reach the port could ..." when a token is missing off loopback.
    unauthenticated_power: ClassVar[str] = "use this service"
    # Fields whose values are never echoed in an error message, also inside nested tables.
    secret_fields: ClassVar[frozenset[str]] = frozenset({"token"})

    host: str = Field(default="127.0.0.1", min_length=1, description="Address the API binds to.")
    token: SecretStr | None = Field(
        default=None, description="Bearer token the API requires; required off loopback."
    )
    token_file: Path | None = Field(
        default=None, description="File holding the bearer token (read once, stripped)."
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Host names, beyond the defaults, that requests may carry in Host and Origin: "
            "exact names, '*.example.org' for every name under it, or '*' for any."
        ),
    )
    log_level: LogLevel = Field(default="INFO", description="Root log level.")

    _file_token: SecretStr | None = PrivateAttr(default=None)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments over the environment; no .env file, no secrets directory."""
        return _layers(settings_cls, init_settings, env_settings)

    @classmethod
    def load(cls, config_file: Path | None = None, **flags: Any) -> Self:
        """Build the settings from flags > environment > TOML file > defaults.

        `flags` are the command-line values by field name; None means "flag not given", and a
        list or table given replaces the lower layers' one whole. Raises `ConfigError` for a
        missing or unparsable file, an unparsable environment variable, or any invalid or
        unknown value: one line per problem, naming the field (dotted for nested values, e.g.
        `agents.0.url`), the problem, the rejected value unless it is a secret, and where it
        came from.
        """
        given = {key: value for key, value in flags.items() if value is not None}
        # The same layers as `settings_customise_sources`, with the file below them; the file
        # differs per call, which that class-level hook cannot be told, so they go in whole.
        files = [_toml_layer(cls, config_file)] if config_file is not None else []
        layers = _layers(cls, InitSettingsSource(cls, given), EnvSettingsSource(cls), *files)
        try:
            return cls(_build_sources=(layers, {}))
        except SettingsError as exc:
            # Only the environment source parses text (JSON for lists and tables); the cause
            # says what is wrong in the value and where.
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            raise ConfigError(f"environment: {exc}{cause}") from exc
        except ValidationError as exc:
            # Unknown keys first: a misspelt key is often why another field is missing.
            errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
            lines = [_describe(cls, error, layers) for error in errors]
            raise ConfigError("\n".join(lines)) from exc

    @field_validator("host", mode="before")
    @classmethod
    def _strip_host(cls, value: object) -> object:
        # "[::1]" (URL notation) becomes the bare "::1" a socket binds to.
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("[") and value.endswith("]"):
                value = value[1:-1]
        return value

    @field_validator("token", mode="before")
    @classmethod
    def _strip_token(cls, value: object) -> object:
        return strip_secret(value)

    @field_validator("token_file")
    @classmethod
    def _expand_token_file(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, value: list[str]) -> list[str]:
        return [check_allowed_host_entry(entry) for entry in value]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_service(self) -> Self:
        # Each problem is one line starting with the field it is about (see `_describe`).
        problems: list[str] = []
        if self.token is not None and self.token_file is not None:
            problems.append("token_file: cannot be combined with token; set only one of them")
        elif self.token_file is not None:
            try:
                self._file_token = read_token_file(self.token_file)
            except ValueError as exc:
                problems.append(str(exc))
        problems += self.cross_field_problems()
        if not problems and self.effective_token() is None and not is_loopback_host(self.host):
            problems.append(
                f"token: required when host {self.host!r} is not a loopback address, because "
                f"anyone who can reach the port could {self.unauthenticated_power}; set token "
                "or token_file, or bind host to 127.0.0.1"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self

    def cross_field_problems(self) -> list[str]:
        """Problems across a service's own fields, each a line starting with its field."""
        return []

    def effective_token(self) -> str | None:
        """The token the API must require: `token`, else `token_file`'s content, else None."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self._file_token is not None:
            return self._file_token.get_secret_value()
        return None


class _Layer(PydanticBaseSettingsSource):
    """One settings layer: a pydantic-settings source, and where its values come from.

    A field a layer sets replaces the lower layers' value whole: pydantic-settings merges tables
    key by key across sources, but a table given as a flag or environment variable (such as the
    controller's `quality`) stands for all of it.
    """

    def __init__(
        self,
        source: PydanticBaseSettingsSource,
        origin: Callable[[str], str],
        config_file: Path | None = None,
    ) -> None:
        super().__init__(source.settings_cls)
        self.source = source
        self.origin = origin
        self.config_file = config_file
        self.values: dict[str, Any] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Never asked: `__call__` takes the wrapped source's values whole.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        # `current_state` holds what the higher layers set.
        values = self.source()
        self.values = {key: value for key, value in values.items() if key not in self.current_state}
        return self.values


def _layers(
    settings_cls: type[BaseSettings],
    flags: PydanticBaseSettingsSource,
    environment: PydanticBaseSettingsSource,
    *lower: _Layer,
) -> tuple[_Layer, ...]:
    """The sources, highest first, each named for error messages."""
    prefix = settings_cls.model_config.get("env_prefix") or ""
    return (
        _Layer(flags, lambda key: COMMAND_LINE),
        _Layer(environment, lambda key: prefix + key.upper()),
        *lower,
    )


def _toml_layer(settings_cls: type[BaseSettings], path: Path) -> _Layer:
    """The TOML file's layer; `ConfigError` if the file cannot be read or parsed."""
    # The library skips a file that does not exist; one named on the command line must.
    if not path.expanduser().is_file():
        problem = "is not a file" if path.expanduser().exists() else "does not exist"
        raise ConfigError(f"config file: {path} {problem}")
    try:
        source = TomlConfigSettingsSource(settings_cls, toml_file=path)
    except OSError as exc:
        raise ConfigError(f"config file: cannot read {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file: {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file: {path} is not valid TOML ({exc})") from None
    return _Layer(source, lambda key: str(path), config_file=path)


def _describe(
    settings_cls: type[ServiceSettings], error: ErrorDetails, layers: tuple[_Layer, ...]
) -> str:
    """One line for one validation error: `field: problem (got value, from origin)`."""
    if not error["loc"]:
        # Checks across fields already start each line with the field they are about.
        return str(error.get("ctx", {}).get("error", error["msg"]))
    loc = ".".join(str(part) for part in error["loc"])
    field = str(error["loc"][0])
    layer = next((layer for layer in layers if field in layer.values), None)
    if error["type"] == "extra_forbidden":
        hint = _did_you_mean(settings_cls, error["loc"])
        if layer is not None and layer.config_file is not None:
            return f"{loc}: unknown key in config file {layer.config_file}{hint}"
        problem = f"unknown setting{hint}"
    elif error["type"] == "value_error":
        problem = str(error.get("ctx", {}).get("error", error["msg"]))
    else:
        problem = error["msg"][:1].lower() + error["msg"][1:]
    secrets = settings_cls.secret_fields
    details = []
    if not secrets.intersection(str(part) for part in error["loc"]):
        details.append(f"got {_redact(error['input'], secrets)!r}")
    if layer is not None:
        details.append(f"from {layer.origin(field)}")
    suffix = f" ({', '.join(details)})" if details else ""
    return f"{loc}: {problem}{suffix}"


def _did_you_mean(settings_cls: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """ "; did you mean 'port'?" for an unknown key close to a field where it stands, or ""."""
    model: type[BaseModel] | None = settings_cls
    for part in loc[:-1]:
        if model is None:
            return ""
        if isinstance(part, str):
            field = model.model_fields.get(part)
            model = _nested_model(field.annotation) if field is not None else None
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model inside `M`, `M | None` or `list[M]`; None for any other annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        model = _nested_model(arg)
        if model is not None:
            return model
    return None


def _redact(value: Any, secret_fields: frozenset[str]) -> Any:
    """`value` with every secret inside tables or lists replaced, so it can be quoted."""
    if isinstance(value, Mapping):
        return {
            key: REDACTED if key in secret_fields else _redact(item, secret_fields)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact(item, secret_fields) for item in value]
    if isinstance(value, tuple):
        return tuple(_redact(item, secret_fields) for item in value)
    return value
