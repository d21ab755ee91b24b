"""Bad input gets a clear status naming what is wrong, and changes nothing."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from serverkit import (
    PACED,
    QUIET,
    SECRET,
    RawCall,
    RelayFactory,
    end_of,
    eventually,
    generation_of,
    produce,
    resume_request,
    run_to_end,
    start_request,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.api.servicer import MAX_CANCEL_REASON_CHARS
from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.config.settings import Settings
from tokenrelay_server.core.clock import ManualClock, SystemClock


@pytest.fixture
async def paced(relay_factory: RelayFactory, clock: ManualClock) -> RelayServer:
    """A gateway on the manual clock, its timers out of reach: a PACED stream
    waits (mid-generation) until the test lets it make chunks (`produce`)."""
    return await relay_factory(clock=clock, **QUIET)


async def resume_to_the_end(
    relay: RelayServer, clock: ManualClock, started: pb.StreamEvent, chunks: int
) -> pb.StreamEnd:
    """Resume the stream `started` names from seq 0 while it still waits for
    its first chunk, let it make `chunks` chunks, and read it to its End."""
    generation = generation_of(relay, started)
    assert generation.last_seq == 0 and not generation.finished.is_set()  # it survived
    async with grpc.aio.insecure_channel(relay.address) as channel:
        again = RawCall(channel, resume_request(started.started.resume_token, 0))
        resumed = await again.next_event()
        await produce(clock, relay, generation, chunks)
        rest = [resumed, *await again.events_until()]
        again.cancel()
    return end_of(rest)


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
        elif name == "tools":
            start.tools.extend(value)  # type: ignore[arg-type]
        elif name == "tool_choice":
            start.tool_choice.CopyFrom(value)  # type: ignore[arg-type]
        else:
            setattr(start, name, value)
    return pb.StreamRequest(start=start)


def tool(name: str = "get_weather", parameters_json: str = "") -> pb.Tool:
    return pb.Tool(name=name, description="d", parameters_json=parameters_json)


def called(*calls: pb.ToolCall, content: str = "") -> pb.Message:
    return pb.Message(role="assistant", content=content, tool_calls=list(calls))


CALL = pb.ToolCall(id="call_1", name="get_weather", arguments_json='{"city": "Oslo"}')
USER = pb.Message(role="user", content="weather?")

BAD_TOOL_REQUESTS = [
    pytest.param(
        start_with(tools=[tool(), tool("lookup"), tool("x", "[1, 2]")]),
        "start.tools[2].parameters_json: is not a JSON object",
        id="a tool schema that is a JSON array",
    ),
    pytest.param(
        start_with(tools=[tool(parameters_json='{"type": "object",')]),
        "start.tools[0].parameters_json: is not a JSON object (it is not JSON",
        id="a tool schema that is not JSON",
    ),
    pytest.param(
        start_with(tools=[tool("get weather")]),
        "start.tools[0].name is 'get weather'",
        id="a tool name with a space",
    ),
    pytest.param(start_with(tools=[tool("")]), "start.tools[0].name", id="an empty tool name"),
    pytest.param(
        start_with(tools=[tool("n" * 65)]), "start.tools[0].name", id="a tool name of 65 characters"
    ),
    pytest.param(
        start_with(tools=[tool(), tool("b"), tool()]),
        "start.tools[2].name 'get_weather' is also start.tools[0].name",
        id="two tools with one name",
    ),
    pytest.param(
        start_with(tools=[tool(f"t{i}") for i in range(129)]),
        "start.tools has 129 tools; the limit is 128",
        id="more than 128 tools",
    ),
    pytest.param(
        start_with(tools=[tool()], tool_choice=pb.ToolChoice(tool_name="lookup")),
        "start.tool_choice.tool_name 'lookup' is not one of start.tools",
        id="a tool choice naming an undeclared tool",
    ),
    pytest.param(
        start_with(tool_choice=pb.ToolChoice(tool_name="lookup")),
        "start.tools is empty",
        id="a tool choice naming a tool with no tools",
    ),
    pytest.param(
        start_with(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)),
        "start.tool_choice.mode is REQUIRED but start.tools is empty",
        id="a required tool call with no tools",
    ),
    pytest.param(
        start_with(tools=[tool()], tool_choice=pb.ToolChoice(mode=7)),  # type: ignore[arg-type]
        "start.tool_choice.mode is 7",
        id="a tool choice mode this gateway does not know",
    ),
    pytest.param(
        start_with(policy=pb.RecoveryPolicy(tool_calls=9)),  # type: ignore[arg-type]
        "start.policy.tool_calls is 9",
        id="a tool call mode this gateway does not know",
    ),
    pytest.param(
        start_with(
            messages=[
                USER,
                called(CALL, pb.ToolCall(id="call_2", name="get_weather", arguments_json="{'a'}")),
            ]
        ),
        "start.messages[1].tool_calls[1].arguments_json: is not a JSON object",
        id="tool call arguments that are not JSON",
    ),
    pytest.param(
        start_with(messages=[USER, called(pb.ToolCall(id="c", name="f", arguments_json="null"))]),
        "start.messages[1].tool_calls[0].arguments_json: is not a JSON object (it is JSON but "
        "not an object (it is null))",
        id="tool call arguments that are JSON null",
    ),
    pytest.param(
        start_with(messages=[USER, called(pb.ToolCall(name="f", arguments_json="{}"))]),
        "start.messages[1].tool_calls[0].id",
        id="a tool call without an id",
    ),
    pytest.param(
        start_with(
            messages=[pb.Message(role="user", content="x", tool_calls=[CALL])],
        ),
        "start.messages[0].tool_calls is set on a 'user' message",
        id="tool calls on a user message",
    ),
    pytest.param(
        start_with(messages=[USER, called(CALL), pb.Message(role="tool", content="21 C")]),
        "start.messages[2].tool_call_id is empty",
        id="a tool result without a tool_call_id",
    ),
    pytest.param(
        start_with(
            messages=[
                USER,
                called(CALL),
                pb.Message(role="tool", content="21 C", tool_call_id="call_9"),
            ]
        ),
        "start.messages[2].tool_call_id 'call_9' answers no tool call",
        id="a tool result for a call nobody made",
    ),
    pytest.param(
        start_with(messages=[pb.Message(role="tool", content="21 C", tool_call_id="call_1"), USER]),
        "start.messages[0].tool_call_id 'call_1' answers no tool call",
        id="a tool result before the call it answers",
    ),
    pytest.param(
        start_with(messages=[pb.Message(role="user", content="x", tool_call_id="call_1")]),
        "start.messages[0].tool_call_id is set on a 'user' message",
        id="a tool_call_id on a user message",
    ),
    pytest.param(
        start_with(tools=[tool(parameters_json=" " * 1_100_000)]),
        "start.tools[0].parameters_json takes the prompt to",
        id="tool schemas count toward the prompt size",
    ),
]

BAD_FIRST_MESSAGES = [
    *BAD_TOOL_REQUESTS,
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
    pytest.param(
        start_with(metadata={"sim.faults": "reset@²"}),
        'metadata["sim.faults"]: item 1',
        id="a fault count in a superscript digit",
    ),
    pytest.param(
        start_with(metadata={"sim.faults": "ok,http:٤٢٩"}),
        'metadata["sim.faults"]: item 2',
        id="a fault status in arabic-indic digits",
    ),
    pytest.param(
        start_with(metadata={"sim.pace_ms": "٣"}),
        'metadata["sim.pace_ms"]',
        id="a pace in arabic-indic digits",
    ),
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


async def test_a_whole_agent_turn_is_accepted(channel) -> None:
    schema = '{"type": "object", "properties": {"city": {"type": "string"}}}'
    request = start_with(
        messages=[
            pb.Message(role="system", content="Be brief."),
            USER,
            called(CALL, content="Let me look."),
            pb.Message(role="tool", content='{"celsius": 21}', tool_call_id="call_1"),
        ],
        tools=[tool(parameters_json=schema), tool("no_args")],
        tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_AUTO),
        policy=pb.RecoveryPolicy(tool_calls=pb.TOOL_CALL_MODE_STREAM),
    )
    end = end_of(await run_to_end(channel, request))
    assert not end.partial


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
    paced: RelayServer, clock: ManualClock
) -> None:
    async with grpc.aio.insecure_channel(paced.address) as channel:
        call = RawCall(channel, start_request(max_tokens=40, metadata=PACED))
        started = await call.next_event()
        call.send(start_request())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.events_until()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "a second `start`" in caught.value.details()
    assert len(paced.hub.store) == 1  # type: ignore[arg-type]  # no second stream
    end = await resume_to_the_end(paced, clock, started, 40)
    assert end.total_seq == 40 and not end.partial


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

        def append_now(self, stream_id, entries):  # type: ignore[no-untyped-def]
            # (the engine appends to an in-process store without awaiting)
            self.appends += 1
            if 5 < self.appends < 1000:
                self.appends = 1000
                raise ConnectionError("store connection lost")
            super().append_now(stream_id, entries)

    relay = await relay_factory(store_instance=StoreThatFailsAfterFiveAppends())
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=20))
    end = events[-1].end
    assert end.partial
    assert end.error.code == "INTERNAL"
    assert [e.chunk.seq for e in events if e.HasField("chunk")] == [1, 2, 3, 4, 5]


# --- frames that are not StreamRequests -------------------------------------------------

VALID_START = start_request(max_tokens=3).SerializeToString()

UNDECODABLE_FRAMES = [
    pytest.param(b"\xff\xff\xff", id="random bytes"),
    pytest.param(b"\x0a\x05abc", id="a length past the end of the frame"),
    pytest.param(b"\x0f\x00", id="a tag with an invalid wire type"),
    pytest.param(b"\x0a\x04\x0a\x02\xff\xfe", id="invalid utf-8 in start.model"),
    pytest.param(VALID_START[:-1], id="a valid start cut short"),
    pytest.param(
        bytes([VALID_START[0] ^ 0x07]) + VALID_START[1:], id="a valid start with a bad tag"
    ),
]


def raw_stream(channel: grpc.aio.Channel):  # type: ignore[no-untyped-def]
    """Relay.Stream sending bytes as they are: a client can put anything in a frame."""
    return channel.stream_stream(
        "/tokenrelay.v1.Relay/Stream",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.StreamEvent.FromString,
    )


@pytest.mark.parametrize("frame", UNDECODABLE_FRAMES)
async def test_an_undecodable_first_frame_is_invalid_argument(
    relay: RelayServer, channel, frame: bytes
) -> None:
    call = raw_stream(channel)(iter([frame]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tokenrelay.v1.StreamRequest" in caught.value.details()
    await eventually(lambda: relay.hub.attached_sessions == 0)
    assert relay.hub.running_generations == 0
    assert len(relay.hub.store) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("frame", UNDECODABLE_FRAMES)
async def test_an_undecodable_later_frame_is_invalid_argument_and_the_stream_survives(
    paced: RelayServer, clock: ManualClock, frame: bytes
) -> None:
    start = start_request(max_tokens=40, metadata=PACED).SerializeToString()
    outbox: asyncio.Queue[bytes] = asyncio.Queue()
    outbox.put_nowait(start)

    async def frames() -> AsyncIterator[bytes]:
        while True:
            yield await outbox.get()

    async with grpc.aio.insecure_channel(paced.address) as channel:
        call = raw_stream(channel)(frames())
        started = await call.read()
        outbox.put_nowait(frame)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() is not grpc.aio.EOF:
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid tokenrelay.v1.StreamRequest" in caught.value.details()
    end = await resume_to_the_end(paced, clock, started, 40)
    assert end.total_seq == 40 and not end.partial


@pytest.mark.parametrize(
    "token",
    ["v1.abc.1700000000.é", "v1.s.²." + "A" * 43, "ü" * 30],
    ids=["a non-ascii signature", "a superscript expiry", "nothing but non-ascii"],
)
async def test_a_resume_token_with_non_ascii_characters_is_permission_denied(
    channel, token: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, resume_request(token, 0))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "resume.resume_token" in caught.value.details()


# --- echoed text is bounded -------------------------------------------------------------------


async def test_a_huge_cancel_reason_is_cut_and_every_reader_still_gets_the_end(
    paced: RelayServer,
) -> None:
    async with grpc.aio.insecure_channel(paced.address) as channel:
        # Paced on a clock nobody moves: still generating when the cancel comes.
        call = RawCall(channel, start_request(max_tokens=100_000, metadata=PACED))
        started = await call.next_event()
        # 3 MB: under the 4 MiB transport limit ([limits] max_request_bytes).
        call.send(pb.StreamRequest(cancel=pb.Cancel(reason="stop " * 600_000)))
        events = await call.events_until()  # a reader with gRPC's default 4 MiB limit
        call.cancel()
        end = end_of(events)
        assert end.finish_reason == "cancelled"
        assert (
            "stop stop" in end.error.message
            and "truncated from 3000000 characters" in end.error.message
        )
        assert len(end.error.message) < MAX_CANCEL_REASON_CHARS + 200
        again = await run_to_end(channel, resume_request(started.started.resume_token, 0))
    assert end_of(again).error.message == end.error.message
    await eventually(lambda: paced.hub.running_generations == 0)


async def test_a_huge_role_is_not_echoed_whole(channel) -> None:
    request = start_with(messages=[pb.Message(role="r" * 100_000, content="x")])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start.messages[0].role" in caught.value.details()
    assert len(caught.value.details()) < 300


# --- a call that never sends its first message ----------------------------------------------


def live_tasks() -> Counter[str]:
    """The running tasks by coroutine: grpc runs a handler inside the task
    that accepted its call and starts another to accept the next one, so
    only counts per kind can say whether something was left behind."""
    return Counter(t.get_coro().__qualname__ for t in asyncio.all_tasks() if not t.done())


async def test_a_call_without_a_first_message_ends_deadline_exceeded_on_the_clock() -> None:
    clock = ManualClock()
    settings = Settings(port=0, resume_secret=SECRET, first_message_timeout_s=10)
    relay = await RelayServer.start(settings, clock=clock)
    try:
        async with grpc.aio.insecure_channel(relay.address) as channel:
            await channel.channel_ready()
            baseline = live_tasks()
            timers = clock.pending
            call = RawCall(channel)  # opened, and nothing sent
            await call.call.wait_for_connection()
            # The handler is waiting once its first-message deadline is set on
            # the clock (a new task alone could be another one, not yet it).
            await eventually(lambda: clock.pending > timers)
            await clock.run_for(9.9)
            assert not call.call.done()  # not before its time
            await clock.run_for(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async with asyncio.timeout(10):  # a guard against hanging only
                    await call.next_event()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "first message" in caught.value.details()
            assert "10 s" in caught.value.details()
            call.half_close()
            # The handler (and anything it started) is gone: only what was there before.
            await eventually(lambda: live_tasks() == baseline)
            assert relay.hub.attached_sessions == 0
    finally:
        await relay.stop(grace=0.5)
