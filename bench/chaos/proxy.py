"""A TCP relay on loopback between the controller and an agent, whose link can be cut or delayed.

`cut()` closes the listening socket and aborts every relayed connection, as a pulled cable seen
from both ends; `restore()` listens on the same port again. `delay_s` holds every chunk that much
longer (on the loop's clock, so virtual on a virtual-time loop), in order, as a congested or
distant link does.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

CONNECT_TIMEOUT_S = 2.0
CHUNK_BYTES = 65536


class LinkProxy:
    """Relays connections on `127.0.0.1:port` to `target_url`'s host and port."""

    def __init__(self, target_url: str, *, port: int = 0) -> None:
        host, _, target_port = target_url.removeprefix("http://").rpartition(":")
        self._target = (host, int(target_port))
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = port
        self.delay_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Relayed connections open now (each has two sockets)."""
        return len(self._writers) // 2

    async def __aenter__(self) -> LinkProxy:
        await self.restore()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cut()

    async def restore(self) -> None:
        """Listen again (on the same port after the first time); no-op while listening."""
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._relay, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and abort every relayed connection."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        pumps = list(self._pumps)
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None:
            await server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The server runs this as its own task, which must end by itself (asyncio's streams
        # complain about one cancelled): `cut()` cancels the pumps, and this then returns.
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection(*self._target)
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        if self._server is None:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        ends = (writer, up_writer)
        self._writers.update(ends)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._pumps.difference_update(pumps)
            self._writers.difference_update(ends)
            for end in ends:
                end.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction; with a delay, each chunk leaves `delay_s` after it arrived, in
        order (latency, not a slower line)."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due_s, data = await chunks.get()
                if not data:
                    return
                wait_s = due_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while data := await reader.read(CHUNK_BYTES):
                    chunks.put_nowait((loop.time() + self.delay_s, data))
            chunks.put_nowait((loop.time() + self.delay_s, b""))
            with contextlib.suppress(ConnectionError):
                await sender
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
            # One side ended: end the other too, as the peer's close would.
            writer.transport.abort()
