"""A `tokenrelay serve` in a process of its own, for the fuzzer and the soak.

The gateway runs as it does in production (its own interpreter, its own
event loop, real time), so what the fuzzer and the soak read from its Admin
overview (asyncio tasks, RSS, open descriptors) is the gateway's alone.
`GatewayProcess.start` writes the settings to a TOML file (some have no
flag), starts `serve --port 0`, reads the port it prints and waits until
health says SERVING; `stop` sends SIGTERM (the drain) and waits.

Given `keys` (and `tenants`), the file also has their [[auth.keys]] (the
SHA-256 of each key, as an operator writes them) and [tenants.*] tables, so
the gateway enforces tenant keys; `keyed_tenants()` makes two tenants with
fresh keys and limits, for a run that needs a valid key and a foreign one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from tokenrelay_server.config.settings import _table_key

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def serving(channel: grpc.Channel, service: str = "", timeout_s: float = 5.0) -> bool:
    """Whether health says SERVING for `service` ("" is the server's own)."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    try:
        answer = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def config_text(settings: dict[str, Any]) -> str:
    """`settings` (Settings' field names) as a config file, each in its table."""
    tables: dict[str, list[str]] = {}
    for setting, value in settings.items():
        table, key = _table_key(setting)
        tables.setdefault(table, []).append(f"{key} = {_toml_value(value)}")
    return "".join(
        f"[{name}]\n" + "".join(f"{line}\n" for line in lines) for name, lines in tables.items()
    )


@dataclass(frozen=True)
class TenantKey:
    """An API key of a gateway this module starts: the key itself (for the
    caller's `authorization` metadata) and what the config file stores."""

    id: str
    tenant: str
    key: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()


def new_key(key_id: str, tenant: str) -> TenantKey:
    """A key as `tokenrelay keys add` makes one: 32 random bytes."""
    return TenantKey(key_id, tenant, "trk_" + secrets.token_hex(32))


def auth_text(keys: Sequence[TenantKey], tenants: Mapping[str, Mapping[str, Any]]) -> str:
    """[[auth.keys]] (hashes only) and [tenants.*] tables of a config file."""
    lines: list[str] = []
    for key in keys:
        lines += [
            "[[auth.keys]]",
            f"id = {_toml_value(key.id)}",
            f"tenant = {_toml_value(key.tenant)}",
            f"sha256 = {_toml_value(key.sha256)}",
        ]
    for tenant, limits in tenants.items():
        lines.append(f"[tenants.{tenant}]")
        for name, value in limits.items():
            if isinstance(value, list | tuple):
                shown = "[" + ", ".join(_toml_value(item) for item in value) + "]"
            else:
                shown = _toml_value(value)
            lines.append(f"{name} = {shown}")
    return "".join(f"{line}\n" for line in lines)


def keyed_tenants(
    own: Mapping[str, Any], foreign: Mapping[str, Any]
) -> tuple[list[TenantKey], dict[str, dict[str, Any]]]:
    """Two tenants, each with a fresh key: `own` (the run's, key id own-1)
    and `foreign` (another tenant's, foreign-1), with these limits."""
    keys = [new_key("own-1", "own"), new_key("foreign-1", "foreign")]
    return keys, {"own": dict(own), "foreign": dict(foreign)}


class GatewayProcess:
    """One `tokenrelay serve` process; its log (stderr) goes to `log_path`."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        workdir: Path,
        settings: dict[str, Any],
        keys: Sequence[TenantKey] = (),
    ) -> None:
        self.process = process
        self.port = port
        self.workdir = workdir
        self.settings = settings
        self.keys = list(keys)  # empty: an open gateway
        self.log_path = workdir / "gateway.log"

    def key_of(self, tenant: str) -> str:
        """The API key of `tenant` (the first, if it has several)."""
        for key in self.keys:
            if key.tenant == tenant:
                return key.key
        raise KeyError(f"the gateway has no key of tenant {tenant!r}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_token(self) -> str:
        return str(self.settings["admin_token"])

    @property
    def resume_secret(self) -> str:
        return str(self.settings["resume_secret"])

    @classmethod
    def start(
        cls,
        workdir: Path | None = None,
        *,
        keys: Sequence[TenantKey] = (),
        tenants: Mapping[str, Mapping[str, Any]] | None = None,
        **settings: Any,
    ) -> GatewayProcess:
        """A gateway with `settings` over these defaults: a free port, a known
        resume secret and admin token (the fuzzer forges tokens with the one
        and reads the Admin overview with the other); with `keys`, it
        requires them (and applies `tenants`' limits)."""
        values: dict[str, Any] = {
            "port": 0,
            "resume_secret": secrets.token_hex(32),
            "admin_token": secrets.token_hex(16),
        }
        values.update(settings)
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-gateway-"))
        config = workdir / "gateway.toml"
        config.write_text(config_text(values) + auth_text(keys, tenants or {}))
        log = (workdir / "gateway.log").open("wb")
        environment = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=log,
            env=environment,
        )
        log.close()
        port = _read_port(process, workdir / "gateway.log")
        gateway = cls(process, port, workdir, values, keys)
        try:
            gateway.wait_serving()
        except BaseException:
            gateway.stop()
            raise
        return gateway

    def wait_serving(self, within_s: float = START_TIMEOUT_S) -> None:
        with grpc.insecure_channel(self.address) as channel:
            give_up = time.monotonic() + within_s
            while True:
                if serving(channel):
                    return
                if time.monotonic() > give_up or self.process.poll() is not None:
                    raise RuntimeError(f"the gateway did not come up; see {self.log_path}")
                time.sleep(0.05)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def error_lines(self) -> list[str]:
        """Lines the gateway logged at ERROR (or tracebacks): an internal
        error may also happen where no status shows it."""
        return [
            line
            for line in self.log_text().splitlines()
            if " ERROR " in line or '"level": "error"' in line or line.startswith("Traceback")
        ]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return self.process.returncode

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _read_port(process: subprocess.Popen[bytes], log_path: Path) -> int:
    """The `port N` line `serve --port 0` prints (read in a thread: a
    gateway that never prints it must not hang the caller)."""
    assert process.stdout is not None
    stdout = process.stdout
    found: list[bytes] = []
    reader = threading.Thread(target=lambda: found.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    line = found[0].decode() if found else ""
    if not line.startswith("port "):
        process.kill()
        process.wait()
        raise RuntimeError(
            f"the gateway did not print its port ({line.strip()!r}); its log:\n"
            + log_path.read_text(errors="replace")[-4000:]
        )
    return int(line.split()[1])
