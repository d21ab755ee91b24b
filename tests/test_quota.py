"""Per-tenant quotas (issue 13, item 4): max_concurrent_streams and
tokens_per_minute, in one process (memory) and across replicas (Redis, one
Lua script per admission), over real gRPC and real replica processes."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import grpc
import pytest

from serverkit import (
    ACME_KEY,
    GLOBEX_KEY,
    QUIET,
    SECRET,
    RawCall,
    RelayFactory,
    end_of,
    eventually,
    run_to_end,
    start_request,
    tenants,
)
from test_allow_partial import details_of
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import QuotaExceeded
from tokenrelay_server.store.quota import MemoryQuota, QuotaLimits, RedisQuota

HANGS = {"sim.faults": "stall@1"}  # one chunk, then nothing (stall timeout out of reach)


async def first_event_or_error(call: RawCall) -> pb.StreamEvent | grpc.aio.AioRpcError:
    try:
        return await call.next_event()
    except grpc.aio.AioRpcError as error:
        return error


# --- the stores themselves -----------------------------------------------------------------


async def test_memory_quota_counts_slots_and_a_sliding_minute_of_tokens() -> None:
    clock = ManualClock()
    quota = MemoryQuota(clock)
    limits = QuotaLimits(max_concurrent_streams=2, tokens_per_minute=100)
    await quota.admit("acme", "s1", limits, 40)
    await quota.admit("acme", "s2", limits, 40)
    with pytest.raises(QuotaExceeded) as streams:
        await quota.admit("acme", "s3", limits, 10)
    assert streams.value.limit == "max_concurrent_streams"
    await quota.release("acme", "s1", used_tokens=5)  # settled: 5 + 40 used
    with pytest.raises(QuotaExceeded) as tokens:
        await quota.admit("acme", "s3", limits, 60)
    assert tokens.value.limit == "tokens_per_minute"
    assert tokens.value.retry_after_s == pytest.approx(60.0)  # when s2's 40 leave the window
    await quota.admit("acme", "s3", limits, 55)  # 5 + 40 + 55 = 100
    await quota.admit("globex", "g1", limits, 100)  # another tenant: its own quota
    await quota.release("acme", "s2", 40)
    await quota.release("acme", "s3", 55)
    clock.advance(60.1)
    await quota.admit("acme", "s4", limits, 100)  # the minute has passed


async def test_redis_admission_is_atomic_nine_at_once_on_two_clients(
    redis_url: str, redis_prefix: str
) -> None:
    quotas = [RedisQuota.from_url(redis_url, prefix=redis_prefix) for _ in range(2)]
    limits = QuotaLimits(max_concurrent_streams=3)
    admitted_per_trial = []
    try:
        for trial in range(20):
            ids = [f"t{trial}-{i}" for i in range(9)]
            results = await asyncio.gather(
                *(quotas[i % 2].admit("acme", sid, limits, 1) for i, sid in enumerate(ids)),
                return_exceptions=True,
            )
            admitted = [sid for sid, result in zip(ids, results, strict=True) if result is None]
            assert all(
                isinstance(result, QuotaExceeded) for result in results if result is not None
            )
            admitted_per_trial.append(len(admitted))
            for sid in admitted:
                await quotas[0].release("acme", sid, 1)
    finally:
        for quota in quotas:
            await quota.close()
    assert admitted_per_trial == [3] * 20


async def test_a_redis_slot_lapses_with_its_ttl(redis_url: str, redis_prefix: str) -> None:
    # A killed replica never releases; its slots lapse (Redis's clock) like its leases.
    quota = RedisQuota.from_url(redis_url, prefix=redis_prefix, slot_ttl_s=0.2)
    try:
        await quota.admit("acme", "dead-1", QuotaLimits(max_concurrent_streams=1), 1)
        with pytest.raises(QuotaExceeded):
            await quota.admit("acme", "new-1", QuotaLimits(max_concurrent_streams=1), 1)

        async def lapsed() -> bool:  # Redis keeps the time
            return not await quota.running("acme")

        await eventually(lapsed, within_s=30, poll_s=0.05)
        await quota.admit("acme", "new-1", QuotaLimits(max_concurrent_streams=1), 1)
    finally:
        await quota.close()


# --- over gRPC, one gateway ----------------------------------------------------------------


async def test_over_max_concurrent_streams_is_resource_exhausted_with_retry_info(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory(auth=tenants(acme={"max_concurrent_streams": 2}), **QUIET)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        running = [
            RawCall(channel, start_request(max_tokens=1000, metadata=HANGS), key=ACME_KEY)
            for _ in range(2)
        ]
        for call in running:
            assert (await call.next_event()).HasField("started")
        third = RawCall(channel, start_request(max_tokens=10), key=ACME_KEY)
        error = await first_event_or_error(third)
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant acme" in error.details() and "max_concurrent_streams = 2" in error.details()
        details = details_of(error)
        assert details["RetryInfo"].retry_delay.seconds >= 1  # type: ignore[attr-defined]
        info = details["ErrorInfo"]
        assert info.metadata["tenant"] == "acme"  # type: ignore[attr-defined]
        assert info.metadata["limit"] == "max_concurrent_streams"  # type: ignore[attr-defined]
        # Another tenant is not affected.
        assert not end_of(
            await run_to_end(channel, start_request(max_tokens=2), key=GLOBEX_KEY)
        ).partial
        # A detached generation still counts: drop one caller (the grace is long).
        running[0].cancel()
        error = await first_event_or_error(RawCall(channel, start_request(), key=ACME_KEY))
        assert isinstance(error, grpc.aio.AioRpcError)
        # Ending one frees its slot.
        running[1].send(pb.StreamRequest(cancel=pb.Cancel(reason="done")))
        await running[1].events_until()
        await eventually(lambda: relay.hub.running_generations == 1)
        events = await run_to_end(channel, start_request(max_tokens=2), key=ACME_KEY)
        assert not end_of(events).partial
        running[1].cancel()


async def start_and_retry(channel: grpc.aio.Channel, key: str) -> tuple[RawCall, RawCall]:
    """Acme starts a stream that hangs after its first chunk, with idempotency
    key `key`, then sends the same start again: both calls read one stream."""
    request = start_request(max_tokens=1000, metadata=HANGS, idempotency_key=key)
    first = RawCall(channel, request, key=ACME_KEY)
    started = await first.next_event()
    retry = RawCall(channel, request, key=ACME_KEY)
    again = await retry.next_event()
    assert again.started.stream_id == started.started.stream_id
    return first, retry


async def test_an_idempotent_retry_gives_back_its_own_slot_not_the_streams(
    relay_factory: RelayFactory,
) -> None:
    # A retry with the same idempotency key attaches to the running stream;
    # the slot its admission took must be the one given back (it was the
    # running stream's, leaving a slot held for a stream that never existed).
    relay = await relay_factory(auth=tenants(acme={"max_concurrent_streams": 2}), **QUIET)
    quota = relay.hub.quota
    assert isinstance(quota, MemoryQuota)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first, retry = await start_and_retry(channel, "k-1")
        assert quota.running("acme") == 1
        first.send(pb.StreamRequest(cancel=pb.Cancel(reason="done")))
        await first.events_until()
        retry.cancel()
        await eventually(lambda: relay.hub.running_generations == 0)
        assert quota.running("acme") == 0
        first.cancel()


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_retry_of_a_running_start_at_the_tenants_limit_is_attached_not_refused(
    relay_factory: RelayFactory, store: str, redis_url: str, redis_prefix: str
) -> None:
    # The tenant is at its limit because of that very stream: the retry (a
    # client that lost the first answer) reads it; a new start is refused.
    on_store = {"store": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix}
    relay = await relay_factory(
        auth=tenants(acme={"max_concurrent_streams": 1}),
        **(on_store if store == "redis" else {}),
        **QUIET,
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first, retry = await start_and_retry(channel, "k-limit")
        other = RawCall(
            channel,
            start_request(max_tokens=10, idempotency_key="k-other"),
            key=ACME_KEY,
        )
        error = await first_event_or_error(other)
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # The same key for a different request is refused as it is under
        # the limit: named, never attached.
        changed = start_request(max_tokens=999, metadata=HANGS, idempotency_key="k-limit")
        error = await first_event_or_error(RawCall(channel, changed, key=ACME_KEY))
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "already used for a different request" in error.details()
        first.send(pb.StreamRequest(cancel=pb.Cancel(reason="done")))
        await first.events_until()
        retry.cancel()
        first.cancel()


async def test_tokens_per_minute_reserves_max_tokens_and_settles_to_the_real_count(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    relay = await relay_factory(
        clock=clock,
        auth=tenants(acme={"tokens_per_minute": 100, "default_max_tokens": 60}),
        **QUIET,
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        # Reserved 60 (the default), produced 5: settles to 5.
        first = await run_to_end(
            channel,
            start_request(max_tokens=None, metadata={"sim.faults": "reset@5"}, max_retries=0),
            key=ACME_KEY,
        )
        used = end_of(first).usage.completion_tokens
        assert used < 40
        await eventually(lambda: relay.hub.running_generations == 0)
        # 60 more fit only because the first settled (60 + 60 > 100).
        await run_to_end(channel, start_request(max_tokens=60), key=ACME_KEY)
        await eventually(lambda: relay.hub.running_generations == 0)
        error = await first_event_or_error(
            RawCall(channel, start_request(max_tokens=60), key=ACME_KEY)
        )
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens_per_minute = 100" in error.details()
        assert details_of(error)["RetryInfo"].retry_delay.seconds > 0  # type: ignore[attr-defined]
        # More than the whole minute's budget can never fit: a bad request.
        error = await first_event_or_error(
            RawCall(channel, start_request(max_tokens=101), key=ACME_KEY)
        )
        assert isinstance(error, grpc.aio.AioRpcError)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "params.max_tokens" in error.details()
        clock.advance(61)
        again = await run_to_end(channel, start_request(max_tokens=60), key=ACME_KEY)
        assert end_of(again).total_seq > 0


# --- across real replica processes on Redis ------------------------------------------------


def _replica_config(tmp_path: Path, redis_url: str, prefix: str, *, lease_ttl_s: float) -> Path:
    import hashlib

    config = tmp_path / "replica.toml"
    config.write_text(
        f'[server]\nport = 0\nstore = "redis"\nredis_url = "{redis_url}"\n'
        f'redis_prefix = "{prefix}"\nresume_secret = "{SECRET}"\nstall_timeout_s = 3600\n'
        f"lease_ttl_s = {lease_ttl_s}\ndetach_grace_s = 3600\n"
        '[[auth.keys]]\nid = "acme-1"\ntenant = "acme"\n'
        f'sha256 = "{hashlib.sha256(ACME_KEY.encode()).hexdigest()}"\n'
        "[tenants.acme]\nmax_concurrent_streams = 3\n"
    )
    return config


async def _serve(config: Path) -> tuple[asyncio.subprocess.Process, int]:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    port = int((await process.stdout.readline()).split()[1])
    return process, port


async def _slots_held(redis_url: str, prefix: str) -> int:
    quota = RedisQuota.from_url(redis_url, prefix=prefix)
    try:
        return await quota.running("acme")
    finally:
        await quota.close()


async def test_two_replicas_never_admit_more_than_the_tenant_limit(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """The issue's figure: 2 replica processes, a limit of 3, 9 simultaneous
    starts x 20 trials; never more than 3 admitted."""
    config = _replica_config(tmp_path, redis_url, redis_prefix, lease_ttl_s=30)
    replicas = [await _serve(config), await _serve(config)]
    admitted_per_trial: list[int] = []
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _, port in replicas]
        for _ in range(20):
            calls = [
                RawCall(
                    channels[i % 2],
                    start_request(max_tokens=1000, metadata=HANGS),
                    key=ACME_KEY,
                )
                for i in range(9)
            ]
            firsts = await asyncio.gather(*(first_event_or_error(call) for call in calls))
            admitted = [
                call
                for call, first in zip(calls, firsts, strict=True)
                if isinstance(first, pb.StreamEvent) and first.HasField("started")
            ]
            for first in firsts:
                if isinstance(first, grpc.aio.AioRpcError):
                    assert first.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, first
            admitted_per_trial.append(len(admitted))
            for call in admitted:  # the starting call may cancel
                call.send(pb.StreamRequest(cancel=pb.Cancel(reason="next trial")))
                await call.events_until()
            for call in calls:
                call.cancel()

            async def freed() -> bool:  # the slots are freed as the generations end
                return not await _slots_held(redis_url, redis_prefix)

            await eventually(freed, within_s=30, poll_s=0.02)
        for channel in channels:
            await channel.close()
    finally:
        for process, _ in replicas:
            process.kill()
            await process.wait()
    print(f"admitted per trial: {admitted_per_trial}")
    assert max(admitted_per_trial) <= 3
    assert admitted_per_trial == [3] * 20  # and the limit is reached, not undercut


async def test_a_killed_replicas_slots_free_themselves_with_its_leases(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    config = _replica_config(tmp_path, redis_url, redis_prefix, lease_ttl_s=0.6)
    doomed, doomed_port = await _serve(config)
    survivor, survivor_port = await _serve(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{doomed_port}") as on_doomed:
            held = [
                RawCall(on_doomed, start_request(max_tokens=1000, metadata=HANGS), key=ACME_KEY)
                for _ in range(3)
            ]
            for call in held:
                assert (await call.next_event()).HasField("started")
            doomed.send_signal(signal.SIGKILL)  # no release: the slots must lapse
            await doomed.wait()
            for call in held:
                call.cancel()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{survivor_port}") as on_survivor:
            # Refused while the dead replica's slots last, admitted once they lapse.
            admitted: list[tuple[RawCall, pb.StreamEvent]] = []

            async def admits() -> bool:
                call = RawCall(on_survivor, start_request(max_tokens=2), key=ACME_KEY)
                first = await first_event_or_error(call)
                if isinstance(first, pb.StreamEvent):
                    admitted.append((call, first))
                    return True
                assert first.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                call.cancel()
                return False

            await eventually(admits, within_s=60, poll_s=0.1)
            ((call, first),) = admitted
            assert end_of([first, *await call.events_until()]).total_seq > 0
            call.cancel()
    finally:
        for process in (doomed, survivor):
            if process.returncode is None:
                process.kill()
                await process.wait()


async def test_an_unreachable_quota_store_is_unavailable_never_internal() -> None:
    from redisproc import free_port
    from tokenrelay_server.core.errors import QuotaUnavailable

    quota = RedisQuota.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(QuotaUnavailable, match="tenant acme's quota cannot be checked"):
            await quota.admit("acme", "s1", QuotaLimits(max_concurrent_streams=1), 1)
    finally:
        await quota.close()
