"""The OpenAI-compatible adapter: the sans-IO parser with byte strings, then
the adapter over `httpx.MockTransport` replaying recorded SSE bytes."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replay import Replay, Upstream, sse
from tokenrelay_server.config.upstream import ProviderConfig
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import (
    ApplicationError,
    DataError,
    ErrorType,
    NetworkError,
    ProtocolError,
    ResourceError,
    SuggestedAction,
    UpstreamError,
    UpstreamTimeout,
)
from tokenrelay_server.core.model import (
    GenerationParams,
    Message,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from tokenrelay_server.upstream.base import (
    CONTINUE_INSTRUCTION,
    Delta,
    Finish,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    UsageReport,
)
from tokenrelay_server.upstream.openai import (
    ChatCompletionsParser,
    OpenAIProvider,
    chat_completions_body,
)
from tokenrelay_server.upstream.sim import split_continuation
from tokenrelay_server.upstream.sse import SSEDecoder

API_KEY = "sk-test-0123456789abcdef"


def chunk(content: str | None = None, *, finish: str | None = None, role: bool = False) -> bytes:
    delta: dict[str, object] = {}
    if role:
        delta["role"] = "assistant"
        delta["content"] = ""
    if content is not None:
        delta["content"] = content
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


def usage_chunk(prompt: int, completion: int) -> bytes:
    body = {
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return f"data: {json.dumps(body)}\n\n".encode()


DONE = b"data: [DONE]\n\n"
HELLO = [
    chunk(role=True),
    chunk("Hel"),
    chunk("lo, wörld 🚀"),
    chunk(finish="stop"),
    usage_chunk(9, 2),
    DONE,
]


def parse(*chunks: bytes) -> list[Delta]:
    """Bytes → deltas, with no I/O: the decoder and the parser alone."""
    decoder, parser = SSEDecoder(), ChatCompletionsParser()
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


# --- the sans-IO parser ----------------------------------------------------------------------


def test_a_clean_stream_gives_text_usage_and_finish():
    deltas = parse(*HELLO)
    assert deltas == [
        TextDelta("Hel"),
        TextDelta("lo, wörld 🚀"),
        UsageReport(Usage(9, 2)),
        Finish("stop", Usage(9, 2)),
    ]


def test_the_role_only_first_delta_gives_no_text():
    assert parse(chunk(role=True), chunk(finish="stop"), DONE) == [Finish("stop")]


@pytest.mark.parametrize(
    "reason",
    [
        pytest.param("stop", id="stop is passed through"),
        pytest.param("length", id="length is passed through"),
        pytest.param("content_filter", id="content_filter is passed through"),
        pytest.param("tool_calls", id="tool_calls is passed through"),
    ],
)
def test_finish_reasons_are_passed_through(reason: str):
    assert parse(chunk("x"), chunk(finish=reason), DONE)[-1] == Finish(reason)


def test_done_without_a_finish_reason_finishes_with_stop():
    assert parse(chunk("x"), DONE)[-1] == Finish("stop")


def test_a_finish_reason_without_done_still_finishes():
    assert parse(chunk("x"), chunk(finish="length"))[-1] == Finish("length")


def test_a_stream_ending_without_finish_or_done_is_a_data_error():
    with pytest.raises(DataError) as caught:
        parse(chunk(role=True), chunk("a"), chunk("b"))
    assert caught.value.fault.code == "NO_FINISH_REASON"
    assert caught.value.fault.tokens_received == 2


def test_an_error_object_mid_stream_is_an_application_error():
    error = {
        "error": {
            "message": "Rate limit reached",
            "type": "requests",
            "code": "rate_limit_exceeded",
        }
    }
    with pytest.raises(ApplicationError) as caught:
        parse(chunk("a"), f"data: {json.dumps(error)}\n\n".encode())
    fault = caught.value.fault
    assert (fault.code, fault.retryable, fault.tokens_received) == ("RATE_LIMITED", True, 1)
    assert fault.suggested_action is SuggestedAction.RESUME


def test_an_openrouter_error_chunk_with_finish_reason_error_is_an_application_error():
    body = {
        "error": {"code": 502, "message": "Provider disconnected"},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    with pytest.raises(ApplicationError) as caught:
        parse(chunk("a"), f"data: {json.dumps(body)}\n\n".encode())
    assert caught.value.fault.code == "PROVIDER_ERROR"


def test_finish_reason_error_without_an_error_object_is_an_application_error():
    with pytest.raises(ApplicationError):
        parse(chunk("a"), chunk(finish="error"))


def test_an_error_event_is_read_like_an_error_chunk():
    stream = b'event: error\ndata: {"error": {"type": "overloaded_error", "message": "busy"}}\n\n'
    with pytest.raises(ApplicationError) as caught:
        parse(stream)
    assert caught.value.fault.code == "OVERLOADED"


def test_invalid_json_is_malformed_data():
    with pytest.raises(DataError) as caught:
        parse(chunk("a"), b'data: {"choices": [{"delta": {"content": "oops\n\n')
    assert caught.value.fault.code == "MALFORMED_DATA"
    assert caught.value.fault.tokens_received == 1


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"[1, 2]", id="a chunk that is not an object"),
        pytest.param(b'{"id": "x"}', id="a chunk with neither choices nor usage"),
        pytest.param(b'{"choices": {"0": {}}}', id="choices that is not a list"),
        pytest.param(b'{"choices": ["x"]}', id="a choice that is not an object"),
        pytest.param(
            b'{"choices": [{"index": 0, "delta": "x"}]}', id="a delta that is not an object"
        ),
        pytest.param(
            b'{"choices": [{"index": 0, "delta": {"content": 7}}]}', id="content that is a number"
        ),
        pytest.param(
            b'{"choices": [{"index": 0, "delta": {}, "finish_reason": 1}]}',
            id="a finish reason that is a number",
        ),
        pytest.param(b'{"choices": [], "usage": [3]}', id="usage that is not an object"),
    ],
)
def test_events_of_the_wrong_shape_are_data_errors(data: bytes):
    with pytest.raises(DataError) as caught:
        parse(b"data: " + data + b"\n\n")
    assert caught.value.fault.code == "UNEXPECTED_SHAPE"


def delta_chunk(delta: dict[str, object], finish: str | None = None) -> bytes:
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("reasoning_content", id="reasoning_content (DeepSeek, vLLM)"),
        pytest.param("reasoning", id="reasoning (OpenRouter, Ollama)"),
    ],
)
def test_reasoning_deltas_are_reasoning_not_answer_text(key: str):
    deltas = parse(delta_chunk({key: "hmm"}), chunk("42"), chunk(finish="stop"))
    assert deltas[:2] == [ReasoningDelta("hmm"), TextDelta("42")]
    assert text_of(deltas) == "42"


def tool_piece(
    index: int | None,
    *,
    id_: str | None = None,
    name: str | None = None,
    arguments: str | None = None,
) -> dict[str, object]:
    piece: dict[str, object] = {} if index is None else {"index": index}
    function: dict[str, object] = {}
    if id_ is not None:
        piece["id"] = id_
        piece["type"] = "function"
    if name is not None:
        function["name"] = name
    if arguments is not None:
        function["arguments"] = arguments
    piece["function"] = function
    return piece


TOOL_CALLS = [
    chunk(role=True),
    delta_chunk(
        {
            "content": None,
            "tool_calls": [tool_piece(0, id_="call_1", name="get_weather", arguments="")],
        }
    ),
    delta_chunk({"tool_calls": [tool_piece(0, arguments='{"city": "Z')]}),
    delta_chunk({"tool_calls": [tool_piece(0, arguments='ürich"}')]}),
    delta_chunk({"tool_calls": [tool_piece(1, id_="call_2", name="get_time", arguments="{}")]}),
    delta_chunk({}, finish="tool_calls"),
    DONE,
]


def test_tool_call_pieces_become_tool_call_deltas_and_the_finish_is_tool_calls():
    assert parse(*TOOL_CALLS) == [
        ToolCallDelta(0, "call_1", "get_weather", ""),
        ToolCallDelta(0, arguments='{"city": "Z'),
        ToolCallDelta(0, arguments='ürich"}'),
        ToolCallDelta(1, "call_2", "get_time", "{}"),
        Finish("tool_calls"),
    ]


def test_pieces_without_an_index_follow_the_call_their_id_names():
    deltas = parse(
        delta_chunk({"tool_calls": [tool_piece(None, id_="a", name="f", arguments="{")]}),
        delta_chunk({"tool_calls": [tool_piece(None, arguments="}")]}),
        delta_chunk({"tool_calls": [tool_piece(None, id_="b", name="g", arguments="{}")]}),
        delta_chunk({}, finish="tool_calls"),
    )
    assert [(d.index, d.id) for d in deltas if isinstance(d, ToolCallDelta)] == [
        (0, "a"),
        (0, ""),
        (1, "b"),
    ]


@pytest.mark.parametrize(
    "delta",
    [
        pytest.param({"reasoning_content": 3}, id="reasoning that is a number"),
        pytest.param({"tool_calls": {"index": 0}}, id="tool_calls that is not a list"),
        pytest.param({"tool_calls": ["x"]}, id="a tool call that is not an object"),
        pytest.param(
            {"tool_calls": [{"index": 0, "function": "f"}]}, id="a function that is not an object"
        ),
        pytest.param({"tool_calls": [{"index": -1, "function": {}}]}, id="a negative index"),
        pytest.param(
            {"tool_calls": [{"index": "0", "function": {}}]}, id="an index that is a string"
        ),
        pytest.param(
            {"tool_calls": [{"index": 0, "function": {"arguments": {"a": 1}}}]},
            id="arguments that are an object, not text",
        ),
        pytest.param(
            {"tool_calls": [{"index": 0, "id": 7, "function": {}}]}, id="an id that is a number"
        ),
    ],
)
def test_reasoning_and_tool_calls_of_the_wrong_shape_are_data_errors(delta: dict[str, object]):
    with pytest.raises(DataError) as caught:
        parse(delta_chunk(delta))
    assert caught.value.fault.code == "UNEXPECTED_SHAPE"


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=900), max_size=40))
def test_any_rechunking_of_a_tool_call_stream_gives_the_same_deltas(cuts: list[int]):
    stream = b"".join(TOOL_CALLS)
    points = sorted(set(cuts))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(*[piece for piece in pieces if piece]) == parse(stream)


def test_choices_other_than_the_first_are_ignored():
    other = {"choices": [{"index": 1, "delta": {"content": "B"}, "finish_reason": None}]}
    deltas = parse(chunk("A"), f"data: {json.dumps(other)}\n\n".encode(), chunk(finish="stop"))
    assert text_of(deltas) == "A"


def test_comments_such_as_openrouter_processing_are_ignored():
    assert text_of(parse(b": OPENROUTER PROCESSING\n\n", chunk("x"), DONE)) == "x"


def test_events_after_done_are_ignored():
    assert parse(chunk("x"), DONE, chunk("late"))[-1] == Finish("stop")


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=40))
def test_any_rechunking_gives_the_same_deltas(cuts: list[int]):
    stream = b"".join(HELLO)
    points = sorted(set(cuts))
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(*[piece for piece in pieces if piece]) == parse(stream)


# --- the request body ----------------------------------------------------------------------------

MESSAGES = (Message("system", "Be brief."), Message("user", "Hi"))


def test_the_body_asks_for_a_stream_with_usage_and_the_parameters():
    request = ProviderRequest(
        model="gpt-4o-mini",
        messages=MESSAGES,
        params=GenerationParams(max_tokens=50, temperature=0.2, top_p=0.9, stop=("\n\n",)),
    )
    body = chat_completions_body(request, include_usage=True)
    assert body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\n"],
    }


WEATHER = Tool(
    "get_weather",
    "The weather now",
    '{"type": "object", "properties": {"city": {"type": "string"}}}',
)
AGENT_MESSAGES = (
    Message("user", "Weather in Zürich?"),
    Message(
        "assistant",
        "",
        tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Zürich"}'),),
    ),
    Message("tool", '{"celsius": 21}', tool_call_id="call_1"),
)


def test_the_body_carries_tools_tool_calls_and_tool_results_in_openai_shape():
    request = ProviderRequest(
        model="m",
        messages=AGENT_MESSAGES,
        params=GenerationParams(),
        tools=(WEATHER, Tool("no_args")),
        tool_choice=ToolChoice(mode="required"),
    )
    body = chat_completions_body(request, include_usage=False)
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        },
        {"type": "function", "function": {"name": "no_args"}},
    ]
    assert body["tool_choice"] == "required"
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
    ]


@pytest.mark.parametrize(
    ("choice", "sent"),
    [
        pytest.param(ToolChoice(mode="auto"), "auto", id="auto"),
        pytest.param(ToolChoice(mode="none"), "none", id="none"),
        pytest.param(
            ToolChoice(tool_name="get_weather"),
            {"type": "function", "function": {"name": "get_weather"}},
            id="one tool by name",
        ),
    ],
)
def test_tool_choice_in_openai_shape(choice: ToolChoice, sent: object):
    request = ProviderRequest(
        model="m",
        messages=MESSAGES,
        params=GenerationParams(),
        tools=(WEATHER,),
        tool_choice=choice,
    )
    assert chat_completions_body(request, include_usage=False)["tool_choice"] == sent


def test_no_tools_no_tool_keys_even_with_a_tool_choice():
    # The API refuses tool_choice without tools.
    request = ProviderRequest(
        model="m", messages=MESSAGES, params=GenerationParams(), tool_choice=ToolChoice("none")
    )
    body = chat_completions_body(request, include_usage=False)
    assert "tools" not in body and "tool_choice" not in body


def test_stream_options_can_be_left_out_for_servers_that_reject_them():
    request = ProviderRequest(model="m", messages=MESSAGES, params=GenerationParams())
    assert "stream_options" not in chat_completions_body(request, include_usage=False)


def test_continuation_sends_the_partial_answer_then_the_instruction():
    request = ProviderRequest(
        model="m", messages=MESSAGES, params=GenerationParams(), continuation="Hello, wor"
    )
    messages = chat_completions_body(request, include_usage=True)["messages"]
    assert messages[-2:] == [
        {"role": "assistant", "content": "Hello, wor"},
        {"role": "user", "content": CONTINUE_INSTRUCTION},
    ]
    # The simulator behind the mock upstream recognises it.
    originals, partial = split_continuation(tuple(Message(**m) for m in messages))
    assert (originals, partial) == (MESSAGES, "Hello, wor")


# --- the adapter over a mock transport ----------------------------------------------------------


def make_provider(upstream: Upstream, **config: object) -> OpenAIProvider:
    cfg = ProviderConfig(kind="openai", base_url="https://api.example.test/v1", **config)
    client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))
    return OpenAIProvider("openai-main", cfg, client, api_key=API_KEY, clock=ManualClock())


REQUEST = ProviderRequest(
    model="gpt-4o-mini",
    messages=MESSAGES,
    params=GenerationParams(max_tokens=20),
    attempt=3,
    metadata=(("sim.faults", "reset@2"), ("tenant", "acme")),
)


async def collect(provider: OpenAIProvider, request: ProviderRequest = REQUEST) -> list[Delta]:
    return [delta async for delta in provider.stream(request)]


async def failure(provider: OpenAIProvider, request: ProviderRequest = REQUEST) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await collect(provider, request)
    return caught.value


pytestmark = pytest.mark.usefixtures("no_stray_tasks")


async def test_adapter_streams_the_recorded_answer_and_closes_the_response():
    upstream = Upstream(lambda request: sse(HELLO))
    provider = make_provider(upstream)
    deltas = await collect(provider)
    await provider.aclose()
    assert text_of(deltas) == "Hello, wörld 🚀"
    # The Finish says how many bytes came (for the traces and logs, issue 11).
    assert deltas[-1] == Finish("stop", Usage(9, 2), bytes_received=len(b"".join(HELLO)))
    assert upstream.all_closed()


async def test_adapter_posts_to_chat_completions_with_the_key_and_no_sim_headers():
    upstream = Upstream(lambda request: sse(HELLO))
    provider = make_provider(upstream)
    await collect(provider)
    await provider.aclose()
    sent = upstream.requests[0]
    assert (sent.method, str(sent.url)) == ("POST", "https://api.example.test/v1/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.headers["accept"] == "text/event-stream"
    # A real API never sees the mock's controls, not even the attempt (issue 8).
    assert [name for name in sent.headers if name.lower().startswith("x-sim-")] == []
    assert json.loads(sent.content)["model"] == "gpt-4o-mini"


async def test_sim_metadata_and_attempt_are_forwarded_as_headers_only_when_configured():
    upstream = Upstream(lambda request: sse(HELLO))
    provider = make_provider(upstream, forward_sim_headers=True)
    await collect(provider)
    await provider.aclose()
    assert upstream.requests[0].headers["x-sim-faults"] == "reset@2"
    assert upstream.requests[0].headers["x-sim-attempt"] == "3"
    assert "x-sim-tenant" not in upstream.requests[0].headers


async def test_the_api_key_never_appears_in_a_fault_or_the_repr():
    echo = {
        "error": {
            "message": f"Incorrect API key provided: {API_KEY}",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        }
    }
    upstream = Upstream(lambda request: httpx.Response(401, json=echo))
    provider = make_provider(upstream)
    error = await failure(provider)
    await provider.aclose()
    assert API_KEY not in str(error.fault.to_json())
    assert API_KEY not in repr(provider)
    assert error.fault.code == "HTTP_401"


async def test_http_429_becomes_a_protocol_error_with_retry_after_and_labels():
    body = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
    response = httpx.Response(429, json=body, headers={"retry-after-ms": "1500"})
    upstream = Upstream(lambda request: response)
    provider = make_provider(upstream)
    error = await failure(provider)
    await provider.aclose()
    assert isinstance(error, ProtocolError)
    fault = error.fault
    assert (fault.code, fault.retryable, fault.retry_after_s) == ("HTTP_429", True, 1.5)
    assert (fault.provider, fault.attempt) == ("openai-main", 3)
    assert fault.bytes_received == len(response.content)


async def test_an_html_page_with_200_is_the_wrong_content_type():
    page = httpx.Response(200, html="<html><body>Bad gateway</body></html>")
    provider = make_provider(Upstream(lambda request: page))
    error = await failure(provider)
    await provider.aclose()
    assert (error.fault.type, error.fault.code) == (ErrorType.PROTOCOL, "WRONG_CONTENT_TYPE")


async def test_a_json_error_body_with_200_is_an_application_error():
    body = {
        "error": {
            "message": "context",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        }
    }
    provider = make_provider(Upstream(lambda request: httpx.Response(200, json=body)))
    error = await failure(provider)
    await provider.aclose()
    assert isinstance(error, ApplicationError)
    assert error.fault.code == "CONTEXT_LENGTH_EXCEEDED"


def _raise(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def respond(request: httpx.Request) -> httpx.Response:
        raise exc

    return respond


def _connect_error(cause: BaseException) -> httpx.ConnectError:
    error = httpx.ConnectError("connection failed")
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("exc", "error_class", "code"),
    [
        pytest.param(
            _connect_error(ConnectionRefusedError(111, "refused")),
            NetworkError,
            "ECONNREFUSED",
            id="a refused connection",
        ),
        pytest.param(
            _connect_error(socket.gaierror(-2, "Name or service not known")),
            NetworkError,
            "DNS_FAILURE",
            id="a DNS failure",
        ),
        pytest.param(
            _connect_error(ssl.SSLCertVerificationError(1, "certificate verify failed")),
            NetworkError,
            "TLS_ERROR",
            id="a TLS failure",
        ),
        pytest.param(
            httpx.ConnectTimeout("timed out"),
            UpstreamTimeout,
            "CONNECT_TIMEOUT",
            id="a connect timeout",
        ),
        pytest.param(
            httpx.PoolTimeout("no connection"), UpstreamTimeout, "POOL_TIMEOUT", id="a pool timeout"
        ),
        pytest.param(
            httpx.ConnectError("???"),
            NetworkError,
            "NETWORK_ERROR",
            id="an unexplained connect error",
        ),
    ],
)
async def test_connection_failures_become_network_or_timeout_errors(exc, error_class, code):
    provider = make_provider(Upstream(_raise(exc)))
    error = await failure(provider)
    await provider.aclose()
    assert isinstance(error, error_class)
    assert error.fault.code == code
    assert error.fault.retryable
    assert error.fault.suggested_action is SuggestedAction.RETRY


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        pytest.param(httpx.ReadError("reset"), "NETWORK_ERROR", id="a read error"),
        pytest.param(
            httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            ),
            "UNEXPECTED_EOF",
            id="a body cut short",
        ),
    ],
)
async def test_a_connection_lost_mid_body_keeps_count_and_suggests_resume(exc, code):
    upstream = Upstream(lambda request: sse(HELLO[:3], error=exc))
    provider = make_provider(upstream)
    received: list[Delta] = []
    with pytest.raises(NetworkError) as caught:
        async for delta in provider.stream(REQUEST):
            received.append(delta)
    await provider.aclose()
    fault = caught.value.fault
    assert text_of(received) == "Hello, wörld 🚀"
    assert (fault.code, fault.tokens_received) == (code, 2)
    assert fault.bytes_received == sum(map(len, HELLO[:3]))
    assert fault.suggested_action is SuggestedAction.RESUME
    assert upstream.all_closed()


async def test_a_reset_read_error_is_econnreset():
    error = httpx.ReadError("")
    error.__cause__ = ConnectionResetError(104, "Connection reset by peer")
    provider = make_provider(Upstream(lambda request: sse(HELLO[:2], error=error)))
    failed = await failure(provider)
    await provider.aclose()
    assert failed.fault.code == "ECONNRESET"
    assert "Connection reset by peer" in failed.fault.message


async def test_a_connection_lost_after_the_finish_reason_still_finishes():
    upstream = Upstream(lambda request: sse(HELLO[:4], error=httpx.ReadError("gone")))
    provider = make_provider(upstream)
    deltas = await collect(provider)
    await provider.aclose()
    assert deltas[-1] == Finish("stop", bytes_received=len(b"".join(HELLO[:4])))
    assert text_of(deltas) == "Hello, wörld 🚀"


async def test_a_response_over_the_size_cap_is_a_resource_error():
    many = [chunk("x" * 100) for _ in range(50)] + [chunk(finish="stop"), DONE]
    upstream = Upstream(lambda request: sse(many))
    provider = make_provider(upstream, max_response_bytes=2_000)
    error = await failure(provider)
    await provider.aclose()
    assert isinstance(error, ResourceError)
    assert error.fault.code == "RESPONSE_TOO_LARGE"
    assert error.fault.tokens_received > 0
    assert upstream.all_closed()


async def test_closing_the_iteration_early_closes_the_response():
    upstream = Upstream(lambda request: sse(HELLO))
    provider = make_provider(upstream)
    stream = provider.stream(REQUEST)
    first = await anext(stream)  # type: ignore[call-overload]
    await stream.aclose()  # type: ignore[attr-defined]
    await provider.aclose()
    assert first == TextDelta("Hel")
    assert upstream.all_closed()


async def test_cancelling_the_consumer_closes_the_response_and_propagates():
    started = asyncio.Event()

    class Endless(Replay):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield chunk("first")
            started.set()
            await asyncio.Event().wait()  # never answers again
            yield b""  # pragma: no cover

    upstream = Upstream(
        lambda request: httpx.Response(
            200, headers={"content-type": "text/event-stream"}, stream=Endless([])
        )
    )
    provider = make_provider(upstream)

    async def consume() -> None:
        async for _ in provider.stream(REQUEST):
            pass

    task = asyncio.create_task(consume())
    async with asyncio.timeout(5):
        await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await provider.aclose()
    assert upstream.all_closed()
