"""The lease keeper ends with its generation, even when a store call eats
the cancel that was meant to stop it.

redis-py (8.1, on Python 3.11) can lose a cancellation that arrives while a
command runs: the command returns as if nothing had happened. The keeper
used to loop `while True`, so it then renewed the lease for ever, and the
hub, awaiting it, kept the finished generation registered: bench/soak.py on
Redis left a stream DETACHED, its max_streams slot held, after every few
hundred operations. The store here eats the cancel the same way, every
time, so the test does not depend on when a cancel lands.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serverkit import eventually
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.model import StreamMeta
from tokenrelay_server.engine.takeover import Leases
from tokenrelay_server.store.memory import MemoryStore


class CancelEatingStore(MemoryStore):
    """A lease renewal that, cancelled while it waits, returns normally."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(clock=clock)
        self.renewing = asyncio.Event()
        self.renewals = 0

    async def renew_lease(
        self, stream_id: str, owner: str, ttl_s: float, *, epoch: int | None = None
    ) -> bool:
        self.renewals += 1
        self.renewing.set()
        try:
            await asyncio.Event().wait()  # a command that takes a while
        except asyncio.CancelledError:
            return True  # the cancel is lost, as redis-py loses it
        return True


async def test_the_keeper_ends_with_its_generation_when_the_store_eats_its_cancel() -> None:
    clock = ManualClock()
    store = CancelEatingStore(clock)
    leases = Leases(store, "replica-a", ttl_s=3.0, clock=clock)
    generation = SimpleNamespace(
        stream_id="s1",
        epoch=1,
        finished=asyncio.Event(),
        stop=lambda fault: None,
        fence=lambda e: None,
    )
    keeper = asyncio.create_task(leases.keep(generation))  # type: ignore[arg-type]
    await eventually(lambda: clock.next_due() is not None)  # asleep for ttl/3
    await clock.run_for(1.0)
    await asyncio.wait_for(store.renewing.wait(), timeout=10)  # a guard only
    # The generation ends; the hub cancels its keeper mid-renewal.
    generation.finished.set()
    keeper.cancel()
    for _ in range(3):  # were it still looping, each move would renew again
        await eventually(lambda: keeper.done() or clock.next_due() is not None)
        if keeper.done():
            break
        await clock.run_for(1.0)
    assert keeper.done(), "the keeper outlived its generation"
    assert store.renewals == 1


async def test_the_keeper_renews_while_its_generation_runs() -> None:
    clock = ManualClock()
    store = MemoryStore(clock=clock)
    leases = Leases(store, "replica-a", ttl_s=3.0, clock=clock)
    renewed: list[str] = []
    original = store.renew_lease

    async def renew(stream_id: str, owner: str, ttl_s: float, *, epoch: int | None = None) -> bool:
        renewed.append(stream_id)
        return await original(stream_id, owner, ttl_s, epoch=epoch)

    store.renew_lease = renew  # type: ignore[method-assign]
    # A stream this replica holds the lease of (a lease lost would stop it).
    await store.create(StreamMeta("s1", "m", 0.0, 10))
    epoch = await store.acquire_lease("s1", "replica-a", 3.0)
    generation = SimpleNamespace(
        stream_id="s1",
        epoch=epoch,
        finished=asyncio.Event(),
        stop=lambda fault: None,
        fence=lambda e: None,
    )
    keeper = asyncio.create_task(leases.keep(generation))  # type: ignore[arg-type]
    for count in (1, 2, 3):
        await eventually(lambda: clock.next_due() is not None)
        await clock.run_for(1.0)
        await eventually(lambda count=count: len(renewed) == count)
    generation.finished.set()
    await eventually(lambda: clock.next_due() is not None)
    await clock.run_for(1.0)
    await eventually(keeper.done)  # it notices at its next wake-up, cancelled or not
    assert len(renewed) == 3
