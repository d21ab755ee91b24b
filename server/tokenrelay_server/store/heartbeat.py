"""Replica heartbeats: is the replica that owns a stream still alive?

A stream's lease (base.py) names its owner's replica id and lasts
`lease_ttl_s` (10 s): long, so that a busy replica never loses a stream it
is generating. A dead replica's streams would then wait that long to be
taken over. So each replica also keeps a short heartbeat key, renewed every
`heartbeat_interval_s` (0.5 s) with a TTL of `heartbeat_ttl_s` (2 s); a
replica that follows a stream whose owner's heartbeat is gone frees that
lease and takes the stream over at once (engine/hub.py, issue 9 defect 7).

Rules (tests/test_heartbeat.py runs them against every implementation):

1. After `beat(r, ttl)`, `remaining(r)` is at most `ttl` and above 0 until
   `ttl` has passed on the heartbeats' `clock`; then it is None.
2. `remaining` of a replica that never beat, or that called `stop`, is None.
3. A replica's beat never changes another replica's heartbeat.

Key layout on Redis (P is the store's prefix, R the replica id)::

    P:hb:{R}   string   "1", PX = the heartbeat TTL

The braces make the replica id the key's hash tag: each heartbeat is one
key in one slot, so a cluster needs nothing more. Nothing ever reads a
heartbeat together with a stream's keys in one script (they live in other
slots): the follower reads the heartbeat, then frees the dead owner's lease
with a compare-and-delete in the stream's slot (`release_lease`), which
changes nothing if the owner renewed it meanwhile.

The TTL runs on the Redis server's clock, which moves by itself: the
heartbeat of a replica on a `ManualClock` must still be renewed in real
time, so `RedisHeartbeats.clock` is the system clock whatever the replica
runs on.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

from redis.exceptions import RedisError

from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.errors import TokenRelayError
from tokenrelay_server.store.connect import RedisClient


class HeartbeatUnavailable(TokenRelayError):
    """The store could not be asked about a heartbeat. A follower must then
    assume the owner lives (and wait for its lease to lapse); a replica that
    cannot beat keeps trying, and its streams may be taken over meanwhile."""


class Heartbeats(Protocol):
    """Where replicas say they are alive."""

    # The clock the TTLs run on: the keeper renews on it.
    clock: Clock

    async def beat(self, replica_id: str, ttl_s: float) -> None:
        """This replica lives for `ttl_s` more (rule 1)."""
        ...

    async def remaining(self, replica_id: str) -> float | None:
        """Seconds left of the replica's heartbeat, None when it is gone."""
        ...

    async def stop(self, replica_id: str) -> None:
        """The replica stops beating now (a clean shutdown, rule 2)."""
        ...


@runtime_checkable
class HasHeartbeats(Protocol):
    """A store shared by replicas offers their heartbeats beside the streams
    (the Redis store). A store of one process (memory) has none: no other
    replica can take its streams over."""

    @property
    def heartbeats(self) -> Heartbeats: ...


class RedisHeartbeats:
    """`Heartbeats` in Redis (or a Redis Cluster), one key per replica."""

    def __init__(self, client: RedisClient, *, prefix: str = "tr") -> None:
        self._client = client
        self._prefix = prefix
        self.clock: Clock = SystemClock()

    def key(self, replica_id: str) -> str:
        return f"{self._prefix}:hb:{{{replica_id}}}"

    async def beat(self, replica_id: str, ttl_s: float) -> None:
        try:
            await self._client.set(self.key(replica_id), b"1", px=_ms(ttl_s))
        except RedisError as error:
            raise HeartbeatUnavailable(f"cannot renew the heartbeat: {error}") from error

    async def remaining(self, replica_id: str) -> float | None:
        try:
            pttl = int(await self._client.pttl(self.key(replica_id)))
        except RedisError as error:
            raise HeartbeatUnavailable(f"cannot read a heartbeat: {error}") from error
        if pttl == -2:  # no such key
            return None
        if pttl == -1:  # no TTL: someone set it by hand; it never lapses
            return math.inf
        return pttl / 1000

    async def stop(self, replica_id: str) -> None:
        try:
            await self._client.delete(self.key(replica_id))
        except RedisError as error:
            raise HeartbeatUnavailable(f"cannot clear the heartbeat: {error}") from error


class MemoryHeartbeats:
    """`Heartbeats` of replicas in one process, on an injected clock (engine tests)."""

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._expires_at: dict[str, float] = {}

    async def beat(self, replica_id: str, ttl_s: float) -> None:
        self._expires_at[replica_id] = self.clock.monotonic() + ttl_s

    async def remaining(self, replica_id: str) -> float | None:
        expires_at = self._expires_at.get(replica_id)
        if expires_at is None:
            return None
        left = expires_at - self.clock.monotonic()
        if left <= 0:
            del self._expires_at[replica_id]
            return None
        return left

    async def stop(self, replica_id: str) -> None:
        self._expires_at.pop(replica_id, None)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


__all__ = [
    "HasHeartbeats",
    "HeartbeatUnavailable",
    "Heartbeats",
    "MemoryHeartbeats",
    "RedisHeartbeats",
]
