"""The Anthropic adapter: the sans-IO parser with byte strings, then the
adapter over `httpx.MockTransport` replaying recorded SSE bytes."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay import Upstream, sse
from tokenrelay_server.config.upstream import ProviderConfig
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import (
    ApplicationError,
    DataError,
    NetworkError,
    ProtocolError,
    SuggestedAction,
    UpstreamError,
)
from tokenrelay_server.core.model import (
    GenerationParams,
    Message,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from tokenrelay_server.upstream.anthropic import (
    AnthropicProvider,
    MessagesParser,
    messages_body,
)
from tokenrelay_server.upstream.base import (
    CONTINUE_INSTRUCTION,
    Delta,
    Finish,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    UsageReport,
)
from tokenrelay_server.upstream.sim import split_continuation
from tokenrelay_server.upstream.sse import SSEDecoder

API_KEY = "sk-ant-test-0123456789"


def ev(name: str, **data: Any) -> bytes:
    payload = json.dumps({"type": name, **data}, ensure_ascii=False)
    return f"event: {name}\ndata: {payload}\n\n".encode()


def text(piece: str, index: int = 0) -> bytes:
    return ev("content_block_delta", index=index, delta={"type": "text_delta", "text": piece})


MESSAGE_START = ev(
    "message_start",
    message={
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": "claude-3-5-haiku-latest",
        "stop_reason": None,
        "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1},
    },
)
BLOCK_START = ev("content_block_start", index=0, content_block={"type": "text", "text": ""})
PING = ev("ping")
BLOCK_STOP = ev("content_block_stop", index=0)


def message_delta(stop_reason: str = "end_turn", output_tokens: int = 15) -> bytes:
    return ev(
        "message_delta",
        delta={"stop_reason": stop_reason, "stop_sequence": None},
        usage={"output_tokens": output_tokens},
    )


MESSAGE_STOP = ev("message_stop")
HELLO = [
    MESSAGE_START,
    BLOCK_START,
    PING,
    text("Hello"),
    text(", wörld 🚀"),
    BLOCK_STOP,
    message_delta(),
    MESSAGE_STOP,
]


def parse(*chunks: bytes) -> list[Delta]:
    decoder, parser = SSEDecoder(), MessagesParser()
    deltas: list[Delta] = []
    for data in chunks:
        for event in decoder.feed(data):
            deltas += parser.on_event(event)
            if parser.ended:
                return deltas + parser.on_end()
    decoder.feed(b"")
    return deltas + parser.on_end()


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas if isinstance(d, TextDelta))


# --- the sans-IO parser --------------------------------------------------------------------------


def test_a_clean_stream_gives_text_usage_and_finish():
    assert parse(*HELLO) == [
        TextDelta("Hello"),
        TextDelta(", wörld 🚀"),
        UsageReport(Usage(30, 15)),
        Finish("stop", Usage(30, 15)),
    ]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        pytest.param("end_turn", "stop", id="end_turn is stop"),
        pytest.param("stop_sequence", "stop", id="stop_sequence is stop"),
        pytest.param("max_tokens", "length", id="max_tokens is length"),
        pytest.param("tool_use", "tool_calls", id="tool_use is tool_calls"),
        pytest.param("refusal", "content_filter", id="refusal is content_filter"),
        pytest.param("pause_turn", "pause_turn", id="an unmapped reason passes through"),
    ],
)
def test_stop_reasons_become_finish_reasons(stop_reason: str, finish: str):
    deltas = parse(MESSAGE_START, BLOCK_START, text("x"), message_delta(stop_reason), MESSAGE_STOP)
    assert deltas[-1].reason == finish  # type: ignore[union-attr]


THINKING_THEN_TEXT = [
    MESSAGE_START,
    ev("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""}),
    ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hmm."}),
    ev("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "c2ln"}),
    ev("content_block_stop", index=0),
    ev("content_block_start", index=1, content_block={"type": "text", "text": ""}),
    text("42", index=1),
    ev("content_block_stop", index=1),
    message_delta(),
    MESSAGE_STOP,
]


def test_thinking_deltas_are_reasoning_not_answer_text():
    deltas = parse(*THINKING_THEN_TEXT)
    assert deltas[:2] == [ReasoningDelta("Hmm."), TextDelta("42")]
    assert text_of(deltas) == "42"


def tool_use(index: int, id_: str, name: str, input_: dict[str, object] | None = None) -> bytes:
    block = {"type": "tool_use", "id": id_, "name": name, "input": input_ or {}}
    return ev("content_block_start", index=index, content_block=block)


def input_json(index: int, fragment: str) -> bytes:
    return ev(
        "content_block_delta",
        index=index,
        delta={"type": "input_json_delta", "partial_json": fragment},
    )


TOOL_USE = [
    MESSAGE_START,
    BLOCK_START,
    text("Let me check."),
    BLOCK_STOP,
    tool_use(1, "toolu_1", "get_weather"),
    input_json(1, ""),
    input_json(1, '{"city": "Z'),
    input_json(1, 'ürich"}'),
    ev("content_block_stop", index=1),
    tool_use(2, "toolu_2", "get_time"),
    ev("content_block_stop", index=2),
    message_delta("tool_use"),
    MESSAGE_STOP,
]


def test_tool_use_blocks_become_tool_call_deltas_numbered_by_call_not_block():
    assert parse(*TOOL_USE) == [
        TextDelta("Let me check."),
        ToolCallDelta(0, "toolu_1", "get_weather", ""),
        ToolCallDelta(0, arguments='{"city": "Z'),
        ToolCallDelta(0, arguments='ürich"}'),
        ToolCallDone(0),
        # No input_json_delta: the arguments are the block's (empty) input.
        ToolCallDelta(1, "toolu_2", "get_time", ""),
        ToolCallDelta(1, arguments="{}"),
        ToolCallDone(1),
        UsageReport(Usage(30, 15)),
        Finish("tool_calls", Usage(30, 15)),
    ]


def test_a_tool_use_whose_input_came_whole_in_its_start_has_that_input():
    deltas = parse(
        MESSAGE_START,
        tool_use(0, "t", "f", {"a": [1]}),
        ev("content_block_stop", index=0),
        message_delta("tool_use"),
    )
    assert ToolCallDelta(0, arguments='{"a": [1]}') in deltas


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(
            ev("content_block_start", index=0, content_block={"type": "tool_use", "id": "t"}),
            id="a tool_use block without a name",
        ),
        pytest.param(
            ev(
                "content_block_start",
                index=0,
                content_block={"type": "tool_use", "id": "t", "name": "f", "input": []},
            ),
            id="a tool_use block whose input is not an object",
        ),
        pytest.param(
            ev(
                "content_block_start",
                content_block={"type": "tool_use", "id": "t", "name": "f", "input": {}},
            ),
            id="a tool_use block without an index",
        ),
        pytest.param(input_json(0, '{"a"'), id="input_json_delta outside a tool_use block"),
        pytest.param(
            ev("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": 1}),
            id="thinking that is a number",
        ),
    ],
)
def test_tool_use_and_thinking_of_the_wrong_shape_are_data_errors(event: bytes):
    with pytest.raises(DataError) as caught:
        parse(MESSAGE_START, event)
    assert caught.value.fault.code == "UNEXPECTED_SHAPE"


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=40))
def test_any_rechunking_of_tool_use_and_thinking_gives_the_same_deltas(cuts: list[int]):
    stream = b"".join(THINKING_THEN_TEXT[:-2] + TOOL_USE[4:])
    points = sorted(set(cuts))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(*[piece for piece in pieces if piece]) == parse(stream)


def test_unknown_event_types_are_ignored():
    assert text_of(parse(ev("future_event", x=1), *HELLO)) == "Hello, wörld 🚀"


def test_events_without_event_names_are_read_by_their_type():
    unnamed = b"".join(chunk.split(b"\n", 1)[1] for chunk in HELLO)  # drop every `event:` line
    assert parse(unnamed)[-1] == Finish("stop", Usage(30, 15))


def test_an_overloaded_error_event_mid_stream_is_a_retryable_application_error():
    overloaded = (
        b"event: error\n"
        b'data: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
        b"\n\n"
    )
    with pytest.raises(ApplicationError) as caught:
        parse(MESSAGE_START, BLOCK_START, text("Hel"), overloaded)
    fault = caught.value.fault
    assert (fault.code, fault.retryable, fault.tokens_received) == ("OVERLOADED", True, 1)
    assert fault.suggested_action is SuggestedAction.RESUME


def test_a_stream_ending_without_stop_reason_or_message_stop_is_a_data_error():
    with pytest.raises(DataError) as caught:
        parse(MESSAGE_START, BLOCK_START, text("a"), text("b"), BLOCK_STOP)
    assert (caught.value.fault.code, caught.value.fault.tokens_received) == ("NO_FINISH_REASON", 2)


def test_the_stop_reason_without_message_stop_still_finishes():
    assert parse(MESSAGE_START, BLOCK_START, text("a"), message_delta())[-1] == Finish(
        "stop", Usage(30, 15)
    )


def test_invalid_json_is_malformed_data():
    with pytest.raises(DataError) as caught:
        parse(MESSAGE_START, b'event: content_block_delta\ndata: {"type": "content_bl\n\n')
    assert caught.value.fault.code == "MALFORMED_DATA"


@pytest.mark.parametrize(
    "event",
    [
        pytest.param(b"event: message_start\ndata: [1]\n\n", id="data that is not an object"),
        pytest.param(ev("message_start", message="nope"), id="message_start without a message"),
        pytest.param(
            ev("content_block_start", index=0, content_block=None),
            id="a block start without a block",
        ),
        pytest.param(
            ev("content_block_delta", index=0, delta="x"), id="a delta that is not an object"
        ),
        pytest.param(
            ev("content_block_delta", index=0, delta={"type": "text_delta", "text": 42}),
            id="text that is a number",
        ),
        pytest.param(
            ev("content_block_delta", index=0, delta={"type": "text_delta"}),
            id="a text delta without text",
        ),
        pytest.param(
            ev("message_delta", delta={"stop_reason": 3}), id="a stop reason that is a number"
        ),
        pytest.param(ev("message_delta", delta={}, usage=[1]), id="usage that is not an object"),
    ],
)
def test_events_of_the_wrong_shape_are_data_errors(event: bytes):
    with pytest.raises(DataError) as caught:
        parse(event)
    assert caught.value.fault.code == "UNEXPECTED_SHAPE"


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=1200), max_size=40))
def test_any_rechunking_gives_the_same_deltas(cuts: list[int]):
    stream = b"".join(HELLO)
    points = sorted(set(cuts))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(*[piece for piece in pieces if piece]) == parse(stream)


# --- the request body ----------------------------------------------------------------------------

MESSAGES = (Message("system", "Be brief."), Message("user", "Hi"))


def test_the_body_moves_system_messages_to_the_system_field():
    request = ProviderRequest(
        model="claude-3-5-haiku-latest",
        messages=MESSAGES,
        params=GenerationParams(temperature=0.5, stop=("END",)),
    )
    assert messages_body(request, default_max_tokens=1024) == {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 1024,
        "messages": [{"role": "user", "content": "Hi"}],
        "system": "Be brief.",
        "stream": True,
        "temperature": 0.5,
        "stop_sequences": ["END"],
    }


def test_continuation_is_an_assistant_prefill_without_trailing_whitespace():
    request = ProviderRequest(
        model="m", messages=MESSAGES, params=GenerationParams(), continuation="Hello, \n"
    )
    body = messages_body(request, default_max_tokens=100)
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello,"}
    restored = (Message("system", body["system"]), *(Message(**m) for m in body["messages"]))
    assert split_continuation(restored) == (MESSAGES, "Hello,")


WEATHER = Tool("get_weather", "The weather now", '{"type": "object", "properties": {}}')


def test_the_body_carries_tools_tool_use_and_tool_results_in_anthropic_shape():
    request = ProviderRequest(
        model="m",
        messages=(
            Message("system", "Be brief."),
            Message("user", "Weather in Zürich and Oslo?"),
            Message(
                "assistant",
                "Let me look.",
                tool_calls=(
                    ToolCall("toolu_1", "get_weather", '{"city": "Zürich"}'),
                    ToolCall("toolu_2", "get_weather", '{"city": "Oslo"}'),
                ),
            ),
            Message("tool", "21 C", tool_call_id="toolu_1"),
            Message("tool", "8 C", tool_call_id="toolu_2"),
            Message("user", "And tomorrow?"),
        ),
        params=GenerationParams(),
        tools=(WEATHER, Tool("no_args")),
        tool_choice=ToolChoice(mode="required"),
    )
    body = messages_body(request, default_max_tokens=100)
    assert body["tools"] == [
        {
            "name": "get_weather",
            "input_schema": {"type": "object", "properties": {}},
            "description": "The weather now",
        },
        {"name": "no_args", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert body["tool_choice"] == {"type": "any"}
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Zürich and Oslo?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Zürich"},
                },
                {
                    "type": "tool_use",
                    "id": "toolu_2",
                    "name": "get_weather",
                    "input": {"city": "Oslo"},
                },
            ],
        },
        {
            # Both results and the question after them: one user turn.
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21 C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "8 C"},
                {"type": "text", "text": "And tomorrow?"},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        pytest.param(ToolChoice(mode="auto"), {"type": "auto"}, id="auto"),
        pytest.param(ToolChoice(mode="none"), {"type": "none"}, id="none"),
        pytest.param(ToolChoice(mode="required"), {"type": "any"}, id="required is any"),
        pytest.param(
            ToolChoice(tool_name="get_weather"),
            {"type": "tool", "name": "get_weather"},
            id="one tool by name",
        ),
    ],
)
def test_tool_choice_in_anthropic_shape(choice: ToolChoice, sent: object):
    request = ProviderRequest(
        model="m",
        messages=MESSAGES,
        params=GenerationParams(),
        tools=(WEATHER,),
        tool_choice=choice,
    )
    assert messages_body(request, default_max_tokens=100)["tool_choice"] == sent


def test_continuation_uses_the_instruction_when_prefill_is_off():
    request = ProviderRequest(
        model="m", messages=MESSAGES, params=GenerationParams(), continuation="Hello"
    )
    body = messages_body(request, default_max_tokens=100, assistant_prefill=False)
    assert body["messages"][-2:] == [
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]


def test_an_all_whitespace_partial_answer_is_not_sent_as_a_prefill():
    request = ProviderRequest(
        model="m", messages=MESSAGES, params=GenerationParams(), continuation="\n\n"
    )
    assert messages_body(request, default_max_tokens=100)["messages"][-1]["role"] == "user"


# --- the adapter over a mock transport ----------------------------------------------------------


def make_provider(upstream: Upstream, **config: object) -> AnthropicProvider:
    cfg = ProviderConfig(kind="anthropic", base_url="https://api.example.test/v1", **config)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    return AnthropicProvider("claude", cfg, client, api_key=API_KEY, clock=ManualClock())


REQUEST = ProviderRequest(
    model="claude-3-5-haiku-latest", messages=MESSAGES, params=GenerationParams(), attempt=2
)


async def collect(provider: AnthropicProvider) -> list[Delta]:
    return [delta async for delta in provider.stream(REQUEST)]


pytestmark = pytest.mark.usefixtures("no_stray_tasks")


async def test_adapter_streams_the_recorded_answer_and_closes_the_response():
    upstream = Upstream(lambda request: sse(HELLO))
    provider = make_provider(upstream)
    deltas = await collect(provider)
    await provider.aclose()
    assert text_of(deltas) == "Hello, wörld 🚀"
    # The Finish says how many bytes came (for the traces and logs, issue 11).
    assert deltas[-1] == Finish("stop", Usage(30, 15), bytes_received=len(b"".join(HELLO)))
    assert upstream.all_closed()


async def test_adapter_posts_to_messages_with_key_version_default_max_tokens_no_sim_headers():
    upstream = Upstream(lambda request: sse(HELLO))
    provider = make_provider(upstream, default_max_tokens=777)
    await collect(provider)
    await provider.aclose()
    sent = upstream.requests[0]
    assert str(sent.url) == "https://api.example.test/v1/messages"
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert [name for name in sent.headers if name.lower().startswith("x-sim-")] == []
    assert json.loads(sent.content)["max_tokens"] == 777


async def test_the_attempt_is_forwarded_as_a_header_only_when_configured():
    upstream = Upstream(lambda request: sse(HELLO))
    provider = make_provider(upstream, forward_sim_headers=True)
    await collect(provider)
    await provider.aclose()
    assert upstream.requests[0].headers["x-sim-attempt"] == "2"


async def test_http_529_is_a_retryable_protocol_error():
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    provider = make_provider(Upstream(lambda request: httpx.Response(529, json=body)))
    with pytest.raises(ProtocolError) as caught:
        await collect(provider)
    await provider.aclose()
    fault = caught.value.fault
    assert (fault.code, fault.retryable, fault.provider, fault.attempt) == (
        "HTTP_529",
        True,
        "claude",
        2,
    )
    assert "overloaded_error" in fault.message


async def test_an_error_event_mid_stream_keeps_the_counts():
    overloaded = ev("error", error={"type": "overloaded_error", "message": "Overloaded"})
    upstream = Upstream(lambda request: sse([MESSAGE_START, BLOCK_START, text("Hi"), overloaded]))
    provider = make_provider(upstream)
    with pytest.raises(UpstreamError) as caught:
        await collect(provider)
    await provider.aclose()
    assert (caught.value.fault.code, caught.value.fault.tokens_received) == ("OVERLOADED", 1)
    assert caught.value.fault.bytes_received > 0
    assert upstream.all_closed()


async def test_a_connection_lost_mid_body_is_a_network_error():
    cut = httpx.RemoteProtocolError("peer closed connection without sending complete message body")
    upstream = Upstream(lambda request: sse(HELLO[:4], error=cut))
    provider = make_provider(upstream)
    with pytest.raises(NetworkError) as caught:
        await collect(provider)
    await provider.aclose()
    assert (caught.value.fault.code, caught.value.fault.tokens_received) == ("UNEXPECTED_EOF", 1)
    assert upstream.all_closed()


async def test_a_connection_lost_after_the_stop_reason_still_finishes():
    upstream = Upstream(lambda request: sse(HELLO[:7], error=httpx.ReadError("gone")))
    provider = make_provider(upstream)
    deltas = await collect(provider)
    await provider.aclose()
    assert deltas[-1] == Finish("stop", Usage(30, 15), bytes_received=len(b"".join(HELLO[:7])))
