"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, settings

from redisproc import RedisProcess, answers, free_port, spawn, wait_until_ready

# Property tests never depend on how fast the machine is: no per-example
# deadline and no "too slow" health check (these machines are shared; a
# loaded one once failed a compact-log property test on the health check).
settings.register_profile(
    "tokenrelay",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("tokenrelay")

# Fixtures for tests over a real gateway (tests/serverkit.py).
pytest_plugins = ["serverkit"]

# --- Redis ---------------------------------------------------------------------
#
# `redis_url` gives the session one usable Redis: the one named by
# TOKENRELAY_TEST_REDIS_URL (default: a local one on 6379), or else a throwaway
# `redis-server` started here and stopped at the end of the session. A test
# that needs Redis fails when there is none: a skipped Redis suite is how a
# broken store goes unnoticed. TOKENRELAY_SKIP_REDIS=1 turns that into a skip.
#
# `redis_prefix` gives each test its own key prefix and deletes its keys after.

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_START_TIMEOUT_S = 10.0


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("TOKENRELAY_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    if answers(url):
        yield url
        return

    binary = shutil.which("redis-server")
    problem = f"no Redis answers at {url} and no redis-server binary is on PATH"
    if binary is not None:
        with tempfile.TemporaryDirectory(prefix="tokenrelay-redis-") as workdir:
            port = free_port()  # a clash: the server never answers, which fails loudly
            command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir]
            # No RDB snapshots, no AOF: nothing of the test data reaches disk.
            command += ["--save", "", "--appendonly", "no"]
            server = spawn(command)
            try:
                local_url = f"redis://127.0.0.1:{port}/0"
                if wait_until_ready(server, REDIS_START_TIMEOUT_S):
                    yield local_url
                    return
                problem = (
                    f"no Redis answers at {url}, and the redis-server started on port "
                    f"{port} did not say it was ready (exit code {server.poll()})"
                )
            finally:
                server.terminate()
                try:
                    server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()

    if os.environ.get("TOKENRELAY_SKIP_REDIS") == "1":
        pytest.skip(f"{problem} (TOKENRELAY_SKIP_REDIS=1)")
    pytest.fail(
        f"{problem}. Start Redis, point TOKENRELAY_TEST_REDIS_URL at one, "
        "or set TOKENRELAY_SKIP_REDIS=1 to skip the Redis tests.",
        pytrace=False,
    )


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are deleted after the test."""
    prefix = f"trtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)


# --- Redis Cluster ---------------------------------------------------------------
#
# `redis_cluster_url` gives the session a throwaway local Redis Cluster of three
# masters (tokenrelay_devtools.redis_cluster: redis-server --cluster-enabled yes
# on three free ports, joined by redis-cli --cluster create), or the one named by
# TOKENRELAY_TEST_REDIS_CLUSTER_URL. A test that needs it FAILS when it cannot
# be had: a skipped cluster suite is how a cross-slot script goes unnoticed.
# `redis_cluster_prefix` is `redis_prefix` on the cluster (keys deleted after,
# on every master).


def _cluster_answers(url: str) -> bool:
    try:
        with redis.RedisCluster.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
            return "ok" == client.cluster_info().get("cluster_state")
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    from tokenrelay_devtools.redis_cluster import ClusterStartError, LocalRedisCluster

    given = os.environ.get("TOKENRELAY_TEST_REDIS_CLUSTER_URL")
    if given:
        if not _cluster_answers(given):
            pytest.fail(
                f"TOKENRELAY_TEST_REDIS_CLUSTER_URL={given} is not a Redis Cluster in state ok",
                pytrace=False,
            )
        yield given
        return
    try:
        with LocalRedisCluster.start() as cluster:
            yield cluster.url
    except ClusterStartError as error:
        pytest.fail(
            f"the local Redis Cluster could not be started: {error}. Install redis-server "
            "and redis-cli, or point TOKENRELAY_TEST_REDIS_CLUSTER_URL at a cluster.",
            pytrace=False,
        )


@pytest.fixture
def redis_cluster_prefix(redis_cluster_url: str) -> Iterator[str]:
    """A key prefix no other test uses on the cluster; its keys are deleted after."""
    prefix = f"trtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    with redis.RedisCluster.from_url(redis_cluster_url) as client:
        for node in client.get_primaries():
            keys = list(client.scan_iter(match=f"{prefix}:*", count=500, target_nodes=node))
            for key in keys:
                client.delete(key)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A throwaway redis-server of the test's own, which it may stop, pause or
    count the commands of (tests/redisproc.py)."""
    process = RedisProcess(tmp_path)
    process.start()
    yield process
    if process.running:
        process.resume()  # harmless when it was not paused
    process.stop()
