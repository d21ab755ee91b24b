"""The injected clocks: ManualClock timers, sleeps and deadline scopes move
only with the test; SystemClock keeps the same contract on real time."""

from __future__ import annotations

import asyncio

import pytest

from tokenrelay_server.core.clock import ManualClock, SystemClock


def test_advance_runs_due_timers_in_order_at_their_time():
    clock = ManualClock(start=0.0)
    seen: list[tuple[str, float]] = []
    clock.call_later(2.0, lambda: seen.append(("b", clock.monotonic())))
    clock.call_later(1.0, lambda: seen.append(("a", clock.monotonic())))
    clock.call_later(5.0, lambda: seen.append(("late", clock.monotonic())))
    clock.advance(3.0)
    assert seen == [("a", 1.0), ("b", 2.0)]
    assert clock.monotonic() == 3.0


def test_cancelled_timer_never_runs():
    clock = ManualClock(start=0.0)
    seen: list[int] = []
    timer = clock.call_later(1.0, lambda: seen.append(1))
    timer.cancel()
    clock.advance(10.0)
    assert seen == [] and clock.pending == 0


async def test_sleep_returns_only_when_the_clock_passes_it():
    clock = ManualClock(start=0.0)
    sleeper = asyncio.create_task(clock.sleep(5.0))
    await clock.run_for(4.9)
    assert not sleeper.done()
    await clock.run_for(0.1)
    assert sleeper.done()


async def test_run_for_lets_a_periodic_loop_tick_every_period():
    clock = ManualClock(start=0.0)
    ticks: list[float] = []

    async def every_second() -> None:
        while True:
            await clock.sleep(1.0)
            ticks.append(clock.monotonic())

    task = asyncio.create_task(every_second())
    await clock.run_for(5.0)
    task.cancel()
    assert ticks == [1.0, 2.0, 3.0, 4.0, 5.0]


async def test_deadline_raises_timeout_when_its_time_passes():
    clock = ManualClock(start=0.0)
    started = asyncio.Event()

    async def guarded() -> str:
        try:
            async with clock.deadline(3.0):
                started.set()
                await asyncio.Event().wait()
        except TimeoutError:
            return "timed out"
        return "finished"

    task = asyncio.create_task(guarded())
    await started.wait()
    await clock.run_for(2.9)
    assert not task.done()
    await clock.run_for(0.1)
    assert await task == "timed out"


async def test_deadline_expire_stops_the_block_at_once():
    clock = ManualClock(start=0.0)
    scopes = []

    async def guarded() -> bool:
        try:
            async with clock.deadline(None) as scope:
                scopes.append(scope)
                await asyncio.Event().wait()
        except TimeoutError:
            return scope.expired
        return False

    task = asyncio.create_task(guarded())
    await clock.run_for(0)
    scopes[0].expire()
    assert await task is True


async def test_deadline_move_pushes_the_expiry_back():
    clock = ManualClock(start=0.0)

    async def guarded() -> float:
        async with clock.deadline(1.0) as scope:
            await clock.sleep(0.5)
            scope.move(2.0)  # now expires at 2.5
            await asyncio.Event().wait()
        return clock.monotonic()

    task = asyncio.create_task(guarded())
    await clock.run_for(2.4)
    assert not task.done()
    await clock.run_for(0.1)
    with pytest.raises(TimeoutError):
        await task


async def test_a_deadline_that_is_left_leaves_no_timer_behind():
    clock = ManualClock(start=0.0)
    async with clock.deadline(10.0):
        pass
    assert clock.pending == 0


async def test_system_clock_deadline_expires_on_loop_time():
    clock = SystemClock()
    with pytest.raises(TimeoutError):
        async with clock.deadline(0.0):
            await asyncio.Event().wait()


async def test_a_timer_due_now_runs_at_the_next_loop_step_without_moving_time():
    clock = ManualClock(start=0.0)
    fired = asyncio.Event()
    clock.call_later(0, fired.set)
    await asyncio.wait_for(fired.wait(), timeout=5)
    assert clock.monotonic() == 0.0
