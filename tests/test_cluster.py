"""On a Redis Cluster (issue 9 defect 8): every key of one stream lives in one
hash slot, streams spread over the masters, and each script's keys share a
slot (redis-py's cluster client refuses a script whose keys do not, before
sending it; the contract suite in test_store.py runs every script there).

The cluster is the session's throwaway three-master one (conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.cluster import key_slot
from redis.exceptions import MaxConnectionsError

from test_store import make_meta
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import ErrorType
from tokenrelay_server.core.model import Chunk, End, Usage
from tokenrelay_server.store.connect import connect
from tokenrelay_server.store.error_stats import ErrorRecord
from tokenrelay_server.store.error_stats_redis import RedisErrorStats
from tokenrelay_server.store.redis import RedisStore

STREAMS = 30


async def keys_by_node(url: str, prefix: str) -> dict[str, list[str]]:
    """Every key under `prefix`, per master that holds it."""
    found: dict[str, list[str]] = defaultdict(list)
    async with RedisCluster.from_url(url) as cluster:
        for node in cluster.get_primaries():
            async for key in cluster.scan_iter(match=f"{prefix}:*", count=500, target_nodes=node):
                found[node.name].append(key.decode())
    return found


async def test_every_key_of_a_stream_lives_in_one_slot_and_streams_spread_over_masters(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    prefix = redis_cluster_prefix
    store = RedisStore.from_url(redis_cluster_url, prefix=prefix, cluster=True)
    stream_ids = []
    try:
        for index in range(STREAMS):
            meta = make_meta(key=f"job-{index}")
            await store.create(meta)
            stream_ids.append(meta.stream_id)
            await store.append(meta.stream_id, [Chunk(1, "a", "sim", 1), Chunk(2, "b", "sim", 1)])
            assert await store.acquire_lease(meta.stream_id, "replica-a", 30.0)
            await store.request_cancel(meta.stream_id, "stop")
            end = End("stop", 2, "0" * 64, Usage(completion_tokens=2))
            await store.append(meta.stream_id, [end])
        await store.heartbeats.beat("replica-a", 30.0)
    finally:
        await store.close()

    found = await keys_by_node(redis_cluster_url, prefix)
    every_key = [key for keys in found.values() for key in keys]
    for stream_id in stream_ids:
        tag = f"{{{stream_id}}}"
        own = sorted(key for key in every_key if tag in key)
        assert own == [f"{prefix}:{tag}:{part}" for part in ("lease", "log", "meta")]
        assert len({key_slot(key.encode()) for key in own}) == 1, own
        assert key_slot(stream_id.encode()) == key_slot(own[0].encode())
    holders = {node for node, keys in found.items() if any("{" in key for key in keys)}
    assert len(holders) > 1, "every stream landed on one master: is it a cluster?"
    assert f"{prefix}:hb:{{replica-a}}" in every_key


async def test_error_buckets_each_live_in_one_slot_and_read_back_from_every_master(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    clock = ManualClock(wall_start=1_700_000_000.0)
    stats = RedisErrorStats.from_url(
        redis_cluster_url, prefix=redis_cluster_prefix, clock=clock, cluster=True
    )
    try:
        records = [
            ErrorRecord(
                type=ErrorType.NETWORK,
                code="ECONNRESET",
                provider="sim",
                model="sim",
                bytes_received=10,
                tokens_received=2,
                recoverable=True,
                at=clock.wall() - offset,
            )
            for offset in (0.0, 3_600.0, 90_000.0)
        ]
        await stats.record(records)
    finally:
        await stats.close()
    found = await keys_by_node(redis_cluster_url, redis_cluster_prefix)
    buckets = [key for keys in found.values() for key in keys]
    # minute, hour and day buckets of three moments: each its own hash tag.
    assert len(buckets) >= 3
    for key in buckets:
        tag = key[key.index("{") + 1 : key.index("}")]
        assert key_slot(key.encode()) == key_slot(tag.encode())


def test_a_cluster_url_naming_a_database_other_than_0_is_refused() -> None:
    with pytest.raises(ValueError, match="only database 0"):
        connect("redis://127.0.0.1:7000/3", cluster=True)


async def test_a_fresh_cluster_client_takes_a_burst_of_concurrent_commands(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    # redis-py's cluster client, fresh, given concurrent first commands, used
    # to close connections under some of them (connect.py): about one fresh
    # client in four failed a burst of 12 here.
    for _ in range(20):
        store = RedisStore.from_url(redis_cluster_url, prefix=redis_cluster_prefix, cluster=True)
        try:
            metas = await asyncio.gather(*(store.get_meta(uuid.uuid4().hex) for _ in range(12)))
        finally:
            await store.close()
        assert metas == [None] * 12


async def test_more_commands_than_cluster_connections_wait_for_one(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    # redis-py's cluster pools raise MaxConnectionsError when full; the
    # client from connect.py makes the extra commands wait instead.
    store = RedisStore.from_url(
        redis_cluster_url, prefix=redis_cluster_prefix, cluster=True, max_connections=2
    )
    try:
        metas = await asyncio.gather(*(store.get_meta(uuid.uuid4().hex) for _ in range(60)))
    finally:
        await store.close()
    assert metas == [None] * 60


async def test_a_command_that_finds_no_free_cluster_connection_ends_typed(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    client = connect(redis_cluster_url, cluster=True, max_connections=1, connection_wait_s=0.05)
    try:
        await client.initialize()
        # The one connection is held by a read blocked far beyond the test.
        held = asyncio.create_task(
            client.xread({f"{redis_cluster_prefix}:{{held}}:log": "$"}, block=60_000)
        )
        await asyncio.sleep(0)
        with pytest.raises(MaxConnectionsError, match="no free connection to the Redis Cluster"):
            await client.get(f"{redis_cluster_prefix}:other")
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
    finally:
        await client.aclose()
