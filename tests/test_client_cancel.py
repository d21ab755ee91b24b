"""A client that reconnected can still cancel its stream (issue 13 leftovers):
the Python client's `cancel` after a resume, over real gRPC through a TCP
proxy that cuts the first connection, on an open gateway (no keys: every
caller is the anonymous tenant) and on a keyed one (the resumed call carries
the tenant's key); a key of another tenant cannot even resume.

The gateway runs on a ManualClock with a paced stream, so the stream is
mid-generation exactly when the proxy cuts it and when the cancel arrives;
the client's backoff sleep is a recording fake.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from serverkit import (
    ACME_KEY,
    GLOBEX_KEY,
    PACED,
    QUIET,
    TENANTS,
    RelayFactory,
    eventually,
    produce,
)
from tokenrelay_client import (
    Chunk,
    End,
    Event,
    Reconnected,
    RelayClient,
    ResumeRejected,
    Started,
)
from tokenrelay_devtools.netfault import FaultProxy
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock

PROMPT = [("user", "cancel me after the reconnect")]


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


@pytest.fixture(params=["open", "keyed"])
async def gateway(
    request: pytest.FixtureRequest, relay_factory: RelayFactory, clock: ManualClock
) -> AsyncIterator[tuple[RelayServer, str | None]]:
    if request.param == "open":
        yield await relay_factory(clock=clock, **QUIET), None
    else:
        yield await relay_factory(clock=clock, auth=TENANTS, **QUIET), ACME_KEY


async def test_a_client_that_reconnected_cancels_its_stream(
    gateway: tuple[RelayServer, str | None], clock: ManualClock
) -> None:
    relay, key = gateway
    sleep = RecordingSleep()
    events: list[Event] = []
    async with (
        FaultProxy.for_target(relay.address) as proxy,
        RelayClient(proxy.address, sleep=sleep, api_key=key) as client,
    ):
        relay_stream = client.stream("sim", PROMPT, max_tokens=500, metadata=PACED)
        async for event in relay_stream:
            events.append(event)
            if isinstance(event, Started) and not event.resumed:
                generation = relay.hub.generation(event.stream_id)
                assert generation is not None
                await produce(clock, relay, generation, 3)
            if isinstance(event, Chunk) and event.seq == 3:
                assert proxy.cut_all() == 1  # mid-generation: the client resumes
            if isinstance(event, Reconnected):
                # Attached again by a resume token, on a new call.
                await relay_stream.cancel("stop after the reconnect")
    assert relay_stream.reconnects == 1
    assert [e.resumed for e in events if isinstance(e, Started)] == [False, True]
    end = events[-1]
    assert isinstance(end, End)
    assert end.finish_reason == "cancelled" and end.verified
    assert end.error is not None and end.error.code == "CANCELLED"
    assert "stop after the reconnect" in end.error.message
    assert relay_stream.last_seq == end.total_seq == 3
    await eventually(lambda: relay.hub.running_generations == 0)


async def test_another_tenants_key_cannot_resume_let_alone_cancel(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, auth=TENANTS, **QUIET)
    async with RelayClient(relay.address, api_key=ACME_KEY) as owner_client:
        owner = owner_client.stream("sim", PROMPT, max_tokens=500, metadata=PACED)
        iterator = aiter(owner)
        started = await anext(iterator)
        assert isinstance(started, Started)
        async with RelayClient(relay.address, api_key=GLOBEX_KEY, sleep=RecordingSleep()) as other:
            intruder = other.resume(started.resume_token, 0)
            await intruder.cancel("not mine")  # sent with the resume, once attached
            with pytest.raises(ResumeRejected) as caught:
                async for _ in intruder:
                    pass
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
        generation = relay.hub.generation(started.stream_id)
        assert generation is not None and generation.end is None  # still running
        await owner.cancel("mine")
        async for _ in iterator:
            pass
    assert owner.end is not None and owner.end.finish_reason == "cancelled"
