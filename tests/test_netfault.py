"""The fault proxy on real sockets: it forwards, it resets (RST, not FIN) on
demand, it keeps accepting, and it leaves no task behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tokenrelay_devtools.netfault import FaultProxy


class EchoServer:
    """Echoes every byte back; records how each connection ended."""

    def __init__(self) -> None:
        self.endings: list[str] = []
        self.ended = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        finally:
            writer.close()
            self.ended.set()
            self._handlers.discard(task)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[tuple[EchoServer, int]]:
    server = EchoServer()
    port = await server.start()
    yield server, port
    await server.close()


@pytest.fixture
async def proxy(echo) -> AsyncIterator[FaultProxy]:
    _, port = echo
    async with FaultProxy("127.0.0.1", port) as fault_proxy:
        yield fault_proxy


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await reader.readexactly(len(data))


async def test_the_proxy_forwards_both_ways(proxy):
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"hello \xf0\x9f\x9a\x80") == b"hello \xf0\x9f\x9a\x80"
    assert proxy.open_connections == 1
    writer.close()
    await writer.wait_closed()


async def test_cut_all_resets_the_client_side(proxy):
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"ping")
    assert proxy.cut_all() == 1
    with pytest.raises(ConnectionResetError):
        # A reset, not an orderly end: read() would return b"" on a FIN.
        await reader.read(1024)
    writer.close()


async def test_cut_all_resets_the_upstream_side_too(echo, proxy):
    server, _ = echo
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"ping")
    proxy.cut_all()
    await server.ended.wait()
    assert server.endings == ["reset"]
    writer.close()


async def test_the_proxy_keeps_accepting_after_a_cut(proxy):
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"one")
    proxy.cut_all()
    writer.close()
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"two") == b"two"
    assert proxy.connections_accepted == 2
    assert proxy.connections_cut == 1
    writer.close()


async def test_refuse_new_resets_new_connections_until_lifted(proxy):
    proxy.refuse_new = True
    reader, writer = await connect(proxy)
    with pytest.raises(ConnectionResetError):
        writer.write(b"anyone?")
        await writer.drain()
        await reader.read(1024)
    writer.close()
    proxy.refuse_new = False
    reader, writer = await connect(proxy)
    assert await roundtrip(reader, writer, b"back") == b"back"
    writer.close()


async def test_an_orderly_close_is_passed_on_as_an_orderly_close(echo, proxy):
    server, _ = echo
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"bye")
    writer.write_eof()
    assert await reader.read(1024) == b""
    await server.ended.wait()
    assert server.endings == ["eof"]
    writer.close()


async def test_a_target_that_is_down_looks_like_a_reset():
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await connect(proxy)
        with pytest.raises(ConnectionResetError):
            await reader.read(1024)
        writer.close()


async def test_close_leaves_no_task_behind(echo):
    _, port = echo
    before = asyncio.all_tasks()
    proxy = await FaultProxy("127.0.0.1", port).start()
    streams = [await connect(proxy) for _ in range(3)]
    for reader, writer in streams:
        await roundtrip(reader, writer, b"x")
    assert proxy.open_connections == 3

    def proxy_tasks() -> set[asyncio.Task]:
        return {t for t in asyncio.all_tasks() - before if "FaultProxy" in repr(t.get_coro())}

    assert len(proxy_tasks()) == 9  # per connection: the connection and two pumps
    await proxy.close()
    assert proxy_tasks() == set()
    assert proxy.open_connections == 0
    for _, writer in streams:
        writer.close()


def test_for_target_parses_host_and_port():
    proxy = FaultProxy.for_target("[::1]:50051")
    assert (proxy.target_host, proxy.target_port) == ("::1", 50051)
    with pytest.raises(ValueError, match="host:port"):
        FaultProxy.for_target("localhost")
