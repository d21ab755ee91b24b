"""Followers on a few connections (issue 10, item 3): one watcher per store
rings the doorbell of every reader waiting for a stream's log to grow, so
1,000 followers of streams owned elsewhere cost one Redis connection, not
1,000 parked `XREAD BLOCK`s.

Two ways to watch, by what Redis allows:

- One server (`BlockingWatcher`): a single `XREAD BLOCK` over every watched
  log key at once, plus the store's own poke key. A reader that starts
  waiting on a key the parked read does not cover pokes it (an `XADD` to the
  poke key from the command pool), so the read returns and is sent again with
  the new key: no wait for the block to run out.
- A Redis Cluster (`PollingWatcher`): a multi-key `XREAD` must keep to one
  hash slot, and every stream has a slot of its own; instead the watcher
  asks for the last entry ID of every watched key in one pipeline (one
  round trip per node) every `poll_s`.

Either way a waiter is rung when its key holds an entry after the ID it
waits from; it then reads the log itself (the watcher is a doorbell, never
the source of entries). A watcher that cannot reach Redis keeps trying; its
waiters' own timeouts end their waits, and the store's next command reports
the outage, typed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import KeysView
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# After a read returns, the next waits at least this long, so a busy store
# (every watched stream appending) costs a bounded number of reads per second.
MIN_INTERVAL_S = 0.002
# A watcher that failed to reach Redis tries again after this long.
RETRY_S = 0.1


def parse_id(raw: bytes | str) -> tuple[int, int]:
    """A stream entry ID ("5-2") as a comparable pair."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    first, _, second = text.partition("-")
    return int(first), int(second or 0)


@dataclass(eq=False)
class _Waiter:
    after: tuple[int, int]
    future: asyncio.Future[None]


@dataclass
class WatcherStats:
    """What the watcher did (tests and operators)."""

    reads: int = 0  # XREADs or polls sent
    pokes: int = 0
    poke_failures: int = 0  # pokes tried again (the command pool full, Redis away)
    rings: int = 0
    errors: int = 0
    # The keys watched at the last read (a view of that read's own dict: not
    # copied per read, which with 1,000 followers is 1,000 keys each time).
    keys: KeysView[str] = field(default_factory=lambda: {}.keys())


class _Watcher:
    """The waiters, by key, and the task that watches them."""

    def __init__(self) -> None:
        self._waiters: dict[str, list[_Waiter]] = {}
        self._task: asyncio.Task[None] | None = None
        self.stats = WatcherStats()
        self._closed = False

    @property
    def waiting(self) -> int:
        """How many readers wait now."""
        return sum(len(w) for w in self._waiters.values())

    async def wait(self, key: str, after_id: str, timeout_s: float) -> bool:
        """Wait until `key` holds an entry after `after_id`, up to `timeout_s`
        (real time). True when rung, False on timeout."""
        if self._closed:
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(parse_id(after_id), loop.create_future())
        self._waiters.setdefault(key, []).append(waiter)
        self._added(key, waiter)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="tokenrelay-redis-watcher")
        try:
            async with asyncio.timeout(timeout_s):
                await waiter.future
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(key, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(key, None)

    def _added(self, key: str, waiter: _Waiter) -> None:
        """A waiter joined (the blocking watcher pokes its read)."""

    def _ring(self, key: str, last: tuple[int, int]) -> None:
        """`key`'s log holds entries up to `last`: ring whoever waits from before."""
        for waiter in self._waiters.get(key, ()):
            if waiter.after < last and not waiter.future.done():
                waiter.future.set_result(None)
                self.stats.rings += 1

    def _watched(self) -> dict[str, tuple[int, int]]:
        """Each watched key with the earliest ID a waiter waits from."""
        return {
            key: min(w.after for w in waiters) for key, waiters in self._waiters.items() if waiters
        }

    async def _run(self) -> None:
        while self._waiters and not self._closed:
            try:
                await self._watch_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, AttributeError, RuntimeError) as error:
                # Redis is away (or a connection closed under us): keep trying;
                # each waiter's own timeout ends its wait meanwhile.
                self.stats.errors += 1
                log.debug("the Redis watcher failed (%s); trying again", error)
                await asyncio.sleep(RETRY_S)
                continue
            await asyncio.sleep(MIN_INTERVAL_S)

    async def _watch_once(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.cancel()


class BlockingWatcher(_Watcher):
    """One `XREAD BLOCK` over every watched key, on the blocking client (one
    connection in all), poked through `poke_key` when a waiter joins."""

    def __init__(
        self,
        blocking: Any,
        commands: Any,
        *,
        prefix: str,
        block_slice_s: float | None,
        poke_ttl_ms: int = 60_000,
    ) -> None:
        super().__init__()
        self._blocking = blocking
        self._commands = commands
        # Of this store alone (a uuid): other replicas' pokes never wake it.
        self.poke_key = f"{prefix}:watcher:{uuid.uuid4().hex}"
        self._poke_last = "0-0"
        self._block_ms = max(1, int((block_slice_s or 5.0) * 1000))
        self._poke_ttl_ms = poke_ttl_ms
        self._reading: dict[str, tuple[int, int]] = {}  # what the parked read covers
        self._poking: asyncio.Task[None] | None = None

    def _added(self, key: str, waiter: _Waiter) -> None:
        if self._covers(key, waiter):
            return
        if self._reading and (self._poking is None or self._poking.done()):
            self._poking = asyncio.get_running_loop().create_task(self._poke())

    def _covers(self, key: str, waiter: _Waiter) -> bool:
        """Whether the parked read rings `waiter` (it reads `key` from no
        later than the waiter waits from)."""
        covered = self._reading.get(key)
        return covered is not None and covered <= waiter.after

    def _uncovered(self) -> bool:
        """Whether a read is parked that would not ring some waiter (asked
        after a poke, not per waiter that joins: it looks at every waiter)."""
        if not self._reading:
            return False  # the next read takes every waiter there is then
        return any(
            not self._covers(key, waiter)
            for key, waiters in self._waiters.items()
            for waiter in waiters
        )

    async def _poke(self) -> None:
        """Make the parked read return, so it is sent again with every
        waiter. Poked again while a read is parked that misses a waiter:
        after a poke that failed (the command pool full, Redis away), and
        after one that landed before the next read took its snapshot (a
        waiter that joined then, with this poke still on its way, started no
        poke of its own). Either would leave the waiter to the end of the
        block slice."""
        while not self._closed:
            reads = self.stats.reads
            try:
                pipe = self._commands.pipeline(transaction=False)
                pipe.xadd(self.poke_key, {"p": "1"}, maxlen=16, approximate=True)
                pipe.pexpire(self.poke_key, self._poke_ttl_ms)
                await pipe.execute()
            except (RedisError, OSError, AttributeError, RuntimeError) as error:
                self.stats.poke_failures += 1
                if not self._uncovered():
                    return
                log.debug("the Redis watcher's poke failed (%s); trying again", error)
                await asyncio.sleep(RETRY_S)
                continue
            self.stats.pokes += 1
            # No read sent since: the one this poke returns is sent again
            # with every waiter there is by then.
            if self.stats.reads == reads or not self._uncovered():
                return

    async def _watch_once(self) -> None:
        watched = self._watched()
        if not watched:
            return
        streams: dict[Any, Any] = {self.poke_key: self._poke_last}
        streams.update({key: f"{after[0]}-{after[1]}" for key, after in watched.items()})
        self._reading = watched
        self.stats.reads += 1
        self.stats.keys = watched.keys()
        try:
            reply = await self._blocking.xread(streams, count=1, block=self._block_ms)
        finally:
            self._reading = {}
        for name, items in reply or ():
            key = name.decode() if isinstance(name, bytes) else name
            if not items:
                continue
            last = items[-1][0]
            if key == self.poke_key:
                self._poke_last = last.decode() if isinstance(last, bytes) else last
                continue
            self._ring(key, parse_id(last))

    async def close(self) -> None:
        if self._poking is not None and not self._poking.done():
            self._poking.cancel()
        await super().close()
        with contextlib.suppress(RedisError, OSError, AttributeError, RuntimeError):
            await self._commands.delete(self.poke_key)


class PollingWatcher(_Watcher):
    """Every `poll_s`, the last entry ID of every watched key, in one
    pipeline (Redis Cluster: one round trip per node)."""

    def __init__(self, commands: Any, *, poll_s: float) -> None:
        super().__init__()
        self._commands = commands
        self.poll_s = poll_s

    async def _watch_once(self) -> None:
        watched = self._watched()
        if not watched:
            return
        keys = list(watched)
        pipe = self._commands.pipeline(transaction=False)
        for key in keys:
            pipe.xrevrange(key, count=1)
        self.stats.reads += 1
        self.stats.keys = watched.keys()
        replies = await pipe.execute(raise_on_error=False)
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception) or not reply:
                continue
            self._ring(key, parse_id(reply[0][0]))
        if self._waiters:
            await asyncio.sleep(self.poll_s)


__all__ = ["BlockingWatcher", "PollingWatcher", "WatcherStats", "parse_id"]
