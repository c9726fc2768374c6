"""Host and Origin checks for both HTTP APIs (adapter layer): DNS rebinding and browser CSRF.

A web page can make a browser send requests to a loopback or LAN address in two ways this module
stops. With DNS rebinding, the page's own name is re-pointed at the API's address, so the request
carries `Host: attacker.example`; the API answers 403 `forbidden_host` to any Host it does not
know. With cross-site requests (a form post, a `fetch` in `no-cors` mode, a websocket), the
browser sends `Origin: https://attacker.example`; the API answers 403 `forbidden_origin` to any
Origin whose host it does not know. Programs (the controller, `curl`, the Ollama clients) send no
Origin and the Host of the URL they were given, so they pass.

Allowed by default: `localhost` and `*.localhost`, any loopback address, the bind address, the
address the connection arrived on (a client that dialled an IP literal sends it as Host, and a
rebinding attack cannot produce one), this machine's hostname, and names under the private-use
suffixes `.local`, `.internal`, `.lan` and `.home.arpa`, which no one can register publicly.
More come from the `allowed_hosts` setting: exact names, `*.example.org` (any name under it) or
`*` (anything; for a reverse proxy that checks Host itself). A request without a Host header
(HTTP/1.0) is let through: there is no name to rebind.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from gpu_common.errors import Forbidden

__all__ = [
    "PRIVATE_SUFFIXES",
    "HostPolicy",
    "check_allowed_host_entry",
    "host_check_middleware",
    "host_of_header",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRIVATE_SUFFIXES = (".localhost", ".local", ".internal", ".lan", ".home.arpa")
"""Name suffixes reserved for private use (RFC 6761, 6762, 8375; ICANN's `.internal`)."""

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


def _normalise_name(name: str) -> str:
    """Lower case, without brackets or the trailing dot of a fully qualified name."""
    name = name.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    return name.removesuffix(".")


def _as_ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name.split("%", 1)[0])  # a zone id (fe80::1%eth0) is no help
    except ValueError:
        return None


def check_allowed_host_entry(entry: str) -> str:
    """One `allowed_hosts` entry, normalised: a name, an address, `*.suffix` or `*`.

    Raises ValueError saying what is wrong (meant to be called from a field validator).
    """
    value = _normalise_name(entry)
    if value == "*":
        return value
    name = value[2:] if value.startswith("*.") else value
    if not name:
        raise ValueError(f"{entry!r} is empty")
    if _as_ip(name) is not None:
        if value.startswith("*."):
            raise ValueError(f"{entry!r}: a wildcard cannot cover an address")
        return str(_as_ip(name))
    if not set(name) <= _NAME_CHARS or "*" in name or ".." in name or name.startswith("."):
        raise ValueError(
            f"{entry!r} is not a host name (letters, digits, '-' and '.'; a leading '*.' "
            f"allows every name under it; no port)"
        )
    return value


def host_of_header(value: str) -> str | None:
    """The host part of a `Host` header (`name`, `name:port`, `[v6]:port`), normalised;
    None when it cannot be a host at all."""
    value = value.strip()
    if not value or any(ch.isspace() or ord(ch) < 32 or ch in "/\\@?#" for ch in value):
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if _as_ip(host) is None:
            return None
    else:
        host, sep, rest = value.partition(":")
        rest = sep + rest
    if rest and not (rest.startswith(":") and rest[1:].isdigit() and rest[1:].isascii()):
        return None
    host = _normalise_name(host)
    return host or None


class HostPolicy:
    """Which names a request may use in `Host` and `Origin` to reach this API."""

    def __init__(self, extra_hosts: Iterable[str] = (), *, bind_host: str | None = None) -> None:
        entries = [check_allowed_host_entry(entry) for entry in extra_hosts]
        self.allow_any = "*" in entries
        self._suffixes = PRIVATE_SUFFIXES + tuple(e[1:] for e in entries if e.startswith("*."))
        names = {"localhost", _normalise_name(socket.gethostname())}
        names.update(e for e in entries if not e.startswith("*"))
        if bind_host:
            bind = _normalise_name(bind_host)
            ip = _as_ip(bind)
            # A wildcard bind (0.0.0.0, ::) names no address a client could use.
            if ip is None or not ip.is_unspecified:
                names.add(str(ip) if ip is not None else bind)
        self._names = frozenset(names)

    def allows(self, host: str, *, local_address: str | None = None) -> bool:
        """Whether `host` (already normalised, see `host_of_header`) may reach this API.

        `local_address` is the address the connection arrived on, if known.
        """
        if self.allow_any:
            return True
        ip = _as_ip(host)
        if ip is not None:
            if ip.is_loopback or str(ip) in self._names:
                return True
            local = _as_ip(_normalise_name(local_address)) if local_address else None
            if isinstance(local, ipaddress.IPv6Address) and local.ipv4_mapped is not None:
                local = local.ipv4_mapped  # a dual-stack socket reports v4 clients this way
            return local is not None and ip == local
        return host in self._names or host.endswith(self._suffixes)


def _forbidden(code: str, message: str) -> Forbidden:
    # Raised, not answered: the error middleware gives it the shape of the route's family.
    return Forbidden(code, message)


def _local_address(request: web.Request) -> str | None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and sockname and isinstance(sockname[0], str):
        return sockname[0]
    return None


def host_check_middleware(policy: HostPolicy) -> Callable[..., Any]:
    """aiohttp middleware answering 403 JSON for a Host or Origin the policy does not allow.

    It runs on every route, `/healthz` and `/openapi.json` included, before authentication.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if policy.allow_any:
            return await handler(request)
        local = _local_address(request)
        raw_host = request.headers.get("Host")
        if raw_host is not None:
            host = host_of_header(raw_host)
            if host is None or not policy.allows(host, local_address=local):
                raise _forbidden(
                    "forbidden_host",
                    f"Host {raw_host[:200]!r} is not allowed; add the name to allowed_hosts "
                    f"if clients really use it",
                )
        origin = request.headers.get("Origin")
        if origin is not None:
            origin_host = _host_of_origin(origin)
            if origin_host is None or not policy.allows(origin_host, local_address=local):
                raise _forbidden(
                    "forbidden_origin",
                    f"Origin {origin[:200]!r} is not allowed; browser pages from other sites "
                    f"may not use this API",
                )
        return await handler(request)

    return middleware


def _host_of_origin(origin: str) -> str | None:
    """The host of an `Origin` header; None for `null` or anything that is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        parts.port  # noqa: B018 - property access validates the port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        return None
    return _normalise_name(parts.hostname)
