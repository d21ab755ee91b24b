"""TLS and mTLS over real gRPC, with certificates the test makes (issue 13):
the gateway serves TLS; a plaintext client is refused clearly; with a client
CA, a client without a certificate, or with one another CA signed, is
refused, and the right one gets its stream; the certificates reload (SIGHUP)
with a stream running: the stream completes, new connections see the new
certificate."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    assert_contiguous,
    chunks_of,
    end_of,
    eventually,
    generation_of,
    produce,
    start_request,
)
from tlskit import CertificateAuthority, Pem
from tokenrelay_client import ReconnectsExhausted, RelayClient
from tokenrelay_server.api.tls import TlsFilesError
from tokenrelay_server.core.clock import ManualClock

PROMPT = [("user", "tell me about certificates")]


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "other-ca", name="someone else's CA")


def tls_settings(server: Pem, client_ca: CertificateAuthority | None = None) -> dict[str, str]:
    values = {"tls_cert": str(server.cert), "tls_key": str(server.key)}
    if client_ca is not None:
        values["tls_client_ca"] = str(client_ca.cert)
    return values


def presented_serial(port: int, ca: Path, client: Pem | None = None) -> int:
    """The serial number of the certificate the gateway presents to a new
    connection (the standard library's TLS client, ALPN h2 as gRPC's)."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client.cert, client.key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def generate(address: str, **options: object) -> str:
    async with RelayClient(address, max_reconnects=0, **options) as client:  # type: ignore[arg-type]
        result = await client.generate("sim", PROMPT, max_tokens=12)
    assert not result.end.partial and result.end.verified
    return result.text


async def test_a_tls_gateway_serves_a_client_that_trusts_its_ca(
    relay_factory: RelayFactory, ca: CertificateAuthority
) -> None:
    relay = await relay_factory(**tls_settings(ca.server()))
    plain = await relay_factory()
    assert await generate(relay.address, tls_ca=ca.cert) == await generate(plain.address)


async def test_a_plaintext_client_of_a_tls_gateway_is_refused_clearly(
    relay_factory: RelayFactory, ca: CertificateAuthority
) -> None:
    relay = await relay_factory(**tls_settings(ca.server()))
    with pytest.raises(ReconnectsExhausted) as caught:
        await generate(relay.address)
    assert "TLS" in str(caught.value)
    # Raw gRPC says UNAVAILABLE; nothing started on the gateway.
    async with grpc.aio.insecure_channel(relay.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raw:
            await RawCall(channel, start_request()).next_event()
    assert raw.value.code() == grpc.StatusCode.UNAVAILABLE
    assert relay.hub.running_generations == 0


async def test_a_client_that_trusts_another_ca_refuses_the_gateway(
    relay_factory: RelayFactory, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    relay = await relay_factory(**tls_settings(ca.server()))
    with pytest.raises(ReconnectsExhausted) as caught:
        await generate(relay.address, tls_ca=other_ca.cert)
    assert "handshake" in str(caught.value)
    plain = await relay_factory()
    with pytest.raises(ReconnectsExhausted) as caught:
        await generate(plain.address, tls_ca=ca.cert)
    assert "does the gateway serve TLS" in str(caught.value)


async def test_mtls_refuses_a_client_without_a_certificate(
    relay_factory: RelayFactory, ca: CertificateAuthority
) -> None:
    relay = await relay_factory(**tls_settings(ca.server(), client_ca=ca))
    with pytest.raises(ReconnectsExhausted) as caught:
        await generate(relay.address, tls_ca=ca.cert)
    assert "tls_client_cert" in str(caught.value)
    assert relay.hub.running_generations == 0


async def test_mtls_refuses_a_client_certificate_another_ca_signed(
    relay_factory: RelayFactory, ca: CertificateAuthority, other_ca: CertificateAuthority
) -> None:
    relay = await relay_factory(**tls_settings(ca.server(), client_ca=ca))
    stranger = other_ca.client("stranger")
    with pytest.raises(ReconnectsExhausted) as caught:
        await generate(
            relay.address,
            tls_ca=ca.cert,
            tls_client_cert=stranger.cert,
            tls_client_key=stranger.key,
        )
    assert "client CA" in str(caught.value)
    assert relay.hub.running_generations == 0


async def test_mtls_serves_a_client_certificate_its_ca_signed(
    relay_factory: RelayFactory, ca: CertificateAuthority
) -> None:
    relay = await relay_factory(**tls_settings(ca.server(), client_ca=ca))
    client = ca.client()
    text = await generate(
        relay.address, tls_ca=ca.cert, tls_client_cert=client.cert, tls_client_key=client.key
    )
    assert text


async def test_certificates_reload_without_dropping_a_running_stream(
    relay_factory: RelayFactory, ca: CertificateAuthority, tmp_path: Path, clock: ManualClock
) -> None:
    """The files are replaced by a certificate of a new CA while a stream
    runs; after the reload the stream runs on to a complete end on its old
    connection, a new connection is shown the new certificate, and a client
    that trusts only the old CA is refused."""
    live = tmp_path / "live"
    live.mkdir()
    first = ca.server("first")
    served = Pem(live / "server.crt", live / "server.key")
    served.cert.write_bytes(first.cert_bytes())
    served.key.write_bytes(first.key_bytes())
    relay = await relay_factory(clock=clock, **QUIET, **tls_settings(served))
    assert await asyncio.to_thread(presented_serial, relay.port, ca.cert) == first.serial()

    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
    async with grpc.aio.secure_channel(relay.address, credentials) as channel:
        call = RawCall(channel, start_request(max_tokens=20, metadata=PACED))
        started = await call.next_event()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 5)
        seen = [started, *await call.events_until(lambda e: e.chunk.seq == 5)]

        new_ca = CertificateAuthority(tmp_path / "new-ca", name="the new CA")
        second = new_ca.server("second")
        served.cert.write_bytes(second.cert_bytes())
        served.key.write_bytes(second.key_bytes())
        relay.reload_certificates()

        assert await asyncio.to_thread(presented_serial, relay.port, new_ca.cert) == (
            second.serial()
        )
        with pytest.raises(ReconnectsExhausted):
            await generate(relay.address, tls_ca=ca.cert)
        assert await generate(relay.address, tls_ca=new_ca.cert)

        await produce(clock, relay, generation, 15)
        seen += await call.events_until()
        call.cancel()
    assert_contiguous(chunks_of(seen))
    end = end_of(seen)
    assert not end.partial and end.total_seq == 20


async def test_a_reload_with_broken_files_keeps_the_old_certificate(
    relay_factory: RelayFactory, ca: CertificateAuthority, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    first = ca.server("first")
    served = Pem(live / "server.crt", live / "server.key")
    served.cert.write_bytes(first.cert_bytes())
    served.key.write_bytes(first.key_bytes())
    relay = await relay_factory(**tls_settings(served))
    served.key.write_bytes(ca.server("unrelated").key_bytes())  # not the cert's key
    with pytest.raises(TlsFilesError) as caught:
        relay.reload_certificates()
    assert "--tls-cert/--tls-key" in str(caught.value)
    assert await asyncio.to_thread(presented_serial, relay.port, ca.cert) == first.serial()
    assert await generate(relay.address, tls_ca=ca.cert)


@pytest.mark.parametrize(
    ("which", "named"),
    [
        pytest.param({"tls_cert": "missing.crt"}, "--tls-key", id="a cert without a key"),
        pytest.param({"tls_key": "missing.key"}, "--tls-cert", id="a key without a cert"),
        pytest.param({"tls_client_ca": "ca.crt"}, "--tls-client-ca", id="a client CA alone"),
    ],
)
async def test_incomplete_tls_settings_are_refused_before_listening(
    relay_factory: RelayFactory, which: dict[str, str], named: str
) -> None:
    with pytest.raises(TlsFilesError) as caught:
        await relay_factory(**which)
    assert named in str(caught.value)


# --- the real command: flags, mistakes, SIGHUP -----------------------------------------------


def tokenrelay() -> list[str]:
    return [sys.executable, "-m", "tokenrelay_server.cli"]


def test_serve_names_a_tls_file_that_does_not_load(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    server = ca.server()
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello")
    done = subprocess.run(
        [
            *tokenrelay(),
            "serve",
            "--port",
            "0",
            "--tls-cert",
            str(server.cert),
            "--tls-key",
            str(tmp_path / "nowhere.key"),
            "--tls-client-ca",
            str(not_pem),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert f"--tls-key: {tmp_path / 'nowhere.key'}: the file does not exist" in done.stderr
    assert f"--tls-client-ca: {not_pem}: is not a PEM file" in done.stderr
    assert "nothing was started" in done.stderr


@pytest.fixture
def serving(
    tmp_path: Path, ca: CertificateAuthority
) -> Iterator[tuple[subprocess.Popen[str], int, Pem]]:
    live = tmp_path / "live"
    live.mkdir()
    first = ca.server("first")
    served = Pem(live / "server.crt", live / "server.key")
    served.cert.write_bytes(first.cert_bytes())
    served.key.write_bytes(first.key_bytes())
    process = subprocess.Popen(
        [
            *tokenrelay(),
            "serve",
            "--port",
            "0",
            "--drain-grace-s",
            "0",
            "--tls-cert",
            str(served.cert),
            "--tls-key",
            str(served.key),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("port "), (line, process.stderr.read() if process.stderr else "")
        yield process, int(line.split()[1]), served
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_sighup_reloads_the_certificates_of_a_running_gateway(
    serving: tuple[subprocess.Popen[str], int, Pem], ca: CertificateAuthority, tmp_path: Path
) -> None:
    """The real command, the real signal, a stream running on the old
    certificate's connection: it completes, and new connections are shown
    the new certificate. (The stream is paced at 50 ms a token, 300 tokens:
    it is still running when the reload is seen, which the test checks.)"""
    process, port, served = serving
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        call = RawCall(channel, start_request(max_tokens=300, metadata={"sim.pace_ms": "50"}))
        seen = await call.events_until(lambda e: e.HasField("chunk"))

        new_ca = CertificateAuthority(tmp_path / "new-ca", name="the new CA")
        second = new_ca.server("second")
        served.cert.write_bytes(second.cert_bytes())
        served.key.write_bytes(second.key_bytes())
        process.send_signal(signal.SIGHUP)

        def shows_the_new_certificate() -> bool:
            try:
                return presented_serial(port, new_ca.cert) == second.serial()
            except (ssl.SSLError, OSError):
                return False

        async def reloaded() -> None:
            # The signal lands asynchronously: poll new connections until one
            # is shown the new certificate (bounded by the timeout only).
            await eventually(
                lambda: asyncio.to_thread(shows_the_new_certificate), within_s=60, poll_s=0.05
            )

        async def read_until_reloaded() -> None:
            watcher = asyncio.create_task(reloaded())
            while not watcher.done():
                event = await call.next_event()
                seen.append(event)
                if event.HasField("end"):
                    break
            await asyncio.wait_for(watcher, timeout=60)

        await asyncio.wait_for(read_until_reloaded(), timeout=60)
        assert not any(e.HasField("end") for e in seen), "the stream ended before the reload"
        assert await generate(f"127.0.0.1:{port}", tls_ca=new_ca.cert)
        seen += await call.events_until()
        call.cancel()
    assert_contiguous(chunks_of(seen))
    end = end_of(seen)
    assert not end.partial and end.total_seq == 300
    assert process.poll() is None  # SIGHUP reloads; it does not stop the gateway
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    assert "TLS certificates reloaded" in stderr


def test_the_tls_files_are_flags_and_variables() -> None:
    from click.testing import CliRunner

    from tokenrelay_server.cli import main
    from tokenrelay_server.config.settings import load_settings

    shown = CliRunner().invoke(main, ["serve", "--help"]).output
    for flag, variable in (
        ("--tls-cert FILE", "TOKENRELAY_TLS_CERT"),
        ("--tls-key FILE", "TOKENRELAY_TLS_KEY"),
        ("--tls-client-ca FILE", "TOKENRELAY_TLS_CLIENT_CA"),
        ("--log-content / --no-log-content", "TOKENRELAY_LOG_CONTENT"),
    ):
        assert flag in shown and variable in shown
    flags = {"tls_cert": None, "tls_key": "/flag.key", "log_content": None}
    env = {"TOKENRELAY_TLS_CERT": "/env.crt", "TOKENRELAY_LOG_CONTENT": "true"}
    settings = load_settings(None, flags=flags, env=env)
    assert (settings.tls_cert, settings.tls_key, settings.log_content) == (
        "/env.crt",
        "/flag.key",
        True,
    )


async def test_stats_and_top_ask_an_mtls_gateway(
    relay_factory: RelayFactory, ca: CertificateAuthority
) -> None:
    admin_token = "admin-token-0123456789abcdef"
    relay = await relay_factory(admin_token=admin_token, **tls_settings(ca.server(), client_ca=ca))
    client = ca.client()
    files = [
        "--tls-ca", str(ca.cert),
        "--tls-client-cert", str(client.cert), "--tls-client-key", str(client.key),
    ]  # fmt: skip
    for command in ("stats", "top"):
        process = await asyncio.create_subprocess_exec(
            *tokenrelay(), command, "--target", relay.address, "--admin-token", admin_token,
            *files,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert out.strip()
    process = await asyncio.create_subprocess_exec(
        *tokenrelay(), "stats", "--target", relay.address, "--admin-token", admin_token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    assert process.returncode == 1 and b"cannot reach the gateway" in err
