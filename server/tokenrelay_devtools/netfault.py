"""A TCP proxy that breaks connections on demand, for real.

    async with FaultProxy("127.0.0.1", server_port) as proxy:
        client = RelayClient(proxy.address)
        ...
        proxy.cut_all()                  # every open connection is reset
        proxy.refuse_new = True          # new connections are reset at once

The demo and the tests put it between a client and a gateway to drop a
connection mid-stream on a real socket: `cut_all` sets SO_LINGER to 0 and
closes both sockets of each connection, so the kernel sends a TCP RST and
each peer sees "connection reset", exactly as with a network failure. The
listener stays open; new connections are forwarded as before unless
`refuse_new` is set.

Every task the proxy starts (one per connection, plus its two pumps) is
owned: the connection task is tracked, and `close()` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

_READ_SIZE = 64 * 1024
# How long close() lets connection tasks finish after resetting them.
_CLOSE_TIMEOUT_S = 2.0
# struct linger { int l_onoff; int l_linger; }: on, 0 seconds → close() sends RST.
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_transport(transport: asyncio.WriteTransport) -> None:
    """Close the transport's socket so that the peer sees a reset (RST), not FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    # abort() closes at once without flushing buffered data; with linger 0 the
    # close is a reset.
    transport.abort()


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    cut: bool = False
    bytes_up: int = 0
    bytes_down: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def reset(self) -> None:
        self.cut = True
        reset_transport(self.client.transport)
        if self.upstream is not None:
            reset_transport(self.upstream.transport)


class FaultProxy:
    """Forward TCP from `address` (127.0.0.1, a free port) to target_host:target_port."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        # When True, a new connection is accepted and reset at once (an
        # unreachable server, without stopping it).
        self.refuse_new = False
        self.connections_accepted = 0
        self.connections_cut = 0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closing = False

    @classmethod
    def for_target(
        cls, target: str, *, listen_host: str = "127.0.0.1", listen_port: int = 0
    ) -> FaultProxy:
        """A proxy in front of a "host:port" target ("[::1]:port" for IPv6)."""
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"target must be host:port, got {target!r}")
        return cls(host.strip("[]"), int(port), listen_host=listen_host, listen_port=listen_port)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not started")
        sockname = self._server.sockets[0].getsockname()
        return int(sockname[1])

    @property
    def address(self) -> str:
        """ "host:port" to give to the client instead of the target."""
        return f"{self.listen_host}:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._serve, self.listen_host, self.listen_port)
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def cut_all(self) -> int:
        """Reset every open connection (both sides); return how many. The
        listener keeps accepting."""
        connections = [c for c in self._connections if not c.cut]
        for connection in connections:
            connection.reset()
        self.connections_cut += len(connections)
        return len(connections)

    async def close(self) -> None:
        """Stop listening, reset every connection, and wait for every task."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        tasks = []
        for connection in list(self._connections):
            # A reset ends both pumps (their reads see the closed socket), so
            # the connection task finishes by itself.
            connection.reset()
            if connection.task is not None:
                tasks.append(connection.task)
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=_CLOSE_TIMEOUT_S)
            # Only a connect to an upstream that never answers gets here.
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # -- one connection --------------------------------------------------------

    async def _serve(
        self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter
    ) -> None:
        # asyncio.start_server runs this as a task it does not keep; we do.
        connection = _Connection(client=client, task=asyncio.current_task())
        self.connections_accepted += 1
        if self._closing or self.refuse_new:
            connection.reset()
            return
        self._connections.add(connection)
        try:
            await self._forward(client_reader, connection)
        except asyncio.CancelledError:
            # close() is the only canceller (a connect that hangs); we are the
            # owner of this task and asked for it, so end quietly: asyncio's
            # start_server callback would otherwise log the cancellation.
            if not self._closing:
                raise
        finally:
            self._connections.discard(connection)
            if not connection.cut:
                client.close()
                if connection.upstream is not None:
                    connection.upstream.close()

    async def _forward(self, client_reader: asyncio.StreamReader, connection: _Connection) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection(
                self.target_host, self.target_port
            )
        except OSError:
            connection.reset()  # the target is down: the client sees a reset
            return
        connection.upstream = upstream
        if connection.cut:  # cut while we were connecting
            connection.reset()
            return
        async with asyncio.TaskGroup() as pumps:
            pumps.create_task(self._pump(client_reader, upstream, connection, upstream=True))
            pumps.create_task(
                self._pump(upstream_reader, connection.client, connection, upstream=False)
            )

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        connection: _Connection,
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(_READ_SIZE):
                writer.write(data)
                await writer.drain()
                if upstream:
                    connection.bytes_up += len(data)
                else:
                    connection.bytes_down += len(data)
            # An orderly end (FIN) on one side is passed on as a FIN.
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except OSError:
            # One side was reset (by us or by the peer): pass the reset on.
            connection.reset()
