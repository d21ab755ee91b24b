"""A throwaway local Redis Cluster: three masters, no replicas, in a temp dir.

For the tests (tests/conftest.py `redis_cluster_url`), the takeover bench and
anyone trying `--redis-cluster` on one machine::

    with LocalRedisCluster.start() as cluster:
        print(cluster.url)      # redis://127.0.0.1:PORT/0, any one master

It runs `redis-server --cluster-enabled yes` on three free ports, joins them
with `redis-cli --cluster create … --cluster-replicas 0 --cluster-yes`, and
waits (bounded) until every node says `cluster_state:ok`. Anything that goes
wrong raises `ClusterStartError` with what each step said, so a test that
needs the cluster fails instead of skipping.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

MASTERS = 3
START_TIMEOUT_S = 30.0


class ClusterStartError(RuntimeError):
    """The local cluster could not be started; the message says which step failed."""


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now. Redis Cluster also binds port + 10000
    (the cluster bus), so only ports below 55535 are taken."""
    ports: list[int] = []
    sockets: list[socket.socket] = []
    try:
        while len(ports) < count:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
            sockets.append(probe)
            if port + 10000 > 65535 or port in ports:
                continue
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for probe in sockets:
            probe.close()
    return ports


def _run(command: list[str], timeout_s: float) -> str:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise ClusterStartError(f"{' '.join(command)!r} did not finish in {timeout_s}s") from None
    if done.returncode != 0:
        raise ClusterStartError(
            f"{' '.join(command)!r} failed (exit {done.returncode}): "
            f"{(done.stdout + done.stderr).strip()[-2000:]}"
        )
    return done.stdout


@dataclass
class LocalRedisCluster:
    """A running local cluster (see the module docstring)."""

    ports: list[int]
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A URL of one master: the cluster client discovers the others."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @classmethod
    @contextmanager
    def start(cls, *, masters: int = MASTERS) -> Iterator[LocalRedisCluster]:
        server = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if server is None or cli is None:
            raise ClusterStartError("redis-server and redis-cli must be on PATH for a cluster")
        with tempfile.TemporaryDirectory(prefix="tokenrelay-cluster-") as workdir:
            cluster = cls(free_ports(masters), Path(workdir))
            try:
                cluster._launch(server, cli)
                yield cluster
            finally:
                cluster.stop()

    def _launch(self, server: str, cli: str) -> None:
        for port in self.ports:
            node_dir = self.workdir / str(port)
            node_dir.mkdir()
            command = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir)]
            command += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            # No RDB snapshots, no AOF: nothing of the test data reaches disk.
            command += ["--save", "", "--appendonly", "no", "--cluster-node-timeout", "2000"]
            self.processes.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        for port, process in zip(self.ports, self.processes, strict=True):
            while not self._answers(cli, port):
                if process.poll() is not None:
                    raise ClusterStartError(
                        f"redis-server on port {port} exited with {process.returncode}"
                    )
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"redis-server on port {port} never answered PING")
                time.sleep(0.05)
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        _run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            START_TIMEOUT_S,
        )
        for port in self.ports:
            while "cluster_state:ok" not in _run(
                [cli, "-p", str(port), "cluster", "info"], START_TIMEOUT_S
            ):
                if time.monotonic() > deadline:
                    raise ClusterStartError(f"node {port} never reached cluster_state:ok")
                time.sleep(0.05)

    @staticmethod
    def _answers(cli: str, port: int) -> bool:
        try:
            done = subprocess.run(
                [cli, "-p", str(port), "ping"], capture_output=True, text=True, timeout=5
            )
        except subprocess.TimeoutExpired:
            return False
        return done.stdout.strip() == "PONG"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


__all__ = ["ClusterStartError", "LocalRedisCluster", "free_ports"]
