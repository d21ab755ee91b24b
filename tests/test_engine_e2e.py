"""Engine defects of issue 8 seen from outside, over a real port, on a
ManualClock: the gateway's timers move only when the test moves them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from serverkit import (
    RawCall,
    RelayFactory,
    chunks_of,
    end_of,
    eventually,
    run_to_end,
    start_request,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.breaker import BreakerState, CircuitBreaker
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.engine.resources import resident_bytes

# Timeouts far beyond any clock move of these tests, so only what a test
# means to happen happens.
QUIET = {"stall_timeout_s": 10_000, "first_token_timeout_s": 10_000, "detach_grace_s": 60}


def sim_breaker(relay: RelayServer) -> CircuitBreaker:
    return relay.hub.recovery.health.breaker(relay.hub.router.resolve("sim")[0])


@pytest.fixture
async def clock() -> ManualClock:
    return ManualClock()


async def open_the_breaker(relay: RelayServer, channel: grpc.aio.Channel) -> None:
    events = await run_to_end(
        channel, start_request(metadata={"sim.faults": "http:500"}, max_retries=0)
    )
    assert end_of(events).error.code == "HTTP_500"
    assert sim_breaker(relay).state is BreakerState.OPEN


async def end_by_cancel(relay: RelayServer, call: RawCall, clock: ManualClock) -> None:
    call.send(pb.StreamRequest(cancel=pb.Cancel(reason="stop")))
    assert end_of(await call.events_until()).error.code == "CANCELLED"


async def end_by_grace(relay: RelayServer, call: RawCall, clock: ManualClock) -> None:
    call.cancel()  # the client went away
    await eventually(lambda: relay.hub.attached_sessions == 0)
    await clock.run_for(60)


async def end_by_memory_limit(relay: RelayServer, call: RawCall, clock: ManualClock) -> None:
    relay.hub.max_memory_bytes = 1
    relay.hub.check_memory(resident_bytes())
    assert end_of(await call.events_until()).error.code == "MEMORY_LIMIT"
    relay.hub.check_memory(0)


@pytest.mark.parametrize(
    "end_the_probe",
    [end_by_cancel, end_by_grace, end_by_memory_limit],
    ids=[
        "a cancelled probe frees the breaker",
        "a probe whose client left past the grace frees the breaker",
        "a probe ended by the memory limit frees the breaker",
    ],
)
async def test_a_half_open_probe_that_ends_early_does_not_block_the_provider(
    relay_factory: RelayFactory, clock: ManualClock, end_the_probe
) -> None:
    relay = await relay_factory(
        clock=clock, breaker_failure_threshold=1, breaker_cooldown_s=1, **QUIET
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        await open_the_breaker(relay, channel)
        await clock.run_for(1)  # the cool-down
        # A slow stream: the sim waits 1 s of the manual clock per token.
        probe = RawCall(
            channel, start_request(max_tokens=100_000, metadata={"sim.pace_ms": "1000"})
        )
        await probe.next_event()
        await eventually(lambda: sim_breaker(relay).state is BreakerState.PROBING)
        await end_the_probe(relay, probe, clock)
        probe.cancel()
        await eventually(lambda: relay.hub.running_generations == 0)
        assert sim_breaker(relay).state is BreakerState.HALF_OPEN
        after = await run_to_end(channel, start_request(max_tokens=5))
    assert not end_of(after).partial
    assert sim_breaker(relay).state is BreakerState.CLOSED


async def test_a_probe_cut_by_the_callers_deadline_frees_the_breaker(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(
        clock=clock, breaker_failure_threshold=1, breaker_cooldown_s=1, **QUIET
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        await open_the_breaker(relay, channel)
        await clock.run_for(1)

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield start_request(max_tokens=100_000, metadata={"sim.pace_ms": "1000"})
            await asyncio.Event().wait()

        # A real deadline far away (gRPC's own timer); the generation takes it
        # as its total deadline on the manual clock.
        call = pbg.RelayStub(channel).Stream(requests(), timeout=600)
        events = []
        reader = asyncio.create_task(_read_all(call, events))
        await eventually(lambda: sim_breaker(relay).state is BreakerState.PROBING)
        await clock.run_for(601)  # gRPC may round the deadline up a little
        await reader
        assert end_of(events).error.code == "DEADLINE_EXCEEDED"
        await eventually(lambda: relay.hub.running_generations == 0)
        assert sim_breaker(relay).state is BreakerState.HALF_OPEN
        after = await run_to_end(channel, start_request(max_tokens=5))
    assert not end_of(after).partial


async def _read_all(call, events: list[pb.StreamEvent]) -> None:
    async for event in call:
        events.append(event)
        if event.HasField("end"):
            call.cancel()
            return


async def test_tokens_and_chunks_are_counted_apart(relay_factory: RelayFactory) -> None:
    # Issue 8, defect 3: two tokens per delta; a checkpoint every 2 chunks.
    # The provider's usage says how many tokens a delta holds; a Checkpoint
    # counts with what the gateway knows when it is sent (learnt from the
    # provider's earlier answers), the End with this answer's own usage.
    relay = await relay_factory()
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first = await run_to_end(
            channel, start_request(max_tokens=12, metadata={"sim.tokens_per_chunk": "2"})
        )
        assert end_of(first).usage.completion_tokens == 12
        events = await run_to_end(
            channel,
            start_request(
                max_tokens=12, metadata={"sim.tokens_per_chunk": "2"}, checkpoint_interval=2
            ),
        )
    end = end_of(events)
    assert end.total_seq == 6 == len(chunks_of(events))
    assert end.usage.completion_tokens == 12
    checkpoints = [e.checkpoint for e in events if e.HasField("checkpoint")]
    assert [(c.seq, c.token_count) for c in checkpoints] == [(2, 4), (4, 8), (6, 12)]
    assert relay is not None


async def test_a_continued_answer_keeps_the_token_budget_in_tokens(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(backoff_base_s=0.0)
    meta = {"sim.tokens_per_chunk": "2", "sim.seed": "budget"}
    async with grpc.aio.insecure_channel(relay.address) as channel:
        clean = await run_to_end(channel, start_request(max_tokens=12, metadata=meta))
        broken = await run_to_end(
            channel,
            start_request(max_tokens=12, metadata={**meta, "sim.faults": "reset@2"}),
        )
    # The gateway learnt two tokens per delta from the clean answer, so the
    # continuation asks for the 8 tokens that are left, not 10.
    assert "".join(c.text for c in chunks_of(broken)) == "".join(c.text for c in chunks_of(clean))
    assert end_of(broken).usage.completion_tokens == 12
    assert relay is not None
