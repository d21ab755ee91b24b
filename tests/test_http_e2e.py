"""The whole path: gRPC client → gateway → real HTTP adapters → mock upstream
(OpenAI and Anthropic formats) over real sockets, faults included.

The gateway and the mock share a ManualClock with realistic timers (1 s
backoff, 5 s stall timeout, Retry-After of a second); a time keeper moves it
only when every stream provably waits on time: a backoff, or a mock answer
that stalled (or waits on its clock) after the gateway took in every byte
of it. A slow machine cannot fire a stall timeout early."""

from __future__ import annotations

import asyncio
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
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.model import Message
from tokenrelay_server.upstream.sim import SimAnswer

PROMPT = "tell me about streams"

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

[providers.mock-plain]
kind = "openai"
base_url = "{base_url}"

[models.oa]
chain = [{{ provider = "mock-openai", model = "gpt-4o-mini" }}]

[models.plain]
chain = [{{ provider = "mock-plain", model = "gpt-4o-mini" }}]

[models.an]
chain = [{{ provider = "mock-anthropic", model = "claude-3-5-haiku-latest" }}]

[models.both]
chain = [
  {{ provider = "mock-openai", model = "gpt-4o-mini" }},
  {{ provider = "mock-anthropic", model = "claude-3-5-haiku-latest" }},
]
"""


@pytest.fixture
async def gateway(
    upstream: MockUpstream, relay_factory: RelayFactory, tmp_path: Path, clock: ManualClock
) -> AsyncIterator[RelayServer]:
    async with configured_gateway(
        CONFIG, upstream=upstream, relay_factory=relay_factory, tmp_path=tmp_path, clock=clock
    ) as relay:
        yield relay


def clean(max_tokens: int) -> str:
    return SimAnswer((Message("user", PROMPT),)).text(max_tokens)


@pytest.mark.parametrize("model", ["oa", "an"], ids=["openai format", "anthropic format"])
async def test_a_generation_streams_end_to_end_over_http(gateway: RelayServer, model: str) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        events = await run_to_end(channel, start_request(model=model, prompt=PROMPT, max_tokens=40))
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    assert text_of(events) == clean(40)
    end = end_of(events)
    assert not end.partial
    assert end.text_sha256 == sha256(clean(40))
    assert end.usage.completion_tokens > 0
    assert {c.provider for c in chunks} == {"mock-openai" if model == "oa" else "mock-anthropic"}


@pytest.mark.parametrize("model", ["oa", "an"], ids=["openai format", "anthropic format"])
@pytest.mark.parametrize(
    "faults",
    [
        "reset@7",
        "stall@5",
        "garbage@3+random_chunks",
        "drop@9",
        "http:429",
        "http:503+retry_after:ms",
        "error@6:overloaded",
        "split_utf8+reset_bytes@300",
        "html",
    ],
    ids=[
        "reset mid-stream",
        "stall",
        "garbage is not retried but keeps the partial",
        "body cut short",
        "rate limited",
        "503 with retry-after-ms",
        "overloaded mid-stream",
        "split characters then a reset",
        "an html page instead of a stream",
    ],
)
async def test_faults_over_http_end_clean_or_typed_partial(
    gateway: RelayServer, model: str, faults: str
) -> None:
    metadata = {"sim.faults": faults, "sim.retry_after_s": "1"}
    request = start_request(model=model, prompt=PROMPT, max_tokens=40, metadata=metadata)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        events = await run_to_end(channel, request)
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    end = end_of(events)
    assert end.text_sha256 == sha256(text_of(events))
    if faults.startswith("garbage"):
        assert end.partial and end.error.code == "MALFORMED_DATA"
        assert end.error.type == pb.ERROR_TYPE_DATA
        assert clean(40).startswith(text_of(events))
    else:
        assert not end.partial, end.error
        assert text_of(events) == clean(40)
        notices = [e.error for e in events if e.HasField("error")]
        assert notices and all(not n.fatal for n in notices)


async def test_a_failing_provider_falls_back_to_the_other_format(gateway: RelayServer) -> None:
    metadata = {"sim.faults": "reset@8,http:500,http:500,ok"}
    request = start_request(model="both", prompt=PROMPT, max_tokens=30, metadata=metadata)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        events = await run_to_end(channel, request)
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    assert text_of(events) == clean(30)
    assert chunks[0].provider == "mock-openai" and chunks[-1].provider == "mock-anthropic"
    actions = [e.error.suggested_action for e in events if e.HasField("error")]
    assert actions[-1] == pb.SUGGESTED_ACTION_FALLBACK


@pytest.mark.parametrize("kind", ["oa", "an"], ids=["openai format", "anthropic format"])
async def test_a_provider_that_forwards_sim_headers_sends_the_attempt_and_the_faults(
    upstream: MockUpstream, gateway: RelayServer, kind: str
) -> None:
    metadata = {"sim.faults": "reset@3,ok", "sim.retry_after_s": "1"}
    request = start_request(model=kind, prompt=PROMPT, max_tokens=10, metadata=metadata)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        events = await run_to_end(channel, request)
    assert not end_of(events).partial
    received = list(upstream.sim_headers_received)
    assert [headers.get("x-sim-attempt") for headers in received] == ["1", "2"]
    assert {headers.get("x-sim-faults") for headers in received} == {"reset@3,ok"}


async def test_a_provider_without_forward_sim_headers_sends_no_sim_header(
    upstream: MockUpstream, gateway: RelayServer
) -> None:
    # Issue 8: a real API must never see x-sim-* headers, not even the attempt.
    metadata = {"sim.faults": "reset@3,ok", "sim.seed": "7"}
    request = start_request(model="plain", prompt=PROMPT, max_tokens=10, metadata=metadata)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        events = await run_to_end(channel, request)
    assert list(upstream.sim_headers_received) == [{}]  # one request, no x-sim-* header
    assert not end_of(events).partial
    assert text_of(events) == clean(10)  # no fault and no seed reached the mock


async def test_nothing_is_left_open_after_streams_and_shutdown(
    upstream: MockUpstream, gateway: RelayServer
) -> None:
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        await asyncio.gather(
            *(
                run_to_end(
                    channel,
                    start_request(
                        model=model, prompt=PROMPT, max_tokens=20, metadata={"sim.faults": f}
                    ),
                )
                for model in ("oa", "an")
                for f in ("ok", "reset@3", "garbage@2", "stall@2")
            )
        )
    await gateway.stop()
    await upstream.wait_idle()
    for provider in gateway.hub.router.providers():
        pool = getattr(getattr(provider, "_client", None), "_transport", None)
        connections = getattr(getattr(pool, "_pool", None), "connections", [])
        assert connections == [], provider.name
    current = asyncio.current_task()
    leftovers = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not [t for t in leftovers if "generation" in t.get_name()]


async def test_a_trimmed_prefill_does_not_skew_the_tokens_counted_per_delta(
    gateway: RelayServer,
) -> None:
    # Found by `tokenrelay chaos`: an Anthropic continuation whose delivered
    # text ends in whitespace sends the prefill trimmed; the model writes the
    # whitespace again and the adapter drops that delta, but the usage counts
    # its token. The gateway learnt more than one token per delta from that
    # answer, then counted a later broken answer's text as more tokens than it
    # was, and its continuation stopped short of max_tokens.
    whitespace = next(i for i in range(100) if not clean(i + 1)[len(clean(i)) :].strip())
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        trimmed = await run_to_end(
            channel,
            start_request(
                model="an",
                prompt=PROMPT,
                max_tokens=whitespace + 9,
                metadata={"sim.faults": f"eof@{whitespace + 1}"},  # ends on the whitespace
            ),
        )
        assert text_of(trimmed) == clean(whitespace + 9)
        later = await run_to_end(
            channel,
            start_request(
                model="an", prompt=PROMPT, max_tokens=30, metadata={"sim.faults": "eof@16"}
            ),
        )
    assert not end_of(later).partial
    assert text_of(later) == clean(30)
