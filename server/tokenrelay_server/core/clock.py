"""Injected time.

Everything in the gateway that waits or measures time takes a `Clock`: the
engine's timers (first-token and stall watchdogs, the detach grace, the
caller's deadline, drain, lease renewal), the sim's pacing, the breaker, the
retry budget, token expiry. Production uses `SystemClock` (the event loop's
time); tests use `ManualClock`, whose time moves only when the test moves it
(like trio's `MockClock(autojump_threshold=0)`), so a 60 s grace period or a
30 s stall timeout is crossed in microseconds and never depends on how fast
the machine is.

A clock offers three ways to wait, and nothing else in the engine may wait
on time:

- `await clock.sleep(s)`;
- `clock.call_later(s, callback)` → a `Timer` with `cancel()`;
- `async with clock.deadline(s) as scope:` → a `Deadline` scope that raises
  `TimeoutError` when its time is up or when `expire()` is called on it (a
  stop from outside). `scope.move(s)` moves it; `None` means no limit.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None:
        """Do not run the callback (a no-op once it ran)."""
        ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (for token expiry and retention)."""
        ...

    async def sleep(self, seconds: float) -> None: ...

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        """Run `callback` (a plain function) once `seconds` have passed."""
        ...

    def deadline(self, seconds: float | None) -> AbstractAsyncContextManager[Deadline]:
        """A scope that raises TimeoutError after `seconds` (None: only when expired)."""
        ...


class Deadline:
    """The handle of a `clock.deadline()` scope.

    Built on an `asyncio.Timeout` whose own deadline is never a time: the
    scope is expired by a `Timer` of the clock (or by `expire()`), which
    reschedules the asyncio scope to "now" on the loop, so the cancellation
    lands at the next step of the task, as with `asyncio.timeout`."""

    def __init__(self, clock: Clock, scope: asyncio.Timeout) -> None:
        self._clock = clock
        self._scope = scope
        self._timer: Timer | None = None
        self.expired = False  # the scope was expired (by time or by expire())
        self.when: float | None = None  # monotonic time it expires, on the clock

    def move(self, seconds: float | None) -> None:
        """Expire `seconds` from now (None: no time limit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.expired:
            return
        if seconds is None:
            self.when = None
            return
        self.when = self._clock.monotonic() + max(seconds, 0.0)
        self._timer = self._clock.call_later(max(seconds, 0.0), self.expire)

    def expire(self) -> None:
        """End the scope now: the block it guards gets TimeoutError."""
        if self.expired:
            return
        self.expired = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._scope.expired():
            return
        try:
            self._scope.reschedule(asyncio.get_running_loop().time())
        except RuntimeError:
            # The scope's block already left (asyncio refuses to reschedule a
            # finished scope): nothing left to interrupt.
            pass

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


@asynccontextmanager
async def deadline_scope(clock: Clock, seconds: float | None) -> AsyncIterator[Deadline]:
    async with asyncio.timeout(None) as scope:
        handle = Deadline(clock, scope)
        handle.move(seconds)
        try:
            yield handle
        finally:
            handle._close()


class SystemClock:
    """The real clock: the event loop's time for timers, time.time() for wall."""

    def monotonic(self) -> float:
        # The clock asyncio's own loop.time() reads, without looking the loop
        # up (this is called per token).
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        return asyncio.get_running_loop().call_later(max(seconds, 0.0), callback)

    def deadline(self, seconds: float | None) -> AbstractAsyncContextManager[Deadline]:
        return deadline_scope(self, seconds)


class _ManualTimer:
    __slots__ = ("callback", "cancelled", "due")

    def __init__(self, due: float, callback: Callable[[], None]) -> None:
        self.due = due
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that only moves when told to.

    `advance(s)` moves time forward and runs every timer that falls due, in
    order of due time, with the clock reading that timer's time while its
    callback runs. `await run_for(s)` does the same but lets the event loop
    run between timers, so a task woken by one timer can set the next (a
    periodic loop, a stall timer re-armed by a token) and see it fire within
    the same span: use it whenever tasks react to time.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall_start - start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_later(seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Timer:
        if seconds <= 0:
            # Due now: it runs at the loop's next step, as on the system
            # clock, not only when the test next moves time (a detach grace
            # of 0 s stops the generation at once).
            try:
                return asyncio.get_running_loop().call_soon(callback)
            except RuntimeError:
                pass  # no loop: a timer that the next advance runs
        timer = _ManualTimer(self._now + max(seconds, 0.0), callback)
        heapq.heappush(self._timers, (timer.due, next(self._order), timer))
        return timer

    def deadline(self, seconds: float | None) -> AbstractAsyncContextManager[Deadline]:
        return deadline_scope(self, seconds)

    @property
    def pending(self) -> int:
        """Timers that have not run and were not cancelled."""
        return sum(1 for _, _, timer in self._timers if not timer.cancelled)

    def next_due(self) -> float | None:
        """When the next live timer falls due (None: no timer)."""
        self._drop_cancelled()
        return self._timers[0][0] if self._timers else None

    def advance(self, seconds: float) -> None:
        """Move time forward by `seconds`, running due timers in order."""
        target = self._now + max(seconds, 0.0)
        while (timer := self._pop_due(target)) is not None:
            self._now = max(self._now, timer.due)
            timer.callback()
        self._now = target

    async def run_for(self, seconds: float, *, settle: int = 20) -> None:
        """Move time forward by `seconds`, one due timer at a time, letting the
        loop run `settle` steps after each (and before the first)."""
        target = self._now + max(seconds, 0.0)
        await _settle(settle)
        while (timer := self._pop_due(target)) is not None:
            self._now = max(self._now, timer.due)
            timer.callback()
            await _settle(settle)
        self._now = target
        await _settle(settle)

    def _pop_due(self, target: float) -> _ManualTimer | None:
        self._drop_cancelled()
        if self._timers and self._timers[0][0] <= target:
            return heapq.heappop(self._timers)[2]
        return None

    def _drop_cancelled(self) -> None:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)


async def _settle(steps: int) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)
