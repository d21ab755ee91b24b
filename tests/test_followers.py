"""Followers on a few connections (store/follow.py; issue 10, item 3).

Readers waiting for streams that grow elsewhere share one watcher per store:
on one server a single blocking read over every watched key (1,000
followers hold one parked connection), on a Redis Cluster one pipelined
poll. Over a throwaway redis-server (its client count is this test's alone)
and the shared throwaway cluster.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Redis

from logkit import chunk, meta
from redisproc import RedisProcess
from serverkit import eventually
from tokenrelay_server.store.follow import BlockingWatcher
from tokenrelay_server.store.redis import RedisStore

FOLLOWERS = 1000
WITHIN_S = 60.0


async def blocked_clients(url: str, count: int) -> bool:
    """Whether `count` clients of the server are blocked in a command."""
    _, blocked = await clients_info(url)
    return blocked == count


async def clients_info(url: str) -> tuple[int, int]:
    """(connected clients but this one, blocked clients) of the server."""
    async with Redis.from_url(url) as client:
        info = await client.info("clients")
    return int(info["connected_clients"]) - 1, int(info["blocked_clients"])


async def test_a_thousand_followers_park_on_one_connection_and_all_wake(
    own_redis: RedisProcess,
) -> None:
    store = RedisStore.from_url(own_redis.url, max_connections=16)
    try:
        streams = [f"f-{i}" for i in range(FOLLOWERS)]
        for stream_id in streams:
            await store.create(meta(stream_id))
        waits = [
            asyncio.ensure_future(store.wait(stream_id, after_seq=0, timeout_s=WITHIN_S))
            for stream_id in streams
        ]

        every_log = {f"tr:{{{s}}}:log" for s in streams}

        async def parked() -> bool:
            # One parked read over every log: the pokes of followers that
            # joined while it was parked (some fail at first, the command
            # pool full of their reads: they are tried again) sent it again.
            _, blocked = await clients_info(own_redis.url)
            watcher = store.watcher
            return watcher.waiting == FOLLOWERS and blocked == 1 and watcher.stats.keys == every_log

        await eventually(parked, within_s=WITHIN_S)
        connected, blocked = await clients_info(own_redis.url)
        # The watcher's one parked read, plus the command pool (bounded at 16).
        assert blocked == 1
        assert connected <= 16 + 2
        await asyncio.gather(*(store.append(s, [chunk(1)]) for s in streams))
        results = await asyncio.gather(*waits)
        assert all(result == [chunk(1)] for result in results)
    finally:
        await store.close()


async def test_a_follower_that_joins_a_parked_read_is_rung_without_waiting_for_its_block(
    own_redis: RedisProcess,
) -> None:
    # The parked read covers stream a; b's reader joins later. Its poke makes
    # the read start again with b in it, so b's append rings b's reader even
    # though the parked read would block for its whole slice otherwise.
    store = RedisStore.from_url(own_redis.url)
    try:
        for stream_id in ("a", "b"):
            await store.create(meta(stream_id))
        first = asyncio.ensure_future(store.wait("a", after_seq=0, timeout_s=WITHIN_S))
        await eventually(lambda: store.watcher.stats.keys == {"tr:{a}:log"})
        second = asyncio.ensure_future(store.wait("b", after_seq=0, timeout_s=WITHIN_S))
        await eventually(lambda: store.watcher.stats.keys == {"tr:{a}:log", "tr:{b}:log"})
        assert store.watcher.stats.pokes >= 1
        await store.append("b", [chunk(1)])
        assert await second == [chunk(1)]
        assert not first.done()
        await store.append("a", [chunk(1)])
        assert await first == [chunk(1)]
    finally:
        await store.close()


async def test_a_poke_that_fails_is_tried_again_until_the_parked_read_covers_the_follower(
    own_redis: RedisProcess,
) -> None:
    # b's reader joins while the read over a is parked, and its poke finds
    # the command pool (one connection here) taken by a blocked command: it
    # fails. Tried again, it lands once the connection is free, and b's
    # append rings b's reader. Not tried again, b would wait for the parked
    # read's block slice (an hour here), past its own 60 s.
    commands = Redis(
        connection_pool=BlockingConnectionPool.from_url(
            own_redis.url, max_connections=1, timeout=0.01
        )
    )
    blocking = Redis.from_url(own_redis.url, socket_timeout=3600.0)  # for the hour-long slice
    other = Redis.from_url(own_redis.url)
    watcher = BlockingWatcher(blocking, commands, prefix="t", block_slice_s=3600.0)
    try:
        first = asyncio.ensure_future(watcher.wait("t:{a}:log", "0-0", WITHIN_S))
        await eventually(lambda: watcher.stats.keys == {"t:{a}:log"})
        await eventually(lambda: blocked_clients(own_redis.url, 1))
        hold = asyncio.ensure_future(commands.blpop(["t:hold"], timeout=0))
        await eventually(lambda: blocked_clients(own_redis.url, 2))
        second = asyncio.ensure_future(watcher.wait("t:{b}:log", "0-0", WITHIN_S))
        await eventually(lambda: watcher.stats.poke_failures >= 1)
        assert watcher.stats.keys == {"t:{a}:log"}  # still the read over a alone
        await other.rpush("t:hold", "x")  # the blocked command returns: the pool is free
        await hold
        await eventually(lambda: watcher.stats.keys == {"t:{a}:log", "t:{b}:log"})
        await other.xadd("t:{b}:log", {"e": "1"})
        assert await second is True
        assert not first.done()
    finally:
        await watcher.close()
        for client in (commands, blocking, other):
            await client.aclose()


async def test_a_follower_waits_from_its_own_position(own_redis: RedisProcess) -> None:
    # Two readers of one stream, one further along: an append the further one
    # has seen rings only the other.
    store = RedisStore.from_url(own_redis.url)
    try:
        await store.create(meta("s"))
        await store.append("s", [chunk(1), chunk(2)])
        behind = await store.wait("s", after_seq=1, timeout_s=WITHIN_S)
        assert behind == [chunk(2)]  # already there: no wait
        ahead = asyncio.ensure_future(store.wait("s", after_seq=2, timeout_s=WITHIN_S))
        await eventually(lambda: store.watcher.waiting == 1)
        await store.append("s", [chunk(3)])
        assert await ahead == [chunk(3)]
    finally:
        await store.close()


async def test_a_wait_times_out_while_redis_is_away_and_the_watcher_recovers(
    own_redis: RedisProcess,
) -> None:
    store = RedisStore.from_url(own_redis.url, retry_window_s=0.5)
    try:
        await store.create(meta("s"))
        waiting = asyncio.ensure_future(store.wait("s", after_seq=0, timeout_s=1.0))
        await eventually(lambda: store.watcher.stats.reads >= 1)
        own_redis.stop()
        assert await waiting == []  # its own timeout; the watcher kept trying
        own_redis.start()
        await store.append("s", [chunk(1)])
        again = await store.wait("s", after_seq=0, timeout_s=WITHIN_S)
        assert again == [chunk(1)]
    finally:
        await store.close()


async def test_cluster_followers_share_one_poll(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    store = RedisStore.from_url(redis_cluster_url, prefix=redis_cluster_prefix, cluster=True)
    try:
        streams = [f"f-{i}" for i in range(200)]  # over every node's slots
        for stream_id in streams:
            await store.create(meta(stream_id))
        waits = [
            asyncio.ensure_future(store.wait(stream_id, after_seq=0, timeout_s=WITHIN_S))
            for stream_id in streams
        ]
        await eventually(lambda: store.watcher.waiting == len(streams), within_s=WITHIN_S)
        await eventually(lambda: len(store.watcher.stats.keys) == len(streams), within_s=WITHIN_S)
        reads_before = store.watcher.stats.reads
        await asyncio.gather(*(store.append(s, [chunk(1)]) for s in streams))
        results = await asyncio.gather(*waits)
        assert all(result == [chunk(1)] for result in results)
        # One poll covers every follower: far fewer polls than followers.
        assert store.watcher.stats.reads - reads_before < len(streams)
    finally:
        await store.close()
