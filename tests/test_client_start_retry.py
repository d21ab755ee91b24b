"""The Python client honours a refused start's advice (issue 13 leftovers):
a start refused with RESOURCE_EXHAUSTED that says when to try again
(google.rpc.RetryInfo, `retry-after-ms`) is sent again after that wait, a
bounded number of times, then raised as `StreamFailed` carrying the wait.

The decision is a pure function (table); the loop runs against a real
gateway that sheds (max_streams reached) or counts a tenant's quota. The
client's `sleep` is a recording fake, so no test waits the advised seconds;
the gateway runs on a ManualClock nobody moves, so the stream that holds the
slot holds it until the test frees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2, status_pb2

from serverkit import (
    ACME_KEY,
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    eventually,
    start_request,
    tenants,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_client import (
    End,
    Event,
    RelayClient,
    Started,
    StreamFailed,
    Throttled,
    reconnect_wait,
    start_retry_wait,
)
from tokenrelay_client.client import advised_wait
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock

PROMPT = [("user", "wait your turn")]
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


class RecordingSleep:
    """Stands in for asyncio.sleep: records each wait, runs `during` (the
    world moving on while the client waits), waits for nothing."""

    def __init__(self, during: Callable[[int], Awaitable[None]] | None = None) -> None:
        self.delays: list[float] = []
        self._during = during

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        if self._during is not None:
            await self._during(len(self.delays))
        await asyncio.sleep(0)


# --- the decision (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "advice", "done", "expected"),
    [
        pytest.param(EXHAUSTED, 2.5, 0, 2.5, id="a shed start waits the advised time"),
        pytest.param(EXHAUSTED, 2.5, 2, 2.5, id="the third retry still waits it"),
        pytest.param(EXHAUSTED, 2.5, 3, None, id="after the budget the refusal is raised"),
        pytest.param(EXHAUSTED, None, 0, None, id="a refusal without advice is raised"),
        pytest.param(EXHAUSTED, 61.0, 0, None, id="a wait past the cap is raised, not slept"),
        pytest.param(EXHAUSTED, 60.0, 0, 60.0, id="a wait at the cap is slept"),
        pytest.param(EXHAUSTED, -1.0, 0, 0.0, id="a negative advice waits nothing"),
        pytest.param(
            grpc.StatusCode.PERMISSION_DENIED, 2.5, 0, None, id="only RESOURCE_EXHAUSTED retries"
        ),
        pytest.param(grpc.StatusCode.UNAVAILABLE, 2.5, 0, None, id="UNAVAILABLE is a reconnect's"),
    ],
)
def test_start_retry_wait_table(
    code: grpc.StatusCode, advice: float | None, done: int, expected: float | None
) -> None:
    wait = start_retry_wait(code, advice, retries_done=done, max_retries=3, max_wait_s=60.0)
    assert wait == expected


@pytest.mark.parametrize(
    ("backoff", "advice", "expected"),
    [
        pytest.param(1.0, None, 1.0, id="no advice: the backoff"),
        pytest.param(1.0, 2.5, 2.5, id="a longer advice is waited (a refused takeover)"),
        pytest.param(4.0, 2.5, 4.0, id="a shorter advice does not cut the backoff"),
        pytest.param(1.0, 90.0, 30.0, id="an advice past the cap waits the cap"),
        pytest.param(1.0, -1.0, 1.0, id="a negative advice is the backoff"),
    ],
)
def test_reconnect_wait_table(backoff: float, advice: float | None, expected: float) -> None:
    assert reconnect_wait(backoff, advice, cap_s=30.0) == expected


def test_no_start_retries_means_the_first_refusal_is_raised() -> None:
    assert start_retry_wait(EXHAUSTED, 1.0, retries_done=0, max_retries=0, max_wait_s=60) is None


def _status_with_retry_info(seconds: float) -> status_pb2.Status:
    delay = Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    status = status_pb2.Status(code=8, message="shed")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="MAX_STREAMS"))
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


@pytest.mark.parametrize(
    ("rich", "trailing", "expected"),
    [
        pytest.param(_status_with_retry_info(2.5), (), 2.5, id="RetryInfo in the details"),
        pytest.param(None, (("retry-after-ms", "1500"),), 1.5, id="retry-after-ms alone"),
        pytest.param(
            _status_with_retry_info(2.5),
            (("retry-after-ms", "9000"),),
            2.5,
            id="RetryInfo wins over retry-after-ms",
        ),
        pytest.param(None, (("retry-after-ms", "soon"),), None, id="an unreadable header is none"),
        pytest.param(None, (("retry-after-ms", "-5"),), None, id="a negative header is none"),
        pytest.param(status_pb2.Status(code=8), (), None, id="details without RetryInfo"),
        pytest.param(None, (), None, id="no advice at all"),
    ],
)
def test_advised_wait_reads_retry_info_then_retry_after_ms(
    rich: status_pb2.Status | None, trailing: tuple[tuple[str, str], ...], expected: float | None
) -> None:
    assert advised_wait(rich, trailing) == expected


def test_the_client_refuses_a_negative_start_retry_budget() -> None:
    with pytest.raises(ValueError, match="start_retries"):
        RelayClient("127.0.0.1:1", start_retries=-1)
    with pytest.raises(ValueError, match="max_start_retry_wait_s"):
        RelayClient("127.0.0.1:1", max_start_retry_wait_s=-1)


# --- over a real gateway that sheds ---------------------------------------------------------


@pytest.fixture
async def full(relay_factory: RelayFactory) -> tuple[RelayServer, ManualClock]:
    """A gateway with room for one stream, advising 2.5 s to whoever comes next."""
    clock = ManualClock()
    relay = await relay_factory(clock=clock, max_streams=1, shed_retry_after_s=2.5, **QUIET)
    return relay, clock


async def holding_the_slot(channel: grpc.aio.Channel) -> RawCall:
    """A paced stream on a clock nobody moves: it holds the only slot."""
    holder = RawCall(channel, start_request(max_tokens=50, metadata=PACED))
    assert (await holder.next_event()).HasField("started")
    return holder


async def test_a_start_shed_until_the_budget_is_spent_raises_with_the_advised_wait(
    full: tuple[RelayServer, ManualClock],
) -> None:
    relay, _ = full
    sleep = RecordingSleep()
    async with grpc.aio.insecure_channel(relay.address) as channel:
        holder = await holding_the_slot(channel)
        events: list[Event] = []
        async with RelayClient(relay.address, sleep=sleep, start_retries=3) as client:
            with pytest.raises(StreamFailed) as caught:
                async for event in client.stream("sim", PROMPT, max_tokens=5):
                    events.append(event)
        holder.cancel()
    assert sleep.delays == [2.5, 2.5, 2.5], "each retry after the advised wait, three of them"
    assert [e.attempt for e in events if isinstance(e, Throttled)] == [1, 2, 3]
    assert all(isinstance(e, Throttled) and e.delay_s == 2.5 for e in events)
    error = caught.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_after_s == 2.5
    assert "max_streams" in error.details
    assert relay.hub.running_generations == 1  # the holder only: no retry was admitted


async def test_a_shed_start_is_admitted_once_a_slot_frees_during_the_wait(
    full: tuple[RelayServer, ManualClock],
) -> None:
    relay, _ = full
    async with grpc.aio.insecure_channel(relay.address) as channel:
        holder = await holding_the_slot(channel)

        async def free_the_slot_on_the_second_wait(wait: int) -> None:
            if wait == 2:
                holder.send(pb.StreamRequest(cancel=pb.Cancel(reason="make room")))
                await eventually(lambda: relay.hub.running_generations == 0)

        sleep = RecordingSleep(free_the_slot_on_the_second_wait)
        async with RelayClient(relay.address, sleep=sleep) as client:
            relay_stream = client.stream("sim", PROMPT, max_tokens=5)
            events = [event async for event in relay_stream]
        holder.cancel()
    assert sleep.delays == [2.5, 2.5]
    assert [type(e) for e in events[:3]] == [Throttled, Throttled, Started]
    started = events[2]
    assert isinstance(started, Started) and not started.resumed  # one stream, started once
    end = events[-1]
    assert isinstance(end, End) and end.verified and end.total_seq == 5
    assert relay_stream.reconnects == 0  # a refusal is not a broken connection


async def refused_while_held(
    relay: RelayServer, sleep: RecordingSleep, **options: Any
) -> StreamFailed:
    """What a client with `options` raises for a start while another call
    holds the only slot."""
    async with grpc.aio.insecure_channel(relay.address) as channel:
        holder = await holding_the_slot(channel)
        async with RelayClient(relay.address, sleep=sleep, **options) as client:
            with pytest.raises(StreamFailed) as caught:
                await client.generate("sim", PROMPT, max_tokens=5)
        holder.cancel()
    return caught.value


async def test_no_start_retries_raises_the_first_refusal_with_its_advice(
    full: tuple[RelayServer, ManualClock],
) -> None:
    sleep = RecordingSleep()
    refusal = await refused_while_held(full[0], sleep, start_retries=0)
    assert sleep.delays == []
    assert (refusal.code, refusal.retry_after_s) == (EXHAUSTED, 2.5)


async def test_an_advised_wait_past_the_cap_is_raised_at_once(
    full: tuple[RelayServer, ManualClock],
) -> None:
    sleep = RecordingSleep()
    refusal = await refused_while_held(full[0], sleep, max_start_retry_wait_s=1.0)
    assert sleep.delays == []
    assert refusal.retry_after_s == 2.5


async def test_a_tenant_over_its_quota_is_retried_after_the_retry_info(
    relay_factory: RelayFactory,
) -> None:
    # A quota refusal carries RetryInfo only (no retry-after-ms): 1 s for a slot.
    relay = await relay_factory(
        clock=ManualClock(), auth=tenants(acme={"max_concurrent_streams": 1}), **QUIET
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        holder = RawCall(channel, start_request(max_tokens=50, metadata=PACED), key=ACME_KEY)
        assert (await holder.next_event()).HasField("started")

        async def free_the_slot(wait: int) -> None:
            holder.send(pb.StreamRequest(cancel=pb.Cancel(reason="make room")))
            await eventually(lambda: relay.hub.running_generations == 0)

        sleep = RecordingSleep(free_the_slot)
        async with RelayClient(relay.address, sleep=sleep, api_key=ACME_KEY) as client:
            result = await client.generate("sim", PROMPT, max_tokens=5)
        holder.cancel()
    assert sleep.delays == [1.0]
    assert result.chunks == 5 and not result.partial
