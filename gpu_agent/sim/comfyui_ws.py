"""Websocket fan-out of the emulated ComfyUI (simulator layer).

One socket per `clientId`, as ComfyUI's `PromptServer.sockets`. Events from the worker are queued
and sent in order by one publisher task (ComfyUI's `publish_loop`); `sid=None` broadcasts. Two
server quirks are kept on purpose: a reconnect with the same id replaces the old socket without
closing it, and when the *older* socket then closes, the id is forgotten, silencing the newer one.
`ServerFaults.websocket_silent` drops (not buffers) every frame while it is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gpu_agent.sim.faults import ServerFaults

log = logging.getLogger(__name__)

# A client that does not read for this long loses the frame rather than stalling everyone.
SEND_TIMEOUT_S = 5.0


@dataclass(eq=False)
class WsClient:
    """One connected socket and what it negotiated."""

    sid: str
    ws: web.WebSocketResponse
    request: web.Request
    feature_flags: dict[str, Any] = field(default_factory=dict)
    # Set when the server itself cut the connection; its handler must not forget a newer socket.
    dropped: bool = False


class WsHub:
    """The set of connected clients and the ordered event outbox."""

    def __init__(self, faults: ServerFaults) -> None:
        self.faults = faults
        self.clients: dict[str, WsClient] = {}
        # (event, data, sid); a binary frame travels as (None, its bytes, sid).
        self._outbox: asyncio.Queue[tuple[str | None, dict[str, Any] | bytes, str | None]] = (
            asyncio.Queue()
        )
        self._publisher: asyncio.Task[None] | None = None
        # Held while a frame is sent, so a new client's greeting is not interleaved with events.
        self._lock = asyncio.Lock()

    # -- outbox ----------------------------------------------------------------------------

    def send(self, event: str, data: dict[str, Any], sid: str | None) -> None:
        """Queue an event for `sid` (None = everyone); returns at once."""
        self._outbox.put_nowait((event, data, sid))

    def send_bytes(self, frame: bytes, sid: str | None) -> None:
        """Queue a binary frame for `sid` (None = everyone), in order with the events."""
        self._outbox.put_nowait((None, frame, sid))

    def supports_preview_metadata(self, sid: str | None) -> bool:
        """Whether `sid`'s socket announced `supports_preview_metadata` (ComfyUI's check)."""
        client = self.clients.get(sid) if sid is not None else None
        return client is not None and bool(client.feature_flags.get("supports_preview_metadata"))

    def start(self) -> None:
        """Start delivering the outbox in order; a no-op when already started."""
        if self._publisher is None:
            self._publisher = asyncio.create_task(self._publish_forever(), name="comfyui-ws-pub")

    async def stop(self) -> None:
        """Stop publishing and forget queued events (the process that made them is gone)."""
        task, self._publisher = self._publisher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._outbox = asyncio.Queue()

    async def _publish_forever(self) -> None:
        while True:
            event, data, sid = await self._outbox.get()
            await self.send_now(event, data, sid)

    async def send_now(
        self, event: str | None, data: dict[str, Any] | bytes, sid: str | None
    ) -> None:
        """Send at once, bypassing the outbox (replies to a client's own message)."""
        async with self._lock:
            await self._deliver(event, data, sid)

    async def _deliver(
        self, event: str | None, data: dict[str, Any] | bytes, sid: str | None
    ) -> None:
        """Send to `sid`, or to every client when `sid` is None; the caller holds the lock."""
        if self.faults.websocket_silent:
            return
        if sid is None:
            targets = list(self.clients.values())
        else:
            target = self.clients.get(sid)
            targets = [target] if target is not None else []
        message: dict[str, Any] | bytes = (
            data if isinstance(data, bytes) else {"type": event, "data": data}
        )
        for client in targets:
            await self._send(client, message)

    async def _send(self, client: WsClient, message: dict[str, Any] | bytes) -> None:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(SEND_TIMEOUT_S):
                if isinstance(message, bytes):
                    await client.ws.send_bytes(message)
                else:
                    await client.ws.send_json(message)
        except (ConnectionError, aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
            log.debug("websocket send to %s failed: %s", client.sid, exc)

    # -- connections -----------------------------------------------------------------------

    async def connect(self, client: WsClient, greeting: list[tuple[str, dict[str, Any]]]) -> None:
        """Take over `client.sid` and send the greeting frames before any queued event."""
        async with self._lock:
            self.clients.pop(client.sid, None)
            self.clients[client.sid] = client
            for event, data in greeting:
                await self._deliver(event, data, client.sid)

    def unregister(self, client: WsClient) -> None:
        """The handler of `client` ended. ComfyUI forgets the id even if a newer socket holds it."""
        if client.dropped and self.clients.get(client.sid) is not client:
            return
        self.clients.pop(client.sid, None)

    async def drop_all(self) -> None:
        """Cut every connection without a close frame, as a crash or a network fault does."""
        clients, self.clients = list(self.clients.values()), {}
        for client in clients:
            client.dropped = True
            transport = client.request.transport
            if transport is not None:
                transport.abort()
            else:
                await client.ws.close()

    async def close_all(self) -> None:
        """Close every connection politely (server shutdown)."""
        clients, self.clients = list(self.clients.values()), {}
        for client in clients:
            client.dropped = True
            with contextlib.suppress(
                ConnectionError, aiohttp.ClientError, RuntimeError, TimeoutError
            ):
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await client.ws.close(
                        code=aiohttp.WSCloseCode.GOING_AWAY, message=b"Server shutdown"
                    )
