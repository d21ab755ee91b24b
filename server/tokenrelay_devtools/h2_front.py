"""HTTP/2 over TLS in front of an HTTP/1.1 server: the mock upstream as a
provider that speaks HTTP/2 (issue 13).

httpx speaks HTTP/2 only over TLS, where ALPN picks it, and the mock
upstream (aiohttp) only HTTP/1.1. `Http2Front` terminates TLS with ALPN
`h2` (the `h2` package, sans-IO, on asyncio streams) and forwards each
request to the backend over HTTP/1.1, streaming the answer back as DATA
frames as it arrives, with HTTP/2 flow control obeyed. A backend that cuts
its connection (the mock's `reset@N`) becomes a RST_STREAM.

It exists so a test can drive the gateway's provider adapters over real
HTTP/2 (where hpack encodes `authorization: Bearer <key>`) against the
mock's fault injection. Point a provider's base_url at `front.base_url`
and let the gateway trust the test's CA (SSL_CERT_FILE).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httpx

# Headers that belong to one HTTP/1.1 connection, not to the message
# (RFC 9113 section 8.2.2: never sent over HTTP/2).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
        b"content-length",
    }
)


class _Connection:
    """One client connection: the h2 state machine and its socket."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        front: Http2Front,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._front = front
        self._h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._requests: dict[int, tuple[list[tuple[bytes, bytes]], bytearray]] = {}
        self._windows: dict[int, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data:
            self._writer.write(data)

    async def run(self) -> None:
        self._h2.initiate_connection()
        self._flush()
        try:
            while data := await self._reader.read(65536):
                try:
                    events = self._h2.receive_data(data)
                except h2.exceptions.ProtocolError:
                    self._flush()
                    return
                for event in events:
                    self._on(event)
                self._flush()
                await self._writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            for task in self._tasks:
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await self._writer.wait_closed()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
            headers = [(bytes(name), bytes(value)) for name, value in event.headers or ()]
            self._requests[event.stream_id] = (headers, bytearray())
        elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
            self._requests[event.stream_id][1].extend(event.data or b"")
            self._h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
            stream_id = event.stream_id
            task = asyncio.create_task(self._forward(stream_id), name=f"h2 stream {stream_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif isinstance(event, h2.events.WindowUpdated):
            for window in self._windows.values():
                window.set()
        elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
            self._requests.pop(event.stream_id, None)

    async def _forward(self, stream_id: int) -> None:
        headers, body = self._requests.pop(stream_id)
        pseudo = {name: value for name, value in headers if name.startswith(b":")}
        forwarded = [
            (name, value)
            for name, value in headers
            if not name.startswith(b":") and name not in _HOP_BY_HOP
        ]
        self._front.streams += 1
        self._front.requests.append(headers)
        url = self._front.backend + pseudo.get(b":path", b"/").decode()
        method = pseudo.get(b":method", b"GET").decode()
        try:
            async with self._front.client.stream(
                method, url, headers=forwarded, content=bytes(body)
            ) as response:
                status = str(response.status_code).encode()
                answer = [(b":status", status)] + [
                    (name.lower(), value)
                    for name, value in response.headers.raw
                    if name.lower() not in _HOP_BY_HOP
                ]
                self._h2.send_headers(stream_id, answer)
                self._flush()
                async for chunk in response.aiter_raw():
                    await self._send(stream_id, chunk)
            self._h2.end_stream(stream_id)
            self._flush()
        except (httpx.HTTPError, h2.exceptions.StreamClosedError):
            with contextlib.suppress(h2.exceptions.H2Error):
                self._h2.reset_stream(stream_id)
                self._flush()
        finally:
            self._windows.pop(stream_id, None)

    async def _send(self, stream_id: int, data: bytes) -> None:
        """DATA frames as the peer's flow-control window allows."""
        while data:
            window = min(
                self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
            )
            if window <= 0:
                event = self._windows.setdefault(stream_id, asyncio.Event())
                event.clear()
                await event.wait()
                continue
            piece, data = data[:window], data[window:]
            self._h2.send_data(stream_id, piece)
            self._flush()
            await self._writer.drain()


class Http2Front:
    """An HTTPS (HTTP/2 only) server forwarding every request to `backend`
    (an http:// base, no trailing slash) over HTTP/1.1."""

    def __init__(self, backend: str, *, cert: Path, key: Path) -> None:
        self.backend = backend.rstrip("/")
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.load_cert_chain(cert, key)
        self._ssl.set_alpn_protocols(["h2"])
        self.client = httpx.AsyncClient(timeout=None)
        self.streams = 0  # requests forwarded
        # The headers of each request received (a test checks what the
        # gateway sent: its provider key, hpack-encoded).
        self.requests: list[list[tuple[bytes, bytes]]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        """The provider base_url to configure (the mock's /v1)."""
        return f"https://localhost:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._accept, host, port, ssl=self._ssl)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await _Connection(reader, writer, self).run()
        finally:
            if task is not None:
                self._connections.discard(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            for task in list(self._connections):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._server.wait_closed()
        await self.client.aclose()
