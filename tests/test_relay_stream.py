"""The Relay.Stream contract over a real server on a real port (memory store)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from serverkit import (
    RawCall,
    RelayFactory,
    assert_contiguous,
    chunks_of,
    end_of,
    eventually,
    resume_request,
    run_to_end,
    sha256,
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.model import Message
from tokenrelay_server.upstream.sim import SimAnswer


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


async def test_resume_while_generating_gets_the_rest_exactly_once(channel) -> None:
    first = RawCall(channel, start_request(max_tokens=60, metadata={"sim.pace_ms": "5"}))
    seen = await first.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 7)
    first.cancel()
    token = seen[0].started.resume_token
    rest = await run_to_end(channel, resume_request(token, 7))
    chunks = chunks_of(seen) + chunks_of(rest)
    assert_contiguous(chunks)
    assert len(chunks) == 60
    text = "".join(c.text for c in chunks)
    assert end_of(rest).text_sha256 == sha256(text)
    clean = await run_to_end(channel, start_request(max_tokens=60))
    assert text == text_of(clean)


async def test_resume_between_chunks_waits_for_the_next_one(channel) -> None:
    # A slow pace means the resume lands while the generation is between chunks.
    first = RawCall(channel, start_request(max_tokens=8, metadata={"sim.pace_ms": "150"}))
    seen = await first.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 2)
    first.cancel()
    rest = await run_to_end(channel, resume_request(seen[0].started.resume_token, 2))
    assert [c.seq for c in chunks_of(rest)] == [3, 4, 5, 6, 7, 8]
    assert not end_of(rest).partial


async def test_two_clients_on_one_stream_see_identical_events(channel) -> None:
    first = RawCall(channel, start_request(max_tokens=40, metadata={"sim.pace_ms": "3"}))
    started = await first.next_event()
    second = RawCall(channel, resume_request(started.started.resume_token, 0))
    events_a, events_b = await asyncio.gather(first.events_until(), second.events_until())
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


async def test_reconnect_within_grace_loses_nothing(relay: RelayServer, channel) -> None:
    first = RawCall(channel, start_request(max_tokens=50, metadata={"sim.pace_ms": "4"}))
    seen = await first.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 10)
    first.cancel()
    await eventually(lambda: relay.hub.attached_sessions == 0)
    assert relay.hub.running_generations == 1  # detached, still generating
    rest = await run_to_end(channel, resume_request(seen[0].started.resume_token, 10))
    assert not end_of(rest).partial
    assert_contiguous(chunks_of(seen) + chunks_of(rest))


async def test_detached_generation_is_cancelled_after_the_grace_period(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(detach_grace_s=0.2)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first = RawCall(channel, start_request(max_tokens=100_000, metadata={"sim.pace_ms": "5"}))
        seen = await first.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 3)
        stream_id = seen[0].started.stream_id
        generation = relay.hub.generation(stream_id)
        assert generation is not None
        first.cancel()
        await asyncio.wait_for(generation.finished.wait(), timeout=30)
        assert generation.upstream_cancelled
        assert relay.hub.running_generations == 0
        rest = await run_to_end(channel, resume_request(seen[0].started.resume_token, 3))
        end = end_of(rest)
        assert end.partial
        assert end.error.code == "CLIENT_GONE"
        assert end.total_seq < 100_000
        assert_contiguous(chunks_of(seen) + chunks_of(rest))
        assert end.text_sha256 == sha256(text_of(seen) + text_of(rest))


async def test_cancel_stops_the_generation_at_once(relay: RelayServer, channel) -> None:
    call = RawCall(channel, start_request(max_tokens=100_000, metadata={"sim.pace_ms": "5"}))
    await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 2)
    call.send(pb.StreamRequest(cancel=pb.Cancel(reason="user pressed stop")))
    events = await call.events_until()
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
        channel, start_request(max_tokens=30, metadata={"sim.faults": faults}, max_retries=0)
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
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(stall_timeout_s=0.2)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        request = start_request(metadata={"sim.faults": "stall@3"}, max_retries=0)
        events = await run_to_end(channel, request)
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
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(drain_grace_s=0.3)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=100_000, metadata={"sim.pace_ms": "5"}))
        await call.events_until(lambda e: e.HasField("chunk"))
        drain = asyncio.create_task(relay.drain_and_stop())
        await eventually(lambda: relay.hub.draining)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await run_to_end(channel, start_request())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as told:
            await call.events_until()
        assert told.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "resume" in told.value.details()
        await drain
