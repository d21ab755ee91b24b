"""The nemesis: faults on a seeded schedule, applied to a `Rig`.

- `kill`: SIGKILL a replica (a crash: no drain, no End, no lease release);
  restarted `hold_s` later.
- `pause`: SIGSTOP a replica (a GC stall, a frozen VM), often past its
  lease; SIGCONT `hold_s` later.
- `terminate`: SIGTERM a replica (a drain: its clients get UNAVAILABLE);
  restarted once it exited.
- `client_kill`: `CLIENT KILL TYPE normal`: every replica's Redis
  connections break at once.
- `redis_pause`: `CLIENT PAUSE hold_ms ALL`: Redis answers nobody for a
  while, then carries on by itself.
- `redis_restart`: SIGTERM the throwaway redis-server and start it again
  `hold_s` later (AOF, fsync always: nothing it acknowledged is lost); on
  a cluster, one node (`node`).

On a cluster, `client_kill` and `redis_pause` go to every node.

A fault fires when the round's clients have received `at_chunk` chunks in
all (progress, not wall time, so a slow machine changes when in the
stream it lands, not whether it lands mid-stream); `hold_s` is the fault
itself (how long a replica stays paused or dead, Redis down), so it is
real time. Only the throwaway Redis is paused, killed or restarted; with
a Redis of the caller's the Redis faults are left out of the schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenrelay_devtools.nemesis.rig import Rig

FaultKind = Literal["kill", "pause", "terminate", "client_kill", "redis_pause", "redis_restart"]
REPLICA_FAULTS: tuple[FaultKind, ...] = ("kill", "pause", "terminate")
REDIS_FAULTS: tuple[FaultKind, ...] = ("client_kill", "redis_pause", "redis_restart")
ALL_FAULTS: tuple[FaultKind, ...] = REPLICA_FAULTS + REDIS_FAULTS


@dataclass(frozen=True, slots=True)
class Fault:
    kind: FaultKind
    at_chunk: int  # fires once the round's clients received this many chunks
    replica: int = -1  # the target of a replica fault
    hold_s: float = 0.0
    node: int = -1  # redis_restart on a cluster: the node restarted

    def describe(self) -> str:
        target = f" replica={self.replica}" if self.replica >= 0 else ""
        hold = f" hold={self.hold_s:.2f}s" if self.hold_s else ""
        return f"{self.kind}@{self.at_chunk}{target}{hold}"


def schedule(
    rng: random.Random,
    *,
    replicas: int,
    total_chunks: int,
    lease_ttl_s: float,
    kinds: Sequence[FaultKind] = ALL_FAULTS,
    count: int = 3,
) -> list[Fault]:
    """`count` faults of `kinds` at random points of the first 80 % of a
    round that delivers about `total_chunks` chunks, sorted by when they fire.

    A pause lasts 0.5 to 2.5 lease TTLs: a short one must change nothing, a
    long one lets another replica take the stream over while the owner
    sleeps (the split brain of issue 9, defect 4). A dead replica stays down
    0.1 to 1.5 lease TTLs: back before its leases lapse, or after."""
    faults = []
    for _ in range(count):
        kind = rng.choice(list(kinds))
        at = rng.randint(1, max(1, int(total_chunks * 0.8)))
        target = rng.randrange(replicas) if kind in REPLICA_FAULTS else -1
        if kind == "pause":
            hold = rng.uniform(0.5, 2.5) * lease_ttl_s
        elif kind == "kill":
            hold = rng.uniform(0.1, 1.5) * lease_ttl_s
        elif kind == "terminate":
            hold = 0.0
        elif kind == "redis_pause":
            hold = rng.uniform(0.2, 1.5)
        elif kind == "redis_restart":
            hold = rng.uniform(0.1, 2.0)
        else:
            hold = 0.0
        node = rng.randrange(3) if kind == "redis_restart" else -1
        faults.append(Fault(kind, at, target, round(hold, 3), node))
    return sorted(faults, key=lambda f: f.at_chunk)


async def _first(wanted: Awaitable[object], other: Awaitable[object]) -> bool:
    """Wait for whichever ends first; True when it was `wanted`."""
    wanted_task = asyncio.ensure_future(wanted)
    other_task = asyncio.ensure_future(other)
    try:
        await asyncio.wait({wanted_task, other_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        wanted_task.cancel()
        other_task.cancel()
    return wanted_task.done() and not wanted_task.cancelled()


class Progress:
    """Chunks the round's clients received so far; `reached(n)` waits for n."""

    def __init__(self) -> None:
        self.count = 0
        self._waiting: list[tuple[int, asyncio.Event]] = []

    def add(self) -> None:
        self.count += 1
        for threshold, event in self._waiting:
            if self.count >= threshold:
                event.set()

    async def reached(self, threshold: int) -> None:
        if self.count >= threshold:
            return
        event = asyncio.Event()
        self._waiting.append((threshold, event))
        try:
            await event.wait()
        finally:
            self._waiting.remove((threshold, event))


class Nemesis:
    """Applies a schedule to a rig as the clients make progress, and heals
    each fault after its hold. `injected` counts what was applied, by kind
    (a fault whose target was already down is counted under `skipped`)."""

    def __init__(self, rig: Rig, progress: Progress) -> None:
        self._rig = rig
        self._progress = progress
        self.injected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.applied: list[str] = []

    async def run(self, faults: Sequence[Fault], done: asyncio.Event) -> None:
        """Fire each fault when progress reaches it (stop early when `done`);
        wait for every heal, then heal whatever is left."""
        async with asyncio.TaskGroup() as heals:
            for fault in faults:
                if not await _first(self._progress.reached(fault.at_chunk), done.wait()):
                    break  # the clients finished first
                heal = await self.apply(fault)
                if heal is not None:
                    heals.create_task(heal)
        await self._rig.heal()

    async def apply(self, fault: Fault) -> Coroutine[Any, Any, None] | None:
        """Inject `fault` now; returns its heal to await, if it has one."""
        rig = self._rig
        replica = rig.replicas[fault.replica] if fault.replica >= 0 else None
        if replica is not None and not replica.up:
            self.skipped[fault.kind] += 1
            return None
        if (
            fault.kind in REDIS_FAULTS
            and rig.redis is not None
            and (
                not rig.redis.running or rig.redis.restarting  # one restart at a time
            )
        ):
            self.skipped[fault.kind] += 1
            return None
        self.injected[fault.kind] += 1
        self.applied.append(fault.describe())
        if fault.kind == "kill":
            assert replica is not None
            await replica.kill()
            return self._restart_later(fault.replica, fault.hold_s)
        if fault.kind == "pause":
            assert replica is not None
            replica.signal(signal.SIGSTOP)
            return self._continue_later(fault.replica, fault.hold_s)
        if fault.kind == "terminate":
            assert replica is not None
            replica.signal(signal.SIGTERM)
            return self._restart_after_exit(fault.replica)
        if fault.kind in ("client_kill", "redis_pause"):
            try:
                for url in rig.redis_node_urls:
                    async with self._redis(url) as client:
                        if fault.kind == "client_kill":
                            await client.client_kill_filter(_type="normal", skipme=True)
                        else:
                            await client.client_pause(int(fault.hold_s * 1000), all=True)
            except (RedisConnectionError, OSError):
                # Redis is still coming back from a restart (its process runs,
                # it does not accept yet): the target is down, as above.
                self.injected[fault.kind] -= 1
                self.skipped[fault.kind] += 1
                self.applied.pop()
            return None
        assert fault.kind == "redis_restart" and rig.redis is not None
        # On a cluster, one node restarts (`node`); a single Redis ignores it.
        return rig.redis.restart(down_s=fault.hold_s, node=max(fault.node, 0))

    @contextlib.asynccontextmanager
    async def _redis(self, url: str) -> AsyncIterator[aioredis.Redis]:
        client = aioredis.Redis.from_url(url, socket_timeout=5)
        try:
            yield client
        finally:
            await client.aclose()

    async def _restart_later(self, index: int, hold_s: float) -> None:
        await asyncio.sleep(hold_s)  # the outage itself
        replica = self._rig.replicas[index]
        if not replica.alive and not replica.starting:
            await replica.start()

    async def _continue_later(self, index: int, hold_s: float) -> None:
        await asyncio.sleep(hold_s)  # the pause itself
        self._rig.replicas[index].signal(signal.SIGCONT)

    async def _restart_after_exit(self, index: int) -> None:
        replica = self._rig.replicas[index]
        await replica.wait_exit()
        await replica.start()


__all__ = ["ALL_FAULTS", "REDIS_FAULTS", "REPLICA_FAULTS", "Fault", "FaultKind", "Nemesis",
           "Progress", "schedule"]  # fmt: skip
