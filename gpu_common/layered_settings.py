"""Layered settings loading shared by the agent and the controller (configuration layer).

A settings model is built from four layers, highest first: command-line flags, environment
variables (`<PREFIX><FIELD>`), a TOML file, defaults. Every problem becomes one readable line that
starts with the field it is about, says what is wrong and where the value came from, and never
echoes a secret. Both `gpu_agent.settings` and `controller.settings` load through `load_layered`;
the checks on single values that both need (loopback hosts, base URLs, token files) live here too.
"""

from __future__ import annotations

import difflib
import ipaddress
import tomllib
import types
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsError

S = TypeVar("S", bound=BaseSettings)

# What a secret's value is replaced with wherever a rejected input is quoted.
REDACTED = "**********"


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


def strip_host(value: object) -> object:
    """A bind address without whitespace; "[::1]" (URL notation) becomes the bare "::1"."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]
    return value


def strip_secret(value: object) -> object:
    """A token without surrounding whitespace; an empty one is an error, not "no token"."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise ValueError("is empty; remove it, or set a token (openssl rand -hex 32)")
    return value


def token_sources(
    token: SecretStr | None, token_file: Path | None
) -> tuple[list[str], SecretStr | None]:
    """Only one of `token` and `token_file`; returns problem lines and the file's token."""
    if token is not None and token_file is not None:
        return ["token_file: cannot be combined with token; set only one of them"], None
    if token_file is not None:
        try:
            return [], read_token_file(token_file)
        except ValueError as exc:
            return [str(exc)], None
    return [], None


def open_host_problem(host: str, has_token: bool, *, power: str) -> str | None:
    """A service bound off loopback needs a token; `power` says what anyone could do without."""
    if has_token or is_loopback_host(host):
        return None
    return (
        f"token: required when host {host!r} is not a loopback address, because anyone who can "
        f"reach the port could {power}; set token or token_file, or bind host to 127.0.0.1"
    )


def load_layered(
    model_cls: type[S],
    config_file: Path | None,
    overrides: Mapping[str, Any],
    *,
    env_prefix: str,
    error_cls: type[Exception],
    secret_fields: Collection[str] = frozenset(),
) -> S:
    """Build `model_cls` from flags > environment (`env_prefix`) > TOML file > defaults.

    `overrides` are the command-line flags by field name; None means "flag not given".
    `env_prefix` must be the model's own `env_prefix`. Raises `error_cls` for a missing or
    unparsable file, an unknown key in it (with a "did you mean" hint), an unparsable environment
    variable, or any invalid value: one line per problem, naming the field (dotted for nested
    values, e.g. `agents.0.url`), the problem, the rejected value unless it is one of
    `secret_fields`, and where it came from.
    """
    file_values = (
        _read_config_file(model_cls, config_file, error_cls) if config_file is not None else {}
    )
    try:
        env_values = EnvSettingsSource(model_cls, env_prefix=env_prefix)()
    except SettingsError as exc:
        # The cause says what is wrong in the value (for a JSON list or table, where).
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        raise error_cls(f"environment: {exc}{cause}") from exc
    flag_values = {key: value for key, value in overrides.items() if value is not None}

    origins: dict[str, str] = {}
    origins.update({key: str(config_file) for key in file_values})
    origins.update({key: env_prefix + key.upper() for key in env_values})
    origins.update({key: "command line" for key in flag_values})
    try:
        # Passing every layer as keyword arguments, highest last, gives the precedence above;
        # the model's own environment read is then overridden by identical values.
        return model_cls(**{**file_values, **env_values, **flag_values})
    except ValidationError as exc:
        secrets = frozenset(secret_fields)
        lines = [describe_error(error, origins, secrets) for error in exc.errors()]
        raise error_cls("\n".join(lines)) from exc


def _read_config_file(
    model_cls: type[BaseModel], path: Path, error_cls: type[Exception]
) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            values = tomllib.load(stream)
    except FileNotFoundError:
        raise error_cls(f"config file: {path} does not exist") from None
    except OSError as exc:
        raise error_cls(f"config file: cannot read {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise error_cls(f"config file: {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise error_cls(f"config file: {path} is not valid TOML ({exc})") from None
    lines = [
        f"{key}: unknown key in config file {path}{hint}"
        for key, hint in _unknown_keys(model_cls, values, prefix="")
    ]
    if lines:
        raise error_cls("\n".join(lines))
    return values


def _unknown_keys(
    model_cls: type[BaseModel], values: Mapping[str, Any], *, prefix: str
) -> list[tuple[str, str]]:
    """(dotted key, hint) for every key no field takes, also inside tables of nested models."""
    found: list[tuple[str, str]] = []
    fields = model_cls.model_fields
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            found.append((prefix + key, f"; did you mean {close[0]!r}?" if close else ""))
            continue
        nested = _nested_model(fields[key].annotation)
        if nested is None:
            continue
        if isinstance(value, Mapping):
            found += _unknown_keys(nested, value, prefix=f"{prefix}{key}.")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, Mapping):
                    found += _unknown_keys(nested, item, prefix=f"{prefix}{key}.{index}.")
    return found


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The model inside `M`, `M | None` or `list[M]`; None for any other annotation."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = get_origin(annotation)
    if origin in (list, Union, types.UnionType):
        for arg in get_args(annotation):
            model = _nested_model(arg)
            if model is not None:
                return model
    return None


def describe_error(
    error: ErrorDetails, origins: Mapping[str, str], secret_fields: frozenset[str]
) -> str:
    """One line for one validation error: `field: problem (got value from origin)`."""
    loc = ".".join(str(part) for part in error["loc"])
    if error["type"] == "value_error":
        problem = str(error.get("ctx", {}).get("error", error["msg"]))
    elif error["type"] == "extra_forbidden":
        problem = "unknown setting"
    else:
        problem = error["msg"][:1].lower() + error["msg"][1:]
    if not loc:
        # Checks across fields already start each line with the field they are about.
        return problem
    field = str(error["loc"][0])
    details = []
    if not secret_fields.intersection(str(part) for part in error["loc"]):
        details.append(f"got {_redact(error['input'], secret_fields)!r}")
    if field in origins:
        details.append(f"from {origins[field]}")
    suffix = f" ({', '.join(details)})" if details else ""
    return f"{loc}: {problem}{suffix}"


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
