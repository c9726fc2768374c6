"""Who may use the controller's API, and what each client has asked (adapter layer).

Three ways in, checked in this order on every route but the public ones (`/healthz`,
`/openapi.json`):

1. a bearer token: the controller's own `token`, or one of the named `clients` tokens (one per
   studio tool, so each can be revoked alone); the request is then that client's;
2. no token (or one it does not know), from an address in `trusted_networks`, on an LLM route
   only: the Ollama routes
   under `/api/` (except the ones that manage models: pull, push, create, copy, delete, blobs)
   and the OpenAI ones. That is what lets the `ollama` command line, which cannot send an
   Authorization header, run `OLLAMA_HOST=mac-mini:8766 ollama run auto:quality` from another
   machine on the studio's network;
3. nothing else: 401. Image jobs, cancels, the fleet, the metrics and every other route need a
   token from everyone.

With no token configured at all (a controller on loopback only) every request is let through,
as `anonymous`. Requests are counted per client (`trusted` for the token-less ones, `rejected`
for the refused), for `/metrics`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from gpu_common.errors import Unauthorized
from gpu_common.http import PUBLIC_PATHS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

CLIENT_KEY: Final = web.RequestKey("client", str)
"""Where a request's client name is kept (`request[CLIENT_KEY]`)."""
DEFAULT_CLIENT = "default"
TRUSTED_CLIENT = "trusted"
ANONYMOUS_CLIENT = "anonymous"
REJECTED_CLIENT = "rejected"

# The OpenAI-compatible routes (Ollama serves the same under /v1).
OPENAI_PATHS: Final = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
)
# Ollama routes that manage models rather than use them: never without a token.
MODEL_MANAGEMENT_PATHS: Final = frozenset(
    {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"}
)


def is_llm_route(path: str) -> bool:
    """Whether `path` is one the trusted networks may use without a token."""
    if path == "/":
        return True  # Ollama's liveness text, which its clients ask for first
    if path.startswith("/api/"):
        return path not in MODEL_MANAGEMENT_PATHS and not path.startswith("/api/blobs")
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def _digest(token: str) -> bytes:
    return hashlib.sha256(f"Bearer {token}".encode("utf-8", "surrogateescape")).digest()


class AccessPolicy:
    """The tokens by client name, the trusted networks, and the requests counted per client."""

    def __init__(
        self,
        *,
        token: str | None,
        clients: Mapping[str, str],
        trusted_networks: Iterable[str] = (),
    ) -> None:
        # Hashes, compared in constant time: the time taken says nothing about any token.
        self._tokens: list[tuple[bytes, str]] = [
            (_digest(secret), name) for name, secret in clients.items()
        ]
        if token is not None:
            self._tokens.insert(0, (_digest(token), DEFAULT_CLIENT))
        self._networks: list[Network] = [ipaddress.ip_network(n) for n in trusted_networks]
        self.requests: Counter[str] = Counter()

    @property
    def open(self) -> bool:
        """No token is configured: every request is let through."""
        return not self._tokens

    def client_of(self, authorization: str) -> str | None:
        """The client whose token `authorization` carries; None for no known token."""
        given = hashlib.sha256(authorization.encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, name in self._tokens:
            # Every token is compared, so the time does not depend on which one matched.
            if hmac.compare_digest(given, digest) and found is None:
                found = name
        return found

    def trusts(self, remote: str | None) -> bool:
        """Whether the peer address `remote` is in a trusted network."""
        if remote is None or not self._networks:
            return False
        try:
            address = ipaddress.ip_address(remote.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def admit(self, request: web.Request) -> str:
        """The client a request is served as; `Unauthorized` when it may not be served."""
        if request.path in PUBLIC_PATHS:
            return ANONYMOUS_CLIENT
        if self.open:
            return ANONYMOUS_CLIENT
        authorization = request.headers.get("Authorization")
        if authorization is not None:
            client = self.client_of(authorization)
            if client is not None:
                return client
        # An unknown token is ignored here: OpenAI's clients always send one (any key).
        if is_llm_route(request.path) and self.trusts(request.remote):
            return TRUSTED_CLIENT
        raise Unauthorized("missing or wrong bearer token")


def access_middleware(
    policy: AccessPolicy, *, own_auth_prefixes: tuple[str, ...] = ()
) -> Middleware:
    """aiohttp middleware serving each request as its client, or refusing it (401).

    Paths under `own_auth_prefixes` are left to their own authentication (a browser UI that
    exchanges the token for a session cookie once, so it never travels in a URL)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if own_auth_prefixes and request.path.startswith(own_auth_prefixes):
            return await handler(request)
        try:
            client = policy.admit(request)
        except Unauthorized:
            policy.requests[REJECTED_CLIENT] += 1
            raise
        if request.path not in PUBLIC_PATHS:
            policy.requests[client] += 1
        request[CLIENT_KEY] = client
        return await handler(request)

    return middleware


class ClientRequestsCollector(Collector):
    """`gpu_controller_client_requests_total{client}`: requests served per client."""

    def __init__(self, policy: AccessPolicy) -> None:
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        """One sample per client seen so far."""
        family = CounterMetricFamily(
            "gpu_controller_client_requests",
            "Requests per client: a named token, 'default' (the controller's token), 'trusted' "
            "(no token, from a trusted network) or 'rejected' (401)",
            labels=["client"],
        )
        for client, count in sorted(self._policy.requests.items()):
            family.add_metric([client], count)
        yield family
