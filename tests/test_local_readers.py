"""Local readers never wait on Redis (issue 10, item 2): a reader attached
to a generation running in this process gets its chunks from memory as soon
as Redis acknowledged them; the log is read from Redis only for a stream
this process does not hold.

Counted on a throwaway redis-server of the test's own (its command counts
are this test's alone): no XRANGE (the read script's) and no XREAD (the
watcher's) while a stream is read live and resumed on its own replica.
"""

from __future__ import annotations

import grpc
from redis import Redis

from redisproc import RedisProcess
from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    chunks_of,
    end_of,
    generation_of,
    produce,
    resume_request,
    run_to_end,
    start_request,
)
from tokenrelay_server.core.clock import ManualClock


def log_reads(url: str) -> dict[str, int]:
    """How often Redis ran the commands that read a stream's log."""
    with Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return {
        name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("xrange", "xread", "xrevrange")
    }


async def test_a_stream_read_live_and_resumed_on_its_replica_never_reads_redis(
    own_redis: RedisProcess, relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(
        clock=clock, store="redis", redis_url=own_redis.url, redis_prefix="local", **QUIET
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=12, metadata=PACED))
        started = await call.next_event()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 5)
        first = [started, *await call.events_until(lambda e: e.chunk.seq == 5)]
        call.cancel()  # the client goes away, then resumes on the same replica
        token = started.started.resume_token
        resumed = RawCall(channel, resume_request(token, 3))
        again = await resumed.events_until(lambda e: e.chunk.seq == 5)
        await produce(clock, relay, generation, 7)
        rest = await resumed.events_until()
    assert [c.seq for c in chunks_of(first)] == [1, 2, 3, 4, 5]
    assert [c.seq for c in chunks_of(again + rest)] == list(range(4, 13))
    assert not end_of(rest).partial
    assert log_reads(own_redis.url) == {"xrange": 0, "xread": 0, "xrevrange": 0}
    # A stream this process no longer holds (finished) is read from Redis.
    events = await run_to_end(grpc.aio.insecure_channel(relay.address), resume_request(token, 10))
    assert [c.seq for c in chunks_of(events)] == [11, 12]
    assert log_reads(own_redis.url)["xrange"] >= 1
    await relay.stop(grace=0.5)
