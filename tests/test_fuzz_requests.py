"""Fuzzing the edge: whatever a client sends, the answer is never INTERNAL or
UNKNOWN, every refusal says what is wrong, and the server is unchanged after.

The cases are the fuzzer's (tokenrelay_devtools/fuzz/generate.py: requests
walked from `StreamRequest`'s descriptor, 1-4 frames a call, some of them
mutated or random bytes, keys and resume tokens good and bad), with
hypothesis making the choices (`HypothesisDraw`), so a failing example is
printed with every choice labelled. bench/fuzz.py and tests/fuzz/ draw the
same cases from a seeded random source against a gateway process; this test
runs them in process, one server on a real port, and after every call
checks more than they can: no generation running, no call attached, no task
beyond those it had (by coroutine), health SERVING, nothing logged as an
error, and a clean stream still whole.

Valid streams are kept short (a sim pace of at most a few milliseconds, no
Retry-After waits): the point is the edge, not generation.

The gateway runs on a ManualClock with short timers: a time keeper moves it
only when every stream provably waits on time (a pace, a stalled answer), and
a timer set for "now" (the detach grace of 0) fires without time moving, as
it would at once on a real clock. So no example waits on the wall clock, and
what happens in one (a stall timeout, an expired token) never depends on how
fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from serverkit import SECRET, RelayFactory, eventually, run_to_end, start_request
from tokenrelay_devtools.fuzz.generate import Material, fuzz_case
from tokenrelay_devtools.fuzz.run import play, problems
from tokenrelay_devtools.timekeeper import POLL_S, TimeKeeper
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock

MAX_PROMPT_BYTES = 64 << 10
HANG_GUARD_S = 20.0  # a deadline only against hanging; nothing asserts how long a call took

T = TypeVar("T")


class HypothesisDraw:
    """The fuzzer's `Draw` protocol on hypothesis' `st.data()`."""

    def __init__(self, data: st.DataObject) -> None:
        self._data = data

    def integer(self, low: int, high: int) -> int:
        return self._data.draw(st.integers(low, high))

    def roll(self, sides: int) -> int:
        return self._data.draw(st.integers(0, sides - 1))

    def choice(self, options: Sequence[T]) -> T:
        return self._data.draw(st.sampled_from(options))

    def binary(self, max_size: int) -> bytes:
        return self._data.draw(st.binary(max_size=max_size))

    def text(self, max_size: int) -> str:
        return self._data.draw(st.text(max_size=max_size))

    def floating(self) -> float:
        return self._data.draw(st.floats(width=32) | st.sampled_from([0.0, 1.0, 2.0, 2.0001]))


class ErrorRecords(logging.Handler):
    """Every ERROR the gateway logs: an internal error may also happen where
    no status shows it (a request reader, a generation)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_records() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    logger = logging.getLogger("tokenrelay_server")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def live_tasks() -> Counter[str]:
    """Running tasks by coroutine, pytest's own (the test, one per example,
    and the fixture wrappers) aside."""
    names = (t.get_coro().__qualname__ for t in asyncio.all_tasks() if not t.done())
    return Counter(name for name in names if not name.startswith(("test_", "_wrap_")))


async def keep_time(clock: ManualClock, keeper: TimeKeeper) -> None:
    """Fire the timers due now (moving time by nothing), else let the keeper
    move the clock when every stream waits on time; one task, so the clock
    is never moved by two at once."""
    while True:
        due = clock.next_due()
        if due is not None and due <= clock.monotonic():
            await clock.run_for(0)
        elif not await keeper.move_once():
            await asyncio.sleep(POLL_S)


@pytest.fixture
async def fuzz_relay(relay_factory: RelayFactory) -> AsyncIterator[RelayServer]:
    clock = ManualClock()
    relay = await relay_factory(
        clock=clock,
        detach_grace_s=0,  # a call we stop reading takes its generation with it
        max_prompt_bytes=MAX_PROMPT_BYTES,
        backoff_base_s=0,
        backoff_cap_s=0,
        # On the manual clock: a stall costs the keeper one move, and the
        # caller's deadline (HANG_GUARD_S, on the same clock) stays far away.
        stall_timeout_s=0.05,
        first_token_timeout_s=0.5,
    )
    keeper = asyncio.create_task(keep_time(clock, TimeKeeper(clock, relay)), name="fuzz clock")
    yield relay
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper


@pytest.fixture
async def fuzz_state(fuzz_relay: RelayServer) -> AsyncIterator[dict[str, Any]]:
    """One channel for every example, real tokens to resume with, and the
    task census before the first example."""
    channel = grpc.aio.insecure_channel(fuzz_relay.address)
    await channel.channel_ready()
    sync_channel = grpc.insecure_channel(fuzz_relay.address)
    baseline = live_tasks()  # the server and the channel, no call open
    finished = await run_to_end(channel, start_request(max_tokens=3))
    # Tampered, foreign and forged tokens (a stream that does not exist, an
    # expired one: the secret is known) are made from this one.
    material = Material(tokens=[finished[0].started.resume_token], secret=SECRET)
    await eventually(lambda: fuzz_relay.hub.running_generations == 0)
    yield {"channel": channel, "sync": sync_channel, "material": material, "baseline": baseline}
    sync_channel.close()
    await channel.close()


async def assert_unchanged(relay: RelayServer, channel: grpc.aio.Channel, baseline) -> None:
    """Nothing of the call is left: no generation, no attached call, no task
    beyond those the server had before, health still SERVING, and a clean
    stream still comes out whole."""
    try:
        await eventually(
            lambda: (
                relay.hub.running_generations == 0
                and relay.hub.attached_sessions == 0
                and live_tasks() == baseline
            ),
            within_s=5.0,
        )
    except TimeoutError:
        pytest.fail(
            f"left behind: {relay.hub.running_generations} generation(s), "
            f"{relay.hub.attached_sessions} call(s), tasks {live_tasks() - baseline}"
        )
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tokenrelay.v1.Relay"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    events = await run_to_end(channel, start_request(max_tokens=3))
    assert events[-1].end.total_seq == 3 and not events[-1].end.partial
    await eventually(lambda: relay.hub.running_generations == 0)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    # No shrinking: each step replays calls against the server, which takes
    # minutes; the failing example is printed as found (frames are labelled).
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one server for every example, on purpose
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_fuzzed_requests_never_get_internal_or_unknown_and_change_nothing(
    fuzz_relay: RelayServer, fuzz_state: dict[str, Any], error_records: ErrorRecords, data
) -> None:
    channel = fuzz_state["channel"]
    case = fuzz_case(HypothesisDraw(data), fuzz_state["material"])
    outcome = await asyncio.to_thread(play, fuzz_state["sync"], case, hang_guard_s=HANG_GUARD_S)
    assert not problems(case, outcome, expect_auth=False), (outcome, case.describe())
    await assert_unchanged(fuzz_relay, channel, fuzz_state["baseline"])
    assert not error_records.records, [r.getMessage() for r in error_records.records]
