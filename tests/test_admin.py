"""The tokenrelay.v1.Admin service over a real port: served only with an admin
token, every call guarded by `authorization: Bearer TOKEN`, the error
statistics (memory, and Redis shared by two replicas), the streams of a
replica and the overview `tokenrelay top` draws.

A stream that must still be running while Admin looks at it is PACED on a
ManualClock: it makes its chunks only when the test lets it (`produce`), so
what Admin reports is exact, however fast or slow the machine."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    eventually,
    generation_of,
    produce,
    run_to_end,
    start_request,
)
from test_reflection import PROTOCOLS, ask
from tokenrelay.v1 import admin_pb2, admin_pb2_grpc, relay_pb2
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock

TOKEN = "admin-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
HOUR = admin_pb2.GetErrorStatsRequest(period=admin_pb2.STATS_PERIOD_HOUR)

Call = Callable[[admin_pb2_grpc.AdminStub, Any], Awaitable[Any]]
CALLS: list[Any] = [
    pytest.param(lambda stub, md: stub.GetErrorStats(HOUR, metadata=md), id="GetErrorStats"),
    pytest.param(
        lambda stub, md: stub.ListStreams(admin_pb2.ListStreamsRequest(), metadata=md),
        id="ListStreams",
    ),
    pytest.param(
        lambda stub, md: stub.GetStream(admin_pb2.GetStreamRequest(stream_id="x"), metadata=md),
        id="GetStream",
    ),
    pytest.param(
        lambda stub, md: stub.GetOverview(admin_pb2.GetOverviewRequest(), metadata=md),
        id="GetOverview",
    ),
]


async def admin_error(relay: RelayServer, call: Call, metadata: Any) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(relay.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(admin_pb2_grpc.AdminStub(channel), metadata)
    return failure.value


# --- who may call ------------------------------------------------------------------------


@pytest.mark.parametrize("call", CALLS)
async def test_without_an_admin_token_the_service_is_not_served(
    relay_factory: RelayFactory, call: Call
) -> None:
    relay = await relay_factory()
    error = await admin_error(relay, call, AUTH)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_reflection_lists_admin_only_when_it_is_served(
    relay_factory: RelayFactory, protocol: Any
) -> None:
    for token, listed in ((None, False), (TOKEN, True)):
        relay = await relay_factory(admin_token=token)
        async with grpc.aio.insecure_channel(relay.address) as channel:
            response = await ask(channel, protocol, list_services="")
            names = {s.name for s in response.list_services_response.service}
            assert ("tokenrelay.v1.Admin" in names) is listed
            if listed:
                described = await ask(
                    channel, protocol, file_containing_symbol="tokenrelay.v1.Admin"
                )
                assert described.file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param((), id="no authorization metadata"),
        pytest.param((("authorization", "Bearer wrong-token-0123456789"),), id="another token"),
        pytest.param((("authorization", TOKEN),), id="the token without Bearer"),
        pytest.param((("authorization", f"Basic {TOKEN}"),), id="another scheme"),
        pytest.param((("authorization", f"Bearer {TOKEN}x"),), id="the token and more"),
        pytest.param(
            (("authorization", "Bearer nope"), ("authorization", f"Bearer {TOKEN}")),
            id="two authorization values",
        ),
    ],
)
async def test_every_admin_call_needs_the_bearer_token_and_the_refusal_echoes_nothing(
    relay_factory: RelayFactory, call: Call, metadata: Any
) -> None:
    relay = await relay_factory(admin_token=TOKEN)
    error = await admin_error(relay, call, metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    details = error.details() or ""
    assert "authorization" in details and "Bearer TOKEN" in details
    assert TOKEN not in details and "wrong-token" not in details and "nope" not in details


async def test_health_needs_no_token(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(admin_token=TOKEN)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


# --- error statistics ---------------------------------------------------------------------


async def test_error_statistics_group_the_errors_of_the_period_by_type_and_code(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(admin_token=TOKEN, backoff_base_s=0, max_retries=3)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        for faults in ("reset@3,http:500", "http:500,http:500", "http:401"):
            await run_to_end(channel, start_request(metadata={"sim.faults": faults}))
        stats = await admin_pb2_grpc.AdminStub(channel).GetErrorStats(HOUR, metadata=AUTH)
    assert stats.period == admin_pb2.STATS_PERIOD_HOUR
    assert [(r.code, r.count, r.recoverable_count) for r in stats.rows] == [
        ("HTTP_500", 3, 3),
        ("ECONNRESET", 1, 1),
        ("HTTP_401", 1, 0),
    ]
    assert stats.total == 5
    reset = stats.rows[1]
    assert reset.type == relay_pb2.ERROR_TYPE_NETWORK
    assert reset.avg_tokens_received == 3 and reset.avg_bytes_received > 0
    assert list(reset.providers) == ["sim"]


@pytest.mark.parametrize("period", [0, 7])
async def test_a_period_that_is_not_hour_day_or_week_is_invalid(
    relay_factory: RelayFactory, period: int
) -> None:
    relay = await relay_factory(admin_token=TOKEN)
    request = admin_pb2.GetErrorStatsRequest(period=period)  # type: ignore[arg-type]
    error = await admin_error(
        relay, lambda stub, md: stub.GetErrorStats(request, metadata=md), AUTH
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "period" in (error.details() or "")


@pytest.mark.parametrize("cluster", [False, True], ids=["on one redis", "on a redis cluster"])
async def test_replicas_on_one_redis_share_the_error_statistics(
    relay_factory: RelayFactory, request: pytest.FixtureRequest, cluster: bool
) -> None:
    shared = {
        "store": "redis",
        "redis_url": request.getfixturevalue("redis_cluster_url" if cluster else "redis_url"),
        "redis_prefix": request.getfixturevalue(
            "redis_cluster_prefix" if cluster else "redis_prefix"
        ),
        "redis_cluster": cluster,
    }
    first = await relay_factory(admin_token=TOKEN, max_retries=0, **shared)
    second = await relay_factory(admin_token=TOKEN, max_retries=0, **shared)
    for relay, faults in ((first, "http:429"), (second, "http:429"), (second, "http:503")):
        async with grpc.aio.insecure_channel(relay.address) as channel:
            await run_to_end(
                channel, start_request(metadata={"sim.faults": faults, "sim.retry_after_s": "0"})
            )
    # Each replica writes its records from its own task, soon but not at once
    # (a fresh cluster client first learns the slots); an Admin call flushes
    # only its own replica's. So both flush before either is asked.
    for relay in (first, second):
        assert relay.recorder is not None
        await relay.recorder.flush()
    for relay in (first, second):
        async with grpc.aio.insecure_channel(relay.address) as channel:
            stub = admin_pb2_grpc.AdminStub(channel)
            for period in (admin_pb2.STATS_PERIOD_HOUR, admin_pb2.STATS_PERIOD_WEEK):
                stats = await stub.GetErrorStats(
                    admin_pb2.GetErrorStatsRequest(period=period), metadata=AUTH
                )
                assert {r.code: r.count for r in stats.rows} == {"HTTP_429": 2, "HTTP_503": 1}


# --- streams ---------------------------------------------------------------------------------


async def test_list_streams_shows_running_and_detached_generations_of_the_replica(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(admin_token=TOKEN, clock=clock, **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        empty = await stub.ListStreams(admin_pb2.ListStreamsRequest(), metadata=AUTH)
        assert list(empty.streams) == [] and empty.replica_id == relay.hub.replica_id
        kept = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        left = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        kept_first, left_first = await kept.next_event(), await left.next_event()
        kept_started, left_started = kept_first.started, left_first.started
        # Both are paced on the same clock from the same time: one second
        # brings the first chunk of each, and then they wait for the second.
        await produce(clock, relay, generation_of(relay, kept_first), 1)
        for call in (kept, left):
            await call.events_until(lambda e: e.HasField("chunk"))
        left.cancel()
        await eventually(lambda: relay.hub.attached_sessions == 1)
        listed = await stub.ListStreams(admin_pb2.ListStreamsRequest(), metadata=AUTH)
        by_id = {info.stream_id: info for info in listed.streams}
        assert set(by_id) == {kept_started.stream_id, left_started.stream_id}
        running, detached = by_id[kept_started.stream_id], by_id[left_started.stream_id]
        assert running.state == admin_pb2.STREAM_STATE_RUNNING and running.attached_clients == 1
        assert detached.state == admin_pb2.STREAM_STATE_DETACHED
        assert detached.attached_clients == 0
        for info in (running, detached):
            assert info.model == "sim" and info.owner == relay.hub.replica_id
            assert info.last_seq == 1 and info.age_seconds == pytest.approx(1.0)
            assert info.attempts == 1 and info.phase == "attempt"
        one = await stub.GetStream(
            admin_pb2.GetStreamRequest(stream_id=kept_started.stream_id), metadata=AUTH
        )
        assert one.stream_id == running.stream_id and one.state == running.state
        kept.cancel()


async def test_get_stream_of_a_finished_stream_says_ended_and_unknown_is_not_found(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(admin_token=TOKEN)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(max_tokens=4))
        stub = admin_pb2_grpc.AdminStub(channel)
        stream_id = events[0].started.stream_id
        await eventually(lambda: relay.hub.generation(stream_id) is None)
        info = await stub.GetStream(admin_pb2.GetStreamRequest(stream_id=stream_id), metadata=AUTH)
        assert info.state == admin_pb2.STREAM_STATE_ENDED
        assert (info.last_seq, info.owner, info.model) == (4, "", "sim")
        for stream_id, code, said in (
            ("f" * 32, grpc.StatusCode.NOT_FOUND, "no such stream"),
            ("", grpc.StatusCode.INVALID_ARGUMENT, "stream_id is required"),
            ("x" * 300, grpc.StatusCode.INVALID_ARGUMENT, "stream_id is longer"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await stub.GetStream(admin_pb2.GetStreamRequest(stream_id=stream_id), metadata=AUTH)
            assert failure.value.code() == code
            assert said in (failure.value.details() or "")


async def test_get_stream_on_another_replica_names_the_owner(
    relay_factory: RelayFactory, redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    shared = {"store": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix}
    owner = await relay_factory(admin_token=TOKEN, clock=clock, **QUIET, **shared)
    other = await relay_factory(admin_token=TOKEN, clock=clock, **QUIET, **shared)
    async with grpc.aio.insecure_channel(owner.address) as channel:
        call = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        first = await call.next_event()
        await produce(clock, owner, generation_of(owner, first), 1)  # then it waits
        await call.events_until(lambda e: e.HasField("chunk"))
        started = first.started
        async with grpc.aio.insecure_channel(other.address) as other_channel:
            info = await admin_pb2_grpc.AdminStub(other_channel).GetStream(
                admin_pb2.GetStreamRequest(stream_id=started.stream_id), metadata=AUTH
            )
        call.cancel()
    assert info.state == admin_pb2.STREAM_STATE_REMOTE
    assert info.owner == owner.hub.replica_id and info.last_seq == 1
    assert info.attached_clients == 0  # none on the replica that answered


# --- the overview -------------------------------------------------------------------------


async def test_the_overview_shows_streams_rates_breakers_and_recent_recovery(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    # The resume after the reset needs no wait (backoff 0), so the recovered
    # stream runs to its end without the clock moving.
    relay = await relay_factory(admin_token=TOKEN, clock=clock, **QUIET, backoff_base_s=0)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        recovered = await run_to_end(
            channel, start_request(max_tokens=20, metadata={"sim.faults": "reset@4"})
        )
        call = RawCall(channel, start_request(max_tokens=5000, metadata=PACED))
        started = await call.next_event()
        await produce(clock, relay, generation_of(relay, started), 1)  # then it waits
        await call.events_until(lambda e: e.HasField("chunk"))
        overview = await admin_pb2_grpc.AdminStub(channel).GetOverview(
            admin_pb2.GetOverviewRequest(), metadata=AUTH
        )
        call.cancel()
    assert overview.replica_id == relay.hub.replica_id
    assert (overview.streams_running, overview.streams_detached, overview.attached_clients) == (
        1,
        0,
        1,
    )
    # 20 tokens a second ago and one now, over the 10 s window.
    assert overview.tokens_per_second == pytest.approx(21 / 10)
    assert [(c.code, c.count) for c in overview.errors_last_minute] == [("ECONNRESET", 1)]
    assert [(b.provider, b.upstream_model, b.state) for b in overview.breakers] == [
        ("sim", "sim", "closed")
    ]
    [action] = overview.recent_actions
    assert action.stream_id == recovered[0].started.stream_id
    assert (action.step, action.code, action.from_provider, action.to_provider) == (
        "resume",
        "ECONNRESET",
        "sim",
        "sim",
    )
    assert action.at_seq == 4 and action.seconds_ago == pytest.approx(1.0)


async def test_the_overview_counts_the_processes_tasks_memory_and_descriptors(
    relay_factory: RelayFactory,
) -> None:
    # In process: the server's own loop is this test's, so its tasks are
    # counted beside the test's; what matters is that each is the process's
    # (the fuzzer and the soak read them from a gateway in another process).
    relay = await relay_factory(admin_token=TOKEN)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        overview = await stub.GetOverview(admin_pb2.GetOverviewRequest(), metadata=AUTH)
        call = RawCall(channel, start_request(max_tokens=5000, metadata={"sim.pace_ms": "1000"}))
        await call.next_event()
        during = await stub.GetOverview(admin_pb2.GetOverviewRequest(), metadata=AUTH)
        call.cancel()
    assert overview.asyncio_tasks >= 1
    assert during.asyncio_tasks > overview.asyncio_tasks  # the stream's generation and reader
    # The same process, read again now: within what a few calls change.
    status = Path("/proc/self/status").read_text()  # noqa: ASYNC240 (procfs: no I/O wait)
    vm_rss_kib = next(int(line.split()[1]) for line in status.splitlines() if "VmRSS:" in line)
    assert overview.rss_bytes == pytest.approx(vm_rss_kib * 1024, rel=0.2)
    assert abs(overview.open_fds - (len(os.listdir("/proc/self/fd")) - 1)) <= 8
    assert overview.open_fds > 3
