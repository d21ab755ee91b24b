"""The time keeper moves a manual clock only when every stream provably
waits on time, over a real gateway and the mock upstream on real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from serverkit import RawCall, RelayFactory, end_of, generation_of, start_request
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_devtools.timekeeper import TimeKeeper
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.config.settings import build_settings, read_config_file
from tokenrelay_server.core.clock import ManualClock

CONFIG = """
[recovery]
backoff_base_s = 2
jitter = 0
max_retries = 1

[providers.oa]
kind = "openai"
base_url = "{base_url}"
forward_sim_headers = true
stall_timeout_s = 5
first_token_timeout_s = 30

[providers.an]
kind = "anthropic"
base_url = "{base_url}"
forward_sim_headers = true
stall_timeout_s = 5
first_token_timeout_s = 30

[models.oa]
chain = [{{ provider = "oa", model = "m" }}]

[models.an]
chain = [{{ provider = "an", model = "m" }}]
"""


@pytest.fixture
async def gateway(
    upstream: MockUpstream, relay_factory: RelayFactory, tmp_path: Path, clock: ManualClock
) -> RelayServer:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(CONFIG.format(base_url=upstream.base_url))
    values = read_config_file(config)
    settings = build_settings(values)
    return await relay_factory(
        clock=clock,
        detach_grace_s=3600,
        lease_ttl_s=3600,
        **{k: getattr(settings, k) for k in values},
    )


async def first_time_it_may_move(keeper: TimeKeeper) -> None:
    """Step the loop one iteration at a time until the keeper would move."""
    async with asyncio.timeout(10):
        while not keeper.waiting_on_time():  # noqa: ASYNC110 (a plain predicate)
            await asyncio.sleep(0)


@pytest.mark.parametrize("model", ["oa", "an"], ids=["openai format", "anthropic format"])
@pytest.mark.parametrize(
    "writes", ["", "+split_utf8", "+random_chunks"], ids=["whole", "split", "in random pieces"]
)
async def test_a_stall_is_waited_on_only_once_the_gateway_has_every_chunk_sent_before_it(
    gateway: RelayServer,
    upstream: MockUpstream,
    clock: ManualClock,
    model: str,
    writes: str,
) -> None:
    keeper = TimeKeeper(clock, gateway, upstream)
    assert not keeper.waiting_on_time()  # nothing runs: nothing to keep time for
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        faults = f"stall@12{writes}"
        call = RawCall(
            channel, start_request(model=model, max_tokens=20, metadata={"sim.faults": faults})
        )
        started = await call.next_event()
        generation = generation_of(gateway, started)
        await first_time_it_may_move(keeper)
        # The mock wrote its 12 events in many pieces; the gateway read and
        # stored every one of them before the keeper saw a stall.
        assert generation.last_seq == 12
        assert [view.state for view in upstream.in_flight()] == ["stalled"]
        assert clock.next_due() == pytest.approx(clock.monotonic() + 5)  # the stall timeout
        assert await keeper.move_once()
        # Stall timeout, then the backoff: the keeper waits for it once the
        # gateway is in it, and lands on it exactly.
        await first_time_it_may_move(keeper)
        assert generation.phase == "backoff"
        before = clock.monotonic()
        assert await keeper.move_once()
        assert clock.monotonic() - before == pytest.approx(2)
        events = await call.events_until()
        call.cancel()
    end = end_of(events)
    assert not end.partial and end.total_seq == 20
    assert [e.error.code for e in events if e.HasField("error")] == ["STALL_TIMEOUT"]
    assert keeper.moves == 2


async def test_a_slow_first_byte_is_waited_on_while_the_mock_waits_on_its_clock(
    gateway: RelayServer, upstream: MockUpstream, clock: ManualClock
) -> None:
    keeper = TimeKeeper(clock, gateway, upstream)
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        request = start_request(
            model="oa", max_tokens=5, metadata={"sim.faults": "slow_first_byte@250"}
        )
        call = RawCall(channel, request)
        await call.next_event()
        await first_time_it_may_move(keeper)
        assert [view.state for view in upstream.in_flight()] == ["waiting"]
        before = clock.monotonic()
        assert await keeper.move_once()
        assert clock.monotonic() - before == pytest.approx(0.25)  # the mock's wait, not 30 s
        events = await call.events_until()
        call.cancel()
    assert not end_of(events).partial
    assert [e for e in events if e.HasField("error")] == []
