"""The real adapters against the mock upstream over a real socket.

Every fault the mock can inject must reach the caller as the right
`UpstreamError` with the right code. Every test ends with the leak checks of
the fixtures: no httpx connection left in use, every client closed with an
empty pool, no mock handler still running, no asyncio task left over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serverkit import eventually
from tokenrelay_devtools.mock_upstream import (
    MockUpstream,
    parse_mock_faults,
    start_mock_upstream,
)
from tokenrelay_server.config.upstream import (
    ProviderConfig,
    load_upstream_config,
)
from tokenrelay_server.core import classify
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import (
    ApplicationError,
    DataError,
    NetworkError,
    ProtocolError,
    RequestError,
    ResourceError,
    SuggestedAction,
    UpstreamError,
    UpstreamTimeout,
)
from tokenrelay_server.core.model import GenerationParams, Message, Tool, ToolCall
from tokenrelay_server.upstream.anthropic import AnthropicProvider
from tokenrelay_server.upstream.base import (
    Delta,
    Finish,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    UsageReport,
)
from tokenrelay_server.upstream.build import build_providers, make_client
from tokenrelay_server.upstream.http_stream import Receiving
from tokenrelay_server.upstream.openai import OpenAIProvider
from tokenrelay_server.upstream.sim import SimProvider

KINDS = ["openai", "anthropic"]
MESSAGES = (Message("system", "Answer briefly."), Message("user", "Tell me about relays."))
Provider = OpenAIProvider | AnthropicProvider


async def until_idle(upstream: MockUpstream, *, within: float = 5.0) -> None:
    """Wait, for at most `within` seconds, until no mock handler is running."""
    async with asyncio.timeout(within):
        await upstream.wait_idle()


def pool_of(client: httpx.AsyncClient) -> Any:
    return client._transport._pool  # type: ignore[attr-defined]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()  # a fixed wall clock shared by the mock and the adapters


@pytest.fixture
async def upstream(clock: ManualClock) -> AsyncIterator[MockUpstream]:
    baseline = asyncio.all_tasks()
    mock = MockUpstream(clock=clock)
    await mock.start("127.0.0.1", 0)
    yield mock
    await until_idle(mock)  # every handler has ended
    await mock.stop()
    stray = [t for t in asyncio.all_tasks() - baseline if t is not asyncio.current_task()]
    assert not stray, f"tasks left over: {stray}"


class Providers:
    """Builds adapters pointed at the mock and checks their pools at the end."""

    def __init__(self, upstream: MockUpstream, clock: ManualClock) -> None:
        self.upstream = upstream
        self.clock = clock
        self.made: list[Provider] = []

    def __call__(self, kind: str, base_url: str | None = None, **config: Any) -> Provider:
        cfg = ProviderConfig(
            kind=kind,  # type: ignore[arg-type]
            base_url=base_url or self.upstream.base_url,
            **{"forward_sim_headers": True, **config},
        )
        client = make_client(cfg)
        cls = OpenAIProvider if kind == "openai" else AnthropicProvider
        provider = cls(f"mock-{kind}", cfg, client, api_key="test-key", clock=self.clock)
        self.made.append(provider)
        return provider

    async def close_and_check(self) -> None:
        for provider in self.made:
            pool = pool_of(provider._client)
            busy = [c for c in pool.connections if not (c.is_idle() or c.is_closed())]
            assert not busy, f"connections still in use: {busy}"
            await provider.aclose()
            assert pool.connections == []


@pytest.fixture
async def make(upstream: MockUpstream, clock: ManualClock) -> AsyncIterator[Providers]:
    providers = Providers(upstream, clock)
    yield providers
    await providers.close_and_check()


def request(
    faults: str = "",
    *,
    max_tokens: int = 12,
    attempt: int = 1,
    continuation: str = "",
    model: str = "sim-model",
    **sim: str,
) -> ProviderRequest:
    metadata = [("sim.faults", faults)] if faults else []
    metadata += [(f"sim.{key}", value) for key, value in sim.items()]
    return ProviderRequest(
        model=model,
        messages=MESSAGES,
        params=GenerationParams(max_tokens=max_tokens),
        attempt=attempt,
        continuation=continuation,
        metadata=tuple(metadata),
    )


async def run(provider: Any, req: ProviderRequest) -> tuple[list[Delta], UpstreamError | None]:
    deltas: list[Delta] = []
    try:
        async for delta in provider.stream(req):
            deltas.append(delta)
    except UpstreamError as error:
        return deltas, error
    return deltas, None


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas if isinstance(d, TextDelta))


async def sim_text(req: ProviderRequest) -> str:
    deltas, error = await run(SimProvider(), req)
    assert error is None
    return text_of(deltas)


# --- the same text as the in-process simulator ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_a_clean_answer_over_http_is_the_simulators_answer(make: Providers, kind: str):
    req = request(max_tokens=30)
    deltas, error = await run(make(kind), req)
    assert error is None
    assert text_of(deltas) == await sim_text(req)
    assert isinstance(deltas[-1], Finish)
    assert deltas[-1].reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 30


@pytest.mark.parametrize("kind", KINDS)
async def test_a_continuation_over_http_carries_on_like_the_simulator(make: Providers, kind: str):
    partial = await sim_text(request(max_tokens=7))
    req = request(max_tokens=10, continuation=partial)
    deltas, error = await run(make(kind), req)
    assert error is None
    assert text_of(deltas) == await sim_text(req)
    assert partial + text_of(deltas) == await sim_text(request(max_tokens=17))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "faults",
    [
        pytest.param("split_utf8", id="characters split across writes"),
        pytest.param("random_chunks", id="random chunking"),
        pytest.param("split_utf8+random_chunks", id="both at once"),
    ],
)
async def test_write_level_chunking_does_not_change_the_text(make: Providers, kind: str, faults):
    req = request(faults, max_tokens=60, seed="utf8")
    deltas, error = await run(make(kind), req)
    assert error is None
    assert text_of(deltas) == await sim_text(request(max_tokens=60, seed="utf8"))


@pytest.mark.parametrize("kind", KINDS)
async def test_thinking_is_reasoning_not_part_of_the_answer_and_is_paid_for(
    make: Providers, kind: str
):
    deltas, error = await run(make(kind), request("thinking"))
    assert error is None
    assert text_of(deltas) == await sim_text(request())
    assert [type(d) for d in deltas[:2]] == [ReasoningDelta, TextDelta]
    # Usage counts the reasoning delta too, as a provider's does: the
    # gateway learns tokens per delta from it (a usage without it made a
    # later continuation overshoot max_tokens).
    finish = deltas[-1]
    assert isinstance(finish, Finish) and finish.usage is not None
    assert finish.usage.completion_tokens == 12 + 1


# --- every fault → the right error ----------------------------------------------------------------

FAULTS = [
    pytest.param(
        "reset@3", NetworkError, "ECONNRESET", 3, id="a reset after 3 tokens is ECONNRESET"
    ),
    pytest.param(
        "reset_bytes@700",
        NetworkError,
        "ECONNRESET",
        None,
        id="a reset after 700 bytes is ECONNRESET",
    ),
    pytest.param(
        "drop@3",
        NetworkError,
        "UNEXPECTED_EOF",
        3,
        id="a connection closed mid body is UNEXPECTED_EOF",
    ),
    pytest.param(
        "eof@3", DataError, "NO_FINISH_REASON", 3, id="a body ending without a finish reason"
    ),
    pytest.param("garbage@3", DataError, "MALFORMED_DATA", 3, id="broken JSON is MALFORMED_DATA"),
    pytest.param("shape@2", DataError, "UNEXPECTED_SHAPE", 2, id="an event of the wrong shape"),
    pytest.param(
        "error@3:overloaded", ApplicationError, "OVERLOADED", 3, id="an overloaded event mid stream"
    ),
    pytest.param(
        "error@1:rate_limit",
        ApplicationError,
        "RATE_LIMITED",
        1,
        id="a rate limit event mid stream",
    ),
    pytest.param(
        "error@0:context_length",
        ApplicationError,
        "CONTEXT_LENGTH_EXCEEDED",
        0,
        id="a context length error event",
    ),
    pytest.param(
        "error@2:authentication",
        ApplicationError,
        "AUTHENTICATION_FAILED",
        2,
        id="an authentication error event",
    ),
    pytest.param(
        "error@2:invalid_request",
        ApplicationError,
        "INVALID_REQUEST",
        2,
        id="an invalid request error event",
    ),
    pytest.param(
        "error@2:server_error", ApplicationError, "PROVIDER_ERROR", 2, id="a server error event"
    ),
    pytest.param(
        "json_error:overloaded", ApplicationError, "OVERLOADED", 0, id="a JSON error body with 200"
    ),
    pytest.param("http:429", ProtocolError, "HTTP_429", 0, id="HTTP 429"),
    pytest.param("http:529", ProtocolError, "HTTP_529", 0, id="HTTP 529"),
    pytest.param("http:500", ProtocolError, "HTTP_500", 0, id="HTTP 500"),
    pytest.param("http:502", ProtocolError, "HTTP_502", 0, id="HTTP 502"),
    pytest.param("http:503", ProtocolError, "HTTP_503", 0, id="HTTP 503"),
    pytest.param("http:504", ProtocolError, "HTTP_504", 0, id="HTTP 504"),
    pytest.param("http:401", ProtocolError, "HTTP_401", 0, id="HTTP 401"),
    pytest.param("http:400", ProtocolError, "HTTP_400", 0, id="HTTP 400"),
    pytest.param("html", ProtocolError, "WRONG_CONTENT_TYPE", 0, id="an HTML page with 200"),
    pytest.param("html:502", ProtocolError, "HTTP_502", 0, id="an HTML page with 502"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("faults", "error_class", "code", "tokens"), FAULTS)
async def test_each_injected_fault_reaches_the_caller_classified(
    make: Providers, kind: str, faults: str, error_class: type, code: str, tokens: int | None
):
    deltas, error = await run(make(kind), request(faults, attempt=1))
    assert isinstance(error, error_class), error
    fault = error.fault
    assert fault.code == code
    assert (fault.provider, fault.attempt) == (f"mock-{kind}", 1)
    if tokens is not None:
        assert fault.tokens_received == tokens
        assert text_of(deltas) == await sim_text(request(max_tokens=tokens))
    if fault.retryable:
        expected = SuggestedAction.RESUME if fault.tokens_received else SuggestedAction.RETRY
        assert fault.suggested_action is expected
    else:
        assert fault.suggested_action is SuggestedAction.ABORT


# Every status the gateway's one status table names, and one of each class it does not.
TABLE_STATUSES = [*sorted(classify.HTTP_STATUSES), 418, 507]


def _meaning(status: int) -> tuple[bool, bool]:
    fault = classify.classify_http_status(status)
    return fault.retryable, classify.counts_against_provider(fault)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", TABLE_STATUSES)
async def test_an_http_error_over_the_wire_means_what_the_status_table_says(
    make: Providers, kind: str, status: int
):
    _, error = await run(make(kind), request(f"http:{status}"))
    assert isinstance(error, ProtocolError), error
    assert error.fault.code == f"HTTP_{status}"
    assert (error.fault.retryable, classify.counts_against_provider(error.fault)) == _meaning(
        status
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("status", TABLE_STATUSES)
async def test_the_mock_sends_an_error_body_that_agrees_with_its_status(
    upstream: MockUpstream, kind: str, status: int
):
    path = "chat/completions" if kind == "openai" else "messages"
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{upstream.base_url}/{path}",
            headers={"x-sim-faults": f"http:{status}"},
            json={
                "model": "m",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 5,
                "stream": True,
            },
        )
    assert response.status_code == status
    payload = classify.error_payload_fields(response.json())
    assert payload is not None
    # The body alone, as a mid-stream error would be read, means the same.
    fault = classify.classify_provider_error(payload.type, payload.code, payload.message)
    assert (fault.retryable, classify.counts_against_provider(fault)) == _meaning(status)


@pytest.mark.parametrize("status", TABLE_STATUSES)
async def test_the_in_process_simulator_fails_as_the_status_table_says(status: int):
    _, error = await run(SimProvider(), request(f"http:{status}"))
    assert isinstance(error, ProtocolError), error
    assert error.fault.code == f"HTTP_{status}"
    assert (error.fault.retryable, classify.counts_against_provider(error.fault)) == _meaning(
        status
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("faults", "sim", "retry_after"),
    [
        pytest.param("http:429", {}, 1.0, id="Retry-After in seconds"),
        pytest.param("http:429", {"retry_after_s": "3"}, 3.0, id="the delay the request asked for"),
        pytest.param(
            "http:529+retry_after:date",
            {"retry_after_s": "2"},
            2.0,
            id="Retry-After as an HTTP date",
        ),
        pytest.param(
            "http:503+retry_after:ms", {"retry_after_s": "0.25"}, 0.25, id="retry-after-ms"
        ),
    ],
)
async def test_retry_after_reaches_the_fault(make, kind, faults, sim, retry_after):
    _, error = await run(make(kind), request(faults, **sim))
    assert error is not None
    assert error.fault.retry_after_s == retry_after


@pytest.mark.parametrize("kind", KINDS)
async def test_the_fault_script_applies_per_attempt(make: Providers, kind: str):
    provider = make(kind)
    _, first = await run(provider, request("reset@2,http:503,ok", attempt=1))
    _, second = await run(provider, request("reset@2,http:503,ok", attempt=2))
    third, error = await run(provider, request("reset@2,http:503,ok", attempt=3))
    assert first is not None and first.fault.code == "ECONNRESET"
    assert second is not None and second.fault.code == "HTTP_503"
    assert error is None and isinstance(third[-1], Finish)


async def test_a_model_name_suffix_injects_faults_without_headers(make: Providers):
    _, error = await run(make("openai", forward_sim_headers=False), request(model="gpt#http:502"))
    assert error is not None and error.fault.code == "HTTP_502"


async def test_without_the_attempt_header_every_request_is_the_first_attempt(make: Providers):
    # A provider that does not forward sim headers sends no x-sim-attempt: the
    # mock cannot tell retries apart, so the script's first item applies to all.
    provider = make("openai", forward_sim_headers=False)
    for attempt in (1, 2, 3):
        _, error = await run(provider, request(model="gpt#http:503,ok", attempt=attempt))
        assert error is not None and error.fault.code == "HTTP_503", attempt


async def test_the_fault_header_wins_over_the_model_suffix(make: Providers):
    _, error = await run(make("openai"), request("http:504", model="gpt#http:502"))
    assert error is not None and error.fault.code == "HTTP_504"


async def test_a_bad_fault_script_is_a_400_that_names_the_header(make: Providers):
    _, error = await run(make("anthropic"), request("explode@3"))
    assert error is not None and error.fault.code == "HTTP_400"
    assert "x-sim-faults" in error.fault.message


# --- network failures below HTTP ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_connection_is_econnrefused(make: Providers, kind: str):
    provider = make(kind, base_url=f"http://127.0.0.1:{_closed_port()}/v1")
    _, error = await run(provider, request())
    assert isinstance(error, NetworkError)
    assert error.fault.code == "ECONNREFUSED"


async def test_tls_to_a_plain_http_server_is_a_tls_error(make: Providers, upstream: MockUpstream):
    provider = make("openai", base_url=f"https://127.0.0.1:{upstream.port}/v1")
    _, error = await run(provider, request())
    assert isinstance(error, NetworkError)
    assert error.fault.code == "TLS_ERROR"


async def test_a_listener_that_never_accepts_is_a_connect_timeout(make: Providers):
    # A full accept queue drops SYNs, so the connect hangs until the timeout.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(listener.getsockname())
                fillers.append(filler)
            host, port = listener.getsockname()
            provider = make("openai", base_url=f"http://{host}:{port}/v1", connect_timeout_s=0.2)
            _, error = await run(provider, request())
        finally:
            for filler in fillers:
                filler.close()
    assert isinstance(error, UpstreamTimeout)
    assert error.fault.code == "CONNECT_TIMEOUT"
    assert error.fault.retryable


# --- stalls and slow starts are the caller's timeouts; nothing may leak ---------------------------
#
# The mock's pace and slow first byte wait on its clock (the fixture's
# ManualClock), and so does the caller's timeout here, as the generation
# loop's does: the clock moves once `in_flight()` shows the mock waiting.


async def until_the_mock_is(upstream: MockUpstream, state: str) -> None:
    """Until the mock's one request is in `state`."""
    await eventually(lambda: [view.state for view in upstream.in_flight()] == [state])


async def next_within(clock: ManualClock, seconds: float, stream: AsyncIterator[Delta]) -> Delta:
    """The next delta, or TimeoutError once `seconds` of the clock passed."""
    async with clock.deadline(seconds):
        return await anext(stream)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stalled_stream_blocks_until_the_caller_gives_up_and_then_closes(
    make: Providers, upstream: MockUpstream, clock: ManualClock, kind: str
):
    stream = make(kind).stream(request("stall@2"))
    received = [await anext(stream), await anext(stream)]  # type: ignore[call-overload]
    # 5 s: the generation loop's stall timeout.
    waiting = asyncio.create_task(next_within(clock, 5.0, stream))
    await until_the_mock_is(upstream, "stalled")
    await clock.run_for(4.9)
    assert not waiting.done()  # nothing comes, and nothing ends it but the caller
    await clock.run_for(0.1)
    with pytest.raises(TimeoutError):
        await waiting
    assert text_of(received) == await sim_text(request(max_tokens=2))
    await until_idle(upstream)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "writes", ["", "+split_utf8", "+random_chunks"], ids=["whole", "split", "random pieces"]
)
async def test_a_stalled_answer_shows_what_it_sent_and_the_adapter_what_it_took_in(
    make: Providers, upstream: MockUpstream, kind: str, writes: str
):
    # What a time keeper relies on: once the adapter has taken in every byte
    # the mock sent, every delta of them has been handed on.
    provider = make(kind)
    stream = provider.stream(request(f"ok,ok,stall@5{writes}", attempt=3))
    deltas: list[Delta] = []

    async def consume() -> None:
        async for delta in stream:
            deltas.append(delta)

    consumer = asyncio.create_task(consume())
    await until_the_mock_is(upstream, "stalled")
    [answer] = upstream.in_flight()
    assert answer.attempt == 3 and answer.bytes_sent > 0
    await eventually(lambda: provider.in_flight() == (Receiving(3, answer.bytes_sent),))
    assert text_of(deltas) == await sim_text(request(max_tokens=5))
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await stream.aclose()  # type: ignore[attr-defined]
    assert provider.in_flight() == ()
    await until_idle(upstream)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_slow_first_byte_is_abandoned_cleanly_by_the_caller(
    make: Providers, upstream: MockUpstream, clock: ManualClock, kind: str
):
    stream = make(kind).stream(request("slow_first_byte@60000"))
    # 30 s: the generation loop's first-token timeout, before the mock's 60 s.
    waiting = asyncio.create_task(next_within(clock, 30.0, stream))
    await until_the_mock_is(upstream, "waiting")
    await clock.run_for(30.0)
    with pytest.raises(TimeoutError):
        await waiting
    await until_idle(upstream)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_slow_first_byte_still_answers_when_waited_for(
    make: Providers, upstream: MockUpstream, clock: ManualClock, kind: str
):
    answer = asyncio.create_task(run(make(kind), request("slow_first_byte@50")))
    await until_the_mock_is(upstream, "waiting")
    await clock.run_for(0.049)
    assert upstream.in_flight()[0].state == "waiting"  # not a byte before its time
    await clock.run_for(0.001)
    deltas, error = await answer
    assert error is None
    assert text_of(deltas) == await sim_text(request())


@pytest.mark.parametrize("kind", KINDS)
async def test_a_response_over_the_size_cap_is_cut_off(make: Providers, kind: str):
    deltas, error = await run(make(kind, max_response_bytes=3_000), request(max_tokens=500))
    assert isinstance(error, ResourceError)
    assert error.fault.code == "RESPONSE_TOO_LARGE"
    assert 0 < error.fault.tokens_received == len(deltas)
    assert error.fault.bytes_received > 3_000


@pytest.mark.parametrize("kind", KINDS)
async def test_the_consumer_closing_early_closes_the_connection(
    make: Providers, upstream: MockUpstream, clock: ManualClock, kind: str
):
    # Paced at a second of the clock per token: the mock is mid-answer when
    # the consumer leaves.
    stream = make(kind).stream(request(max_tokens=200, pace_ms="1000"))
    first = asyncio.create_task(next_within(clock, 60.0, stream))
    await until_the_mock_is(upstream, "waiting")
    await clock.run_for(1.0)
    assert await first is not None
    await stream.aclose()  # type: ignore[attr-defined]
    await until_idle(upstream)


@pytest.mark.parametrize("kind", KINDS)
async def test_the_mock_paces_on_an_absolute_schedule_however_late_it_wakes(
    make: Providers, upstream: MockUpstream, clock: ManualClock, kind: str
):
    # Every wake-up 7 ms late: sleeping the full pace after each event would
    # put event k at k * 27 ms; on an absolute schedule it is due at
    # start + k * 20 ms (issue 10).
    started = clock.monotonic()
    answer = asyncio.create_task(run(make(kind), request(max_tokens=30, pace_ms="20")))
    last_due = 0.0
    for k in range(1, 31):
        # The mock's next wake-up is the only timer on the clock.
        await eventually(lambda after=last_due: (clock.next_due() or 0.0) > after)
        due = clock.next_due()
        assert due == pytest.approx(started + k * 0.020, abs=1e-9), f"event {k}"
        clock.advance(due - clock.monotonic() + 0.007)
        last_due = due
    deltas, error = await answer
    assert error is None
    assert text_of(deltas) == await sim_text(request(max_tokens=30))


# --- pooling --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_sequential_streams_reuse_one_pooled_connection(make: Providers, kind: str):
    provider = make(kind)
    for _ in range(3):
        _, error = await run(provider, request())
        assert error is None
    assert len(pool_of(provider._client).connections) == 1


@pytest.mark.parametrize("kind", KINDS)
async def test_concurrent_streams_share_the_client(make: Providers, kind: str):
    provider = make(kind)
    requests = [request(max_tokens=20, seed=str(n)) for n in range(20)]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(run(provider, req)) for req in requests]
    for task, req in zip(tasks, requests, strict=True):
        deltas, error = task.result()
        assert error is None
        assert text_of(deltas) == await sim_text(req)


# --- building from configuration ------------------------------------------------------------------


async def test_providers_built_from_config_stream_from_the_mock(upstream: MockUpstream):
    document = {
        "providers": {
            "local-openai": {
                "kind": "openai",
                "base_url": upstream.base_url,
                "api_key_env": "LOCAL_OPENAI_KEY",
            },
            "local-anthropic": {"kind": "anthropic", "base_url": upstream.base_url},
        },
        "models": {
            "fast": {
                "chain": [
                    {"provider": "local-openai", "model": "gpt-4o-mini"},
                    {"provider": "local-anthropic", "model": "claude-3-5-haiku-latest"},
                ]
            }
        },
    }
    config = load_upstream_config(document, "test.toml")
    providers = build_providers(config, {"LOCAL_OPENAI_KEY": "k-123"})
    try:
        for entry in config.models["fast"].chain:
            deltas, error = await run(providers[entry.provider], request())
            assert error is None
            assert text_of(deltas) == await sim_text(request())
    finally:
        for provider in providers.values():
            await provider.aclose()


# --- the mock itself ------------------------------------------------------------------------------


async def test_a_request_without_stream_gets_the_whole_answer(upstream: MockUpstream):
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{upstream.base_url}/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5},
        )
    message = response.json()["choices"][0]["message"]
    assert message["content"] == await sim_text(
        ProviderRequest("m", (Message("user", "Hi"),), GenerationParams(max_tokens=5))
    )


async def test_anthropic_requests_need_max_tokens_like_the_real_api(upstream: MockUpstream):
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{upstream.base_url}/messages",
            json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True},
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in response.json()["error"]["message"]


async def test_start_mock_upstream_returns_the_port_it_listens_on():
    mock, port = await start_mock_upstream("127.0.0.1", 0)
    try:
        assert port == mock.port > 0
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", content=b"not json"
            )
        assert response.status_code == 400
        assert json.loads(response.content)["error"]["type"] == "invalid_request_error"
    finally:
        await mock.stop()


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        pytest.param("reset@x", "reset@x", id="a count that is not a number"),
        pytest.param(
            "reset@2+stall@3", "two simulator faults", id="two simulator faults in one item"
        ),
        pytest.param("error@2:meteor", "meteor", id="an unknown error kind"),
        pytest.param("html:999", "999", id="a status that is not HTTP"),
        pytest.param("ok,frobnicate", "item 2", id="an unknown fault names its item"),
    ],
)
def test_bad_fault_scripts_are_rejected_with_the_item(script: str, problem: str):
    with pytest.raises(RequestError) as caught:
        parse_mock_faults(script)
    assert problem in str(caught.value)


def test_a_fault_script_splits_simulator_and_http_parts():
    items = parse_mock_faults("reset@5+split_utf8, http:429+retry_after:date ,drop@2")
    assert [item.sim for item in items] == ["reset@5", "http:429", "ok"]
    assert items[0].http.split_utf8
    assert items[1].http.retry_after == "date"
    assert items[2].http.drop_at == 2


async def test_a_bad_simulator_setting_is_a_400_that_names_the_header(make: Providers):
    _, error = await run(make("openai"), request(pace_ms="fast"))
    assert error is not None and error.fault.code == "HTTP_400"
    assert "x-sim-pace-ms" in error.fault.message


# --- agent turns: tool calls and reasoning in both formats (issue 12) ---------------------------

WEATHER = Tool(
    "get_weather",
    "The weather now",
    '{"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}',
)


def agent_request(
    faults: str = "",
    *,
    messages: tuple[Message, ...] = MESSAGES,
    continuation: str = "",
    attempt: int = 1,
    **sim: str,
) -> ProviderRequest:
    base = request(faults, max_tokens=20, continuation=continuation, attempt=attempt, **sim)
    return dataclasses.replace(base, messages=messages, tools=(WEATHER,))


def assembled(deltas: list[Delta]) -> list[tuple[str, str, str]]:
    """(id, name, arguments) per call, joined from its pieces."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if isinstance(delta, ToolCallDelta):
            call = calls.setdefault(delta.index, ["", "", ""])
            call[0] = call[0] or delta.id
            call[1] = call[1] or delta.name
            call[2] += delta.arguments
    return [(c[0], c[1], c[2]) for _, c in sorted(calls.items())]


def kinds(deltas: list[Delta]) -> list[str]:
    return [type(d).__name__ for d in deltas if not isinstance(d, UsageReport | Finish)]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_tool_call_over_http_is_the_simulators_call(make: Providers, kind: str):
    req = agent_request(reasoning="2")
    deltas, error = await run(make(kind), req)
    assert error is None
    expected, _ = await run(SimProvider(), req)
    ((call_id, name, arguments),) = assembled(deltas)
    assert assembled(deltas) == assembled(expected)
    assert name == "get_weather" and call_id.startswith("call_")
    assert set(json.loads(arguments)) == {"city", "days"}
    assert [d.text for d in deltas if isinstance(d, ReasoningDelta)] == [
        d.text for d in expected if isinstance(d, ReasoningDelta)
    ]
    assert text_of(deltas) == text_of(expected)
    assert isinstance(deltas[-1], Finish) and deltas[-1].reason == "tool_calls"
    if kind == "anthropic":  # the tool_use block's stop closes the call
        assert ToolCallDone(0) in deltas


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("faults", "error_class", "code"),
    [
        pytest.param("reset@5", NetworkError, "ECONNRESET", id="a reset inside the arguments"),
        pytest.param(
            "drop@6", NetworkError, "UNEXPECTED_EOF", id="a dropped connection inside them"
        ),
        pytest.param("garbage@5", DataError, "MALFORMED_DATA", id="garbage inside them"),
        pytest.param("eof@6", DataError, "NO_FINISH_REASON", id="the body ending inside them"),
        pytest.param(
            "error@5:overloaded", ApplicationError, "OVERLOADED", id="an error event inside them"
        ),
        pytest.param("shape@5", DataError, "UNEXPECTED_SHAPE", id="a wrong event inside them"),
    ],
)
async def test_every_fault_can_land_inside_a_tool_calls_arguments(
    make: Providers, kind: str, faults: str, error_class: type, code: str
):
    # 3 preamble text events, the call's first event, then argument fragments.
    deltas, error = await run(make(kind), agent_request(faults + "+split_utf8"))
    assert isinstance(error, error_class) and error.fault.code == code
    assert kinds(deltas)[:4] == ["TextDelta"] * 3 + ["ToolCallDelta"]
    ((_, name, arguments),) = assembled(deltas)
    assert name == "get_weather"
    with pytest.raises(ValueError):
        json.loads(arguments)  # cut mid-arguments


@pytest.mark.parametrize("kind", KINDS)
async def test_a_reset_inside_the_reasoning_lands_there(make: Providers, kind: str):
    deltas, error = await run(make(kind), agent_request("reset@3", reasoning="6"))
    assert isinstance(error, NetworkError)
    assert kinds(deltas) == ["ReasoningDelta"] * 3


@pytest.mark.parametrize("kind", KINDS)
async def test_the_tool_result_turn_is_answered_with_the_final_text(make: Providers, kind: str):
    first, _ = await run(make(kind), agent_request())
    ((call_id, name, arguments),) = assembled(first)
    conversation = (
        *MESSAGES,
        Message("assistant", text_of(first), tool_calls=(ToolCall(call_id, name, arguments),)),
        Message("tool", '{"celsius": 21}', tool_call_id=call_id),
    )
    req = agent_request(messages=conversation)
    deltas, error = await run(make(kind), req)
    assert error is None
    assert not assembled(deltas)
    assert text_of(deltas) == await sim_text(req) != ""
    assert isinstance(deltas[-1], Finish) and deltas[-1].reason == "stop"


@pytest.mark.parametrize("kind", KINDS)
async def test_a_tool_turn_continued_after_its_preamble_makes_the_same_call(
    make: Providers, kind: str
):
    first, _ = await run(make(kind), agent_request())
    deltas, error = await run(make(kind), agent_request(continuation=text_of(first), attempt=2))
    assert error is None
    assert text_of(deltas).strip() == ""
    assert assembled(deltas) == assembled(first)


@pytest.mark.parametrize(
    ("path", "body", "calls"),
    [
        pytest.param(
            "chat/completions",
            {
                "model": "m",
                "messages": [{"role": "user", "content": "Hi"}],
                "tools": [{"type": "function", "function": {"name": "get_time"}}],
            },
            lambda body: body["choices"][0]["message"]["tool_calls"],
            id="openai",
        ),
        pytest.param(
            "messages",
            {
                "model": "m",
                "max_tokens": 10,
                "messages": [{"role": "user", "content": "Hi"}],
                "tools": [{"name": "get_time", "input_schema": {"type": "object"}}],
            },
            lambda body: [b for b in body["content"] if b["type"] == "tool_use"],
            id="anthropic",
        ),
    ],
)
async def test_a_request_without_stream_gets_its_tool_calls_whole(
    upstream: MockUpstream, path: str, body: dict[str, Any], calls: Any
):
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{upstream.base_url}/{path}", json=body)
    assert response.status_code == 200
    (call,) = calls(response.json())
    assert call["id"].startswith("call_")
