"""`serve --workers N` (issue 10): N gateway processes on one port, real
processes on real Redis, real signals.

The supervisor logs `worker I serving (pid P, replica R)` for every worker
that serves; the tests read those lines (and the stream leases in Redis,
which name the replica generating a stream) to tell the workers apart.
Which worker takes a connection is the kernel's choice (SO_REUSEPORT hashes
the connection), so a test that needs both opens new connections until it
has seen both; nothing waits on wall time to make anything happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
from redis.asyncio import Redis

from serverkit import (
    SECRET,
    RawCall,
    assert_contiguous,
    chunks_of,
    end_of,
    eventually,
    resume_request,
    run_to_end,
    sha256,
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.api.workers import (
    MAX_STARTUP_FAILURES,
    ExitVerdict,
    after_exit,
    describe_exit,
    forget_replica,
    reserve_port,
    restart_delay,
)
from tokenrelay_server.config.settings import Settings
from tokenrelay_server.store.heartbeat import RedisHeartbeats
from tokenrelay_server.store.redis import RedisStore

TOKENRELAY = [sys.executable, "-m", "tokenrelay_server.cli"]
# A generous bound on waits for other processes (it fails the test; it times nothing).
PROCESS_GUARD_S = 90.0
SERVING = re.compile(r"worker (\d+) serving \(pid (\d+), replica (\w+)\)")
# Each channel its own TCP connection (grpc shares one per target otherwise),
# so the kernel picks a worker for each.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# Connections opened to see both workers: all on one worker has odds 2**-63.
MAX_CONNECTIONS = 64


@dataclass
class Supervised:
    """A `tokenrelay serve --workers N` process (in a session of its own, so
    the test can kill the whole tree)."""

    process: asyncio.subprocess.Process
    log_path: Path
    port: int = 0
    metrics_port: int | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving(self) -> list[tuple[int, int, str]]:
        """(worker index, pid, replica id) of every worker that served, in order."""
        return [(int(i), int(p), r) for i, p, r in SERVING.findall(self.log())]

    def current(self) -> dict[int, tuple[int, str]]:
        """worker index → (pid, replica id) of its latest process."""
        return {index: (pid, replica) for index, pid, replica in self.serving()}

    def channel(self) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.address, options=OWN_CONNECTION)
        self.channels.append(channel)
        return channel


def workers_config(path: Path, redis_url: str, redis_prefix: str, **extra: object) -> Path:
    lines = ["[server]", "port = 0", "workers = 2", 'store = "redis"']
    lines += [f'redis_url = "{redis_url}"', f'redis_prefix = "{redis_prefix}"']
    lines += [f'resume_secret = "{SECRET}"', 'log_level = "info"']
    lines += [f"{key} = {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port_pair() -> int:
    """A port P such that P and P + 1 are both free now."""
    while True:
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port == 65535:
                continue
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


@pytest.fixture
async def supervised(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, redis_prefix: str
) -> AsyncIterator[Supervised]:
    """`serve --workers 2` on port 0; more settings by indirect parametrization
    (`metrics_port = "pair"`: a P with P and P + 1 free)."""
    extra = dict(getattr(request, "param", {}))
    if extra.get("metrics_port") == "pair":
        extra["metrics_port"] = free_port_pair()
    # Streams hang where a test says (stall@K) and their leases never lapse
    # on their own: only a death frees a stream (through its heartbeat).
    config = workers_config(
        tmp_path / "gateway.toml",
        redis_url,
        redis_prefix,
        lease_ttl_s=3600,
        stall_timeout_s=3600,
        drain_grace_s=120,
        **extra,
    )
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *(*TOKENRELAY, "serve", "--config", str(config)),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )
    supervised = Supervised(process, log_path, metrics_port=extra.get("metrics_port"))
    try:
        assert process.stdout is not None
        async with asyncio.timeout(PROCESS_GUARD_S):
            line = await process.stdout.readline()
        assert line.startswith(b"port "), f"{line!r}; it said: {supervised.log()[-3000:]}"
        supervised.port = int(line.split()[1])
        yield supervised
    finally:
        for channel in supervised.channels:
            await channel.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the supervisor and its workers
        await process.wait()


async def open_on_both_workers(
    supervised: Supervised, store: RedisStore, request: pb.StreamRequest, first_seq: int
) -> dict[str, tuple[RawCall, list[pb.StreamEvent]]]:
    """Streams on new connections until two workers generate one: replica id
    → (the call, its events up to chunk `first_seq`). Each stream's owner is
    its lease in Redis."""
    owners: dict[str, tuple[RawCall, list[pb.StreamEvent]]] = {}
    for _ in range(MAX_CONNECTIONS):
        call = RawCall(supervised.channel(), request)
        seen = await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == first_seq)
        owner = await store.lease_owner(seen[0].started.stream_id)
        assert owner is not None
        if owner in owners:
            call.cancel()
            continue
        owners[owner] = (call, seen)
        if len(owners) == 2:
            return owners
    raise AssertionError(f"{MAX_CONNECTIONS} connections all reached one worker")


async def test_two_workers_serve_one_port_each_as_its_own_replica(
    supervised: Supervised, redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        async with asyncio.timeout(PROCESS_GUARD_S):
            owners = await open_on_both_workers(
                supervised, store, start_request(metadata={"sim.faults": "stall@2"}), 2
            )
        serving = supervised.current()
        assert sorted(serving) == [0, 1]
        assert set(owners) == {replica for _, replica in serving.values()}
        pids = {pid for pid, _ in serving.values()}
        assert len(pids) == 2
        children = {child.pid for child in psutil.Process(supervised.process.pid).children()}
        assert pids <= children
    finally:
        await store.close()


async def test_sigterm_drains_every_worker_and_the_supervisor_exits_0(
    supervised: Supervised, redis_url: str, redis_prefix: str
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    # 40 chunks at 50 ms: running on both workers when the signal comes,
    # each finishes within the drain grace (120 s) however slow the machine.
    request = start_request(max_tokens=40, metadata={"sim.pace_ms": "50"})
    try:
        async with asyncio.timeout(PROCESS_GUARD_S):
            owners = await open_on_both_workers(supervised, store, request, 1)
            pids = [pid for pid, _ in supervised.current().values()]
            # Twice, as `timeout` sends it (to the command, then its process
            # group): one stop, still graceful.
            supervised.process.send_signal(signal.SIGTERM)
            supervised.process.send_signal(signal.SIGTERM)
            for call, seen in owners.values():
                events = seen + await call.events_until()
                assert_contiguous(chunks_of(events))
                end = end_of(events)
                assert not end.partial and end.total_seq == 40
            status = await supervised.process.wait()
    finally:
        await store.close()
    assert status == 0, supervised.log()[-3000:]
    assert not any(psutil.pid_exists(pid) for pid in pids)
    log = supervised.log()
    assert "SIGTERM: draining 2 workers" in log
    assert log.count("exited with status 0") == 2


async def test_ctrl_c_while_draining_kills_the_workers_and_exits_1(
    supervised: Supervised, redis_url: str, redis_prefix: str
) -> None:
    # Streams that hang (stall@2) would hold the drain for its whole grace
    # (120 s); Ctrl-C again (a SIGINT) ends it now.
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        async with asyncio.timeout(PROCESS_GUARD_S):
            await open_on_both_workers(
                supervised, store, start_request(metadata={"sim.faults": "stall@2"}), 2
            )
            pids = [pid for pid, _ in supervised.current().values()]
            supervised.process.send_signal(signal.SIGTERM)
            await eventually(lambda: supervised.log().count("draining: no new streams") == 2)
            supervised.process.send_signal(signal.SIGINT)
            status = await supervised.process.wait()
    finally:
        await store.close()
    assert status == 1
    assert "SIGINT while draining: killing the workers (SIGKILL)" in supervised.log()
    assert not any(psutil.pid_exists(pid) for pid in pids)


@pytest.mark.parametrize("supervised", [{"metrics_port": "pair"}], indirect=True)
async def test_worker_i_serves_metrics_on_metrics_port_plus_i(supervised: Supervised) -> None:
    import httpx

    log = supervised.log()
    assert supervised.metrics_port is not None
    async with httpx.AsyncClient() as http:
        for index in (0, 1):
            url = f"http://127.0.0.1:{supervised.metrics_port + index}/metrics"
            assert f"metrics at {url}" in log
            scraped = await http.get(url)
            assert scraped.status_code == 200 and "tokenrelay_" in scraped.text


async def test_sighup_reaches_every_worker(supervised: Supervised) -> None:
    supervised.process.send_signal(signal.SIGHUP)
    await eventually(
        lambda: supervised.log().count("SIGHUP: no TLS files to reload") == 2,
        within_s=PROCESS_GUARD_S,
    )
    await eventually(
        lambda: supervised.log().count("SIGHUP: API keys and tenants reloaded") == 2,
        within_s=PROCESS_GUARD_S,
    )  # each worker read the config file again
    assert "SIGHUP: forwarded to the workers" in supervised.log()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_workers_drain_and_exit_when_their_supervisor_is_killed(
    supervised: Supervised,
) -> None:
    # PR_SET_PDEATHSIG: no orphan keeps serving the port.
    pids = [pid for pid, _ in supervised.current().values()]
    assert len(pids) == 2
    supervised.process.send_signal(signal.SIGKILL)
    await supervised.process.wait()
    await eventually(lambda: all(gone(pid) for pid in pids), within_s=PROCESS_GUARD_S)
    assert supervised.log().count("tokenrelay: stopped") == 2  # each drained


# Heartbeats that would lapse only after an hour: only the supervisor
# deleting the dead worker's can free its stream within the test.
@pytest.mark.parametrize("supervised", [{"heartbeat_ttl_s": 3600}], indirect=True)
async def test_a_killed_worker_is_restarted_and_its_stream_taken_over_on_resume(
    supervised: Supervised, redis_url: str, redis_prefix: str
) -> None:
    # The stream sends 8 chunks and hangs (stall@8, its stall timeout out of
    # reach), so its worker is mid-generation when killed however slow the
    # machine is. Its lease and the heartbeats last an hour: only the
    # supervisor deleting the dead worker's heartbeat frees the stream for
    # the worker that gets the resume.
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    request = start_request(max_tokens=60, metadata={"sim.faults": "stall@8"})
    try:
        async with asyncio.timeout(PROCESS_GUARD_S):
            call = RawCall(supervised.channel(), request)
            seen = await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 8)
            owner = await store.lease_owner(seen[0].started.stream_id)
            before = supervised.current()
            [(index, pid)] = [(i, p) for i, (p, r) in before.items() if r == owner]
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError):
                await call.events_until()
            # Restarted: the same place, a new process and a new replica id.
            await eventually(
                lambda: supervised.current()[index][0] != pid, within_s=PROCESS_GUARD_S
            )
            new_pid, new_replica = supervised.current()[index]
            assert new_replica != owner and psutil.pid_exists(new_pid)
            client = Redis.from_url(redis_url)
            try:
                heartbeats = RedisHeartbeats(client, prefix=redis_prefix)
                assert await heartbeats.remaining(owner) is None  # deleted, not lapsed
                assert await heartbeats.remaining(new_replica) is not None
            finally:
                await client.aclose()
            assert "killed by SIGKILL; restarting it" in supervised.log()
            last = max(c.seq for c in chunks_of(seen))
            rest = await run_to_end(
                supervised.channel(), resume_request(seen[0].started.resume_token, last)
            )
            clean = await run_to_end(supervised.channel(), start_request(max_tokens=60))
            # The restarted worker serves on the same port: new connections reach it.
            owners = await open_on_both_workers(
                supervised, store, start_request(metadata={"sim.faults": "stall@1"}), 1
            )
            assert new_replica in owners and owner not in owners
    finally:
        await store.close()
    chunks = chunks_of(seen) + chunks_of(rest)
    assert_contiguous(chunks)
    assert "".join(c.text for c in chunks) == text_of(clean)
    end = end_of(rest)
    assert not end.partial and end.total_seq == len(chunks)
    assert end.text_sha256 == sha256(text_of(clean))
    assert [e.error.code for e in rest if e.HasField("error")] == ["OWNER_LOST"]


def test_a_crashed_worker_whose_restarts_never_serve_stops_the_supervisor(
    tmp_path: Path,
) -> None:
    # tests/workerkit.py: worker 1 serves, crashes, and every restart of it
    # fails before serving; the supervisor restarts it (no delays there)
    # until MAX_STARTUP_FAILURES in a row, then drains worker 0 and exits 1.
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("workerkit.py")), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=PROCESS_GUARD_S,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("port ")
    lines = done.stderr.splitlines()
    assert any("worker 1 serving" in line and "replica flaky" in line for line in lines)
    restarts = [line for line in lines if "worker 1 (pid" in line and "; restarting it in" in line]
    assert len(restarts) == MAX_STARTUP_FAILURES  # the crash, then 4 failed restarts
    assert any("worker 1 (pid" in line and "not restarting it: stopping" in line for line in lines)
    assert any("worker 0 (pid" in line and "exited with status 0" in line for line in lines)


# --- refused configurations ------------------------------------------------------------


def refused(*args: str, env: dict[str, str] | None = None) -> list[str]:
    """`serve` that must not start: exits 2 at once, no traceback, nothing on
    stdout (no "port N"); its stderr lines."""
    done = subprocess.run(
        [*TOKENRELAY, "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=PROCESS_GUARD_S,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    return done.stderr.splitlines()


NEEDS_REDIS = (
    "2 workers need the Redis store (--store redis): a resume may land on any worker, "
    "and only Redis is shared by them (the store is memory)"
)


def test_workers_on_the_memory_store_are_refused_naming_the_flag() -> None:
    assert refused("--workers", "2", "--store", "memory") == [
        f"--workers: {NEEDS_REDIS}",
        "Error: 1 configuration mistake; nothing was started.",
    ]


def test_workers_on_the_memory_store_are_refused_naming_the_variable() -> None:
    assert refused(env={"TOKENRELAY_WORKERS": "2"})[0] == f"TOKENRELAY_WORKERS: {NEEDS_REDIS}"


def test_workers_on_the_memory_store_are_refused_naming_the_file_line(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[server]\nlog_level = "info"\nworkers = 2\n')
    assert refused("--config", str(config))[0] == f"{config}:3: server.workers: {NEEDS_REDIS}"


def test_zero_workers_are_refused() -> None:
    assert refused("--workers", "0")[0] == "--workers: must be at least 1"


def test_metrics_ports_of_every_worker_must_fit(redis_url: str) -> None:
    lines = refused(
        *("--workers", "3", "--store", "redis", "--redis-url", redis_url),
        *("--metrics-port", "65534"),
    )
    assert lines[0] == (
        "--workers: 3 workers serve metrics on --metrics-port + 0..2, which passes port "
        "65535; use a lower --metrics-port"
    )


def test_a_worker_refused_at_startup_is_not_restarted(redis_url: str, tmp_path: Path) -> None:
    # A mistake only the gateway's start sees (TLS files): worker 0 reports
    # it and exits 2; the supervisor starts no other worker and exits 2.
    lines = refused(
        *("--workers", "2", "--store", "redis", "--redis-url", redis_url),
        *("--tls-cert", str(tmp_path / "cert.pem")),
    )
    problems = [line for line in lines if line.startswith("--tls-cert:")]
    assert len(problems) == 1, lines
    assert any("worker 0 (pid" in line and "not restarting it" in line for line in lines)
    assert not any("worker 1 starting" in line for line in lines)


# --- the port and the restart policy ----------------------------------------------------


@contextlib.contextmanager
def plain_listener() -> Iterator[int]:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield int(other.getsockname()[1])


def test_a_port_another_program_listens_on_is_refused() -> None:
    with plain_listener() as port:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)


def test_a_port_another_supervisor_holds_is_refused() -> None:
    with reserve_port("127.0.0.1", 0) as held:
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)


def test_the_reserved_port_takes_no_connection_itself() -> None:
    with reserve_port("127.0.0.1", 0) as held:
        port = held.getsockname()[1]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize(
    ("crashes", "delay"),
    [(1, 0.0), (2, 0.5), (3, 1.0), (4, 2.0), (8, 30.0), (50, 30.0)],
    ids=[
        "the first crash restarts at once",
        "the second waits half a second",
        "the third a second",
        "then it doubles",
        "up to thirty seconds",
        "and stays there",
    ],
)
def test_restart_delay(crashes: int, delay: float) -> None:
    assert restart_delay(crashes) == delay


@pytest.mark.parametrize(
    ("exitcode", "said"),
    [(0, "exited with status 0"), (2, "exited with status 2"), (-9, "killed by SIGKILL")],
)
def test_describe_exit(exitcode: int, said: str) -> None:
    assert describe_exit(exitcode) == said


@pytest.mark.parametrize(
    ("exitcode", "served_s", "first_start", "crashes", "failures", "verdict"),
    [
        (-9, 5.0, False, 0, 0, ExitVerdict(0.0, None, 1, 0)),
        (-9, 5.0, False, 1, 0, ExitVerdict(0.5, None, 2, 0)),
        (-9, 5.0, False, 3, 0, ExitVerdict(2.0, None, 4, 0)),
        (1, 600.0, False, 3, 0, ExitVerdict(0.0, None, 1, 0)),
        (1, None, True, 0, 0, ExitVerdict(None, 1, 0, 1)),
        (2, None, True, 0, 0, ExitVerdict(None, 2, 0, 1)),
        (-15, None, True, 0, 0, ExitVerdict(None, 1, 0, 1)),
        (2, None, False, 1, 0, ExitVerdict(None, 2, 1, 1)),
        (1, None, False, 1, 0, ExitVerdict(0.5, None, 2, 1)),
        (1, None, False, 4, MAX_STARTUP_FAILURES - 2, ExitVerdict(4.0, None, 5, 4)),
        (1, None, False, 5, MAX_STARTUP_FAILURES - 1, ExitVerdict(None, 1, 5, 5)),
    ],
    ids=[
        "a worker killed while serving is restarted at once",
        "its second crash in a row waits half a second",
        "its fourth waits two seconds",
        "a worker that served half a minute counts its crashes afresh",
        "a worker that fails its first start stops everything with its status",
        "a configuration error at the first start stops with status 2",
        "a worker killed before it ever served stops with status 1",
        "a restart refused for its configuration is not retried",
        "a restart that fails otherwise is retried with the backoff",
        "it is retried up to the limit",
        "the limit of restarts that never served stops everything",
    ],
)
def test_after_exit(
    exitcode: int,
    served_s: float | None,
    first_start: bool,
    crashes: int,
    failures: int,
    verdict: ExitVerdict,
) -> None:
    assert (
        after_exit(
            exitcode,
            served_s=served_s,
            first_start=first_start,
            crashes=crashes,
            startup_failures=failures,
        )
        == verdict
    )


async def test_the_supervisor_forgets_a_dead_workers_heartbeat(
    redis_url: str, redis_prefix: str
) -> None:
    client = Redis.from_url(redis_url)
    heartbeats = RedisHeartbeats(client, prefix=redis_prefix)
    try:
        await heartbeats.beat("dead-replica", ttl_s=3600)
        await heartbeats.beat("live-replica", ttl_s=3600)
        settings = Settings(store="redis", redis_url=redis_url, redis_prefix=redis_prefix)
        # (A process's own event loop, as the supervisor has none: a thread.)
        assert await asyncio.to_thread(forget_replica, settings, "dead-replica")
        assert await heartbeats.remaining("dead-replica") is None
        assert await heartbeats.remaining("live-replica") is not None
    finally:
        await client.aclose()


def test_a_heartbeat_the_supervisor_cannot_delete_is_left_to_lapse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = Settings(store="redis", redis_url="redis://127.0.0.1:1/0")  # nobody listens
    assert not forget_replica(settings, "r1")
    assert "could not delete the heartbeat of replica r1" in caplog.text
    assert "taken over once it lapses" in caplog.text
