"""Recovery over a real server: whatever the simulated upstream does, the client
gets the clean answer with contiguous seq, or a typed partial.

The gateway runs on a ManualClock with realistic timers; a time keeper moves
it only when every stream provably waits on time (a backoff, a stalled
simulator), so no stall timeout ever fires because the machine is slow."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from serverkit import (
    RelayFactory,
    assert_contiguous,
    chunks_of,
    end_of,
    run_to_end,
    sha256,
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.timekeeper import keeping_time
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.limits import Timeouts
from tokenrelay_server.engine.routing import Route
from tokenrelay_server.upstream.sim import SimProvider

TIMERS = {"backoff_base_s": 1.0, "stall_timeout_s": 5.0, "first_token_timeout_s": 30.0}


@pytest.fixture
async def kept(relay_factory: RelayFactory, clock: ManualClock) -> AsyncIterator[RelayFactory]:
    """Start gateways on the manual clock, with a time keeper for each."""
    async with contextlib.AsyncExitStack() as keepers:

        async def start(**settings: object) -> RelayServer:
            relay = await relay_factory(clock=clock, **{**TIMERS, **settings})
            await keepers.enter_async_context(keeping_time(clock, relay))
            return relay

        yield start


@pytest.fixture
async def fast_relay(kept: RelayFactory) -> RelayServer:
    return await kept()


async def clean_text(channel: grpc.aio.Channel, max_tokens: int) -> str:
    return text_of(await run_to_end(channel, start_request(max_tokens=max_tokens)))


def notices(events: list[pb.StreamEvent]) -> list[pb.StreamError]:
    return [e.error for e in events if e.HasField("error")]


@pytest.mark.parametrize(
    ("faults", "code", "action"),
    [
        ("reset@7", "ECONNRESET", pb.SUGGESTED_ACTION_RESUME),
        ("stall@5", "STALL_TIMEOUT", pb.SUGGESTED_ACTION_RESUME),
        ("eof@9", "NO_FINISH_REASON", pb.SUGGESTED_ACTION_RESUME),
        ("http:503", "HTTP_503", pb.SUGGESTED_ACTION_RETRY),
        ("http:429", "HTTP_429", pb.SUGGESTED_ACTION_RETRY),
        ("reset@0", "ECONNRESET", pb.SUGGESTED_ACTION_RETRY),
    ],
    ids=[
        "a reset mid-stream is resumed by continuation",
        "a stall is detected and resumed",
        "an end without finish reason is resumed",
        "a 503 before the first token is retried",
        "a 429 is retried after Retry-After",
        "a reset before the first token is retried",
    ],
)
async def test_a_recoverable_failure_yields_the_clean_answer(
    fast_relay: RelayServer, faults: str, code: str, action: int
) -> None:
    metadata = {"sim.faults": faults, "sim.retry_after_s": "0.01"}
    async with grpc.aio.insecure_channel(fast_relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=40, metadata=metadata))
        clean = await clean_text(channel, 40)
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    assert text_of(events) == clean
    end = end_of(events)
    assert not end.partial
    assert end.text_sha256 == sha256(clean)
    [notice] = notices(events)
    assert (notice.code, notice.suggested_action, notice.fatal) == (code, action, False)
    assert {c.attempt for c in chunks} <= {1, 2}
    assert chunks[-1].attempt == 2


async def test_repeated_text_from_the_continuation_is_stitched_away(
    fast_relay: RelayServer,
) -> None:
    metadata = {"sim.faults": "reset@11,reset@4", "sim.overlap": "9"}
    async with grpc.aio.insecure_channel(fast_relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=50, metadata=metadata))
        clean = await clean_text(channel, 50)
    assert_contiguous(chunks_of(events))
    assert text_of(events) == clean
    assert [n.code for n in notices(events)] == ["ECONNRESET", "ECONNRESET"]


async def test_a_401_is_not_retried(fast_relay: RelayServer) -> None:
    metadata = {"sim.faults": "http:401,ok"}
    async with grpc.aio.insecure_channel(fast_relay.address) as channel:
        events = await run_to_end(channel, start_request(metadata=metadata))
    end = end_of(events)
    assert end.partial and end.error.code == "HTTP_401"
    assert end.error.suggested_action == pb.SUGGESTED_ACTION_ABORT
    assert notices(events) == []


async def test_spent_retries_end_with_a_typed_partial_keeping_the_text(
    fast_relay: RelayServer,
) -> None:
    metadata = {"sim.faults": "reset@5,reset@3,reset@2,reset@1,ok"}
    async with grpc.aio.insecure_channel(fast_relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=40, metadata=metadata))
        clean = await clean_text(channel, 40)
    end = end_of(events)
    assert end.partial
    assert end.error.code == "ECONNRESET" and end.error.fatal
    assert end.total_seq == 11 == len(chunks_of(events))
    assert clean.startswith(text_of(events))
    assert end.text_sha256 == sha256(text_of(events))
    assert len(notices(events)) == 3  # the default max_retries


async def test_a_failing_provider_falls_back_to_the_next_in_the_chain(
    kept: RelayFactory,
) -> None:
    timeouts = Timeouts(first_token_s=5, stall_s=5)
    primary = SimProvider("primary")
    backup = SimProvider("backup")
    relay = await kept(max_retries=1)
    # Re-route an alias over two simulated providers (same text, separate health).
    relay.hub.router._routes["chain"] = [  # type: ignore[attr-defined]
        Route(primary, "sim", timeouts),
        Route(backup, "sim", timeouts),
    ]
    metadata = {"sim.faults": "reset@6,reset@2,ok"}
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(
            channel, start_request(model="chain", max_tokens=30, metadata=metadata)
        )
        clean = await clean_text(channel, 30)
    assert text_of(events) == clean
    chunks = chunks_of(events)
    assert_contiguous(chunks)
    assert [n.suggested_action for n in notices(events)] == [
        pb.SUGGESTED_ACTION_RESUME,
        pb.SUGGESTED_ACTION_FALLBACK,
    ]
    assert chunks[0].provider == "primary" and chunks[-1].provider == "backup"


async def test_an_open_breaker_is_skipped_without_calling_the_provider(
    kept: RelayFactory,
) -> None:
    relay = await kept(max_retries=0, breaker_failure_threshold=2)
    timeouts = Timeouts(first_token_s=5, stall_s=5)
    relay.hub.router._routes["chain"] = [  # type: ignore[attr-defined]
        Route(SimProvider("flaky"), "sim", timeouts),
        Route(SimProvider("steady"), "sim", timeouts),
    ]
    async with grpc.aio.insecure_channel(relay.address) as channel:
        for _ in range(2):  # two failures trip the flaky provider's breaker
            await run_to_end(
                channel, start_request(model="chain", metadata={"sim.faults": "http:500"})
            )
        events = await run_to_end(channel, start_request(model="chain", max_tokens=5))
    assert {c.provider for c in chunks_of(events)} == {"steady"}
    assert notices(events) == []
    breaker = relay.hub.recovery.health.breaker(relay.hub.router.resolve("chain")[0])
    assert breaker.state == "open"


async def test_a_fallback_caused_by_an_open_breaker_says_so(kept: RelayFactory) -> None:
    relay = await kept(max_retries=3, breaker_failure_threshold=1)
    timeouts = Timeouts(first_token_s=5, stall_s=5)
    relay.hub.router._routes["chain"] = [  # type: ignore[attr-defined]
        Route(SimProvider("flaky"), "sim", timeouts),
        Route(SimProvider("steady"), "sim", timeouts),
    ]
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(
            channel, start_request(model="chain", metadata={"sim.faults": "reset@4"})
        )
    [notice] = notices(events)
    assert notice.suggested_action == pb.SUGGESTED_ACTION_FALLBACK
    assert "circuit breaker of flaky/sim is open" in notice.message
    assert not end_of(events).partial
    assert relay.hub.recovery.health.transitions[("flaky/sim", "open")] == 1
