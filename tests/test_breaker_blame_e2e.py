"""The circuit breaker counts the provider's failures, not the caller's (issue 8,
defect 9), over a real port: requests the provider rightly refuses must not
shut every other client out with BREAKER_OPEN; a provider that fails must."""

from __future__ import annotations

import grpc

from serverkit import QUIET, RelayFactory, end_of, run_to_end, start_request, text_of
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock

# One failure opens the breaker; no retries. On a manual clock nobody moves,
# an open breaker stays open (its 30 s cool-down never passes), however long
# the test takes.
SETTINGS = {"breaker_failure_threshold": 1, "max_retries": 0, **QUIET}


async def fail_five_times(relay: RelayServer, faults: str) -> list[pb.StreamEnd]:
    """Five streams of one client, each failing before its first token."""
    async with grpc.aio.insecure_channel(relay.address) as channel:
        return [
            end_of(await run_to_end(channel, start_request(metadata={"sim.faults": faults})))
            for _ in range(5)
        ]


async def another_client_asks(relay: RelayServer) -> pb.StreamEnd:
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=8))
    end = end_of(events)
    if not end.partial:
        assert len(text_of(events)) > 0
    return end


def sim_breaker_state(relay: RelayServer) -> str:
    route = relay.hub.router.resolve("sim")[0]
    return relay.hub.recovery.health.breaker(route).state


async def test_bad_requests_do_not_open_the_breaker_for_other_clients(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, **SETTINGS)
    ends = await fail_five_times(relay, "http:400")
    # Each of them got the provider's own answer, none a BREAKER_OPEN.
    assert [(end.partial, end.error.code) for end in ends] == [(True, "HTTP_400")] * 5
    end = await another_client_asks(relay)
    assert not end.partial, end.error.code
    assert end.finish_reason == "stop"
    assert sim_breaker_state(relay) == "closed"


async def test_provider_failures_do_open_the_breaker_for_other_clients(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(clock=clock, **SETTINGS)
    ends = await fail_five_times(relay, "http:500")
    assert ends[0].error.code == "HTTP_500"
    assert {end.error.code for end in ends[1:]} == {"BREAKER_OPEN"}
    end = await another_client_asks(relay)
    assert end.partial
    assert end.error.code == "BREAKER_OPEN"
    assert sim_breaker_state(relay) == "open"
