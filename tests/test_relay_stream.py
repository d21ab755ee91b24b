"""The Relay.Stream contract over a real server on a real port (memory store).

Tests that need a stream still running, or a timer of the gateway, run it on
a ManualClock: a paced stream makes its chunks only when the test lets it
(`produce`), and grace, stall and drain pass when the test moves the clock."""

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
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.model import Message
from tokenrelay_server.upstream.sim import SimAnswer


@pytest.fixture
async def paced(relay_factory: RelayFactory, clock: ManualClock) -> RelayServer:
    """A gateway on the manual clock, its timers out of reach."""
    return await relay_factory(clock=clock, **QUIET)


def seq_is(seq: int):
    return lambda e: e.HasField("chunk") and e.chunk.seq == seq


async def test_clean_stream_has_contiguous_seq_and_matching_digest(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=30))
    assert events[0].HasField("started")
    assert not events[0].started.resumed
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    assert len(chunks) == 30
    end = end_of(events)
    assert end.finish_reason == "stop"
    assert not end.partial
    assert end.total_seq == 30
    assert end.text_sha256 == sha256(text_of(events))
    assert {c.provider for c in chunks} == {"sim"} and {c.attempt for c in chunks} == {1}


async def test_text_is_the_simulators_deterministic_answer(channel) -> None:
    events = await run_to_end(channel, start_request(prompt="hello", max_tokens=25))
    expected = SimAnswer((Message("user", "hello"),)).text(25)
    assert text_of(events) == expected


async def test_checkpoints_follow_every_interval_with_a_usable_token(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=25, checkpoint_interval=4))
    checkpoints = [e.checkpoint for e in events if e.HasField("checkpoint")]
    assert [c.seq for c in checkpoints] == [4, 8, 12, 16, 20, 24]
    assert all(c.token_count == c.seq for c in checkpoints)
    # A checkpoint sits right after the chunk it covers.
    for index, event in enumerate(events):
        if event.HasField("checkpoint"):
            assert events[index - 1].chunk.seq == event.checkpoint.seq
    resumed = await run_to_end(channel, resume_request(checkpoints[-1].resume_token, 24))
    assert [c.seq for c in chunks_of(resumed)] == [25]


async def test_default_checkpoint_interval_is_ten(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=30))
    assert [e.checkpoint.seq for e in events if e.HasField("checkpoint")] == [10, 20, 30]


async def test_resume_at_every_seq_boundary_of_a_finished_stream(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=12))
    token = events[0].started.resume_token
    full = chunks_of(events)
    for last_seq in range(0, 13):
        resumed = await run_to_end(channel, resume_request(token, last_seq))
        assert resumed[0].started.resumed
        assert resumed[0].started.stream_id == events[0].started.stream_id
        chunks = chunks_of(resumed)
        assert [c.seq for c in chunks] == list(range(last_seq + 1, 13)), last_seq
        assert [c.text for c in chunks] == [c.text for c in full[last_seq:]]
        assert end_of(resumed) == end_of(events)


async def test_resume_while_generating_gets_the_rest_exactly_once(
    paced: RelayServer, clock: ManualClock
) -> None:
    async with grpc.aio.insecure_channel(paced.address) as channel:
        first = RawCall(channel, start_request(max_tokens=60, metadata=PACED))
        started = await first.next_event()
        generation = generation_of(paced, started)
        await produce(clock, paced, generation, 7)
        seen = [started, *await first.events_until(seq_is(7))]
        first.cancel()
        token = seen[0].started.resume_token
        again = RawCall(channel, resume_request(token, 7))
        resumed = await again.next_event()
        assert generation.last_seq == 7  # still generating: the rest is live
        await produce(clock, paced, generation, 53)
        rest = [resumed, *await again.events_until()]
        again.cancel()
        chunks = chunks_of(seen) + chunks_of(rest)
        assert_contiguous(chunks)
        assert len(chunks) == 60
        text = "".join(c.text for c in chunks)
        assert end_of(rest).text_sha256 == sha256(text)
        clean = await run_to_end(channel, start_request(max_tokens=60))
    assert text == text_of(clean)


async def test_resume_between_chunks_waits_for_the_next_one(
    paced: RelayServer, clock: ManualClock
) -> None:
    async with grpc.aio.insecure_channel(paced.address) as channel:
        first = RawCall(channel, start_request(max_tokens=8, metadata=PACED))
        started = await first.next_event()
        generation = generation_of(paced, started)
        await produce(clock, paced, generation, 2)
        await first.events_until(seq_is(2))
        first.cancel()
        # The generation waits for chunk 3 while the resume arrives.
        again = RawCall(channel, resume_request(started.started.resume_token, 2))
        resumed = await again.next_event()
        assert resumed.started.resumed and generation.last_seq == 2
        await produce(clock, paced, generation, 6)
        rest = await again.events_until()
        again.cancel()
    assert [c.seq for c in chunks_of(rest)] == [3, 4, 5, 6, 7, 8]
    assert not end_of(rest).partial


async def test_two_clients_on_one_stream_see_identical_events(
    paced: RelayServer, clock: ManualClock
) -> None:
    async with grpc.aio.insecure_channel(paced.address) as channel:
        first = RawCall(channel, start_request(max_tokens=40, metadata=PACED))
        started = await first.next_event()
        second = RawCall(channel, resume_request(started.started.resume_token, 0))
        second_started = await second.next_event()  # both attached before the first chunk
        await produce(clock, paced, generation_of(paced, started), 40)
        events_a, events_b = await asyncio.gather(first.events_until(), second.events_until())
        events_b.insert(0, second_started)
        first.cancel()
        second.cancel()

    def comparable(events: list[pb.StreamEvent]) -> list[tuple[str, object]]:
        out: list[tuple[str, object]] = []
        for event in events:
            kind = event.WhichOneof("kind")
            if kind == "chunk":
                out.append((kind, (event.chunk.seq, event.chunk.text)))
            elif kind == "checkpoint":
                out.append((kind, event.checkpoint.seq))
            elif kind == "end":
                out.append((kind, event.end.SerializeToString()))
        return out

    assert comparable(events_a) == comparable([started, *events_b])
    assert len(chunks_of(events_a)) == 40


async def test_reconnect_within_grace_loses_nothing(paced: RelayServer, clock: ManualClock) -> None:
    relay = paced
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first = RawCall(channel, start_request(max_tokens=50, metadata=PACED))
        started = await first.next_event()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 10)
        seen = [started, *await first.events_until(seq_is(10))]
        first.cancel()
        await eventually(lambda: relay.hub.attached_sessions == 0)
        assert relay.hub.running_generations == 1  # detached, still generating
        await produce(clock, relay, generation, 5)  # and it goes on while nobody reads
        again = RawCall(channel, resume_request(seen[0].started.resume_token, 10))
        resumed = await again.next_event()
        await produce(clock, relay, generation, 35)
        rest = [resumed, *await again.events_until()]
        again.cancel()
    assert not end_of(rest).partial
    assert_contiguous(chunks_of(seen) + chunks_of(rest))


async def test_detached_generation_is_cancelled_after_the_grace_period(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, **{**QUIET, "detach_grace_s": 60})
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first = RawCall(channel, start_request(max_tokens=100_000, metadata=PACED))
        started = await first.next_event()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 3)
        seen = [started, *await first.events_until(seq_is(3))]
        first.cancel()
        await eventually(lambda: relay.hub.attached_sessions == 0)  # the grace runs
        await clock.run_for(59.5)
        assert not generation.finished.is_set()  # generating on, for a reconnect
        await clock.run_for(0.5)
        await eventually(generation.finished.is_set)
        assert generation.upstream_cancelled
        assert relay.hub.running_generations == 0
        rest = await run_to_end(channel, resume_request(seen[0].started.resume_token, 3))
        end = end_of(rest)
        assert end.partial
        assert end.error.code == "CLIENT_GONE"
        assert end.total_seq < 100_000
        assert_contiguous(chunks_of(seen) + chunks_of(rest))
        assert end.text_sha256 == sha256(text_of(seen) + text_of(rest))


async def test_cancel_stops_the_generation_at_once(paced: RelayServer, clock: ManualClock) -> None:
    relay = paced
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=100_000, metadata=PACED))
        started = await call.next_event()
        await produce(clock, relay, generation_of(relay, started), 2)
        await call.events_until(seq_is(2))
        call.send(pb.StreamRequest(cancel=pb.Cancel(reason="user pressed stop")))
        events = await call.events_until()  # with no clock move: at once
        call.cancel()
    end = end_of(events)
    assert end.partial
    assert end.finish_reason == "cancelled"
    assert end.error.code == "CANCELLED"
    assert "user pressed stop" in end.error.message
    assert end.error.fatal
    await eventually(lambda: relay.hub.running_generations == 0)


async def test_same_idempotency_key_attaches_to_the_existing_stream(
    relay: RelayServer, channel
) -> None:
    request = start_request(max_tokens=20, idempotency_key="order-42")
    first = await run_to_end(channel, request)
    second = await run_to_end(channel, request)
    assert second[0].started.stream_id == first[0].started.stream_id
    assert second[0].started.resumed
    assert text_of(second) == text_of(first)
    assert len(relay.hub.store) == 1  # type: ignore[arg-type]


async def test_idempotency_key_reused_for_another_request_is_rejected(channel) -> None:
    await run_to_end(channel, start_request(max_tokens=5, idempotency_key="k"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, start_request(max_tokens=6, idempotency_key="k"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in caught.value.details()


@pytest.mark.parametrize(
    ("faults", "code", "error_type", "action", "tokens"),
    [
        ("reset@5", "ECONNRESET", pb.ERROR_TYPE_NETWORK, pb.SUGGESTED_ACTION_RESUME, 5),
        ("http:429", "HTTP_429", pb.ERROR_TYPE_PROTOCOL, pb.SUGGESTED_ACTION_RETRY, 0),
        ("http:503", "HTTP_503", pb.ERROR_TYPE_PROTOCOL, pb.SUGGESTED_ACTION_RETRY, 0),
        ("http:401", "HTTP_401", pb.ERROR_TYPE_PROTOCOL, pb.SUGGESTED_ACTION_ABORT, 0),
        ("garbage@3", "MALFORMED_DATA", pb.ERROR_TYPE_DATA, pb.SUGGESTED_ACTION_ABORT, 3),
        ("eof@4", "NO_FINISH_REASON", pb.ERROR_TYPE_DATA, pb.SUGGESTED_ACTION_RESUME, 4),
    ],
    ids=[
        "a reset after five tokens is a network error to resume from",
        "a 429 is a protocol error to retry",
        "a 503 is a protocol error to retry",
        "a 401 is a protocol error to abort",
        "garbage is a data error to abort",
        "an end without finish reason is a data error",
    ],
)
async def test_unrecovered_upstream_failure_ends_as_typed_partial(
    channel, faults: str, code: str, error_type: int, action: int, tokens: int
) -> None:
    events = await run_to_end(
        # No retries: this is about how a failure is typed, not how it is recovered.
        channel,
        start_request(max_tokens=30, metadata={"sim.faults": faults}, max_retries=0),
    )
    end = end_of(events)
    assert end.partial
    assert end.error.code == code
    assert end.error.type == error_type
    assert end.error.suggested_action == action
    assert end.error.fatal
    assert end.error.tokens_received == tokens
    assert end.error.provider == "sim"
    assert end.error.attempt == 1
    assert end.total_seq == tokens == len(chunks_of(events))
    assert end.text_sha256 == sha256(text_of(events))
    if code == "HTTP_429":
        assert end.error.retry_after.ToTimedelta().total_seconds() == 1.0


async def test_stalled_upstream_is_detected_by_the_stall_timeout(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, **{**QUIET, "stall_timeout_s": 30})
    async with grpc.aio.insecure_channel(relay.address) as channel:
        request = start_request(metadata={"sim.faults": "stall@3"}, max_retries=0)
        call = RawCall(channel, request)
        started = await call.next_event()
        generation = generation_of(relay, started)
        events = [started, *await call.events_until(seq_is(3))]
        # The three chunks stall@3 sends are in; the attempt waits for more.
        await eventually(lambda: generation.phase == "attempt" and generation.last_seq == 3)
        await clock.run_for(29.9)
        assert generation.phase == "attempt"  # a gap shorter than the timeout is fine
        await clock.run_for(0.1)
        events += await call.events_until()
        call.cancel()
    end = end_of(events)
    assert end.partial
    assert end.error.code == "STALL_TIMEOUT"
    assert end.error.type == pb.ERROR_TYPE_TIMEOUT
    assert end.total_seq == 3


async def test_health_is_serving_and_reflection_lists_the_relay(relay: RelayServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(relay.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tokenrelay.v1.Relay"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for reply in stub.ServerReflectionInfo(ask()):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"tokenrelay.v1.Relay", "grpc.health.v1.Health"} <= names


async def test_draining_refuses_new_streams_and_tells_open_ones_unavailable(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, **QUIET, drain_grace_s=10)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=100_000, metadata=PACED))
        started = await call.next_event()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 1)
        await call.events_until(lambda e: e.HasField("chunk"))
        drain = asyncio.create_task(relay.drain_and_stop())
        await eventually(lambda: relay.hub.draining)  # its grace is running on the clock
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await run_to_end(channel, start_request())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        await clock.run_for(9.9)
        assert not drain.done() and not generation.finished.is_set()  # open streams may finish
        await clock.run_for(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as told:
            await call.events_until()
        assert told.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume" in told.value.details()
        await drain
