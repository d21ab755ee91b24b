"""Several replicas on one Redis: resume anywhere, drain, dead owners.

Each replica is a real server with its own Redis connections; they share only
Redis and the resume secret, as in production.

In-process replicas run on one ManualClock with their timers out of reach
(QUIET): a stream moves when the test lets it (`produce`), a drain's grace or
a lease renewal passes when the test moves the clock. Redis keeps its own
time (lease TTLs, blocking reads), so leases are long in real time too. The
replica killed with SIGKILL is a real process on real time; see that test.

Every test runs twice: on one Redis, and on a local three-master Redis
Cluster (issue 9 defect 8; conftest.py starts it), with `redis_cluster` on.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from serverkit import (
    ACME_KEY,
    PACED,
    QUIET,
    SECRET,
    TENANTS,
    RawCall,
    RelayFactory,
    assert_contiguous,
    assert_shed,
    chunks_of,
    end_of,
    eventually,
    gateway_store,
    generation_of,
    produce,
    resume_request,
    run_to_end,
    sha256,
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_client import End, Notice, Reconnecting, RelayClient
from tokenrelay_server.api.requests import parse_start
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.model import Chunk, StreamMeta
from tokenrelay_server.store.base import StreamTail
from tokenrelay_server.store.redis import RedisStore
from tokenrelay_server.upstream.sim import SimAnswer

# A generous bound on waits for another process (it fails the test; it times nothing).
PROCESS_GUARD_S = 90.0


@pytest.fixture(params=["redis", "cluster"])
def shared(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The settings every replica of a test shares: one Redis, or a cluster."""
    cluster = request.param == "cluster"
    return {
        "store": "redis",
        "redis_url": request.getfixturevalue("redis_cluster_url" if cluster else "redis_url"),
        "redis_prefix": request.getfixturevalue(
            "redis_cluster_prefix" if cluster else "redis_prefix"
        ),
        "redis_cluster": cluster,
    }


def open_store(shared: dict[str, Any]) -> RedisStore:
    return gateway_store(
        shared["redis_url"], prefix=shared["redis_prefix"], cluster=shared["redis_cluster"]
    )


def replica_config(path: Path, shared: dict[str, Any], **extra: Any) -> Path:
    """A TOML config of a replica process on the shared Redis."""
    lines = ["[server]", "port = 0", 'store = "redis"', f'resume_secret = "{SECRET}"']
    lines += [f'redis_url = "{shared["redis_url"]}"', f'redis_prefix = "{shared["redis_prefix"]}"']
    lines.append(f"redis_cluster = {'true' if shared['redis_cluster'] else 'false'}")
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class ReplicaProcess:
    """A `tokenrelay serve` process; `kill()` is SIGKILL (no drain, no End)."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.address = f"127.0.0.1:{port}"

    @classmethod
    async def start(cls, config: Path) -> ReplicaProcess:
        errors = config.with_suffix(".log")
        with errors.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config", str(config)),
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        assert process.stdout is not None
        async with asyncio.timeout(PROCESS_GUARD_S):
            line = await process.stdout.readline()
        if not line.startswith(b"port "):
            process.kill()
            await process.wait()
            said = errors.read_text(errors="replace")[-2000:]
            raise AssertionError(f"the replica did not start: {line!r}; it said: {said}")
        return cls(process, int(line.split()[1]))

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()


@pytest.fixture
async def replica_processes() -> AsyncIterator[list[ReplicaProcess]]:
    started: list[ReplicaProcess] = []
    yield started
    for replica in started:
        await replica.kill()


@pytest.fixture
async def replicas(
    relay_factory: RelayFactory, shared: dict[str, Any], clock: ManualClock
) -> tuple[RelayServer, RelayServer]:
    a = await relay_factory(clock=clock, **shared, **QUIET)
    b = await relay_factory(clock=clock, **shared, **QUIET)
    return a, b


async def test_resume_at_every_seq_boundary_on_another_replica(replicas) -> None:
    a, b = replicas
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        events = await run_to_end(on_a, start_request(max_tokens=12))
        token = events[0].started.resume_token
        for last_seq in range(0, 13):
            resumed = await run_to_end(on_b, resume_request(token, last_seq))
            assert [c.seq for c in chunks_of(resumed)] == list(range(last_seq + 1, 13))
            assert [c.text for c in chunks_of(resumed)] == [
                c.text for c in chunks_of(events)[last_seq:]
            ]
            assert end_of(resumed) == end_of(events)


async def test_resume_on_another_replica_follows_the_live_stream(
    replicas, clock: ManualClock
) -> None:
    a, b = replicas
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        call = RawCall(on_a, start_request(max_tokens=30, metadata=PACED))
        started = await call.next_event()
        generation = generation_of(a, started)
        await produce(clock, a, generation, 10)
        seen = [started, *await call.events_until(lambda e: e.chunk.seq == 10)]
        call.cancel()
        assert a.hub.running_generations == 1
        on_b_call = RawCall(on_b, resume_request(seen[0].started.resume_token, 10))
        resumed = await on_b_call.next_event()
        await produce(clock, a, generation, 20)  # live on A while B reads the store
        rest = [resumed, *await on_b_call.events_until()]
        on_b_call.cancel()
        assert b.hub.running_generations == 0  # B only reads; A generates
        chunks = chunks_of(seen) + chunks_of(rest)
        assert_contiguous(chunks)
        assert len(chunks) == 30
        end = end_of(rest)
        assert not end.partial
        assert end.text_sha256 == sha256("".join(c.text for c in chunks))
        clean = await run_to_end(on_b, start_request(max_tokens=30))
        assert text_of(clean) == "".join(c.text for c in chunks)


async def test_the_same_idempotency_key_on_another_replica_attaches(replicas) -> None:
    a, b = replicas
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        request = start_request(max_tokens=30, idempotency_key="job-7")
        first, second = await asyncio.gather(run_to_end(on_a, request), run_to_end(on_b, request))
    assert first[0].started.stream_id == second[0].started.stream_id
    assert sorted([first[0].started.resumed, second[0].started.resumed]) == [False, True]
    assert text_of(first) == text_of(second)


async def test_cancel_sent_to_another_replica_stops_the_generation(
    relay_factory: RelayFactory, redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    # A cancel on a resumed call needs the tenant's key (issue 13): both
    # replicas check keys, and both calls carry acme's.
    shared = {"store": "redis", "redis_url": redis_url, "redis_prefix": redis_prefix}
    a = await relay_factory(clock=clock, auth=TENANTS, **shared, **QUIET)
    b = await relay_factory(clock=clock, auth=TENANTS, **shared, **QUIET)
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        # Two chunks, then the attempt hangs (its stall timeout is out of reach).
        request = start_request(max_tokens=100_000, metadata={"sim.faults": "stall@2"})
        call = RawCall(on_a, request, key=ACME_KEY)
        started = await call.next_event()
        stream_id = started.started.stream_id
        other = RawCall(on_b, resume_request(started.started.resume_token, 0), key=ACME_KEY)
        await other.events_until(lambda e: e.HasField("chunk"))
        other.send(pb.StreamRequest(cancel=pb.Cancel(reason="from B")))

        async def stored() -> bool:  # B stores the request
            return await b.hub.store.cancel_requested(stream_id) is not None

        await eventually(stored)
        # A reads it at its next lease renewal, a third of the TTL later.
        await clock.run_for(QUIET["lease_ttl_s"] / 3)
        events = await call.events_until()
        call.cancel()
        other.cancel()
    end = end_of(events)
    assert end.partial and end.error.code == "CANCELLED" and "from B" in end.error.message
    await eventually(lambda: a.hub.running_generations == 0)


async def test_a_draining_replica_sends_unavailable_and_another_serves_the_resume(
    relay_factory: RelayFactory, shared: dict[str, Any], clock: ManualClock
) -> None:
    a = await relay_factory(clock=clock, **shared, **QUIET, drain_grace_s=10)
    b = await relay_factory(clock=clock, **shared, **QUIET)
    async with (
        grpc.aio.insecure_channel(a.address) as on_a,
        grpc.aio.insecure_channel(b.address) as on_b,
    ):
        # Five chunks, then the attempt hangs: still running when the drain comes.
        request = start_request(max_tokens=100_000, metadata={"sim.faults": "stall@5"})
        call = RawCall(on_a, request)
        seen = await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 5)
        drain = asyncio.create_task(a.drain_and_stop())
        await eventually(lambda: a.hub.draining)  # its grace runs on the clock
        await clock.run_for(10)
        with pytest.raises(grpc.aio.AioRpcError) as told:
            seen += await call.events_until()
        assert told.value.code() == grpc.StatusCode.UNAVAILABLE
        await drain
        last_seq = max(c.seq for c in chunks_of(seen))
        rest = await run_to_end(on_b, resume_request(seen[0].started.resume_token, last_seq))
    chunks = chunks_of(seen) + chunks_of(rest)
    assert_contiguous(chunks)
    end = end_of(rest)
    assert end.partial and end.error.code == "SERVER_SHUTDOWN"
    assert end.total_seq == len(chunks)
    assert end.text_sha256 == sha256("".join(c.text for c in chunks))


async def test_a_stream_whose_owner_died_ends_typed_with_what_it_produced(
    relay_factory: RelayFactory, shared: dict[str, Any]
) -> None:
    b = await relay_factory(**shared)
    # A replica that died mid-generation leaves a log, no End and no lease.
    store = open_store(shared)
    try:
        meta = StreamMeta("deadbeef" * 4, "sim", 0.0, 10)
        await store.create(meta)
        await store.append(meta.stream_id, [Chunk(i, f" w{i}", "sim", 1) for i in range(1, 6)])
    finally:
        await store.close()
    token = b.tokens.issue(meta.stream_id)
    async with grpc.aio.insecure_channel(b.address) as on_b:
        events = await run_to_end(on_b, resume_request(token, 2))
    assert [c.seq for c in chunks_of(events)] == [3, 4, 5]
    end = end_of(events)
    assert end.partial and end.error.code == "OWNER_LOST"
    assert end.total_seq == 5
    assert end.text_sha256 == sha256("".join(f" w{i}" for i in range(1, 6)))


ORPHAN_PROMPT = "an orphan"


async def write_orphan(store: RedisStore, prompt: str, chunks: int = 5) -> StreamMeta:
    """The log of a stream whose owner died after `chunks` chunks of the
    sim's answer to `prompt` (max_tokens 12): its request stored, no End, no
    lease."""
    parsed = parse_start(
        start_request(max_tokens=12, prompt=prompt).start, max_prompt_bytes=1 << 20
    )
    answer = SimAnswer(parsed.messages)
    meta = StreamMeta("0dd" * 10 + "ba", "sim", 0.0, 10, request=parsed)
    await store.create(meta)
    await store.append(
        meta.stream_id, [Chunk(i, answer.token(i - 1), "sim", 1, i) for i in range(1, chunks + 1)]
    )
    return meta


@dataclass
class FullReplica:
    """A replica at max_streams (1: one paced stream, `occupant`, holds its
    slot) and, in the store, an orphan (`write_orphan`) to resume on it."""

    relay: RelayServer
    store: RedisStore
    orphan: StreamMeta
    channel: grpc.aio.Channel
    occupant: RawCall

    async def make_room(self) -> None:
        """Cancel the occupant; return once its generation is gone."""
        self.occupant.send(pb.StreamRequest(cancel=pb.Cancel(reason="make room")))
        await self.occupant.events_until()
        await eventually(lambda: self.relay.hub.running_generations == 0)


@contextlib.asynccontextmanager
async def full_replica(
    relay_factory: RelayFactory, shared: dict[str, Any], clock: ManualClock
) -> AsyncIterator[FullReplica]:
    relay = await relay_factory(
        clock=clock, max_streams=1, shed_retry_after_s=2.5, **shared, **QUIET
    )
    store = open_store(shared)
    try:
        orphan = await write_orphan(store, ORPHAN_PROMPT)
        async with grpc.aio.insecure_channel(relay.address) as channel:
            occupant = RawCall(channel, start_request(max_tokens=5, metadata=PACED))
            await occupant.next_event()  # started: the replica is at its limit
            yield FullReplica(relay, store, orphan, channel, occupant)
    finally:
        await store.close()


async def test_a_replica_at_max_streams_refuses_a_takeover_and_leaves_the_stream_intact(
    relay_factory: RelayFactory, shared: dict[str, Any], clock: ManualClock
) -> None:
    # A takeover is a new generation on the replica that makes it: one at
    # max_streams sheds it as it sheds a start, or a replica's death would
    # push its streams past the survivors' limits. The refusal is
    # UNAVAILABLE (the stream is fine: resume it elsewhere) with the shed
    # details, and nothing changes: no lease is taken, nothing is written.
    # With room again, the same resume takes the stream over and finishes it.
    async with full_replica(relay_factory, shared, clock) as full:
        token = full.relay.tokens.issue(full.orphan.stream_id)
        refused = RawCall(full.channel, resume_request(token, 2))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await refused.events_until()
        error = caught.value
        assert_shed(error, "MAX_STREAMS", 2.5, code=grpc.StatusCode.UNAVAILABLE)
        assert full.orphan.stream_id in (error.details() or "")
        assert "max_streams" in (error.details() or "")
        assert await full.store.lease_owner(full.orphan.stream_id) is None
        assert await full.store.tail(full.orphan.stream_id) == StreamTail(5, False)
        assert full.relay.hub.running_generations == 1
        await full.make_room()
        rest = await run_to_end(full.channel, resume_request(token, 2))
        clean = await run_to_end(full.channel, start_request(max_tokens=12, prompt=ORPHAN_PROMPT))
    assert [c.seq for c in chunks_of(rest)] == list(range(3, 13))
    assert [e.error.code for e in rest if e.HasField("error")] == ["OWNER_LOST"]
    assert not end_of(rest).partial
    assert end_of(rest).text_sha256 == sha256(text_of(clean))


async def test_the_python_client_waits_the_advised_time_before_resuming_a_refused_takeover(
    relay_factory: RelayFactory, shared: dict[str, Any], clock: ManualClock
) -> None:
    # The refusal of the test above, as the Python client meets it: an
    # UNAVAILABLE is a reconnect, and its RetryInfo (2.5 s) is longer than
    # the first backoff (0.1 s), so the client waits 2.5 s (its injected
    # sleep: nothing waits on real time). Meanwhile the replica gets room;
    # the resume takes the stream over and the client has the whole answer.
    async with full_replica(relay_factory, shared, clock) as full:
        slept: list[float] = []

        async def sleep(seconds: float) -> None:
            slept.append(seconds)
            await full.make_room()

        client = RelayClient(full.relay.address, sleep=sleep, backoff_base_s=0.1, jitter=0.0)
        try:
            stream = client.resume(full.relay.tokens.issue(full.orphan.stream_id), 0)
            events = [event async for event in stream]
        finally:
            await client.close()
        clean = await run_to_end(full.channel, start_request(max_tokens=12, prompt=ORPHAN_PROMPT))
    reconnecting = [e for e in events if isinstance(e, Reconnecting)]
    assert [e.delay_s for e in reconnecting] == [2.5] == slept
    assert "max_streams" in reconnecting[0].cause
    assert [e.code for e in events if isinstance(e, Notice)] == ["OWNER_LOST"]
    end = events[-1]
    assert isinstance(end, End) and not end.partial
    assert stream.text == text_of(clean)


async def test_a_dead_replicas_generation_is_taken_over_and_finished(
    relay_factory: RelayFactory, shared: dict[str, Any], tmp_path: Path, clock: ManualClock
) -> None:
    # Replica A is a real process, on real time: its lease lapses in Redis
    # (Redis's own clock) lease_ttl_s after the SIGKILL, and B, polling the
    # store, takes the stream over then. Nothing here races the machine:
    # A sends 8 chunks and then hangs (stall@8, its stall timeout out of
    # reach), so it is mid-generation when killed however slow it is; a
    # renewal A misses while alive changes nothing (no one else reads the
    # stream then); B continues on the manual clock with nothing timed.
    # A slow machine only makes it take longer.
    # (The heartbeat would free it sooner: here the lease is the shorter.)
    config = replica_config(
        tmp_path / "replica-a.toml",
        shared,
        lease_ttl_s=0.6,
        stall_timeout_s=3600,
        heartbeat_interval_s=60,
        heartbeat_ttl_s=3600,
    )
    replica_a = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert replica_a.stdout is not None
        port = int((await replica_a.stdout.readline()).split()[1])
        b = await relay_factory(clock=clock, **shared, **QUIET)
        request = start_request(max_tokens=60, metadata={"sim.faults": "stall@8"})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as on_a:
            call = RawCall(on_a, request)
            seen = await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 8)
            replica_a.send_signal(signal.SIGKILL)  # no drain, no End, the lease left to lapse
            await replica_a.wait()
            with pytest.raises(grpc.aio.AioRpcError):
                await call.events_until()
        last = max(c.seq for c in chunks_of(seen))
        async with grpc.aio.insecure_channel(b.address) as on_b:
            rest = await run_to_end(on_b, resume_request(seen[0].started.resume_token, last))
            clean = await run_to_end(on_b, start_request(max_tokens=60))
        chunks = chunks_of(seen) + chunks_of(rest)
        assert_contiguous(chunks)
        assert "".join(c.text for c in chunks) == text_of(clean)
        end = end_of(rest)
        assert not end.partial
        assert end.text_sha256 == sha256(text_of(clean))
        takeover = [e.error for e in rest if e.HasField("error")]
        assert [n.code for n in takeover] == ["OWNER_LOST"]
        assert not takeover[0].fatal
        assert {c.attempt for c in chunks_of(rest)} >= {2}
    finally:
        if replica_a.returncode is None:
            replica_a.kill()
            await replica_a.wait()


async def test_a_killed_owners_stream_is_taken_over_once_its_heartbeat_is_gone(
    shared: dict[str, Any], tmp_path: Path, replica_processes: list[ReplicaProcess]
) -> None:
    # Issue 9 defect 7. Two replica processes on real time. The lease is an
    # hour long, so the only thing that can free A's stream for B within the
    # test's guard is A's heartbeat going away (2 s after its last renewal).
    # A sends 8 chunks and hangs (stall@8, its stall timeout out of reach),
    # so it is mid-generation when killed however slow the machine is; the
    # client then resumes on B and must get exactly the clean answer.
    # Nothing is timed: a slow machine only makes it take longer.
    settings = {"lease_ttl_s": 3600, "stall_timeout_s": 3600}
    a = await ReplicaProcess.start(replica_config(tmp_path / "a.toml", shared, **settings))
    replica_processes.append(a)
    b = await ReplicaProcess.start(replica_config(tmp_path / "b.toml", shared, **settings))
    replica_processes.append(b)
    request = start_request(max_tokens=60, metadata={"sim.faults": "stall@8"})
    async with asyncio.timeout(PROCESS_GUARD_S):
        async with grpc.aio.insecure_channel(a.address) as on_a:
            call = RawCall(on_a, request)
            seen = await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 8)
            await a.kill()
            with pytest.raises(grpc.aio.AioRpcError):
                await call.events_until()
        last = max(c.seq for c in chunks_of(seen))
        async with grpc.aio.insecure_channel(b.address) as on_b:
            rest = await run_to_end(on_b, resume_request(seen[0].started.resume_token, last))
            clean = await run_to_end(on_b, start_request(max_tokens=60))
    chunks = chunks_of(seen) + chunks_of(rest)
    assert_contiguous(chunks)
    assert "".join(c.text for c in chunks) == text_of(clean)
    end = end_of(rest)
    assert not end.partial
    assert end.total_seq == len(chunks)
    assert end.text_sha256 == sha256(text_of(clean))
    notices = [e.error for e in rest if e.HasField("error")]
    assert [n.code for n in notices] == ["OWNER_LOST"]
    assert not notices[0].fatal


async def test_a_live_owners_stream_is_not_taken_over_while_it_beats(
    shared: dict[str, Any], tmp_path: Path, replica_processes: list[ReplicaProcess]
) -> None:
    # The other side of the heartbeat: B follows A's stream while A stalls
    # (alive, beating) far past several heartbeat TTLs' worth of B's looks;
    # B never takes it over. A then ends it (its stall timeout), and B's
    # client gets A's End: OWNER_LOST never appears.
    settings = {"lease_ttl_s": 3600, "stall_timeout_s": 3}
    a = await ReplicaProcess.start(replica_config(tmp_path / "a.toml", shared, **settings))
    replica_processes.append(a)
    b = await ReplicaProcess.start(replica_config(tmp_path / "b.toml", shared, **settings))
    replica_processes.append(b)
    request = start_request(max_tokens=60, metadata={"sim.faults": "stall@4"})
    async with asyncio.timeout(PROCESS_GUARD_S):
        async with grpc.aio.insecure_channel(a.address) as on_a:
            call = RawCall(on_a, request)
            seen = await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 4)
            call.cancel()
        async with grpc.aio.insecure_channel(b.address) as on_b:
            rest = await run_to_end(on_b, resume_request(seen[0].started.resume_token, 4))
    codes = [e.error.code for e in rest if e.HasField("error")]
    assert "OWNER_LOST" not in codes
    end = end_of(rest)
    assert end.total_seq == 4 + len(chunks_of(rest))
    assert end.error.code != "OWNER_LOST"
