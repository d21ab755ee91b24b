"""Takeover on a heartbeat (issue 9 defect 7), in the engine on a ManualClock:
a stream whose owner's heartbeat is gone is taken over by the replica that
follows it, long before the owner's lease would lapse; while the owner beats,
it is not. (tests/test_replicas.py does the same over real processes.)

The owner here is another replica that only exists in the store: its lease,
its heartbeat (MemoryHeartbeats on the same clock) and what it stored.
"""

from __future__ import annotations

import asyncio

from enginekit import Engine, Script, build_engine, end_of, finish, text
from tokenrelay_server.core.model import Chunk, LogEntry, Message, Notice, StartRequest, StreamMeta
from tokenrelay_server.store.heartbeat import MemoryHeartbeats

LEASE_S = 3_600.0  # far beyond any clock move here: only a heartbeat can free it
HEARTBEAT_TTL_S = 2.0
STREAM = "st-owned-elsewhere"


async def owned_elsewhere(engine: Engine, owner: str) -> MemoryHeartbeats:
    """A stream another replica (`owner`) stored one chunk of, holds the
    lease of, and beat for once; the hub follows heartbeats on the clock."""
    heartbeats = MemoryHeartbeats(engine.clock)
    engine.hub.heartbeats = heartbeats
    request = StartRequest(model="m", messages=(Message("user", "hello"),))
    await engine.store.create(StreamMeta(STREAM, "m", 0.0, 10, request=request))
    await engine.store.append(STREAM, [Chunk(1, "Hello", "p", 1)])
    assert await engine.store.acquire_lease(STREAM, owner, LEASE_S)
    await heartbeats.beat(owner, HEARTBEAT_TTL_S)
    return heartbeats


def owner_lost_notices(entries: list[LogEntry]) -> list[Notice]:
    return [e for e in entries if isinstance(e, Notice) and e.fault.code == "OWNER_LOST"]


async def test_a_stream_whose_owners_heartbeat_is_gone_is_taken_over_before_its_lease_lapses() -> (
    None
):
    engine = build_engine({"m": [("p", [Script(text(" world"), finish())])]})
    await owned_elsewhere(engine, "replica-dead")  # and it never beats again

    session = await engine.hub.resume(STREAM, 1)
    entries = await engine.run_to_end(session, step_s=0.25)

    assert not end_of(entries).partial
    assert [n.after_seq for n in owner_lost_notices(entries)] == [1]
    assert [c.text for c in entries if isinstance(c, Chunk)] == [" world"]
    assert len(engine.providers["p"].requests) == 1  # continued here, by continuation
    assert engine.clock.monotonic() < LEASE_S  # the lease had not lapsed


async def test_a_stream_whose_owner_keeps_beating_is_not_taken_over() -> None:
    engine = build_engine({"m": [("p", [Script(text(" world"), finish())])]})
    heartbeats = await owned_elsewhere(engine, "replica-alive")

    async def keep_beating() -> None:
        while True:
            await engine.clock.sleep(0.5)
            await heartbeats.beat("replica-alive", HEARTBEAT_TTL_S)

    beating = asyncio.create_task(keep_beating())
    session = await engine.hub.resume(STREAM, 1)
    reader = asyncio.create_task(engine.read_all(session))
    try:
        await engine.clock.run_for(30)  # 60 heartbeats, 30 looks of the follower
        assert engine.providers["p"].requests == []
        assert engine.hub.running_generations == 0
        assert await engine.store.lease_owner(STREAM) == "replica-alive"
    finally:
        beating.cancel()  # now it dies
    while not reader.done():
        await engine.clock.run_for(0.25)
    entries = reader.result()
    assert [n.after_seq for n in owner_lost_notices(entries)] == [1]
    assert not end_of(entries).partial
