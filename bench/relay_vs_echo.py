"""tokenrelay against a bare grpc.aio server of the same service, in one run.

    .venv/bin/python bench/relay_vs_echo.py            # full run, 2-3 min
    .venv/bin/python bench/relay_vs_echo.py --quick    # ~20-30 s
    .venv/bin/python bench/relay_vs_echo.py --profile  # + cProfile of both servers
    .venv/bin/python bench/relay_vs_echo.py --observability   # metrics on vs off, ~1 min

What is measured

1. Throughput (chunks/s) at 1, 10 and 100 concurrent streams, for
   - the ceiling: a bare grpc.aio server implementing the same
     `tokenrelay.v1.Relay` service, whose `Stream` handler reads the `start`
     and yields `started`, N `TokenChunk`s and an `end`: no store, no hub, no
     checkpoints. Its chunk texts are the simulator's own tokens (same sizes);
   - tokenrelay: `RelayServer` with the in-memory store and model `sim` at
     full speed (sim.pace_ms 0), params.max_tokens = N. Everything tokenrelay
     adds (the generation task, store append, fan-out, a Checkpoint with a
     signed resume token every 10 chunks, the digest) is overhead the ratio
     charges to it.
   A round moves `--total-chunks` chunks per side (N = total / streams; with
   the default 20,000: 20,000 / 2,000 / 200 tokens per stream, the last being
   the simulator's default answer length), timed from the first call created
   to the last `end` received; every stream is checked to end complete.
   After one untimed warm-up round per side, `--rounds` rounds per side are
   timed, interleaved (ceiling, relay, then relay, ceiling, ...) so drift on
   the shared machine hits both. Reported: the BEST round of each side and
   ratio = best relay / best ceiling (the headline). Noise from other
   processes only ever slows a round down, so the best round is the least
   disturbed one; on this machine the best/best ratio at 100 streams moved
   by a few hundredths between runs while the ratio of medians moved by
   0.2. Also shown: the medians and their ratio, the median of the per-round
   ratios of back-to-back pairs (JSON), and the server's CPU time per chunk
   (psutil, all its threads; median): the cost of a chunk, which depends less
   on what else the machine is doing than the rate does.

2. Resume latency: `--resumes` finished relay streams are resumed with
   ResumeStream(token, last_seq = half the stream); the time runs from the
   creation of the new call (on an already connected channel) to the first
   replayed TokenChunk; the replayed seqs are checked. The ceiling's
   reconnect floor is the time from creating a fresh call on the bare server
   to its first chunk, measured alternately with the resumes. One call at a
   time, no other load; p50/p99 (nearest rank). ratio = floor / resume.

3. RSS per detached idle stream: on a fresh relay process (without the logs
   the throughput rounds left in the in-memory store), `--idle-streams`
   streams with sim.pace_ms 60000 are started, each read to its `started`
   event and then cancelled by the client, so the server holds them detached
   for its grace period (default 60 s, kept). Server RSS after a warm-up and a
   gc, before and after, divided by the count. With `--idle-tokens` 200 the
   simulator plans its whole answer up front, which is about half the figure
   (a real provider would hold a connection instead).

Process layout, and why

Each server runs in its own process (multiprocessing, spawn; driven over a
pipe for RSS, gc and profiling) and the load generator (one grpc.aio client,
one channel per server, identical code for both sides) runs in this process.
With 2 cores this gives the server and the client a core each, as when the
clients are elsewhere; in one process the client's work would share the
server's event loop and blur the server's overhead. Both servers live for the
whole throughput and resume parts (an idle server costs no CPU) so rounds can
interleave. The client reads raw bytes and tells chunks from other events by
their first (tag) byte, parsing only the `end`, to keep its cost per chunk
down (it is still about that of the ceiling server: grpc.aio's per-message
cost dominates on both ends). The table shows the server's and the client's
CPU use during the rounds; when neither is near 100 %, the machine (other
processes) or the per-message round trips through grpc's completion queue
were the limit.

4. `--observability` (instead of 1-3): tokenrelay with its metrics and Admin
   on (--metrics-port and --admin-token: LiveStats, the metrics observer and
   collector, the store's append hook, the error recorder; /metrics scraped
   once per round, as Prometheus would every few seconds) against tokenrelay
   with them off, in one run: the same rounds, interleaved, at `--streams`
   (default 100). ratio = best round with them on / best round with them off
   (goal >= 0.9). The metrics are checked afterwards: their chunk count must
   equal the chunks the rounds moved. (bench/observability_overhead.py
   measures tracing, with the metrics, against neither.)

Output: a table on stdout and, last, one JSON line with every figure.
The benchmark never asserts; it exits 0 unless something breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import io
import json
import math
import multiprocessing
import os
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal, TypeVar

import grpc
import psutil

from tokenrelay.v1 import relay_pb2, relay_pb2_grpc

SECRET = "23470a3e48adb610d7843171fd02b36e4c90dc4e02c509bc971b1dbd4a9329f0"
ServerKind = Literal["echo", "relay"]
KINDS: tuple[ServerKind, ServerKind] = ("echo", "relay")
GOAL_RATIO = 0.6
OBSERVABILITY_GOAL_RATIO = 0.9
ADMIN_TOKEN = "bench-admin-token-0123456789"
IDLE_PACE_MS = "60000"
PROMPT = "benchmark: tell me about token streams"


# --- the ceiling: a bare server of the same service ------------------------------------


def sim_token_texts(count: int = 4096) -> list[str]:
    """The simulator's tokens for the benchmark prompt, so the ceiling sends
    texts of the same sizes (words, punctuation, some multi-byte UTF-8)."""
    from tokenrelay_server.core.model import Message
    from tokenrelay_server.upstream.sim import SimAnswer

    answer = SimAnswer((Message("user", PROMPT),))
    return [answer.token(i) for i in range(count)]


class EchoServicer(relay_pb2_grpc.RelayServicer):
    """`Relay.Stream` with nothing behind it: read `start`, yield chunks."""

    def __init__(self) -> None:
        self._texts = sim_token_texts()

    async def Stream(
        self,
        request_iterator: AsyncIterator[relay_pb2.StreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[relay_pb2.StreamEvent]:
        first = await anext(aiter(request_iterator))
        start = first.start
        count = start.params.max_tokens if start.params.HasField("max_tokens") else 200
        yield relay_pb2.StreamEvent(
            started=relay_pb2.StreamStarted(stream_id=uuid.uuid4().hex, model=start.model)
        )
        texts = self._texts
        # `sim.pace_ms` paces the chunks on an absolute schedule, as the
        # simulator does (chunk i is due at start + i * pace), so paced
        # figures compare the same schedule on both sides (bench/redis_speed.py).
        pace_s = float(start.metadata.get("sim.pace_ms", "0")) / 1000
        loop = asyncio.get_running_loop()
        began = loop.time()
        for seq in range(1, count + 1):
            if pace_s:
                delay = began + seq * pace_s - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            yield relay_pb2.StreamEvent(
                chunk=relay_pb2.TokenChunk(
                    seq=seq, text=texts[(seq - 1) % len(texts)], provider="sim", attempt=1
                )
            )
        yield relay_pb2.StreamEvent(
            end=relay_pb2.StreamEnd(
                finish_reason="stop",
                usage=relay_pb2.Usage(completion_tokens=count),
                total_seq=count,
            )
        )


# --- server processes -------------------------------------------------------------------


NO_SHEDDING_MS = 3_600_000.0  # a loop-lag threshold no round reaches


def serve_in_child(
    kind: ServerKind,
    conn: Connection,
    settings: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Entry point of a server process: start the server, report its port,
    then answer commands from the benchmark until told to stop. `settings`
    and `env` (relay only) are more Settings values and environment
    variables (bench/observability_overhead.py)."""
    os.environ.update(env or {})
    if os.environ.get("TOKENRELAY_BENCH_UVLOOP") == "1":  # both servers on uvloop
        import uvloop

        uvloop.run(_serve(kind, conn, settings or {}))
        return
    asyncio.run(_serve(kind, conn, settings or {}))


async def _serve(kind: ServerKind, conn: Connection, settings: dict[str, Any]) -> None:
    from tokenrelay_server.api.heap import tune_collector
    from tokenrelay_server.api.server import RelayServer
    from tokenrelay_server.config.settings import Settings
    from tokenrelay_server.core.limits import RequestLimits

    relay: RelayServer | None = None
    echo: grpc.aio.Server | None = None
    if kind == "relay":
        # The loop-lag monitor runs (its cost is counted) but never sheds: a
        # flood saturates the loop by design, and a round measures the streams
        # it offers, not how many the gateway would refuse.
        values = {"port": 0, "resume_secret": SECRET, "max_loop_lag_ms": NO_SHEDDING_MS}
        relay = await RelayServer.start(Settings(**{**values, **settings}))
        port = relay.port
    else:
        # The same transport options as RelayServer.start.
        echo = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", RequestLimits().max_request_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        relay_pb2_grpc.add_RelayServicer_to_server(EchoServicer(), echo)
        port = echo.add_insecure_port("127.0.0.1:0")
        await echo.start()
    # Both servers tune their collector as `tokenrelay serve` does (api/heap.py).
    tune_collector()
    pauses = GcPauses()
    gc.callbacks.append(pauses.on_gc)
    conn.send(("ready", port, os.getpid()))
    loop = asyncio.get_running_loop()
    profiler: cProfile.Profile | None = None
    me = psutil.Process()
    try:
        while True:
            command, argument = await loop.run_in_executor(None, conn.recv)
            reply: Any = None
            if command == "stop":
                break
            if command == "gc":
                gc.collect()
                await asyncio.sleep(0.2)
                gc.collect()
            elif command == "gc_pauses":  # since the last ask, then reset
                reply = pauses.take()
            elif command == "metrics_url":
                reply = None if relay is None else relay.metrics_url
            elif command == "stats":
                reply = {"rss": me.memory_info().rss}
                if relay is not None:
                    reply["generations"] = relay.hub.running_generations
                    reply["sessions"] = relay.hub.attached_sessions
            elif command == "profile_start":
                profiler = cProfile.Profile()
                profiler.enable()
            elif command == "profile_stop" and profiler is not None:
                profiler.disable()
                reply = _profile_report(profiler, int(argument or 25))
                profiler = None
            conn.send(reply)
    finally:
        if relay is not None:
            await relay.stop(grace=0.5)
        if echo is not None:
            await echo.stop(0.5)
        conn.send(None)


class GcPauses:
    """The collector's pauses in a server process (gc.callbacks), by
    generation: the longest of a paced level is printed with it
    (bench/redis_speed.py), to tell a collector's pause from a loop that is
    behind."""

    def __init__(self) -> None:
        self._started = 0.0
        self._pauses: list[tuple[int, float]] = []

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))

    def take(self) -> dict[str, Any]:
        pauses, self._pauses = self._pauses, []
        by_gen: dict[str, Any] = {}
        for generation in (0, 1, 2):
            seconds = [s for g, s in pauses if g == generation]
            by_gen[str(generation)] = {
                "count": len(seconds),
                "max_ms": max(seconds, default=0.0) * 1000,
                "total_ms": sum(seconds) * 1000,
            }
        return by_gen


def _profile_report(profiler: cProfile.Profile, top: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.strip_dirs()
    out.write("--- by own time (tottime) ---\n")
    stats.sort_stats("tottime").print_stats(top)
    out.write("--- by cumulative time ---\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


class ServerProcess:
    """A server in a child process, driven over a pipe."""

    def __init__(
        self,
        kind: ServerKind,
        *,
        settings: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        name: str | None = None,
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self.kind = kind
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=serve_in_child,
            args=(kind, child_conn, settings, env),
            name=f"bench-{name or kind}",
            daemon=True,
        )
        self.port = 0
        self.pid = 0
        self.psutil: psutil.Process | None = None

    async def start(self) -> ServerProcess:
        self._process.start()
        message = await self._recv(timeout_s=60.0)
        _, self.port, self.pid = message
        self.psutil = psutil.Process(self.pid)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def command(self, command: str, argument: Any = None) -> Any:
        self._conn.send((command, argument))
        return await self._recv(timeout_s=60.0)

    async def _recv(self, timeout_s: float) -> Any:
        loop = asyncio.get_running_loop()
        try:
            if await loop.run_in_executor(None, self._conn.poll, timeout_s):
                return self._conn.recv()
        except EOFError:
            pass
        raise RuntimeError(
            f"the {self.kind} server process did not answer (exit code {self._process.exitcode})"
        )

    def cpu_seconds(self) -> float:
        assert self.psutil is not None
        times = self.psutil.cpu_times()
        return times.user + times.system

    async def stop(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(Exception):
                self._conn.send(("stop", None))
                await self._recv(timeout_s=15.0)
        await asyncio.get_running_loop().run_in_executor(None, self._process.join, 10.0)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5.0)


# --- the client -----------------------------------------------------------------------


def start_request(
    tokens: int,
    *,
    stream_index: int = 0,
    metadata: dict[str, str] | None = None,
    checkpoint_interval: int | None = None,
) -> relay_pb2.StreamRequest:
    policy = relay_pb2.RecoveryPolicy()
    if checkpoint_interval is not None:
        policy.checkpoint_interval = checkpoint_interval
    return relay_pb2.StreamRequest(
        start=relay_pb2.StartGeneration(
            model="sim",
            messages=[relay_pb2.Message(role="user", content=f"{PROMPT} #{stream_index}")],
            params=relay_pb2.GenerationParams(max_tokens=tokens),
            metadata=metadata or {},
            policy=policy,
        )
    )


# The client reads raw bytes: a serialized StreamEvent starts with the tag
# byte of its one `kind` field, so chunks are counted without parsing them and
# the load generator spends its core on the transport, not on protobuf (it
# shares the machine with the server). Only the `end` is parsed, to check it.
STREAM_METHOD = "/tokenrelay.v1.Relay/Stream"
STARTED_TAG = 0x0A  # field 1, length-delimited
CHUNK_TAG = 0x12  # field 2
END_TAG = 0x2A  # field 5


def stream_method(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(
        STREAM_METHOD,
        request_serializer=relay_pb2.StreamRequest.SerializeToString,
        response_deserializer=None,  # raw bytes
    )


@dataclass
class StreamOutcome:
    chunks: int = 0
    ended: bool = False
    partial: bool = False
    total_seq: int = 0


async def read_stream(
    method: grpc.aio.StreamStreamMultiCallable, request: relay_pb2.StreamRequest
) -> StreamOutcome:
    """The one reading loop both sides get: send the first request,
    half-close, count chunks until the end."""
    outcome = StreamOutcome()
    call = method()
    await call.write(request)
    await call.done_writing()
    while True:
        raw = await call.read()
        if raw is grpc.aio.EOF:
            return outcome
        if raw[0] == CHUNK_TAG:
            outcome.chunks += 1
        elif raw[0] == END_TAG:
            end = relay_pb2.StreamEvent.FromString(raw).end
            outcome.ended = True
            outcome.partial = end.partial
            outcome.total_seq = end.total_seq


@dataclass
class RoundResult:
    chunks_per_s: float
    seconds: float
    server_cpu: float  # fraction of one core during the round
    client_cpu: float
    server_us_per_chunk: float  # server CPU time (all its threads) per chunk
    client_us_per_chunk: float
    ok: bool


async def run_round(
    stub: grpc.aio.StreamStreamMultiCallable,
    server: ServerProcess,
    streams: int,
    tokens: int,
    checkpoint_interval: int | None = None,
) -> RoundResult:
    requests = [
        start_request(tokens, stream_index=i, checkpoint_interval=checkpoint_interval)
        for i in range(streams)
    ]
    server_cpu = server.cpu_seconds()
    client_cpu = time.process_time()
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(read_stream(stub, request) for request in requests))
    seconds = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    server_cpu = server.cpu_seconds() - server_cpu
    chunks = sum(o.chunks for o in outcomes)
    ok = all(o.ended and not o.partial and o.chunks == tokens == o.total_seq for o in outcomes)
    return RoundResult(
        chunks_per_s=chunks / seconds,
        seconds=seconds,
        server_cpu=server_cpu / seconds,
        client_cpu=client_cpu / seconds,
        server_us_per_chunk=server_cpu / max(1, chunks) * 1e6,
        client_us_per_chunk=client_cpu / max(1, chunks) * 1e6,
        ok=ok,
    )


@dataclass
class ThroughputFigures:
    streams: int
    tokens_per_stream: int
    echo_chunks_s: float  # the best round
    relay_chunks_s: float
    ratio: float  # best relay / best ceiling: the headline
    echo_median_chunks_s: float
    relay_median_chunks_s: float
    median_ratio: float  # median relay / median ceiling
    paired_ratio: float  # median over rounds of relay / ceiling run back to back
    echo_server_cpu: float
    relay_server_cpu: float
    echo_client_cpu: float
    relay_client_cpu: float
    echo_server_us_per_chunk: float
    relay_server_us_per_chunk: float
    echo_client_us_per_chunk: float
    relay_client_us_per_chunk: float
    cpu_ratio: float  # echo / relay server CPU per chunk: 1.0 = no overhead
    rounds: int
    all_ok: bool
    echo_rounds: list[float] = field(default_factory=list)
    relay_rounds: list[float] = field(default_factory=list)


K = TypeVar("K", bound=str)


async def interleaved_rounds(
    stubs: Mapping[K, grpc.aio.StreamStreamMultiCallable],
    servers: Mapping[K, ServerProcess],
    names: Sequence[K],
    streams: int,
    tokens: int,
    rounds: int,
    checkpoint_interval: int | None = None,
) -> dict[K, list[RoundResult]]:
    """An untimed warm-up round (a quarter of the tokens) per server, then
    `rounds` timed rounds each, interleaved, the order rotating each round so
    drift on the shared machine hits every server alike."""
    for name in names:
        await run_round(
            stubs[name], servers[name], streams, max(1, tokens // 4), checkpoint_interval
        )
    results: dict[K, list[RoundResult]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in [*names[shift:], *names[:shift]]:
            results[name].append(
                await run_round(stubs[name], servers[name], streams, tokens, checkpoint_interval)
            )
    return results


async def measure_throughput(
    stubs: dict[ServerKind, grpc.aio.StreamStreamMultiCallable],
    servers: dict[ServerKind, ServerProcess],
    streams: int,
    total_chunks: int,
    rounds: int,
    checkpoint_interval: int | None = None,
) -> ThroughputFigures:
    tokens = max(1, total_chunks // streams)
    results = await interleaved_rounds(
        stubs, servers, KINDS, streams, tokens, rounds, checkpoint_interval
    )
    echo_rates = [r.chunks_per_s for r in results["echo"]]
    relay_rates = [r.chunks_per_s for r in results["relay"]]
    echo_median = statistics.median(echo_rates)
    relay_median = statistics.median(relay_rates)
    echo_us = statistics.median(r.server_us_per_chunk for r in results["echo"])
    relay_us = statistics.median(r.server_us_per_chunk for r in results["relay"])
    return ThroughputFigures(
        streams=streams,
        tokens_per_stream=tokens,
        echo_chunks_s=max(echo_rates),
        relay_chunks_s=max(relay_rates),
        ratio=max(relay_rates) / max(echo_rates),
        echo_median_chunks_s=echo_median,
        relay_median_chunks_s=relay_median,
        median_ratio=relay_median / echo_median,
        paired_ratio=statistics.median(r / e for r, e in zip(relay_rates, echo_rates, strict=True)),
        echo_server_cpu=statistics.median(r.server_cpu for r in results["echo"]),
        relay_server_cpu=statistics.median(r.server_cpu for r in results["relay"]),
        echo_client_cpu=statistics.median(r.client_cpu for r in results["echo"]),
        relay_client_cpu=statistics.median(r.client_cpu for r in results["relay"]),
        echo_server_us_per_chunk=echo_us,
        relay_server_us_per_chunk=relay_us,
        echo_client_us_per_chunk=statistics.median(r.client_us_per_chunk for r in results["echo"]),
        relay_client_us_per_chunk=statistics.median(
            r.client_us_per_chunk for r in results["relay"]
        ),
        # nan: rounds too short for the CPU clock's ticks (10 ms) to see.
        cpu_ratio=echo_us / relay_us if relay_us else math.nan,
        rounds=rounds,
        all_ok=all(r.ok for rs in results.values() for r in rs),
        echo_rounds=[round(x) for x in echo_rates],
        relay_rounds=[round(x) for x in relay_rates],
    )


# --- resume latency ---------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


async def first_chunk_latency(
    stub: grpc.aio.StreamStreamMultiCallable, request: relay_pb2.StreamRequest, expected_seq: int
) -> float:
    """Seconds from creating the call to its first TokenChunk; the rest of the
    stream is read (and checked) untimed."""
    started = time.perf_counter()
    call = stub()
    await call.write(request)
    await call.done_writing()
    elapsed: float | None = None
    seq = expected_seq
    while True:
        raw = await call.read()
        if raw is grpc.aio.EOF:
            break
        if raw[0] == CHUNK_TAG:
            if elapsed is None:
                elapsed = time.perf_counter() - started
            chunk = relay_pb2.StreamEvent.FromString(raw).chunk
            if chunk.seq != seq:
                raise RuntimeError(f"expected chunk seq {seq}, got {chunk.seq}")
            seq += 1
    if elapsed is None:
        raise RuntimeError("the call ended without a chunk")
    return elapsed


async def finished_stream_token(
    stub: grpc.aio.StreamStreamMultiCallable, tokens: int, index: int
) -> str:
    call = stub()
    await call.write(start_request(tokens, stream_index=index))
    await call.done_writing()
    token = ""
    async for raw in call:
        if raw[0] == STARTED_TAG:
            token = relay_pb2.StreamEvent.FromString(raw).started.resume_token
    return token


@dataclass
class ResumeFigures:
    resumes: int
    tokens_per_stream: int
    last_seq: int
    relay_p50_ms: float
    relay_p99_ms: float
    echo_first_chunk_p50_ms: float
    echo_first_chunk_p99_ms: float
    ratio_p50: float  # echo / relay: 1.0 means a resume is as fast as a fresh bare call
    ratio_p99: float


async def measure_resume(
    stubs: dict[ServerKind, grpc.aio.StreamStreamMultiCallable], resumes: int, tokens: int
) -> ResumeFigures:
    tokens_list: list[str] = []
    batch = 20
    for first in range(0, resumes, batch):
        tokens_list += await asyncio.gather(
            *(
                finished_stream_token(stubs["relay"], tokens, first + i)
                for i in range(min(batch, resumes - first))
            )
        )
    last_seq = tokens // 2
    # Warm both paths once.
    await first_chunk_latency(stubs["echo"], start_request(tokens), 1)
    await first_chunk_latency(
        stubs["relay"],
        relay_pb2.StreamRequest(
            resume=relay_pb2.ResumeStream(resume_token=tokens_list[0], last_seq=last_seq)
        ),
        last_seq + 1,
    )
    relay_s: list[float] = []
    echo_s: list[float] = []
    for index, token in enumerate(tokens_list):
        resume = relay_pb2.StreamRequest(
            resume=relay_pb2.ResumeStream(resume_token=token, last_seq=last_seq)
        )
        fresh = start_request(tokens, stream_index=index)
        if index % 2 == 0:
            relay_s.append(await first_chunk_latency(stubs["relay"], resume, last_seq + 1))
            echo_s.append(await first_chunk_latency(stubs["echo"], fresh, 1))
        else:
            echo_s.append(await first_chunk_latency(stubs["echo"], fresh, 1))
            relay_s.append(await first_chunk_latency(stubs["relay"], resume, last_seq + 1))
    relay_p50, relay_p99 = percentile(relay_s, 50) * 1e3, percentile(relay_s, 99) * 1e3
    echo_p50, echo_p99 = percentile(echo_s, 50) * 1e3, percentile(echo_s, 99) * 1e3
    return ResumeFigures(
        resumes=resumes,
        tokens_per_stream=tokens,
        last_seq=last_seq,
        relay_p50_ms=relay_p50,
        relay_p99_ms=relay_p99,
        echo_first_chunk_p50_ms=echo_p50,
        echo_first_chunk_p99_ms=echo_p99,
        ratio_p50=echo_p50 / relay_p50,
        ratio_p99=echo_p99 / relay_p99,
    )


# --- RSS per detached idle stream --------------------------------------------------------


@dataclass
class RssFigures:
    idle_streams: int
    idle_tokens: int
    rss_before: int
    rss_after: int
    bytes_per_stream: float
    detached_generations: int


async def open_and_detach(
    stub: grpc.aio.StreamStreamMultiCallable, index: int, tokens: int
) -> None:
    """Start a stream that sits idle, wait for `started`, then go away.
    (Its first token would come after sim.pace_ms = 60 s, so the server's
    first-token timeout, 30 s by default, ends it first: the figures are taken
    within seconds.)"""
    call = stub()
    metadata = {"sim.pace_ms": IDLE_PACE_MS}
    await call.write(start_request(tokens, stream_index=index, metadata=metadata))
    raw = await call.read()
    if raw is grpc.aio.EOF or raw[0] != STARTED_TAG:
        raise RuntimeError(f"expected `started`, got {raw!r}")
    call.cancel()


async def wait_for_detached(server: ServerProcess, generations: int) -> dict[str, int]:
    async with asyncio.timeout(60):
        while True:
            stats: dict[str, int] = await server.command("stats")
            if stats["sessions"] == 0 and stats["generations"] >= generations:
                return stats
            await asyncio.sleep(0.1)


async def measure_idle_rss(idle_streams: int, tokens: int) -> RssFigures:
    """On a fresh relay process, so the log of the throughput rounds is not
    in the figure."""
    server = await ServerProcess("relay").start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = stream_method(channel)
            warm = 50  # code paths, caches, free lists: before the baseline
            await asyncio.gather(*(read_stream(stub, start_request(20)) for _ in range(warm)))
            await asyncio.gather(*(open_and_detach(stub, i, tokens) for i in range(warm)))
            await wait_for_detached(server, warm)
            await server.command("gc")
            before = (await server.command("stats"))["rss"]
            batch = 100
            for first in range(0, idle_streams, batch):
                count = min(batch, idle_streams - first)
                await asyncio.gather(
                    *(open_and_detach(stub, warm + first + i, tokens) for i in range(count))
                )
            stats = await wait_for_detached(server, warm + idle_streams)
            await server.command("gc")
            after = (await server.command("stats"))["rss"]
    finally:
        await server.stop()
    return RssFigures(
        idle_streams=idle_streams,
        idle_tokens=tokens,
        rss_before=before,
        rss_after=after,
        bytes_per_stream=(after - before) / idle_streams,
        detached_generations=stats["generations"] - warm,
    )


# --- profiling ----------------------------------------------------------------------------


async def profile_round(
    stub: grpc.aio.StreamStreamMultiCallable,
    server: ServerProcess,
    streams: int,
    total_chunks: int,
    top: int,
    checkpoint_interval: int | None = None,
) -> str:
    """One extra round under cProfile in the server process (slower than the
    timed rounds: only the distribution of time matters). cProfile sees
    Python frames only: grpc's Cython transport shows up as the time spent in
    `Context.run` itself (the event loop running its callbacks)."""
    await server.command("profile_start")
    await run_round(stub, server, streams, max(1, total_chunks // streams), checkpoint_interval)
    report: str = await server.command("profile_stop", top)
    return report


# --- observability on vs off ----------------------------------------------------------------


@dataclass
class ObservabilityFigures:
    streams: int
    tokens_per_stream: int
    off_chunks_s: float  # the best round
    on_chunks_s: float
    ratio: float  # best on / best off: the headline
    median_ratio: float
    paired_ratio: float
    off_server_us_per_chunk: float
    on_server_us_per_chunk: float
    rounds: int
    all_ok: bool
    metrics_chunks: int  # tokenrelay_chunks_total of the server with metrics on
    chunks_moved: int  # what its rounds moved (warm-up included)
    off_rounds: list[float] = field(default_factory=list)
    on_rounds: list[float] = field(default_factory=list)


def _metric_total(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def measure_observability(options: Options) -> list[ObservabilityFigures]:
    import httpx

    results: list[ObservabilityFigures] = []
    observed = {"metrics_port": 0, "admin_token": ADMIN_TOKEN}
    servers = {
        "off": await ServerProcess("relay").start(),
        "on": await ServerProcess("relay", settings=observed, name="relay-observed").start(),
    }
    try:
        metrics_url: str = await servers["on"].command("metrics_url")
        async with (
            grpc.aio.insecure_channel(servers["off"].address) as off_channel,
            grpc.aio.insecure_channel(servers["on"].address) as on_channel,
            httpx.AsyncClient() as http,
        ):
            stubs = {"off": stream_method(off_channel), "on": stream_method(on_channel)}
            moved = 0
            for streams in options.streams:
                tokens = max(1, options.total_chunks // streams)
                warm = max(1, tokens // 4)
                for side in ("off", "on"):
                    await run_round(stubs[side], servers[side], streams, warm)
                moved += streams * warm
                rounds: dict[str, list[RoundResult]] = {"off": [], "on": []}
                for index in range(options.rounds):
                    order = ("off", "on") if index % 2 == 0 else ("on", "off")
                    for side in order:
                        rounds[side].append(
                            await run_round(stubs[side], servers[side], streams, tokens)
                        )
                        if side == "on":  # a scrape per round, as Prometheus would
                            (await http.get(metrics_url)).raise_for_status()
                    moved += streams * tokens
                scraped = await http.get(metrics_url)
                off = [r.chunks_per_s for r in rounds["off"]]
                on = [r.chunks_per_s for r in rounds["on"]]
                figures = ObservabilityFigures(
                    streams=streams,
                    tokens_per_stream=tokens,
                    off_chunks_s=max(off),
                    on_chunks_s=max(on),
                    ratio=max(on) / max(off),
                    median_ratio=statistics.median(on) / statistics.median(off),
                    paired_ratio=statistics.median(a / b for a, b in zip(on, off, strict=True)),
                    off_server_us_per_chunk=statistics.median(
                        r.server_us_per_chunk for r in rounds["off"]
                    ),
                    on_server_us_per_chunk=statistics.median(
                        r.server_us_per_chunk for r in rounds["on"]
                    ),
                    rounds=options.rounds,
                    all_ok=all(r.ok for rs in rounds.values() for r in rs),
                    metrics_chunks=round(_metric_total(scraped.text, "tokenrelay_chunks_total")),
                    chunks_moved=moved,
                    off_rounds=[round(x) for x in off],
                    on_rounds=[round(x) for x in on],
                )
                results.append(figures)
                print(
                    f"  {streams:>3} streams, chunks/s per round: off {figures.off_rounds}, "
                    f"on {figures.on_rounds}",
                    flush=True,
                )
    finally:
        for server in servers.values():
            await server.stop()
    return results


def print_observability(figures: list[ObservabilityFigures]) -> None:
    print()
    print("Observability on (metrics + Admin) vs off: chunks/s of the best round; server CPU")
    print("per chunk (median)")
    header = (
        f"{'streams':>7} {'tok/stream':>10} | {'off':>8} {'on':>8} {'ratio':>5} "
        f"{'(med)':>6} {'(pair)':>6} | {'us/chunk off/on':>15} | metrics chunks"
    )
    print(header)
    print("-" * len(header))
    for f in figures:
        check = "ok" if f.metrics_chunks == f.chunks_moved else f"MISMATCH ({f.chunks_moved})"
        print(
            f"{f.streams:>7} {f.tokens_per_stream:>10} | {f.off_chunks_s:>8.0f} "
            f"{f.on_chunks_s:>8.0f} {f.ratio:>5.2f} ({f.median_ratio:>4.2f}) "
            f"({f.paired_ratio:>4.2f}) | {f.off_server_us_per_chunk:>6.1f}/"
            f"{f.on_server_us_per_chunk:<8.1f} | {f.metrics_chunks} {check}"
            + ("" if f.all_ok else "  (some streams incomplete!)")
        )


async def run_observability(options: Options) -> dict[str, Any]:
    began = time.perf_counter()
    print(
        f"relay_vs_echo --observability: streams {options.streams}, {options.total_chunks} "
        f"chunks per round, {options.rounds} timed rounds per side, {os.cpu_count()} cores",
        flush=True,
    )
    figures = await measure_observability(options)
    print_observability(figures)
    top = next((f for f in figures if f.streams == 100), figures[-1])
    print()
    print(
        f"observability ratio at {top.streams} streams: {top.ratio:.2f} (goal >= "
        f"{OBSERVABILITY_GOAL_RATIO}; best rounds; medians {top.median_ratio:.2f}, paired "
        f"{top.paired_ratio:.2f})"
    )
    seconds = time.perf_counter() - began
    print(f"(took {seconds:.0f} s)")
    return {
        "bench": "relay_vs_echo --observability",
        "settings": asdict(options),
        "observability": [asdict(f) for f in figures],
        "ratio_at_top": top.ratio,
        "top_streams": top.streams,
        "goal_ratio": OBSERVABILITY_GOAL_RATIO,
        "seconds": seconds,
    }


# --- main ---------------------------------------------------------------------------------


@dataclass
class Options:
    streams: list[int]
    total_chunks: int
    rounds: int
    resumes: int
    resume_tokens: int
    idle_streams: int
    idle_tokens: int
    checkpoint_interval: int | None
    profile: bool
    profile_top: int
    observability: bool = False


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        description="tokenrelay against a bare grpc.aio server of the same service."
    )
    parser.add_argument("--quick", action="store_true", help="a ~20 s run with smaller sizes")
    parser.add_argument("--streams", default=None, help="concurrency levels (1,10,100)")
    parser.add_argument(
        "--total-chunks", type=int, help="chunks per round and side (20000; quick 4000)"
    )
    parser.add_argument("--rounds", type=int, help="timed rounds per side and level (5; quick 3)")
    parser.add_argument("--resumes", type=int, help="resume samples (200; quick 50)")
    parser.add_argument(
        "--resume-tokens", type=int, default=40, help="tokens per resumed stream (40)"
    )
    parser.add_argument("--idle-streams", type=int, default=1_000, help="idle streams (1000)")
    parser.add_argument(
        "--idle-tokens", type=int, default=200, help="max_tokens of the idle streams (200)"
    )
    parser.add_argument(
        "--checkpoint-interval",
        type=int,
        help="policy.checkpoint_interval of the throughput streams (the server default, 10); "
        "the ceiling ignores it",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one ceiling and one tokenrelay round at the highest level",
    )
    parser.add_argument("--profile-top", type=int, default=30, help="functions to list (30)")
    parser.add_argument(
        "--observability",
        action="store_true",
        help="instead: tokenrelay with metrics and Admin on vs off (default --streams 100)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    default_streams = "100" if args.observability else "1,10,100"
    streams = [int(s) for s in (args.streams or default_streams).split(",") if s.strip()]
    if not streams or min(streams) < 1:
        parser.error("--streams needs positive numbers")
    return Options(
        streams=streams,
        total_chunks=args.total_chunks or (4_000 if quick else 20_000),
        rounds=args.rounds or (3 if quick else 5),
        resumes=args.resumes or (50 if quick else 200),
        resume_tokens=max(2, args.resume_tokens),
        idle_streams=max(1, args.idle_streams),
        idle_tokens=max(1, args.idle_tokens),
        checkpoint_interval=args.checkpoint_interval,
        profile=args.profile,
        profile_top=args.profile_top,
        observability=args.observability,
    )


def print_throughput(figures: list[ThroughputFigures]) -> None:
    print()
    print("Throughput: chunks/s of the best timed round (median in brackets); server CPU")
    print("per chunk, and CPU use of the server / the client (medians); c = ceiling, r = relay")
    header = (
        f"{'streams':>7} {'tok/stream':>10} | {'ceiling':>16} {'tokenrelay':>16} "
        f"{'ratio':>5} {'(med)':>6} | {'us/chunk c/r':>13} {'ratio':>5} "
        f"| {'srv cpu c/r':>11} {'cli cpu c/r':>11}"
    )
    print(header)
    print("-" * len(header))
    for f in figures:
        print(
            f"{f.streams:>7} {f.tokens_per_stream:>10} | "
            f"{f.echo_chunks_s:>7.0f} ({f.echo_median_chunks_s:>6.0f}) "
            f"{f.relay_chunks_s:>7.0f} ({f.relay_median_chunks_s:>6.0f}) "
            f"{f.ratio:>5.2f} ({f.median_ratio:>4.2f}) | "
            f"{f.echo_server_us_per_chunk:>6.1f}/{f.relay_server_us_per_chunk:<6.1f} "
            f"{f.cpu_ratio:>5.2f} | "
            f"{f.echo_server_cpu:>4.0%} /{f.relay_server_cpu:>4.0%} "
            f"{f.echo_client_cpu:>4.0%} /{f.relay_client_cpu:>4.0%}"
            + ("" if f.all_ok else "  (some streams incomplete!)")
        )


def print_resume(resume: ResumeFigures) -> None:
    print()
    print(
        f"Resume latency: {resume.resumes} resumes of finished {resume.tokens_per_stream}-token "
        f"streams at last_seq={resume.last_seq}, new call -> first replayed chunk"
    )
    print(
        f"  tokenrelay resume            p50 {resume.relay_p50_ms:6.2f} ms   "
        f"p99 {resume.relay_p99_ms:6.2f} ms"
    )
    print(
        f"  ceiling fresh call (floor)   p50 {resume.echo_first_chunk_p50_ms:6.2f} ms   "
        f"p99 {resume.echo_first_chunk_p99_ms:6.2f} ms"
    )
    print(
        f"  ratio floor/resume           p50 {resume.ratio_p50:6.2f}      "
        f"p99 {resume.ratio_p99:6.2f}   (1.0 = as fast as a fresh bare call)"
    )


def print_rss(rss: RssFigures) -> None:
    print()
    print(
        f"RSS per detached idle stream: {rss.idle_streams} streams (max_tokens "
        f"{rss.idle_tokens}), fresh tokenrelay process"
    )
    print(
        f"  server RSS {rss.rss_before / 2**20:.1f} MiB -> {rss.rss_after / 2**20:.1f} MiB: "
        f"{rss.bytes_per_stream / 1024:.1f} KiB per stream "
        f"({rss.detached_generations} detached generations held)"
    )


async def run(options: Options) -> dict[str, Any]:
    began = time.perf_counter()
    print(
        f"relay_vs_echo: streams {options.streams}, {options.total_chunks} chunks per round, "
        f"{options.rounds} timed rounds per side (best reported), {os.cpu_count()} cores, "
        f"Python {sys.version.split()[0]}, grpcio {grpc.__version__}",
        flush=True,
    )
    servers: dict[ServerKind, ServerProcess] = {}
    figures: list[ThroughputFigures] = []
    profiles: dict[ServerKind, str] = {}
    try:
        for kind in KINDS:
            servers[kind] = await ServerProcess(kind).start()
        async with (
            grpc.aio.insecure_channel(servers["echo"].address) as echo_channel,
            grpc.aio.insecure_channel(servers["relay"].address) as relay_channel,
        ):
            stubs: dict[ServerKind, grpc.aio.StreamStreamMultiCallable] = {
                "echo": stream_method(echo_channel),
                "relay": stream_method(relay_channel),
            }
            for streams in options.streams:
                result = await measure_throughput(
                    stubs,
                    servers,
                    streams,
                    options.total_chunks,
                    options.rounds,
                    options.checkpoint_interval,
                )
                figures.append(result)
                print(
                    f"  {streams:>3} streams, chunks/s per round: ceiling {result.echo_rounds}, "
                    f"tokenrelay {result.relay_rounds}",
                    flush=True,
                )
            relay_rss_after_rounds = (await servers["relay"].command("stats"))["rss"]
            print_throughput(figures)
            print(f"({time.perf_counter() - began:.0f} s)", flush=True)
            resume = await measure_resume(stubs, options.resumes, options.resume_tokens)
            print_resume(resume)
            print(f"({time.perf_counter() - began:.0f} s)", flush=True)
            if options.profile:
                for kind in KINDS:
                    profiles[kind] = await profile_round(
                        stubs[kind],
                        servers[kind],
                        max(options.streams),
                        options.total_chunks,
                        options.profile_top,
                        options.checkpoint_interval,
                    )
    finally:
        for server in servers.values():
            await server.stop()
    rss = await measure_idle_rss(options.idle_streams, options.idle_tokens)
    print_rss(rss)
    top = next((f for f in figures if f.streams == 100), figures[-1])
    print()
    print(
        f"ratio at {top.streams} streams: {top.ratio:.2f} (goal >= {GOAL_RATIO}; best rounds; "
        f"medians {top.median_ratio:.2f}, paired rounds {top.paired_ratio:.2f}, "
        f"server CPU per chunk {top.cpu_ratio:.2f})"
    )
    seconds = time.perf_counter() - began
    print(f"(took {seconds:.0f} s)")
    for kind, report in profiles.items():
        name = "ceiling" if kind == "echo" else "tokenrelay"
        print()
        print(f"cProfile of the {name} server, one round at {max(options.streams)} streams:")
        print(report)
    return {
        "bench": "relay_vs_echo",
        "settings": asdict(options),
        "throughput": [asdict(f) for f in figures],
        "ratio_at_top": top.ratio,
        "top_streams": top.streams,
        "goal_ratio": GOAL_RATIO,
        "relay_rss_after_rounds": relay_rss_after_rounds,
        "resume": asdict(resume),
        "idle_rss": asdict(rss),
        "seconds": seconds,
    }


def rounded(value: Any) -> Any:
    """Figures to 3 decimals in the JSON line."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    summary = asyncio.run(run_observability(options) if options.observability else run(options))
    print(json.dumps(rounded(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
