"""A throwaway redis-server a test may stop, restart and attack (issue 9).

Unlike the session's shared Redis (conftest.py), this one belongs to one
test: it can be stopped (SIGTERM: a clean shutdown that writes its AOF) and
started again on the same port with the same data, or have its client
connections killed. No redis-server binary is a failure, never a skip.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import redis

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


# What redis-server logs once it listens (after loading its AOF, if any).
READY = b"Ready to accept connections"


def spawn(command: list[str]) -> subprocess.Popen[bytes]:
    """Start a redis-server with its log on a pipe, for `wait_until_ready`."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_until_ready(process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Whether the redis-server `process` (from `spawn`) says it accepts
    connections before it exits or `timeout_s` pass: its log is read as it
    comes (no polling; the bound only guards against hanging). From then on
    a thread drains the log, so a full pipe never blocks the server."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while READY not in seen:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                return False
            data = os.read(fd, 65536)
            if not data:
                return False  # it exited
            seen = seen[-len(READY) :] + data  # (the line may come in two reads)
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
    return True


def _drain(log: IO[bytes]) -> None:
    while log.read(65536):
        pass


class RedisProcess:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "these tests need the redis-server binary on PATH"
        self._binary = binary
        self._workdir = workdir
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._process is None, "already running"
        command = [self._binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self._workdir), "--save", ""]
        # Every write reaches the AOF before its reply: a restart loses nothing.
        command += ["--appendonly", "yes", "--appendfsync", "always"]
        self._process = spawn(command)
        if wait_until_ready(self._process, START_TIMEOUT_S):
            return
        if self._process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self._process.returncode}")
        raise AssertionError(f"redis-server on port {self.port} did not say it was ready")

    def stop(self) -> None:
        """SIGTERM and wait: Redis flushes its AOF and exits."""
        process, self._process = self._process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections and answers nothing."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGCONT)

    def kill_clients(self) -> int:
        """CLIENT KILL TYPE normal: every ordinary connection is cut."""
        with redis.Redis.from_url(self.url) as client:
            return int(client.execute_command("CLIENT", "KILL", "TYPE", "normal"))

    @property
    def running(self) -> bool:
        return self._process is not None
