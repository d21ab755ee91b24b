"""tokenrelay with tracing on against tokenrelay with it off, in one run.

    .venv/bin/python bench/observability_overhead.py            # ~2 min
    .venv/bin/python bench/observability_overhead.py --quick    # ~30 s
    .venv/bin/python bench/observability_overhead.py --profile  # + cProfile of the traced server

Two gateways, each in its own process (relay_vs_echo.ServerProcess): "off"
with the defaults (`--otel-exporter none`), "on" with `--otel-exporter
otlp` exporting, by the standard OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, to an
OTLP/gRPC receiver (tokenrelay_devtools.otlp_receiver, counting spans) in
this process, the load generator's, so the traced server pays for making,
batching, encoding and sending its spans and nothing else; "on" also has the
metrics observer and its endpoint (`--metrics-port`, on a free port), so it
is everything an operator turns on (the JSON says which).

The load is relay_vs_echo's: `--total-chunks` chunks per round and side at
each concurrency level (N streams of total/N tokens of model `sim` at full
speed), one untimed warm-up round per side, then `--rounds` timed rounds per
side, interleaved (off, on, then on, off, ...). Reported per level: the best
round of each side and ratio = best on / best off (the headline, goal >=
0.9), the medians, and the server CPU time per chunk. Short streams are where
spans cost most (three per stream: the call's, the stream's, the attempt's,
against one chunk per token), so `--short-tokens` adds a level of 100
streams of that many tokens.

Output: a table and one JSON line. It never asserts; it exits 0 unless
something breaks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from relay_vs_echo import (
    RoundResult,
    ServerProcess,
    rounded,
    run_round,
    stream_method,
)

from tokenrelay_devtools.otlp_receiver import TraceReceiver

GOAL_RATIO = 0.9
SIDES = ("off", "on")


def observed_settings() -> tuple[dict[str, Any], list[str]]:
    """The "on" side's settings, and what they turn on."""
    settings: dict[str, Any] = {"otel_exporter": "otlp", "metrics_port": 0}
    parts = ["tracing (OTLP/gRPC to a local receiver)", "metrics"]
    return settings, parts


@dataclass
class Level:
    streams: int
    tokens_per_stream: int
    off_chunks_s: float
    on_chunks_s: float
    ratio: float  # best on / best off: the headline
    off_median_chunks_s: float
    on_median_chunks_s: float
    median_ratio: float
    off_us_per_chunk: float  # server CPU time per chunk, median
    on_us_per_chunk: float
    cpu_ratio: float  # off / on CPU per chunk: 1.0 = tracing costs nothing
    all_ok: bool
    off_rounds: list[float]
    on_rounds: list[float]


async def measure(
    stubs: dict[str, grpc.aio.StreamStreamMultiCallable],
    servers: dict[str, ServerProcess],
    streams: int,
    tokens: int,
    rounds: int,
) -> Level:
    for side in SIDES:
        await run_round(stubs[side], servers[side], streams, max(1, tokens // 4))
    results: dict[str, list[RoundResult]] = {side: [] for side in SIDES}
    for index in range(rounds):
        order = SIDES if index % 2 == 0 else SIDES[::-1]
        for side in order:
            results[side].append(await run_round(stubs[side], servers[side], streams, tokens))
    rates = {side: [r.chunks_per_s for r in results[side]] for side in SIDES}
    us = {side: statistics.median(r.server_us_per_chunk for r in results[side]) for side in SIDES}
    medians = {side: statistics.median(rates[side]) for side in SIDES}
    return Level(
        streams=streams,
        tokens_per_stream=tokens,
        off_chunks_s=max(rates["off"]),
        on_chunks_s=max(rates["on"]),
        ratio=max(rates["on"]) / max(rates["off"]),
        off_median_chunks_s=medians["off"],
        on_median_chunks_s=medians["on"],
        median_ratio=medians["on"] / medians["off"],
        off_us_per_chunk=us["off"],
        on_us_per_chunk=us["on"],
        cpu_ratio=us["off"] / us["on"],
        all_ok=all(r.ok for side in SIDES for r in results[side]),
        off_rounds=[round(x) for x in rates["off"]],
        on_rounds=[round(x) for x in rates["on"]],
    )


def print_levels(levels: list[Level]) -> None:
    print()
    print("chunks/s of the best round (median); server CPU us per chunk (median)")
    header = (
        f"{'streams':>7} {'tok/stream':>10} | {'off':>16} {'on':>16} {'ratio':>5} {'(med)':>6}"
        f" | {'us/chunk off/on':>15} {'ratio':>5}"
    )
    print(header)
    print("-" * len(header))
    for level in levels:
        print(
            f"{level.streams:>7} {level.tokens_per_stream:>10} | "
            f"{level.off_chunks_s:>7.0f} ({level.off_median_chunks_s:>6.0f}) "
            f"{level.on_chunks_s:>7.0f} ({level.on_median_chunks_s:>6.0f}) "
            f"{level.ratio:>5.2f} ({level.median_ratio:>4.2f}) | "
            f"{level.off_us_per_chunk:>7.1f}/{level.on_us_per_chunk:<7.1f} "
            f"{level.cpu_ratio:>5.2f}" + ("" if level.all_ok else "  (some streams incomplete!)")
        )


@dataclass
class Options:
    streams: list[int]
    total_chunks: int
    rounds: int
    short_tokens: int
    profile: bool


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smaller rounds (~30 s)")
    parser.add_argument("--streams", default="1,10,100", help="concurrency levels (1,10,100)")
    parser.add_argument("--total-chunks", type=int, help="chunks per round (20000; quick 4000)")
    parser.add_argument("--rounds", type=int, help="timed rounds per side (5; quick 3)")
    parser.add_argument(
        "--short-tokens",
        type=int,
        default=20,
        help="tokens of the short-stream level (20; 0: none)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile one traced round")
    args = parser.parse_args(argv)
    return Options(
        streams=[int(s) for s in args.streams.split(",") if s.strip()],
        total_chunks=args.total_chunks or (4_000 if args.quick else 20_000),
        rounds=args.rounds or (3 if args.quick else 5),
        short_tokens=max(0, args.short_tokens),
        profile=args.profile,
    )


async def run(options: Options) -> dict[str, Any]:
    began = time.perf_counter()
    settings, parts = observed_settings()
    print(
        f"observability_overhead: on = {' + '.join(parts)}; streams {options.streams}, "
        f"{options.total_chunks} chunks per round, {options.rounds} timed rounds per side, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
        flush=True,
    )
    receiver = await TraceReceiver.start(keep=False)
    servers: dict[str, ServerProcess] = {}
    levels: list[Level] = []
    profile = ""
    try:
        servers["off"] = await ServerProcess("relay", name="off").start()
        servers["on"] = await ServerProcess(
            "relay",
            settings=settings,
            env={"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint},
            name="on",
        ).start()
        async with (
            grpc.aio.insecure_channel(servers["off"].address) as off_channel,
            grpc.aio.insecure_channel(servers["on"].address) as on_channel,
        ):
            stubs = {"off": stream_method(off_channel), "on": stream_method(on_channel)}
            plan = [
                (streams, max(1, options.total_chunks // streams)) for streams in options.streams
            ]
            if options.short_tokens:
                plan.append((100, options.short_tokens))
            for streams, tokens in plan:
                level = await measure(stubs, servers, streams, tokens, options.rounds)
                levels.append(level)
                print(
                    f"  {streams:>3} x {tokens} tokens, chunks/s per round: off {level.off_rounds}"
                    f", on {level.on_rounds}",
                    flush=True,
                )
            if options.profile:
                await servers["on"].command("profile_start")
                await run_round(stubs["on"], servers["on"], 100, options.total_chunks // 100)
                profile = await servers["on"].command("profile_stop", 30)
    finally:
        for server in servers.values():
            await server.stop()  # the traced one flushes its spans on the way
        await receiver.stop()
    print_levels(levels)
    top = next((level for level in levels if level.streams == 100), levels[-1])
    print()
    print(
        f"ratio at {top.streams} streams x {top.tokens_per_stream} tokens: {top.ratio:.2f} "
        f"(goal >= {GOAL_RATIO}; best rounds; medians {top.median_ratio:.2f}, server CPU per "
        f"chunk {top.cpu_ratio:.2f}); {receiver.span_count} spans received in "
        f"{receiver.export_calls} exports"
    )
    if profile:
        print()
        print("cProfile of the traced server, one round at 100 streams:")
        print(profile)
    return {
        "bench": "observability_overhead",
        "on": parts,
        "settings": asdict(options),
        "levels": [asdict(level) for level in levels],
        "ratio_at_top": top.ratio,
        "goal_ratio": GOAL_RATIO,
        "spans_received": receiver.span_count,
        "seconds": time.perf_counter() - began,
    }


def main(argv: Sequence[str] | None = None) -> int:
    summary = asyncio.run(run(parse_args(argv)))
    print(json.dumps(rounded(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
