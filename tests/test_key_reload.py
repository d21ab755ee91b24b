"""SIGHUP re-reads the config file's [[auth.keys]] and [tenants.*] (issue 13
leftovers): a key revoked in the file is refused, a key added works, without
a restart; a file that does not load changes nothing; a file with no key
left refuses every call (a reload never opens a keyed gateway).

`Authenticator.reload` over an in-process gateway, then the real command:
`tokenrelay serve --config FILE` in its own process, the file rewritten and
the real signal sent, each outcome polled with real calls (never a sleep).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from serverkit import (
    ACME_KEY,
    GLOBEX_KEY,
    QUIET,
    RelayFactory,
    end_of,
    eventually,
    run_to_end,
    start_request,
    tenants,
)
from tokenrelay_server.config.tenants import AuthConfig

SECRET = "9c1d5e0f2a7b48c3a6e1f0d29b8c7a6e5f4d3c2b1a09f8e7d6c5b4a392817161"


def key_toml(key_id: str, tenant: str, key: str) -> str:
    sha256 = hashlib.sha256(key.encode()).hexdigest()
    return f'[[auth.keys]]\nid = "{key_id}"\ntenant = "{tenant}"\nsha256 = "{sha256}"\n'


async def outcome(address: str, key: str | None) -> grpc.StatusCode:
    """The status of a short start with `key` (OK when it ran to its end)."""
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            events = await run_to_end(channel, start_request(max_tokens=2), key=key)
        except grpc.aio.AioRpcError as error:
            return error.code()
    assert not end_of(events).partial
    return grpc.StatusCode.OK


OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


# --- Authenticator.reload, in process ----------------------------------------------------------


async def test_a_reload_revokes_adds_and_changes_tenant_limits(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(auth=tenants(acme={}), **QUIET)
    authenticator = relay.authenticator
    assert authenticator is not None
    assert await outcome(relay.address, ACME_KEY) == OK  # now cached for 2 s
    globex_only = tenants(globex={"models": ["smart"]})
    globex_only["keys"] = [k for k in globex_only["keys"] if k["tenant"] == "globex"]
    summary = authenticator.reload(AuthConfig.model_validate(globex_only))
    assert summary == "1 key(s) (-acme-1), 1 tenant(s)"
    assert await outcome(relay.address, ACME_KEY) == UNAUTHENTICATED  # the cache went too
    # globex's new [tenants.globex] applies: it may not use `sim`.
    assert await outcome(relay.address, GLOBEX_KEY) == grpc.StatusCode.PERMISSION_DENIED


async def test_a_reload_to_no_key_refuses_every_call_and_never_opens_the_gateway(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(auth=tenants(), **QUIET)
    assert relay.authenticator is not None
    summary = relay.authenticator.reload(AuthConfig())
    assert "no key left: every call is refused" in summary
    assert relay.authenticator.required
    assert await outcome(relay.address, ACME_KEY) == UNAUTHENTICATED
    assert await outcome(relay.address, None) == UNAUTHENTICATED


async def test_keys_added_to_an_open_gateways_file_turn_keys_on(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(**QUIET)
    assert relay.authenticator is not None and not relay.authenticator.required
    assert await outcome(relay.address, None) == OK
    relay.authenticator.reload(AuthConfig.model_validate(tenants()))
    assert relay.authenticator.required
    assert await outcome(relay.address, None) == UNAUTHENTICATED
    assert await outcome(relay.address, ACME_KEY) == OK


# --- the real command and the real signal ------------------------------------------------------


class Gateway:
    """`tokenrelay serve --config FILE` in a process of its own; its stderr
    is collected line by line (a thread), so a test can wait for a log line."""

    def __init__(self, config: Path) -> None:
        self.config = config
        command = [sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config"]
        self.process = subprocess.Popen(
            [
                *command,
                str(config),
                "--port",
                "0",
                "--drain-grace-s",
                "0",
                "--resume-secret",
                SECRET,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.stderr: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        line = self.process.stdout.readline()
        assert line.startswith("port "), (line, self.stderr)
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def _collect(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)

    def logged(self, text: str) -> int:
        return sum(text in line for line in list(self.stderr))

    def reload(self, config_text: str) -> None:
        self.config.write_text(config_text)
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(key_toml("acme-1", "acme", ACME_KEY) + "[tenants.acme]\n")
    running = Gateway(config)
    try:
        yield running
    finally:
        running.stop()


async def until(address: str, key: str | None, status: grpc.StatusCode) -> None:
    async def holds() -> bool:
        return await outcome(address, key) == status

    await eventually(holds, within_s=30, poll_s=0.05)


async def test_sighup_revokes_a_file_key_and_adds_one_without_a_restart(gateway: Gateway) -> None:
    address = gateway.address
    assert await outcome(address, ACME_KEY) == OK
    assert await outcome(address, GLOBEX_KEY) == UNAUTHENTICATED
    pid = gateway.process.pid

    gateway.reload(key_toml("globex-1", "globex", GLOBEX_KEY))
    await until(address, ACME_KEY, UNAUTHENTICATED)  # revoked: acme-1 left the file
    assert await outcome(address, GLOBEX_KEY) == OK  # added
    assert gateway.logged("API keys and tenants reloaded") == 1
    assert gateway.logged("+globex-1, -acme-1") == 1

    # A file that does not load: logged, and the keys stay as they were.
    gateway.reload(key_toml("globex-1", "globex", GLOBEX_KEY) + 'sha256 = "nothex"\n[oops\n')
    await eventually(lambda: gateway.logged("the config file does not load") == 1, within_s=30)
    assert await outcome(address, GLOBEX_KEY) == OK
    assert await outcome(address, ACME_KEY) == UNAUTHENTICATED

    # No key left: every call refused, the gateway does not turn open.
    gateway.reload("")
    await until(address, GLOBEX_KEY, UNAUTHENTICATED)
    assert await outcome(address, None) == UNAUTHENTICATED
    assert gateway.logged("no key left") == 1

    assert gateway.process.poll() is None and gateway.process.pid == pid  # never restarted
    logged = "".join(gateway.stderr)
    assert ACME_KEY not in logged and GLOBEX_KEY not in logged
    assert hashlib.sha256(GLOBEX_KEY.encode()).hexdigest() not in logged
