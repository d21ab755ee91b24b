"""Write-behind on the Redis store (engine/fanout.py, issue 10): a chunk is
handed to the group commit and the generation goes on, but readers see it
only once its write is acknowledged, and the End covers exactly what the
store holds.

Over a real gateway and a throwaway redis-server of the test's own (so it
can be paused with SIGSTOP). The paused-store test runs the gateway on a
manual clock moved by the time keeper: no wall-clock sleeps.
"""

from __future__ import annotations

import asyncio

import grpc

from redisproc import RedisProcess
from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    chunks_of,
    end_of,
    eventually,
    gateway_store,
    generation_of,
    produce,
    run_to_end,
    start_request,
    text_of,
)
from tokenrelay_devtools.timekeeper import TimeKeeper
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.model import Chunk, End
from tokenrelay_server.engine.events import ChunkStored
from tokenrelay_server.engine.fanout import WRITE_BEHIND_ENTRIES
from tokenrelay_server.store.redis import RedisStore

WITHIN_S = 60.0


async def stored(url: str, stream_id: str) -> list[Chunk | End]:
    store = gateway_store(url, prefix="wb")
    try:
        entries = await store.read(stream_id, after_seq=0, limit=100_000)
    finally:
        await store.close()
    return [e for e in entries if isinstance(e, Chunk | End)]


async def test_a_full_speed_stream_is_written_in_fewer_appends_than_chunks_and_is_exact(
    own_redis: RedisProcess, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(store="redis", redis_url=own_redis.url, redis_prefix="wb", **QUIET)
    tokens = 3000
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=tokens))
    end = end_of(events)
    assert not end.partial and end.total_seq == tokens
    stream_id = events[0].started.stream_id
    log = await stored(own_redis.url, stream_id)
    assert [c.text for c in log if isinstance(c, Chunk)] == [c.text for c in chunks_of(events)]
    assert "".join(c.text for c in log if isinstance(c, Chunk)) == text_of(events)
    store = relay.hub.store
    assert isinstance(store, RedisStore)
    stats = store.group_commit.stats
    # Chunks handed over while a write was on the wire went together.
    assert stats.entries >= tokens + 1
    assert stats.appends < stats.entries
    await relay.stop(grace=0.5)


async def test_chunks_written_behind_are_shown_only_once_redis_acknowledges_them(
    own_redis: RedisProcess, relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(
        clock=clock, store="redis", redis_url=own_redis.url, redis_prefix="wb", **QUIET
    )
    # ChunkStored means durable: it comes from the write's callback.
    reported: list[int] = []
    relay.hub.observe.add(
        lambda event: reported.append(event.seq) if isinstance(event, ChunkStored) else None
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=20, metadata=PACED))
        started = await call.next_event()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 3)
        seen = [started, *await call.events_until(lambda e: e.chunk.seq == 3)]
        own_redis.pause()
        keeper = TimeKeeper(clock, relay)
        # The generation goes on producing while Redis holds its writes...
        for _ in range(5):
            await eventually(keeper.waiting_on_time, poll_s=0.001)
            assert await keeper.move_once()
        await eventually(lambda: generation.log.next_seq > 6, poll_s=0.001)
        # ...but nothing past what Redis acknowledged is visible to a reader.
        assert generation.log.last_seq == 3
        assert generation.log.entries.last_seq == 3
        assert reported == [1, 2, 3]  # nor reported as stored
        own_redis.resume()
        await eventually(lambda: generation.log.last_seq >= 6, within_s=WITHIN_S, poll_s=0.001)
        assert reported == list(range(1, generation.log.last_seq + 1))
        seen += await call.events_until(lambda e: e.chunk.seq == 6)
        stream_id = started.started.stream_id
        log = await stored(own_redis.url, stream_id)
        assert [c.seq for c in chunks_of(seen)] == [1, 2, 3, 4, 5, 6]
        assert [c.text for c in chunks_of(seen)] == [c.text for c in log if isinstance(c, Chunk)][
            :6
        ]
        call.cancel()
    await relay.stop(grace=0.5)


async def test_a_stream_waits_once_its_window_of_unacknowledged_entries_is_full(
    own_redis: RedisProcess, relay_factory: RelayFactory
) -> None:
    relay = await relay_factory(store="redis", redis_url=own_redis.url, redis_prefix="wb", **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=50_000))
        started = await call.next_event()
        generation = generation_of(relay, started)
        await call.events_until(lambda e: e.HasField("chunk"))
        own_redis.pause()
        log = generation.log

        def unacknowledged() -> int:
            return log.next_seq - 1 - log.last_seq

        await eventually(lambda: unacknowledged() == WRITE_BEHIND_ENTRIES, within_s=WITHIN_S)
        for _ in range(50):
            await asyncio.sleep(0)
        assert unacknowledged() == WRITE_BEHIND_ENTRIES  # it waits; it does not grow
        own_redis.resume()
        await eventually(lambda: log.last_seq > WRITE_BEHIND_ENTRIES, within_s=WITHIN_S)
        call.cancel()
    await relay.stop(grace=0.5)
