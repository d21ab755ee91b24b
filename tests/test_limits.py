"""Resource limits and deadlines end streams typed, and refuse new ones cleanly."""

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
    chunks_of,
    end_of,
    eventually,
    generation_of,
    produce,
    resume_request,
    run_to_end,
    sha256,
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.engine.resources import resident_bytes


def test_resident_memory_is_readable_here() -> None:
    resident = resident_bytes()
    assert resident is not None and resident > 1 << 20


async def test_over_the_memory_limit_new_streams_get_resource_exhausted(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(max_memory_mb=1)  # any Python process is over 1 MiB
    await eventually(lambda: relay.hub.memory_exceeded is not None)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run_to_end(channel, start_request())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "memory limit" in caught.value.details()
    assert relay.hub.running_generations == 0


async def test_passing_the_memory_limit_ends_running_streams_as_typed_partials(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=100_000, metadata=PACED))
        started = await call.next_event()
        await produce(clock, relay, generation_of(relay, started), 3)
        seen = [started, *await call.events_until(lambda e: e.chunk.seq == 3)]
        relay.hub.max_memory_bytes = 1
        relay.hub.check_memory(resident_bytes())
        rest = await call.events_until()
        call.cancel()
    events = seen + rest
    end = end_of(events)
    assert end.partial
    assert (end.error.type, end.error.code) == (pb.ERROR_TYPE_RESOURCE, "MEMORY_LIMIT")
    assert_contiguous(chunks_of(events))
    assert end.text_sha256 == sha256(text_of(events))
    relay.hub.check_memory(0)  # back under the limit: streams are taken again
    assert relay.hub.memory_exceeded is None


async def test_the_callers_deadline_is_the_generations_total_deadline(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, **QUIET)
    # A token a minute of the manual clock.
    request = start_request(max_tokens=100_000, metadata={"sim.pace_ms": "60000"})

    async def requests():
        yield request
        await asyncio.Event().wait()

    async with grpc.aio.insecure_channel(relay.address) as channel:
        # A real gRPC deadline far away; the generation takes it as its total
        # deadline on the manual clock, which the test moves past it.
        call = pbg.RelayStub(channel).Stream(requests(), timeout=600)
        started = await call.read()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 1)  # 60 s in, the attempt runs
        await clock.run_for(539)
        assert not generation.finished.is_set()  # 599 s
        await clock.run_for(2)  # 601 s: gRPC may round the deadline up a little
        seen: list[pb.StreamEvent] = [started]
        while (event := await call.read()) is not grpc.aio.EOF:
            seen.append(event)
        end = end_of(seen)
        assert end.partial
        assert (end.error.type, end.error.code) == (pb.ERROR_TYPE_TIMEOUT, "DEADLINE_EXCEEDED")
        assert end.total_seq == len(chunks_of(seen)) < 100_000
        last = max(e.chunk.seq for e in seen if e.HasField("chunk"))
        rest = await run_to_end(channel, resume_request(seen[0].started.resume_token, last))
    assert end_of(rest) == end
