"""Load shedding (issue 10): over max_streams, over the memory limit or while
the event loop lags, a new stream gets RESOURCE_EXHAUSTED with a
google.rpc.RetryInfo and `retry-after-ms`, and the streams admitted are
untouched. The lag monitor runs on an injected clock: nothing here waits on
real time."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    assert_contiguous,
    assert_shed,
    chunks_of,
    end_of,
    eventually,
    run_to_end,
    sha256,
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.timekeeper import keeping_time
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.limits import LagSettings
from tokenrelay_server.core.model import Message
from tokenrelay_server.engine.loop_lag import LoopLagMonitor
from tokenrelay_server.upstream.sim import SimAnswer

# --- the lag monitor, on a manual clock ------------------------------------------------------


def monitor(clock: ManualClock, **settings: float) -> LoopLagMonitor:
    return LoopLagMonitor(clock, LagSettings(**settings))


def test_no_samples_is_no_lag() -> None:
    lag = monitor(ManualClock())
    assert (lag.lag_s(), lag.overloaded) == (0.0, False)


@pytest.mark.parametrize(
    ("lags_ms", "p99_ms", "overloaded"),
    [
        pytest.param([1] * 99 + [200], 1, False, id="one late wake-up in a hundred is the 1 %"),
        pytest.param([1] * 98 + [200, 200], 200, True, id="two in a hundred are past the p99"),
        pytest.param([1] * 9 + [60], 1, False, id="one late sample of the window's 100 is not"),
        pytest.param([60] * 10, 60, True, id="a loop that wakes 10 times a second, late, is"),
        pytest.param([50] * 100, 50, False, id="exactly at the threshold is not over it"),
        pytest.param([51] * 100, 51, True, id="just over the threshold is over it"),
    ],
)
def test_the_p99_of_the_window_decides(lags_ms: list[int], p99_ms: int, overloaded: bool) -> None:
    clock = ManualClock()
    # 10 ms samples over 1 s: the window should hold 100.
    lag = monitor(clock, threshold_s=0.050, window_s=1.0, interval_s=0.010)
    for value in lags_ms:
        lag.record(value / 1000)
        clock.advance(0.001)
    assert lag.lag_s() == pytest.approx(p99_ms / 1000)
    assert lag.overloaded is overloaded
    assert lag.max_lag_s() == pytest.approx(max(lags_ms) / 1000)


def test_a_lag_is_forgotten_once_the_window_has_passed_it() -> None:
    clock = ManualClock()
    lag = monitor(clock, threshold_s=0.050, window_s=1.0, interval_s=0.010)
    for _ in range(5):
        lag.record(0.300)
    clock.advance(0.999)
    assert lag.overloaded
    clock.advance(0.002)
    assert not lag.overloaded
    assert lag.samples == 0


async def test_the_monitor_measures_how_late_its_wake_ups_come() -> None:
    clock = ManualClock()
    lag = monitor(clock, threshold_s=0.050, window_s=1.0, interval_s=0.010)
    task = asyncio.create_task(lag.run())
    try:
        # Time moving timer by timer: every wake-up on time.
        await clock.run_for(0.5)
        assert lag.samples >= 45
        assert (lag.max_lag_s(), lag.overloaded) == (0.0, False)
        # The loop stuck for 300 ms: the wake-up due 10 ms in runs 300 ms in.
        clock.advance(0.300)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert 0.290 <= lag.max_lag_s() < 0.300  # the wake-up was due within 10 ms
        assert not lag.overloaded  # one stall is one sample
        # A second of timely wake-ups later, the stall has left the window.
        await clock.run_for(1.1)
        assert lag.max_lag_s() == 0.0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_one_stall_in_a_timely_second_sheds_nothing_but_a_loop_always_late_does() -> None:
    clock = ManualClock()
    lag = LoopLagMonitor(clock)  # the server's defaults: 5 ms samples, p99 over 1 s, 50 ms
    task = asyncio.create_task(lag.run())

    async def late_wake_up(seconds: float) -> None:
        clock.advance(seconds)  # the loop was stuck: the due wake-up runs this late
        for _ in range(5):
            await asyncio.sleep(0)

    try:
        await asyncio.sleep(0)  # the monitor sleeps on the clock
        await late_wake_up(0.300)  # at the start of the process: the only sample
        assert (lag.samples, lag.overloaded) == (1, False)
        await clock.run_for(1.0)
        await late_wake_up(0.300)  # a collection, a first import
        assert lag.samples > 100
        assert not lag.overloaded
        # Saturated: every wake-up comes 55 ms late, for a second.
        for _ in range(20):
            await late_wake_up(0.060)
        assert lag.overloaded
        assert lag.lag_s() == pytest.approx(0.055)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --- refusals over a real server --------------------------------------------------------------


async def refusal_of(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
    """A start that must be refused: the call's error."""
    call = RawCall(channel, start_request(max_tokens=5, metadata=PACED))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.events_until()
    finally:
        call.cancel()
    return caught.value


async def test_at_two_and_a_half_times_capacity_every_refusal_is_clean_and_admitted_ones_exact(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    capacity, offered, tokens = 8, 20, 6
    relay = await relay_factory(clock=clock, max_streams=capacity, shed_retry_after_s=2.5, **QUIET)
    prompts = [f"prompt {n}" for n in range(offered)]
    async with grpc.aio.insecure_channel(relay.address) as channel:
        calls = [
            RawCall(channel, start_request(max_tokens=tokens, metadata=PACED, prompt=prompt))
            for prompt in prompts
        ]

        async def first_outcome(call: RawCall) -> pb.StreamEvent | grpc.aio.AioRpcError:
            try:
                return await call.next_event()
            except grpc.aio.AioRpcError as error:
                return error

        # All at once, on a clock nobody moves: the admitted streams wait for
        # their first token while the others are decided.
        firsts = await asyncio.gather(*(first_outcome(call) for call in calls))
        refused = [r for r in firsts if isinstance(r, grpc.aio.AioRpcError)]
        admitted = [
            (prompt, call, first)
            for prompt, call, first in zip(prompts, calls, firsts, strict=True)
            if not isinstance(first, grpc.aio.AioRpcError)
        ]
        assert (len(admitted), len(refused)) == (capacity, offered - capacity)
        for error in refused:  # never INTERNAL or UNKNOWN
            assert_shed(error, "MAX_STREAMS", 2.5)
            assert "max_streams" in (error.details() or "")
        assert relay.hub.running_generations == capacity
        async with keeping_time(clock, relay):  # the paced streams move when all wait on time
            rests = await asyncio.gather(*(call.events_until() for _, call, _ in admitted))
        for call in calls:
            call.cancel()
        for (prompt, _, first), rest in zip(admitted, rests, strict=True):
            events = [first, *rest]
            assert events[0].HasField("started")
            end = end_of(events)
            assert (end.partial, end.total_seq) == (False, tokens)
            assert_contiguous(chunks_of(events))
            assert text_of(events) == SimAnswer((Message("user", prompt),)).text(tokens)
            assert end.text_sha256 == sha256(text_of(events))
        # The slots are free again: a new stream is admitted.
        await eventually(lambda: relay.hub.running_generations == 0)
        async with keeping_time(clock, relay):
            events = await run_to_end(channel, start_request(max_tokens=2, metadata=PACED))
        assert end_of(events).total_seq == 2


async def test_a_start_while_the_loop_lags_is_refused_until_the_lag_passes(
    relay_factory: RelayFactory,
) -> None:
    lag_clock = ManualClock()
    relay = await relay_factory(lag_clock=lag_clock, max_loop_lag_ms=50, loop_lag_window_s=1.0)
    lag = relay.hub.loop_lag
    assert lag is not None
    async with grpc.aio.insecure_channel(relay.address) as channel:
        for _ in range(10):  # 120 ms late wake-ups, 5 % of the window's 200
            lag.record(0.120)
        error = await refusal_of(channel)
        assert_shed(error, "LOOP_LAG", 1.0)
        assert "120 ms" in (error.details() or "")
        assert relay.hub.running_generations == 0
        # A second of wake-ups on time: the lag has left the window.
        await lag_clock.run_for(1.05)
        assert not lag.overloaded
        events = await run_to_end(channel, start_request(max_tokens=5))
    end = end_of(events)
    assert (end.partial, end.total_seq) == (False, 5)


async def test_over_the_memory_limit_a_start_is_told_when_to_retry(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(max_memory_mb=1)  # any Python process is over 1 MiB
    await eventually(lambda: relay.hub.memory_exceeded is not None)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        assert_shed(await refusal_of(channel), "MEMORY_LIMIT", 1.0)
    assert relay.hub.running_generations == 0


def test_the_default_gateway_sheds_on_a_50_ms_p99_over_a_second() -> None:
    from tokenrelay_server.config.settings import Settings

    settings = Settings()
    assert (settings.max_loop_lag_ms, settings.loop_lag_window_s) == (50.0, 1.0)
    assert settings.shed_retry_after_s == 1.0
