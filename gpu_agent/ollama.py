"""Ollama adapter (imperative shell): the few calls the agent makes to its local Ollama.

Foreign errors (httpx exceptions, Ollama's `{"error": ...}` bodies) are converted to the agent's
error tree in `_send`, and nowhere else. Every call has a finite timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx

from gpu_agent.errors import ModelNotFound, OllamaError, OllamaRejected, OllamaUnavailable
from gpu_common import clock
from gpu_common.tls import verify_for

# An expiry this far out means "pinned" (keep_alive < 0); Ollama reports year 2318.
_PINNED_AFTER_YEAR = 2200


@dataclass(frozen=True, slots=True)
class AvailableModel:
    """A model Ollama has on disk (`ollama list`)."""

    name: str
    size_bytes: int
    family: str | None
    parameter_size: str | None
    quantization_level: str | None
    # What it can do ("completion", "embedding", "tools", ...), as Ollama lists it since 0.12;
    # None from an older Ollama, which does not say.
    capabilities: list[str] | None = None

    @property
    def embedding(self) -> bool:
        """An embedding model: Ollama loads it through /api/embed, not generate."""
        return self.capabilities is not None and "embedding" in self.capabilities


@dataclass(frozen=True, slots=True)
class RunningModel:
    """A model Ollama has loaded (`ollama ps`). `vram_bytes < size_bytes` means CPU offload."""

    name: str
    size_bytes: int
    vram_bytes: int
    context_length: int | None
    expires_at: datetime | None

    @property
    def pinned(self) -> bool:
        """Loaded with a negative keep_alive: Ollama never unloads it on its own."""
        return self.expires_at is not None and self.expires_at.year >= _PINNED_AFTER_YEAR


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    # Go prints up to 9 fractional digits; Python's parser takes 6.
    head, sep, rest = text.partition(".")
    if sep:
        n = 0
        while n < len(rest) and rest[n].isdigit():
            n += 1
        digits, zone = rest[:n], rest[n:]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class OllamaClient:
    """Talks to one Ollama server. Use `http` for streaming pass-through."""

    def __init__(
        self,
        base_url: str,
        *,
        request_timeout_s: float = 10.0,
        load_timeout_s: float = 300.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.load_timeout_s = load_timeout_s
        self.http = httpx.AsyncClient(
            base_url=self.base_url,
            verify=verify_for(self.base_url),
            timeout=httpx.Timeout(request_timeout_s),
            transport=transport,
            # Room for 64 concurrent streams through the pass-through and the agent's own
            # calls beside them, each connection kept for the next request.
            limits=httpx.Limits(
                max_connections=512,
                max_keepalive_connections=128,
                keepalive_expiry=clock.http_keepalive_expiry_s(),
            ),
        )

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self.http.aclose()

    async def _send(
        self, method: str, path: str, *, json: Any = None, timeout_s: float | None = None
    ) -> Any:
        timeout = httpx.Timeout(timeout_s) if timeout_s is not None else httpx.USE_CLIENT_DEFAULT
        try:
            response = await self.http.request(method, path, json=json, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise OllamaUnavailable(f"Ollama did not answer {method} {path} in time") from exc
        except httpx.HTTPError as exc:
            raise OllamaUnavailable(f"cannot reach Ollama at {self.base_url}: {exc}") from exc
        if response.status_code >= 400:
            message = _error_message(response)
            if response.status_code == 404:
                raise ModelNotFound(message)
            if response.status_code >= 500:
                raise OllamaUnavailable(f"Ollama answered {response.status_code}: {message}")
            raise OllamaRejected(f"Ollama answered {response.status_code}: {message}")
        try:
            return response.json()
        except ValueError as exc:
            raise OllamaError(f"Ollama sent a body that is not JSON for {path}") from exc

    async def version(self) -> str:
        """Ollama's version string (`/api/version`); raises `OllamaUnavailable` if unreachable."""
        body = await self._send("GET", "/api/version")
        return str(body.get("version", ""))

    async def available(self) -> list[AvailableModel]:
        """The models pulled on disk (`/api/tags`), loaded or not."""
        body = await self._send("GET", "/api/tags")
        models = []
        for item in body.get("models") or []:
            details = item.get("details") or {}
            capabilities = item.get("capabilities")
            models.append(
                AvailableModel(
                    name=str(item.get("name") or item.get("model")),
                    size_bytes=int(item.get("size") or 0),
                    family=details.get("family"),
                    parameter_size=details.get("parameter_size"),
                    quantization_level=details.get("quantization_level"),
                    capabilities=(
                        [str(c) for c in capabilities] if isinstance(capabilities, list) else None
                    ),
                )
            )
        return models

    async def running(self) -> list[RunningModel]:
        """The models loaded now (`/api/ps`), with their size in VRAM and expiry."""
        body = await self._send("GET", "/api/ps")
        models = []
        for item in body.get("models") or []:
            context = item.get("context_length")
            models.append(
                RunningModel(
                    name=str(item.get("name") or item.get("model")),
                    size_bytes=int(item.get("size") or 0),
                    vram_bytes=int(item.get("size_vram") or 0),
                    context_length=int(context) if context else None,
                    expires_at=_parse_time(item.get("expires_at")),
                )
            )
        return models

    async def load(
        self,
        model: str,
        *,
        keep_alive: str | float | None = None,
        num_ctx: int | None = None,
        embedding: bool = False,
    ) -> None:
        """Load `model` (an empty generate request, or for an `embedding` model an empty embed
        request: Ollama refuses generate on those); returns once Ollama says it is loaded."""
        body: dict[str, Any] = {"model": model}
        if not embedding:
            body["stream"] = False
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if num_ctx is not None:
            body["options"] = {"num_ctx": num_ctx}
        path = "/api/embed" if embedding else "/api/generate"
        await self._send("POST", path, json=body, timeout_s=self.load_timeout_s)

    async def unload(self, model: str) -> None:
        """Ask Ollama to unload `model`. It answers at once; the memory follows later."""
        body = {"model": model, "keep_alive": 0, "stream": False}
        await self._send("POST", "/api/generate", json=body)


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return response.text.strip()
