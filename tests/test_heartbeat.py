"""The heartbeat contract (store/heartbeat.py), on every implementation: in
memory on a ManualClock, on Redis and on a local Redis Cluster.

Redis TTLs run on the server's real clock: there a lapse is polled for (with
a bound), never timed.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from serverkit import RelayFactory
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.store.heartbeat import Heartbeats, MemoryHeartbeats
from tokenrelay_server.store.redis import RedisStore

POLL_ROUNDS = 500
POLL_INTERVAL_S = 0.01


@dataclass
class Beats:
    kind: str
    heartbeats: Heartbeats
    clock: ManualClock

    async def lapsed(self, replica_id: str, ttl_s: float) -> bool:
        """Let `ttl_s` pass; True once the replica's heartbeat is gone."""
        if self.kind == "memory":
            self.clock.advance(ttl_s)
            return await self.heartbeats.remaining(replica_id) is None
        for _ in range(POLL_ROUNDS):
            if await self.heartbeats.remaining(replica_id) is None:
                return True
            await asyncio.sleep(POLL_INTERVAL_S)
        return False


@pytest.fixture(params=["memory", "redis", "cluster"])
async def beats(request: pytest.FixtureRequest) -> AsyncIterator[Beats]:
    clock = ManualClock()
    if request.param == "memory":
        yield Beats("memory", MemoryHeartbeats(clock), clock)
        return
    cluster = request.param == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "redis_url")
    prefix = request.getfixturevalue("redis_cluster_prefix" if cluster else "redis_prefix")
    store = RedisStore.from_url(url, prefix=prefix, cluster=cluster)
    try:
        yield Beats(request.param, store.heartbeats, clock)
    finally:
        await store.close()


async def test_a_beat_keeps_a_replica_alive_for_at_most_its_ttl(beats: Beats) -> None:
    await beats.heartbeats.beat("replica-a", 30.0)
    left = await beats.heartbeats.remaining("replica-a")
    assert left is not None and 0 < left <= 30.0


async def test_a_replica_that_never_beat_has_no_heartbeat(beats: Beats) -> None:
    assert await beats.heartbeats.remaining("replica-never") is None


async def test_a_heartbeat_is_gone_once_its_ttl_passed(beats: Beats) -> None:
    await beats.heartbeats.beat("replica-a", 0.05)
    assert await beats.lapsed("replica-a", 0.05)


async def test_a_renewed_heartbeat_outlives_its_first_ttl(beats: Beats) -> None:
    await beats.heartbeats.beat("replica-a", 0.05)
    await beats.heartbeats.beat("replica-a", 30.0)
    left = await beats.heartbeats.remaining("replica-a")
    assert left is not None and left > 0.05


async def test_stop_ends_a_heartbeat_at_once(beats: Beats) -> None:
    await beats.heartbeats.beat("replica-a", 30.0)
    await beats.heartbeats.stop("replica-a")
    assert await beats.heartbeats.remaining("replica-a") is None
    await beats.heartbeats.stop("replica-a")  # again: a no-op


async def test_one_replicas_heartbeat_leaves_anothers_alone(beats: Beats) -> None:
    await beats.heartbeats.beat("replica-a", 30.0)
    await beats.heartbeats.beat("replica-b", 30.0)
    await beats.heartbeats.stop("replica-b")
    left = await beats.heartbeats.remaining("replica-a")
    assert left is not None and not math.isinf(left)
    assert await beats.heartbeats.remaining("replica-b") is None


# --- a replica's own heartbeat ----------------------------------------------------------


async def test_a_replica_on_redis_beats_while_it_serves_and_stops_when_it_stops(
    relay_factory: RelayFactory, redis_url: str, redis_prefix: str
) -> None:
    relay = await relay_factory(store="redis", redis_url=redis_url, redis_prefix=redis_prefix)
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        left = await store.heartbeats.remaining(relay.hub.replica_id)
        assert left is not None and 0 < left <= relay.settings.heartbeat_ttl_s
        await relay.stop()
        assert await store.heartbeats.remaining(relay.hub.replica_id) is None
    finally:
        await store.close()


async def test_a_replica_on_the_memory_store_has_no_heartbeat(relay_factory: RelayFactory) -> None:
    relay = await relay_factory()
    assert relay.hub.heartbeats is None  # no other replica could take its streams over
