"""A throwaway redis-server a test may stop, restart and attack (issue 9).

Unlike the session's shared Redis (conftest.py), this one belongs to one
test: it can be stopped (SIGTERM: a clean shutdown that writes its AOF) and
started again on the same port with the same data, or have its client
connections killed. No redis-server binary is a failure, never a skip.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

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


def wait_for_ping(process: subprocess.Popen[bytes], url: str, timeout_s: float) -> bool:
    """Whether the redis-server `process` started answers PING at `url`
    before it exits or `timeout_s` pass (polled: a process coming up is a
    real condition to wait on, with nothing to inject)."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        if answers(url):
            return True
        time.sleep(0.02)
    return False


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
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if wait_for_ping(self._process, self.url, START_TIMEOUT_S):
            return
        if self._process.poll() is not None:
            raise AssertionError(f"redis-server exited with {self._process.returncode}")
        raise AssertionError(f"redis-server on port {self.port} did not answer PING")

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
