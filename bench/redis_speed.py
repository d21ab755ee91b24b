"""tokenrelay on the Redis store against its ceilings, in one run (issue 10).

    .venv/bin/python bench/redis_speed.py                 # flood, paced, resume: ~4 min
    .venv/bin/python bench/redis_speed.py --quick         # ~40 s
    .venv/bin/python bench/redis_speed.py --only flood --profile
    .venv/bin/python bench/redis_speed.py --redis-url redis://host:6379/0

Three servers, each in a process of its own (bench/relay_vs_echo.py's
ServerProcess): the bare grpc.aio echo of the same service (the ceiling),
tokenrelay on the memory store, tokenrelay on the Redis store (a prefix of
its own, deleted afterwards). The load client is this process: one grpc.aio
channel per server, the same reading code for all three (raw bytes, only
the `end` parsed).

1. Flood: `--streams` (100) concurrent streams of sim tokens at full speed,
   `--total-chunks` per round; an untimed warm-up, then `--rounds` timed
   rounds per server, interleaved (the order rotates each round). Reported:
   best round per server, ratio = best / echo's best (goals: Redis >= 0.5,
   memory >= 0.8), and server CPU per chunk (psutil, median round).
2. Paced: N streams at `sim.pace_ms` 20 (50 tok/s), `--paced-tokens` tokens
   each, for N in `--paced-levels` (100,500,1000), on the echo, the memory
   store and the Redis store (`--paced-servers`). The starts are spread over
   `--paced-ramp-s` (1 s: N/ramp starts a second, as callers arrive, not N
   within one pace), and each stream's phase within the pace is its own
   (golden-ratio spacing), so the streams' tokens are spread over the pace as
   independent callers' are. What a level is judged on is the steady window:
   from `SETTLE_S` after the last start to one pace before the first stream
   could end, when all N streams run at once (the ramp measures how fast the
   server takes new streams, which is not what "holds N" asks). Per level:
   delivered tokens/s per stream (median, first chunk to last), and the
   inter-chunk jitter p99 (|gap - 20 ms| over every gap, of every stream,
   that ends in the window; measured where the client reads). A level holds
   when jitter p99 <= 10 ms and the median rate >= 95 % of 50; the figure is
   the largest level that holds, Redis against echo (goal >= 0.7).
   `--paced-ramp-s 0` starts every stream within one pace (a thundering herd:
   the window then opens SETTLE_S later).
3. Resume: `--resumes` finished streams per store, each resumed at half its
   length; request -> first replayed chunk, p50/p99, Redis against memory
   (goal: p99 within 2 ms).

With `--profile`, one more flood round of the Redis server under cProfile
(top frames by own time). Output: tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from relay_vs_echo import (
    CHUNK_TAG,
    END_TAG,
    ServerProcess,
    interleaved_rounds,
    measure_resume,
    percentile,
    profile_round,
    start_request,
    stream_method,
)

from tokenrelay.v1 import relay_pb2

NAMES = ("echo", "memory", "redis")
PACE_MS = 20
# The steady window of a paced level opens this long after the last start
# (the loop catches up with the ramp's last starts) and closes one pace
# before the first stream could end.
SETTLE_S = 0.5
GOLDEN = (math.sqrt(5) - 1) / 2  # phases i * GOLDEN mod 1 spread evenly for any N
FLOOD_GOALS = {"memory": 0.8, "redis": 0.5}
PACED_GOAL = 0.7
JITTER_LIMIT_MS = 10.0
RATE_FLOOR = 0.95
RESUME_GOAL_MS = 2.0


@dataclass
class FloodFigures:
    streams: int
    tokens_per_stream: int
    rounds: dict[str, list[float]]
    best: dict[str, float]
    ratio: dict[str, float]  # best / echo's best
    server_us_per_chunk: dict[str, float]
    client_cpu: dict[str, float]
    all_ok: bool


@dataclass
class PacedLevel:
    server: str
    streams: int
    median_rate: float  # tokens/s per stream
    jitter_p99_ms: float
    jitter_p50_ms: float
    holds: bool
    errors: int
    client_cpu: float  # fraction of one core while the level ran
    server_cpu: float = 0.0  # the server's, likewise (all its threads)
    gc_max_ms: float = 0.0  # the server's longest collector pause during the level
    gc_full: int = 0  # and how many full (generation 2) collections it ran


@dataclass
class ResumeCompare:
    memory_p50_ms: float
    memory_p99_ms: float
    redis_p50_ms: float
    redis_p99_ms: float
    p99_gap_ms: float


async def flood(
    stubs: dict[str, grpc.aio.StreamStreamMultiCallable],
    servers: dict[str, ServerProcess],
    streams: int,
    total_chunks: int,
    rounds: int,
) -> FloodFigures:
    tokens = max(1, total_chunks // streams)
    results = await interleaved_rounds(stubs, servers, NAMES, streams, tokens, rounds)
    best = {name: max(r.chunks_per_s for r in results[name]) for name in NAMES}
    return FloodFigures(
        streams=streams,
        tokens_per_stream=tokens,
        rounds={n: [round(r.chunks_per_s) for r in results[n]] for n in NAMES},
        best=best,
        ratio={n: best[n] / best["echo"] for n in NAMES},
        server_us_per_chunk={
            n: statistics.median(r.server_us_per_chunk for r in results[n]) for n in NAMES
        },
        client_cpu={n: statistics.median(r.client_cpu for r in results[n]) for n in NAMES},
        all_ok=all(r.ok for rs in results.values() for r in rs),
    )


async def paced_stream(
    method: grpc.aio.StreamStreamMultiCallable,
    tokens: int,
    index: int,
    start_s: float = 0.0,
) -> tuple[float, list[float]]:
    """Read one paced stream started `start_s` after the level began; returns
    its delivered rate (tokens/s from the first chunk to the last) and the
    loop times its chunks arrived."""
    request = start_request(tokens, stream_index=index, metadata={"sim.pace_ms": str(PACE_MS)})
    await asyncio.sleep(start_s)
    call = method()
    await call.write(request)
    await call.done_writing()
    loop = asyncio.get_running_loop()
    times: list[float] = []
    ended = False
    while True:
        raw = await call.read()
        if raw is grpc.aio.EOF:
            break
        if raw[0] == CHUNK_TAG:
            times.append(loop.time())
        elif raw[0] == END_TAG:
            ended = not relay_pb2.StreamEvent.FromString(raw).end.partial
    if not ended or len(times) != tokens:
        raise RuntimeError(f"stream {index} ended with {len(times)} of {tokens} chunks")
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else math.nan
    return rate, times


def start_offsets(streams: int, ramp_s: float) -> list[float]:
    """When each stream of a level starts: spread over the ramp in whole
    paces, each at a phase of its own within the pace."""
    pace_s = PACE_MS / 1000
    return [
        math.floor(i / streams * ramp_s / pace_s) * pace_s + (i * GOLDEN % 1.0) * pace_s
        for i in range(streams)
    ]


async def paced_level(
    name: str,
    method: grpc.aio.StreamStreamMultiCallable,
    streams: int,
    tokens: int,
    server: ServerProcess | None = None,
    ramp_s: float = 1.0,
) -> PacedLevel:
    offsets = start_offsets(streams, ramp_s)
    window_opens = max(offsets) + SETTLE_S
    window_closes = min(offsets) + tokens * PACE_MS / 1000 - PACE_MS / 1000
    if window_closes <= window_opens:
        raise ValueError(
            f"{tokens} tokens at {PACE_MS} ms leave no steady window after a {ramp_s} s ramp "
            f"(+{SETTLE_S} s): use more --paced-tokens"
        )
    loop = asyncio.get_running_loop()
    cpu = time.process_time()
    server_cpu = server.cpu_seconds() if server is not None else 0.0
    if server is not None:
        await server.command("gc_pauses")  # (resets them)
    began = time.perf_counter()
    level_t0 = loop.time()
    results = await asyncio.gather(
        *(paced_stream(method, tokens, i, offset) for i, offset in enumerate(offsets)),
        return_exceptions=True,
    )
    seconds = time.perf_counter() - began
    client_cpu = (time.process_time() - cpu) / seconds
    server_share = (server.cpu_seconds() - server_cpu) / seconds if server is not None else 0.0
    pauses = await server.command("gc_pauses") if server is not None else {}
    read = [r for r in results if isinstance(r, tuple)]
    rates = [rate for rate, _ in read]
    errors = len(results) - len(read)
    opens, closes = level_t0 + window_opens, level_t0 + window_closes
    jitter_ms = [
        abs((b - a) * 1000 - PACE_MS)
        for _, times in read
        for a, b in itertools.pairwise(times)
        if opens <= b <= closes
    ] or [math.inf]
    median_rate = statistics.median(rates) if rates else 0.0
    p99 = percentile(jitter_ms, 99)
    return PacedLevel(
        server=name,
        streams=streams,
        median_rate=median_rate,
        jitter_p99_ms=p99,
        jitter_p50_ms=percentile(jitter_ms, 50),
        holds=errors == 0 and p99 <= JITTER_LIMIT_MS and median_rate >= RATE_FLOOR * 1000 / PACE_MS,
        errors=errors,
        client_cpu=client_cpu,
        server_cpu=server_share,
        gc_max_ms=max((g["max_ms"] for g in pauses.values()), default=0.0),
        gc_full=pauses.get("2", {}).get("count", 0),
    )


async def resume_compare(
    stubs: dict[str, grpc.aio.StreamStreamMultiCallable], resumes: int
) -> ResumeCompare:
    memory = await measure_resume({"echo": stubs["echo"], "relay": stubs["memory"]}, resumes, 40)
    on_redis = await measure_resume({"echo": stubs["echo"], "relay": stubs["redis"]}, resumes, 40)
    return ResumeCompare(
        memory_p50_ms=memory.relay_p50_ms,
        memory_p99_ms=memory.relay_p99_ms,
        redis_p50_ms=on_redis.relay_p50_ms,
        redis_p99_ms=on_redis.relay_p99_ms,
        p99_gap_ms=on_redis.relay_p99_ms - memory.relay_p99_ms,
    )


def print_flood(figures: FloodFigures) -> None:
    print(f"\nflood, {figures.streams} streams x {figures.tokens_per_stream} tokens (best round)")
    print(f"  {'server':<8} {'chunks/s':>9} {'ratio':>6} {'goal':>5} {'µs/chunk':>9}  rounds")
    for name in NAMES:
        goal = FLOOD_GOALS.get(name)
        print(
            f"  {name:<8} {figures.best[name]:>9.0f} {figures.ratio[name]:>6.2f} "
            f"{'' if goal is None else f'{goal:.1f}':>5} "
            f"{figures.server_us_per_chunk[name]:>9.1f}  {figures.rounds[name]}"
        )
    print(f"  every stream exact: {figures.all_ok}")


def print_paced(levels: list[PacedLevel], ramp_s: float) -> dict[str, int]:
    print(
        f"\npaced at {PACE_MS} ms (50 tok/s), starts over {ramp_s:g} s, jitter in the steady "
        "window: holds = jitter p99 <= 10 ms and rate >= 95 %"
    )
    print(
        f"  {'server':<6} {'streams':>7} {'tok/s':>6} {'jit p50':>8} {'jit p99':>8} holds"
        "  server client  gc max  full"
    )
    for level in levels:
        print(
            f"  {level.server:<6} {level.streams:>7} {level.median_rate:>6.1f} "
            f"{level.jitter_p50_ms:>7.1f}ms {level.jitter_p99_ms:>7.1f}ms {level.holds!s:>5}"
            f"  {level.server_cpu:>6.0%} {level.client_cpu:>5.0%}"
            f"  {level.gc_max_ms:>4.1f}ms {level.gc_full:>4}"
            f"{'' if not level.errors else f'  errors {level.errors}'}"
        )
    largest = {
        name: max((lv.streams for lv in levels if lv.server == name and lv.holds), default=0)
        for name in NAMES
        if any(lv.server == name for lv in levels)
    }
    ratio = largest.get("redis", 0) / largest["echo"] if largest.get("echo") else math.nan
    print(
        "  largest level that holds: "
        + ", ".join(f"{name} {count}" for name, count in largest.items())
        + f"; redis / echo {ratio:.2f} (goal >= {PACED_GOAL})"
    )
    return largest


async def run(options: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    prefix = f"bench-speed-{uuid.uuid4().hex[:8]}"
    redis_settings = {
        "store": "redis",
        "redis_url": options.redis_url,
        "redis_prefix": prefix,
        "redis_max_connections": 256,
        **(
            {}
            if options.max_wait_ms is None
            else {"redis_group_commit_max_wait_ms": options.max_wait_ms}
        ),
    }
    settings: dict[str, dict[str, Any]] = {
        "echo": {},
        "memory": {"max_streams": 100_000},
        "redis": {**redis_settings, "max_streams": 100_000},
    }
    servers: dict[str, ServerProcess] = {}
    report: dict[str, Any] = {"bench": "redis_speed", "prefix": prefix}
    try:
        for name in NAMES:
            kind = "echo" if name == "echo" else "relay"
            servers[name] = await ServerProcess(kind, settings=settings[name], name=name).start()
        channels = {name: grpc.aio.insecure_channel(servers[name].address) for name in NAMES}
        stubs = {name: stream_method(channel) for name, channel in channels.items()}
        if "flood" in options.only:
            figures = await flood(
                stubs, servers, options.streams, options.total_chunks, options.rounds
            )
            print_flood(figures)
            report["flood"] = asdict(figures)
            print(f"({time.perf_counter() - began:.0f} s)", flush=True)
        if "paced" in options.only:
            levels: list[PacedLevel] = []
            for streams in options.paced_levels:
                for name in options.paced_servers:
                    levels.append(
                        await paced_level(
                            name,
                            stubs[name],
                            streams,
                            options.paced_tokens,
                            servers[name],
                            ramp_s=options.paced_ramp_s,
                        )
                    )
            largest = print_paced(levels, options.paced_ramp_s)
            report["paced"] = {"levels": [asdict(lv) for lv in levels], "largest": largest}
            print(f"({time.perf_counter() - began:.0f} s)", flush=True)
        if "resume" in options.only:
            resume = await resume_compare(stubs, options.resumes)
            print(
                f"\nresume (request -> first replayed chunk), {options.resumes} each: memory "
                f"p50 {resume.memory_p50_ms:.2f} ms p99 {resume.memory_p99_ms:.2f} ms; redis "
                f"p50 {resume.redis_p50_ms:.2f} ms p99 {resume.redis_p99_ms:.2f} ms; p99 gap "
                f"{resume.p99_gap_ms:+.2f} ms (goal <= {RESUME_GOAL_MS})"
            )
            report["resume"] = asdict(resume)
        if options.profile:
            text = await profile_round(
                stubs["redis"],
                servers["redis"],
                options.streams,
                options.total_chunks,
                options.profile_top,
            )
            print(f"\ncProfile of the Redis server, one flood round at {options.streams} streams:")
            print(text)
        for channel in channels.values():
            await channel.close()
    finally:
        for server in servers.values():
            await server.stop()
        with redis.Redis.from_url(options.redis_url) as client:
            keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
    report["seconds"] = time.perf_counter() - began
    print(f"(took {report['seconds']:.0f} s)")
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, ~40 s")
    parser.add_argument("--only", default="flood,paced,resume", help="which parts (all)")
    parser.add_argument("--streams", type=int, default=100, help="flood concurrency (100)")
    parser.add_argument("--total-chunks", type=int, help="chunks per flood round (20000)")
    parser.add_argument("--rounds", type=int, help="timed flood rounds per server (5)")
    parser.add_argument("--paced-levels", help="paced stream counts (100,500,1000)")
    parser.add_argument("--paced-tokens", type=int, help="tokens per paced stream (300; quick 75)")
    parser.add_argument(
        "--paced-servers", default="echo,memory,redis", help="servers paced (echo,memory,redis)"
    )
    parser.add_argument(
        "--paced-ramp-s",
        type=float,
        help="the starts of a paced level spread over (1.0; quick 0.2)",
    )
    parser.add_argument("--resumes", type=int, help="resumes per store (200)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--max-wait-ms", type=float, help="the Redis server's redis_group_commit_max_wait_ms"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-top", type=int, default=25)
    options = parser.parse_args(argv)
    quick = options.quick
    options.only = {part.strip() for part in options.only.split(",") if part.strip()}
    unknown = options.only - {"flood", "paced", "resume"}
    if unknown:
        parser.error(f"--only: unknown parts {sorted(unknown)} (flood, paced, resume)")
    options.total_chunks = options.total_chunks or (4_000 if quick else 20_000)
    options.rounds = options.rounds or (2 if quick else 5)
    levels = options.paced_levels or ("50,100" if quick else "100,500,1000")
    options.paced_levels = [int(n) for n in levels.split(",") if n.strip()]
    options.paced_tokens = options.paced_tokens or (75 if quick else 300)
    if options.paced_ramp_s is None:
        options.paced_ramp_s = 0.2 if quick else 1.0
    options.paced_servers = [n for n in options.paced_servers.split(",") if n in NAMES]
    options.resumes = options.resumes or (30 if quick else 200)
    return options


def main(argv: Sequence[str] | None = None) -> int:
    report = asyncio.run(run(parse_args(argv)))
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
