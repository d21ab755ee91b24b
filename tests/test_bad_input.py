"""Bad input gets a clear status naming what is wrong, and changes nothing."""

from __future__ import annotations

import grpc
import pytest

from serverkit import SECRET, RawCall, eventually, resume_request, run_to_end, start_request
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.core.clock import SystemClock


def start_with(**fields: object) -> pb.StreamRequest:
    start = pb.StartGeneration(model="sim", messages=[pb.Message(role="user", content="hi")])
    for name, value in fields.items():
        if name == "messages":
            del start.messages[:]
            start.messages.extend(value)  # type: ignore[arg-type]
        elif name == "params":
            start.params.CopyFrom(value)  # type: ignore[arg-type]
        elif name == "policy":
            start.policy.CopyFrom(value)  # type: ignore[arg-type]
        elif name == "metadata":
            start.metadata.update(value)  # type: ignore[arg-type]
        else:
            setattr(start, name, value)
    return pb.StreamRequest(start=start)


BAD_FIRST_MESSAGES = [
    pytest.param(pb.StreamRequest(ack=pb.Ack(seq=1)), "first message must be", id="an ack first"),
    pytest.param(
        pb.StreamRequest(cancel=pb.Cancel()), "first message must be", id="a cancel first"
    ),
    pytest.param(pb.StreamRequest(), "first message must be", id="an empty request first"),
    pytest.param(start_with(model=""), "start.model is empty", id="an empty model"),
    pytest.param(start_with(model="   "), "start.model is empty", id="a blank model"),
    pytest.param(start_with(model="gpt-9"), "unknown model 'gpt-9'", id="an unknown model"),
    pytest.param(start_with(messages=[]), "start.messages is empty", id="no messages"),
    pytest.param(
        start_with(messages=[pb.Message(role="wizard", content="x")]),
        "start.messages[0].role",
        id="a message with an unknown role",
    ),
    pytest.param(
        start_with(messages=[pb.Message(role="user", content="x" * 600_000)] * 2),
        "start.messages[1].content",
        id="messages over the prompt size limit",
    ),
    pytest.param(
        start_with(params=pb.GenerationParams(max_tokens=0)),
        "start.params.max_tokens",
        id="zero max_tokens",
    ),
    pytest.param(
        start_with(params=pb.GenerationParams(temperature=3.5)),
        "start.params.temperature",
        id="temperature out of range",
    ),
    pytest.param(
        start_with(params=pb.GenerationParams(top_p=0.0)),
        "start.params.top_p",
        id="top_p of zero",
    ),
    pytest.param(
        start_with(policy=pb.RecoveryPolicy(checkpoint_interval=0)),
        "start.policy.checkpoint_interval",
        id="a zero checkpoint interval",
    ),
    pytest.param(
        start_with(metadata={"sim.faults": "explode@3"}),
        'metadata["sim.faults"]',
        id="a fault script with an unknown item",
    ),
    pytest.param(
        start_with(metadata={"sim.pace_ms": "fast"}),
        'metadata["sim.pace_ms"]',
        id="a pace that is not a number",
    ),
    pytest.param(
        start_with(idempotency_key="k" * 300), "start.idempotency_key", id="a huge idempotency key"
    ),
    pytest.param(resume_request("", 0), "resume.resume_token is empty", id="an empty resume token"),
]


@pytest.mark.parametrize(("request_", "names"), BAD_FIRST_MESSAGES)
async def test_bad_first_message_is_invalid_argument_and_registers_nothing(
    relay: RelayServer, channel, request_: pb.StreamRequest, names: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in caught.value.details()
    await eventually(lambda: relay.hub.attached_sessions == 0)
    assert relay.hub.running_generations == 0
    assert len(relay.hub.store) == 0  # type: ignore[arg-type]


async def test_a_call_closed_before_any_message_is_invalid_argument(relay, channel) -> None:
    call = RawCall(channel)
    call.half_close()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.next_event()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before its first message" in caught.value.details()


async def test_last_seq_beyond_the_end_is_invalid_argument(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=5))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, resume_request(events[0].started.resume_token, 6))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume.last_seq=6 is beyond the stream's last seq 5" in caught.value.details()


async def test_second_start_on_a_call_is_rejected_and_the_stream_survives(
    relay: RelayServer, channel
) -> None:
    call = RawCall(channel, start_request(max_tokens=40, metadata={"sim.pace_ms": "5"}))
    started = await call.next_event()
    call.send(start_request())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.events_until()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a second `start`" in caught.value.details()
    assert len(relay.hub.store) == 1  # type: ignore[arg-type]  # no second stream
    rest = await run_to_end(channel, resume_request(started.started.resume_token, 0))
    assert rest[-1].end.total_seq == 40 and not rest[-1].end.partial


async def test_tampered_token_is_permission_denied(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=3))
    token = events[0].started.resume_token
    head, _, signature = token.rpartition(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for tampered in (f"{head}.{flipped}", token.replace(token.split(".")[1], "0" * 32)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await run_to_end(channel, resume_request(tampered, 0))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "signature" in caught.value.details()


async def test_token_from_another_deployment_is_permission_denied(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=3))
    stream_id = events[0].started.stream_id
    foreign = ResumeTokens(b"another-secret-entirely!", ttl_s=60, clock=SystemClock())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, resume_request(foreign.issue(stream_id), 0))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_garbage_token_is_permission_denied(channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, resume_request("not-a-token", 0))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_expired_token_is_not_found(channel) -> None:
    events = await run_to_end(channel, start_request(max_tokens=3))
    expired = ResumeTokens(SECRET.encode(), ttl_s=-1, clock=SystemClock())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, resume_request(expired.issue(events[0].started.stream_id), 0))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "expired" in caught.value.details()


async def test_token_for_a_stream_that_is_gone_is_not_found(channel) -> None:
    tokens = ResumeTokens(SECRET.encode(), ttl_s=60, clock=SystemClock())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, resume_request(tokens.issue("f" * 32), 0))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_failing_store_ends_the_stream_typed_never_unknown(relay_factory) -> None:
    from tokenrelay_server.store.memory import MemoryStore

    class StoreThatFailsAfterFiveAppends(MemoryStore):
        appends = 0

        async def append(self, stream_id, entries):  # type: ignore[no-untyped-def]
            self.appends += 1
            if 5 < self.appends < 1000:
                self.appends = 1000
                raise ConnectionError("store connection lost")
            await super().append(stream_id, entries)

    relay = await relay_factory(store_instance=StoreThatFailsAfterFiveAppends())
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=20))
    end = events[-1].end
    assert end.partial
    assert end.error.code == "INTERNAL"
    assert [e.chunk.seq for e in events if e.HasField("chunk")] == [1, 2, 3, 4, 5]
