"""The clients' credentials (issue 13): the Python client, `tokenrelay chat`
and `tokenrelay demo` send the API key as `authorization: Bearer <key>` with
every call (--api-key, or $TOKENRELAY_API_KEY) and connect with TLS and mTLS
from PEM files (--tls-ca, --tls-client-cert, --tls-client-key).

What a call carries is seen by a real gRPC server that records each call's
metadata and refuses it (UNAUTHENTICATED, as a gateway with tenant keys
does); whether a key is valid is the gateway's business, not the client's."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from rich.console import Console

from serverkit import QUIET, RelayFactory, eventually, produce
from tlskit import CertificateAuthority
from tokenrelay_client import RelayClient, StreamFailed
from tokenrelay_devtools.demo import ClientCredentials, run_demo
from tokenrelay_server.core.clock import ManualClock

TOKENRELAY = [sys.executable, "-m", "tokenrelay_server.cli"]
KEY = "trk_canary_0123456789abcdefABCDEF"
STREAM_METHOD = "/tokenrelay.v1.Relay/Stream"


class MetadataRecorder:
    """A gRPC server whose Relay.Stream records the call's metadata and
    refuses it with UNAUTHENTICATED."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self._server = grpc.aio.server()
        self.port = 0

    async def start(self, credentials: grpc.ServerCredentials | None = None) -> None:
        recorder = self

        async def stream(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            recorder.calls.append(dict(context.invocation_metadata() or ()))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no such key")
            yield b""  # pragma: no cover (abort raises)

        handler = grpc.method_handlers_generic_handler(
            "tokenrelay.v1.Relay",
            {"Stream": grpc.stream_stream_rpc_method_handler(stream)},
        )
        self._server.add_generic_rpc_handlers((handler,))
        address = "127.0.0.1:0"
        self.port = (
            self._server.add_insecure_port(address)
            if credentials is None
            else self._server.add_secure_port(address, credentials)
        )
        await self._server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        await self._server.stop(None)


@pytest.fixture
async def recorder() -> AsyncIterator[MetadataRecorder]:
    server = MetadataRecorder()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


async def test_the_client_sends_its_api_key_as_a_bearer_token(recorder: MetadataRecorder) -> None:
    async with RelayClient(recorder.address, api_key=KEY, max_reconnects=0) as client:
        with pytest.raises(StreamFailed) as caught:
            await client.generate("sim", [("user", "hi")])
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert KEY not in str(caught.value)
    assert recorder.calls[0]["authorization"] == f"Bearer {KEY}"


async def test_the_client_reads_the_key_from_the_environment(
    recorder: MetadataRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENRELAY_API_KEY", KEY)
    async with RelayClient(recorder.address, max_reconnects=0) as client:
        with pytest.raises(StreamFailed):
            await client.generate("sim", [("user", "hi")])
    monkeypatch.delenv("TOKENRELAY_API_KEY")
    async with RelayClient(recorder.address, max_reconnects=0) as client:
        with pytest.raises(StreamFailed):
            await client.generate("sim", [("user", "hi")])
    assert recorder.calls[0]["authorization"] == f"Bearer {KEY}"
    assert "authorization" not in recorder.calls[1]


def test_a_bad_key_or_half_a_client_certificate_is_refused_before_connecting(
    ca: CertificateAuthority,
) -> None:
    with pytest.raises(ValueError, match="printable ASCII"):
        RelayClient("127.0.0.1:1", api_key="two words")
    client = ca.client()
    with pytest.raises(ValueError, match="tls_client_cert is given but tls_client_key is not"):
        RelayClient("127.0.0.1:1", tls_ca=ca.cert, tls_client_cert=client.cert)
    with pytest.raises(ValueError, match=r"tls_ca '/nowhere/ca\.pem' cannot be read"):
        RelayClient("127.0.0.1:1", tls_ca="/nowhere/ca.pem")


async def run_chat_command(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *TOKENRELAY,
        "chat",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    async with asyncio.timeout(60):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_chat_sends_the_key_of_its_flag_or_its_variable(recorder: MetadataRecorder) -> None:
    code, _, err = await run_chat_command(
        "--target", recorder.address, "--reconnects", "0", "--api-key", KEY, "hi"
    )
    assert code == 1 and "UNAUTHENTICATED" in err and KEY not in err
    code, _, _ = await run_chat_command(
        "--target", recorder.address, "--reconnects", "0", "hi", env={"TOKENRELAY_API_KEY": KEY}
    )
    assert code == 1
    assert [call["authorization"] for call in recorder.calls] == [f"Bearer {KEY}"] * 2


async def test_chat_over_tls_and_mtls(
    relay_factory: RelayFactory, ca: CertificateAuthority
) -> None:
    server, client = ca.server(), ca.client()
    relay = await relay_factory(
        tls_cert=str(server.cert), tls_key=str(server.key), tls_client_ca=str(ca.cert)
    )
    code, out, err = await run_chat_command(
        "--target", relay.address, "--reconnects", "0",
        "--tls-ca", str(ca.cert),
        "--tls-client-cert", str(client.cert), "--tls-client-key", str(client.key),
        "--max-tokens", "8", "hi",
    )  # fmt: skip
    assert code == 0, err
    assert out.strip() and "8 chunks" in err
    code, out, err = await run_chat_command(
        "--target", relay.address, "--reconnects", "0", "--tls-ca", str(ca.cert), "hi"
    )
    assert code == 1 and out == ""
    assert "tls_client_cert" in err  # what to add, said by the client
    code, _, err = await run_chat_command(
        "--target", relay.address, "--tls-ca", str(ca.cert), "--tls-client-cert", "/nowhere", "hi"
    )
    assert code == 2 and "--tls-client-cert" in err and "does not exist" in err


async def test_the_demo_runs_against_a_tls_gateway_through_its_fault_proxy(
    relay_factory: RelayFactory, ca: CertificateAuthority, clock: ManualClock
) -> None:
    """The demo's client dials the fault proxy (127.0.0.1) and checks the
    certificate for the gateway's own name (`localhost` here)."""
    server = ca.server()
    gateway = await relay_factory(
        clock=clock, **QUIET, tls_cert=str(server.cert), tls_key=str(server.key)
    )
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False, width=120)

    async def let_the_demo_stream() -> None:
        await eventually(lambda: bool(gateway.hub.generations()))
        [generation] = gateway.hub.generations()
        await produce(clock, gateway, generation, 10)
        await eventually(lambda: any(session.resumed for session in gateway.hub.sessions()))
        await produce(clock, gateway, generation, 20)

    async with asyncio.TaskGroup() as group:
        demo = group.create_task(
            run_demo(
                f"localhost:{gateway.port}",
                tokens=30,
                pace_ms=1000.0,
                cut_after=10,
                console=console,
                backoff_base_s=0.0,
                credentials=ClientCredentials(api_key=KEY, tls_ca=ca.cert),
            )
        )
        group.create_task(let_the_demo_stream())
    output = buffer.getvalue()
    assert demo.result() == 0, output
    assert "same text as an uninterrupted run" in output


def test_the_demo_refuses_tls_files_without_a_target(ca: CertificateAuthority) -> None:
    from click.testing import CliRunner

    from tokenrelay_server.cli import main

    refused = CliRunner().invoke(main, ["demo", "--tls-ca", str(ca.cert)])
    assert refused.exit_code == 2
    assert "are for a --target gateway" in refused.output
