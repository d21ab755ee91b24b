"""The processes a nemesis plays with: N `tokenrelay serve --store redis`
replicas, each on a port of its own that it keeps across restarts, and
(unless the caller brings a Redis) a throwaway `redis-server` that can be
restarted on the same port without losing what it acknowledged.

Everything is a real process, driven by signals: SIGKILL (a crash),
SIGSTOP/SIGCONT (a pause: a GC stall, a frozen VM), SIGTERM (a drain), and
restarts. Readiness is waited for as a condition (the replica answers
health checks; Redis answers PING), within generous
bounds that only guard against hanging.

The throwaway Redis writes an append-only file with `appendfsync always`,
so a restart (SIGTERM: it flushes and exits; even SIGKILL) keeps every
write it acknowledged, as a production Redis with AOF would. A Redis the
caller passes (`redis_url`) is never paused, killed or restarted by the rig.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from redis.asyncio.cluster import RedisCluster

from tokenrelay.v1 import admin_pb2, admin_pb2_grpc

READY_TIMEOUT_S = 60.0  # real seconds for a process to come up; only guards against hanging
EXIT_TIMEOUT_S = 60.0
POLL_S = 0.02


def free_port(*, below: int = 65536) -> int:
    """A port nobody listens on now, under `below` (it could be taken before
    it is bound: a clash shows up as the process never getting ready, which
    fails loudly)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        if port < below:
            return port


async def _wait_exit(process: asyncio.subprocess.Process, timeout_s: float) -> int:
    async with asyncio.timeout(timeout_s):
        return await process.wait()


class RigError(RuntimeError):
    """A process of the rig did not come up or go down as asked: the rig,
    not the system under test, is broken (or the machine is)."""


# --- Redis ------------------------------------------------------------------------------


class RedisServer:
    """A throwaway redis-server on 127.0.0.1:`port`, data in `workdir`."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        cluster: bool = False,
    ) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RigError("no redis-server binary on PATH: the nemesis needs one to restart")
        self.binary = found
        self.workdir = workdir
        # A cluster node also listens on port + 10000 (the cluster bus).
        self.port = port or free_port(below=55536 if cluster else 65536)
        self.cluster = cluster
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.restarting = False  # a restart is under way (faults skip Redis then)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}" + ("" if self.cluster else "/0")

    @property
    def node_urls(self) -> list[str]:
        return [self.url]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            # nodes.conf in the node's own directory: a restarted node rejoins.
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                        "--cluster-node-timeout", "2000"]  # fmt: skip
        self.process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                break
            if await redis_answers(self.url):
                return
            await asyncio.sleep(POLL_S)
        raise RigError(
            f"redis-server on port {self.port} did not answer PING "
            f"(exit code {self.process.returncode}); see {self.workdir / 'redis.log'}"
        )

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if not self.running:
            return
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGCONT)  # a stopped process cannot exit
            self.process.send_signal(sig)
        try:
            await _wait_exit(self.process, EXIT_TIMEOUT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def restart(
        self, *, down_s: float = 0.0, sig: signal.Signals = signal.SIGTERM, node: int = 0
    ) -> None:
        self.restarting = True
        try:
            await self.stop(sig)
            if down_s > 0:
                await asyncio.sleep(down_s)  # the outage itself: how long Redis is gone
            await self.start()
        finally:
            self.restarting = False
        self.restarts += 1


async def redis_answers(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(await client.ping())
    except (aioredis.RedisError, OSError):
        return False
    finally:
        await client.aclose()


class RedisClusterServers:
    """A throwaway Redis Cluster: three masters, no replicas, on 127.0.0.1
    (`redis-server --cluster-enabled yes` joined by `redis-cli --cluster
    create`). `url` is the first node's: a cluster client finds the rest.
    A restart restarts one node, which rejoins from its nodes.conf."""

    def __init__(self, workdir: Path, *, nodes: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node-{i}", cluster=True) for i in range(nodes)]
        self.created = False
        self.restarts = 0
        self.restarting = False  # a node restart is under way (faults skip Redis then)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    @property
    def node_urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def running(self) -> bool:
        return all(node.running for node in self.nodes)

    async def start(self) -> None:
        try:
            await asyncio.gather(*(n.start() for n in self.nodes if not n.running))
        except BaseException:
            await self.stop()
            raise
        if not self.created:
            cli = shutil.which("redis-cli")
            if cli is None:
                raise RigError("no redis-cli on PATH: it joins the cluster's nodes")
            create = await asyncio.create_subprocess_exec(
                cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                "--cluster-replicas", "0", "--cluster-yes",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await create.communicate()
            if create.returncode != 0:
                raise RigError(f"redis-cli --cluster create failed: {output.decode()[-500:]}")
            self.created = True
        await self._wait_cluster_ok()

    async def _wait_cluster_ok(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if all([await _cluster_ok(url) for url in self.node_urls]):
                return
            await asyncio.sleep(POLL_S)
        raise RigError(f"the cluster on {self.node_urls} never reported cluster_state:ok")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        await asyncio.gather(*(n.stop(sig) for n in self.nodes))

    async def restart(
        self, *, down_s: float = 0.0, sig: signal.Signals = signal.SIGTERM, node: int = 0
    ) -> None:
        target = self.nodes[node % len(self.nodes)]
        self.restarting = True
        try:
            await target.stop(sig)
            if down_s > 0:
                await asyncio.sleep(down_s)  # the outage itself
            await target.start()
            await self._wait_cluster_ok()
        finally:
            self.restarting = False
        self.restarts += 1


async def _cluster_ok(url: str) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        info = await client.cluster("INFO")
    except (aioredis.RedisError, OSError):
        return False
    finally:
        await client.aclose()
    state = info.get("cluster_state") if isinstance(info, dict) else None
    return state in ("ok", b"ok")


RedisProcesses = RedisServer | RedisClusterServers


def _describe_info(info: admin_pb2.StreamInfo) -> str:
    return (
        f"state={admin_pb2.StreamState.Name(info.state)} phase={info.phase or '-'} "
        f"last_seq={info.last_seq} attached_clients={info.attached_clients} "
        f"attempts={info.attempts} owner={info.owner or '-'} age={info.age_seconds:.0f}s"
    )


# --- replicas ---------------------------------------------------------------------------


@dataclass
class Replica:
    """One `tokenrelay serve` process on a fixed port."""

    index: int
    port: int
    config: Path
    log: Path
    process: asyncio.subprocess.Process | None = None
    paused: bool = False
    starting: bool = False  # between spawning and answering health checks
    starts: int = 0
    # One start at a time (see `start`).
    _start_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def up(self) -> bool:
        """Running, serving, not paused: a fault may target it."""
        return self.alive and not self.paused and not self.starting

    async def start(self) -> None:
        """Start the replica, unless it runs or is being started: two starts
        at once (a fault's restart and `heal`) spawned two processes, and the
        one the rig lost track of outlived the run holding the port."""
        async with self._start_lock:
            if self.alive:
                return
            self.starting = True
            try:
                await self._start()
            finally:
                self.starting = False

    async def _start(self) -> None:
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts + 1} ---\n".encode())
            log.flush()
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tokenrelay_server.cli", "serve",
                "--config", str(self.config), "--port", str(self.port),
                stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        self.paused = False
        self.starts += 1
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                last = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RigError(
                    f"replica {self.index} exited with {self.process.returncode} at start "
                    f"(see {self.log}): " + " | ".join(last)
                )
            if await self._answers_health():
                return
            await asyncio.sleep(POLL_S)
        raise RigError(f"replica {self.index} did not come up on port {self.port}; see {self.log}")

    async def _answers_health(self) -> bool:
        """The health service answers (SERVING or not: a replica whose store
        is down is up, and says so)."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                await check(health_pb2.HealthCheckRequest(), timeout=1.0)
            except grpc.aio.AioRpcError:
                return False
            return True

    def signal(self, sig: signal.Signals) -> bool:
        """Send `sig`; False when the process is not running."""
        if not self.alive:
            return False
        assert self.process is not None
        try:
            self.process.send_signal(sig)
        except ProcessLookupError:
            return False
        if sig == signal.SIGSTOP:
            self.paused = True
        elif sig == signal.SIGCONT:
            self.paused = False
        return True

    async def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> None:
        if self.process is None:
            return
        try:
            await _wait_exit(self.process, timeout_s)
        except TimeoutError:
            self.signal(signal.SIGCONT)
            self.process.kill()
            await self.process.wait()
        self.paused = False

    async def kill(self) -> None:
        if self.alive:
            self.signal(signal.SIGCONT)  # SIGKILL works on a stopped process; be plain anyway
            self.signal(signal.SIGKILL)
        await self.wait_exit()


@dataclass
class RigSettings:
    replicas: int = 3
    redis_url: str | None = None  # None: a throwaway redis-server the rig may restart
    # A throwaway 3-master Redis Cluster instead (the replicas get
    # `redis_cluster = true`); not with redis_url.
    cluster: bool = False
    lease_ttl_s: float = 2.0
    detach_grace_s: float = 30.0
    drain_grace_s: float = 1.0
    # Extra `[server]` keys for every replica (e.g. {"redis_cluster": True}).
    server: dict[str, Any] = field(default_factory=dict)


RESUME_SECRET = "6498a89895f88e2e1ccec80b6a59e8d8e4eead66953dc684ff9d21b287785dce"
ADMIN_TOKEN = "nemesis-admin-0123456789abcdef"


class Rig:
    """N replicas on one Redis. `async with Rig(settings, workdir) as rig:`."""

    def __init__(self, settings: RigSettings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self.prefix = f"nem-{uuid.uuid4().hex[:10]}"
        self.redis: RedisProcesses | None = None
        self.redis_url = settings.redis_url or ""
        self.replicas: list[Replica] = []

    @property
    def owns_redis(self) -> bool:
        return self.redis is not None

    @property
    def addresses(self) -> list[str]:
        return [r.address for r in self.replicas]

    async def __aenter__(self) -> Rig:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.settings.cluster:
            self.redis = RedisClusterServers(self.workdir / "cluster")
            await self.redis.start()
            self.redis_url = self.redis.url
        elif not self.settings.redis_url:
            self.redis = RedisServer(self.workdir / "redis")
            await self.redis.start()
            self.redis_url = self.redis.url
        elif not await redis_answers(self.redis_url):
            raise RigError(f"no Redis answers at {self.redis_url}")
        for index in range(self.settings.replicas):
            config = self.workdir / f"replica-{index}.toml"
            config.write_text(self._config_text())
            replica = Replica(index, free_port(), config, self.workdir / f"replica-{index}.log")
            self.replicas.append(replica)
        await asyncio.gather(*(r.start() for r in self.replicas))

    def _config_text(self) -> str:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "store": "redis",
            "redis_url": self.redis_url,
            "redis_prefix": self.prefix,
            "resume_secret": RESUME_SECRET,
            "admin_token": ADMIN_TOKEN,
            "lease_ttl_s": self.settings.lease_ttl_s,
            "detach_grace_s": self.settings.detach_grace_s,
            "drain_grace_s": self.settings.drain_grace_s,
            "log_level": "warning",
            **({"redis_cluster": True} if self.settings.cluster else {}),
            **self.settings.server,
        }
        lines = ["[server]"]
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f'{key} = "{value}"')
        return "\n".join(lines) + "\n"

    async def heal(self) -> None:
        """Undo every fault: continue paused replicas, restart dead ones, and
        bring the throwaway Redis back if it is down."""
        if self.redis is not None and not self.redis.running:
            await self.redis.start()
        for replica in self.replicas:
            if replica.paused:
                replica.signal(signal.SIGCONT)
        await asyncio.gather(*(r.start() for r in self.replicas if not r.alive and not r.starting))

    async def close(self) -> None:
        for replica in self.replicas:
            await replica.kill()
        if self.redis is not None:
            await self.redis.stop()

    # -- what is left after a round ------------------------------------------------

    async def running_streams(self) -> list[tuple[int, str, str]]:
        """(replica, stream id, how it stands) of every generation a live
        replica lists."""
        found: list[tuple[int, str, str]] = []
        metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        for replica in self.replicas:
            if not replica.alive or replica.paused:
                continue
            async with grpc.aio.insecure_channel(replica.address) as channel:
                stub = admin_pb2_grpc.AdminStub(channel)
                answer = await stub.ListStreams(
                    admin_pb2.ListStreamsRequest(), metadata=metadata, timeout=10.0
                )
            found += [(replica.index, s.stream_id, _describe_info(s)) for s in answer.streams]
        return found

    def redis_client(self, *, socket_timeout: float = 10.0) -> aioredis.Redis | RedisCluster:
        """A client of the rig's Redis (a cluster client on a cluster)."""
        if self.settings.cluster:
            return RedisCluster.from_url(self.redis_url, socket_timeout=socket_timeout)
        return aioredis.Redis.from_url(self.redis_url, socket_timeout=socket_timeout)

    @property
    def redis_node_urls(self) -> list[str]:
        """Every Redis node (one, unless a cluster): where CLIENT KILL and
        CLIENT PAUSE go."""
        return self.redis.node_urls if self.redis is not None else [self.redis_url]

    def stream_keys(self, stream_id: str) -> dict[str, str]:
        return {part: f"{self.prefix}:{{{stream_id}}}:{part}" for part in ("meta", "log", "lease")}

    def logs(self) -> Sequence[Path]:
        return [r.log for r in self.replicas]


__all__ = ["ADMIN_TOKEN", "RESUME_SECRET", "RedisClusterServers", "RedisServer", "Replica",
           "Rig", "RigError", "RigSettings", "free_port", "redis_answers"]  # fmt: skip
