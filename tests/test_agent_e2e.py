"""Agent streams end to end (issue 12): gRPC client → gateway → the real
HTTP adapters → the mock upstream, in the OpenAI and the Anthropic format,
over real sockets. A tool call is relayed whole; a break inside its
arguments still ends with one whole, valid call (WHOLE) or a typed partial
(STREAM); reasoning is relayed and survives a break; an agent loop runs
through the Python client.

The gateway and the mock share a ManualClock with realistic timers (1 s
backoff, 5 s stall timeout); a time keeper moves it only when the stream
provably waits on time, so a slow machine never fires a stall timeout in the
middle of a clean answer, and a stall is crossed without waiting for it."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from serverkit import (
    RelayFactory,
    assert_contiguous,
    chunks_of,
    configured_gateway,
    end_of,
    run_to_end,
    sha256,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_client import RelayClient, Tool, tool_result
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock

CONFIG = """
[recovery]
backoff_base_s = 1
max_retries = 2

[providers.mock-openai]
kind = "openai"
base_url = "{base_url}"
forward_sim_headers = true
stall_timeout_s = 5

[providers.mock-anthropic]
kind = "anthropic"
base_url = "{base_url}"
forward_sim_headers = true
stall_timeout_s = 5

[models.oa]
chain = [{{ provider = "mock-openai", model = "gpt-4o-mini" }}]

[models.an]
chain = [{{ provider = "mock-anthropic", model = "claude-3-5-haiku-latest" }}]
"""

FORMATS = pytest.mark.parametrize("model", ["oa", "an"], ids=["openai format", "anthropic format"])
PROMPT = "What is the weather in Zürich?"
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
WEATHER = pb.Tool(
    name="get_weather", description="The weather now", parameters_json=json.dumps(SCHEMA)
)
# With tools the simulator answers 3 text events, then the call's first event
# (id and name), then its arguments in fragments: event 5 is inside them.
INSIDE_THE_ARGUMENTS = 5


@pytest.fixture
async def gateway(
    upstream: MockUpstream, relay_factory: RelayFactory, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[RelayServer]:
    async with configured_gateway(
        CONFIG, upstream=upstream, relay_factory=relay_factory, tmp_path=tmp_path, clock=clock
    ) as relay:
        yield relay


def agent_start(
    model: str,
    *,
    faults: str = "",
    tool_calls: int = pb.TOOL_CALL_MODE_UNSPECIFIED,
    tools: bool = True,
    reasoning: int = 0,
    max_tokens: int = 40,
) -> pb.StreamRequest:
    metadata = {"sim.retry_after_s": "1"}
    if faults:
        metadata["sim.faults"] = faults
    if reasoning:
        metadata["sim.reasoning"] = str(reasoning)
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model=model,
            messages=[pb.Message(role="user", content=PROMPT)],
            params=pb.GenerationParams(max_tokens=max_tokens),
            policy=pb.RecoveryPolicy(tool_calls=tool_calls),  # type: ignore[arg-type]
            tools=[WEATHER] if tools else [],
            metadata=metadata,
        )
    )


async def run(gateway: RelayServer, request: pb.StreamRequest) -> list[pb.StreamEvent]:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        return await run_to_end(channel, request)


def records(chunks: list[pb.TokenChunk]) -> bytes:
    """StreamEnd.chunks_sha256's records, written from relay.proto's comment."""

    def sized(value: str) -> bytes:
        return len(value.encode()).to_bytes(4, "big") + value.encode()

    out = b""
    for chunk in chunks:
        kind = chunk.WhichOneof("content")
        if kind == "tool_call":
            call = chunk.tool_call
            out += b"C" + call.index.to_bytes(4, "big") + sized(call.id) + sized(call.name)
            out += sized(call.arguments)
        else:
            out += (
                (b"R" + sized(chunk.reasoning)) if kind == "reasoning" else b"T" + sized(chunk.text)
            )
    return out


def checked(events: list[pb.StreamEvent]) -> pb.StreamEnd:
    """The End, once seq is contiguous over every kind and both digests hold."""
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    end = end_of(events)
    assert end.total_seq == len(chunks)
    assert end.text_sha256 == sha256("".join(c.text for c in chunks))
    assert end.chunks_sha256 == hashlib.sha256(records(chunks)).hexdigest()
    return end


def calls_of(events: list[pb.StreamEvent]) -> list[pb.ToolCallDelta]:
    return [c.tool_call for c in chunks_of(events) if c.WhichOneof("content") == "tool_call"]


def kinds(events: list[pb.StreamEvent]) -> list[str]:
    return [str(c.WhichOneof("content")) for c in chunks_of(events)]


def answer(events: list[pb.StreamEvent]) -> str:
    return "".join(c.text for c in chunks_of(events))


def reasoning(events: list[pb.StreamEvent]) -> str:
    return "".join(c.reasoning for c in chunks_of(events))


@FORMATS
async def test_a_tool_call_is_relayed_whole(gateway: RelayServer, model: str) -> None:
    events = await run(gateway, agent_start(model))
    end = checked(events)
    assert (end.finish_reason, end.partial) == ("tool_calls", False)
    assert kinds(events) == ["text"] * 3 + ["tool_call"]
    (call,) = calls_of(events)
    assert (call.index, call.name) == (0, "get_weather") and call.id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city", "days"}


@FORMATS
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(f"reset@{INSIDE_THE_ARGUMENTS}", id="a reset inside the arguments"),
        pytest.param(
            f"reset@{INSIDE_THE_ARGUMENTS}+split_utf8", id="a reset inside split characters"
        ),
        pytest.param(f"drop@{INSIDE_THE_ARGUMENTS + 1}", id="the connection dropped inside them"),
        pytest.param(f"stall@{INSIDE_THE_ARGUMENTS}", id="a stall inside them"),
        pytest.param(f"error@{INSIDE_THE_ARGUMENTS}:overloaded", id="overloaded inside them"),
        pytest.param(f"eof@{INSIDE_THE_ARGUMENTS}", id="the body ending inside them"),
    ],
)
async def test_in_whole_mode_a_break_inside_a_tool_call_still_ends_with_one_valid_call(
    gateway: RelayServer, model: str, fault: str
) -> None:
    clean = calls_of(await run(gateway, agent_start(model)))
    events = await run(gateway, agent_start(model, faults=fault))
    end = checked(events)
    assert (end.finish_reason, end.partial) == ("tool_calls", False)
    (call,) = calls_of(events)  # exactly one: nothing of the broken one was shown
    assert isinstance(json.loads(call.arguments), dict)
    assert (call.name, call.arguments) == (clean[0].name, clean[0].arguments)
    notices = [e.error for e in events if e.HasField("error")]
    assert notices and not any(n.fatal for n in notices)
    assert kinds(events) == ["text"] * 3 + ["tool_call"]


@FORMATS
async def test_in_stream_mode_a_reset_inside_a_tool_call_ends_tool_call_interrupted(
    gateway: RelayServer, model: str
) -> None:
    events = await run(
        gateway,
        agent_start(
            model, faults=f"reset@{INSIDE_THE_ARGUMENTS}", tool_calls=pb.TOOL_CALL_MODE_STREAM
        ),
    )
    end = checked(events)
    assert end.partial and end.finish_reason == "error"
    assert end.error.code == "TOOL_CALL_INTERRUPTED" and end.error.fatal
    assert end.error.retryable and end.error.suggested_action == pb.SUGGESTED_ACTION_RETRY
    pieces = calls_of(events)
    assert pieces[0].name == "get_weather" and len(pieces) >= 2
    # Never continued: one upstream attempt, and no notice of a recovery.
    assert not [e for e in events if e.HasField("error") and not e.error.fatal]


@FORMATS
async def test_in_stream_mode_a_clean_tool_call_streams_its_pieces(
    gateway: RelayServer, model: str
) -> None:
    whole = calls_of(await run(gateway, agent_start(model)))
    events = await run(gateway, agent_start(model, tool_calls=pb.TOOL_CALL_MODE_STREAM))
    assert checked(events).finish_reason == "tool_calls"
    pieces = calls_of(events)
    assert len(pieces) > 2
    assert "".join(p.arguments for p in pieces) == whole[0].arguments


@FORMATS
@pytest.mark.parametrize(
    "at",
    [pytest.param(3, id="a break inside the reasoning"), pytest.param(8, id="a break in the text")],
)
async def test_reasoning_is_relayed_and_survives_a_break(
    gateway: RelayServer, model: str, at: int
) -> None:
    clean = await run(gateway, agent_start(model, tools=False, reasoning=5))
    assert kinds(clean)[:5] == ["reasoning"] * 5 and reasoning(clean)
    events = await run(gateway, agent_start(model, tools=False, reasoning=5, faults=f"reset@{at}"))
    end = checked(events)
    assert not end.partial, end.error
    # What was shown of the reasoning stays and is never repeated; the
    # answer text is the clean run's.
    shown = min(at, 5)
    assert kinds(events)[:shown] == ["reasoning"] * shown
    assert "reasoning" not in kinds(events)[shown:]
    assert reasoning(clean).startswith(reasoning(events))
    assert answer(events) == answer(clean)


@FORMATS
async def test_an_agent_loop_runs_through_the_python_client(
    gateway: RelayServer, model: str
) -> None:
    weather = Tool("get_weather", "The weather now", SCHEMA)
    metadata = {"sim.reasoning": "2", "sim.faults": f"reset@{INSIDE_THE_ARGUMENTS + 2}"}
    async with RelayClient(gateway.address) as client:
        conversation: list = [("user", PROMPT)]
        turn = await client.generate(model, conversation, tools=[weather], metadata=metadata)
        assert turn.end.finish_reason == "tool_calls" and not turn.partial
        assert turn.end.verified and turn.end.chunks_verified
        (call,) = turn.tool_calls
        assert call.name == "get_weather" and set(call.parsed_arguments()) == {"city", "days"}
        conversation += [turn.assistant_message(), tool_result(call.id, '{"celsius": 21}')]
        final = await client.generate(model, conversation, tools=[weather], max_tokens=20)
    assert final.end.finish_reason == "stop" and not final.tool_calls
    assert final.text and final.end.chunks_verified
