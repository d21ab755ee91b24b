"""Moving a `ManualClock` only when everything waits on time.

A test, or the chaos run, that puts a gateway (and its mock upstream) on a
`ManualClock` has to move that clock itself. Moving it while the gateway
still has data to read would fire a stall timeout that real time never
would (a false STALL_TIMEOUT), so `TimeKeeper` moves it only when every
generation running on the gateway provably waits on nothing but time:

- in "backoff": the recovery loop sleeps on a timer of the clock;
- in an attempt whose upstream waits on time:
  - the in-process simulator says it waits on its pace or stalled for good
    (`SimProvider.in_flight()`; it is a generator, so every delta it yielded
    has been taken);
  - or the mock upstream says its answer waits on its clock (the pace, a slow
    first byte) or stalled for good, and the gateway's HTTP provider has taken
    in exactly the bytes the mock sent (`MockUpstream.in_flight()` against
    `HttpProvider.in_flight()`); the deltas of bytes taken in are handed on
    before the provider waits for more.

Then it moves the clock to its next timer (which is what real time would
bring next), lets the loop run, and looks again; otherwise it looks again a
moment later: whatever the gateway waits for then happens anyway. Like
trio's autojump clock, but it knows what waiting on time means here instead
of watching the event loop for idleness, so several gateways can share one
loop and gRPC's own threads do not fool it.

Attempts are matched by number, so one keeper is exact for one stream; with
several streams an abandoned answer the mock has not yet noticed could
stand in for a request still on its way, so keep concurrent streams few.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.upstream.http_stream import Receiving
from tokenrelay_server.upstream.sim import SimInFlight

POLL_S = 0.001
# A move lands on the next timer even when float arithmetic puts
# `now + (due - now)` a hair before `due`.
_LANDING_S = 1e-9


class TimeKeeper:
    """Keeps time for one gateway (and its mock upstream) on a ManualClock."""

    def __init__(
        self,
        clock: ManualClock,
        relay: RelayServer,
        upstream: MockUpstream | None = None,
        *,
        poll_s: float = POLL_S,
    ) -> None:
        self._clock = clock
        self._relay = relay
        self._upstream = upstream
        self._poll_s = poll_s
        self.moves = 0  # how often it moved the clock

    def waiting_on_time(self) -> bool:
        """Whether every generation running on the gateway waits on time
        only (False when none runs: there is nothing to keep time for)."""
        generations = self._relay.hub.generations()
        if not generations:
            return False
        attempts: Counter[int] = Counter()
        for generation in generations:
            if generation.phase == "backoff":
                continue
            if generation.phase != "attempt" or generation.attempts == 0:
                return False  # starting, or writing its End: it moves by itself
            attempts[generation.attempts] += 1
        return not attempts or attempts == self._attempts_waiting_on_time()

    def _attempts_waiting_on_time(self) -> Counter[int] | None:
        """The attempt numbers whose upstream waits on time (None: some
        upstream is busy, so nothing does for sure)."""
        waiting: Counter[int] = Counter()
        receiving: Counter[tuple[int, int]] = Counter()
        for provider in self._relay.hub.router.providers():
            in_flight = getattr(provider, "in_flight", None)
            if in_flight is None:
                continue  # a provider we cannot see into vouches for nothing
            for view in in_flight():
                if isinstance(view, SimInFlight):
                    if view.state == "answering":
                        return None
                    waiting[view.attempt] += 1
                elif isinstance(view, Receiving):
                    receiving[(view.attempt, view.bytes_received)] += 1
        if receiving:
            if self._upstream is None:
                return None
            answers = self._upstream.in_flight()
            if any(answer.state == "answering" for answer in answers):
                return None
            if Counter((answer.attempt, answer.bytes_sent) for answer in answers) != receiving:
                return None  # bytes on their way, a request not there yet, a stale answer
            for (attempt, _), count in receiving.items():
                waiting[attempt] += count
        return waiting

    async def move_once(self) -> bool:
        """Move the clock to its next timer if everything waits on time;
        whether it did."""
        if not self.waiting_on_time():
            return False
        due = self._clock.next_due()
        if due is None:
            return False
        self.moves += 1
        await self._clock.run_for(max(due - self._clock.monotonic(), 0.0) + _LANDING_S)
        return True

    async def run(self) -> None:
        """Keep time until cancelled."""
        while True:
            if not await self.move_once():
                await asyncio.sleep(self._poll_s)


@contextlib.asynccontextmanager
async def keeping_time(
    clock: ManualClock, relay: RelayServer, upstream: MockUpstream | None = None
) -> AsyncIterator[TimeKeeper]:
    """A `TimeKeeper` running for the duration of the block."""
    keeper = TimeKeeper(clock, relay, upstream)
    task = asyncio.create_task(keeper.run(), name="time keeper")
    try:
        yield keeper
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
