"""Load shedding at 2.5x capacity, over a real `tokenrelay serve` process.

A gateway with `max_streams = --capacity` (`--store`: memory, or redis at
`--redis-url`; model `sim` paced
at `--pace-ms`, 20: 50 tokens/s, so the admitted streams outlive the burst
of starts; `--pace-ms 0` is a flood instead, which saturates the loop, so
the loop-lag limit refuses too, and frees slots as streams end) gets
`--factor` x capacity starts at once from one grpc.aio client, on
`--channels` channels. Every call is read to its end:

- an admitted stream must be exact: contiguous seq from 1, `end.partial`
  false, `total_seq` = max_tokens, the text's sha256 = `end.text_sha256`,
  the text = the simulator's for that prompt;
- a refused one must be RESOURCE_EXHAUSTED with a google.rpc.RetryInfo and
  `retry-after-ms` trailing metadata (issue 10); anything else (INTERNAL,
  UNKNOWN, ...) is counted as a failure.

    .venv/bin/python bench/load_shedding.py [--capacity 100] [--factor 2.5] [--tokens 200]
                                            [--pace-ms 20]

Output: the counts by outcome, then one JSON line. Exit status 1 when any
call broke the rules.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_server.core.model import Message
from tokenrelay_server.upstream.sim import SimAnswer

PACE_MS = "20"

BENCH_SECRET = "5f2b9e0c7a1d4836b0e9f3a5c2d8471e6b3a0f9c8d7e2b1a4c5f6e7d8a9b0c1d"  # 32 random bytes


def start(prompt: str, tokens: int) -> pb.StreamRequest:
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model="sim",
            messages=[pb.Message(role="user", content=prompt)],
            params=pb.GenerationParams(max_tokens=tokens),
            metadata={"sim.pace_ms": PACE_MS},
        )
    )


async def one_call(stub: pbg.RelayStub, prompt: str, tokens: int) -> str:
    """The outcome of one start: "exact", "shed:REASON", or what was wrong."""
    opened = asyncio.Event()

    async def requests():
        yield start(prompt, tokens)
        await opened.wait()  # keep the request side open, as a real client does

    call = stub.Stream(requests())
    events: list[pb.StreamEvent] = []
    try:
        async for event in call:
            events.append(event)
    except grpc.aio.AioRpcError as error:
        return refusal(error)
    finally:
        opened.set()
        call.cancel()
    chunks = [e.chunk for e in events if e.HasField("chunk")]
    ends = [e.end for e in events if e.HasField("end")]
    text = "".join(c.text for c in chunks)
    if len(ends) != 1 or ends[0].partial:
        return "bad:no clean end"
    if [c.seq for c in chunks] != list(range(1, tokens + 1)) or ends[0].total_seq != tokens:
        return "bad:seq"
    if hashlib.sha256(text.encode()).hexdigest() != ends[0].text_sha256:
        return "bad:digest"
    if text != SimAnswer((Message("user", prompt),)).text(tokens):
        return "bad:text"
    return "exact"


def refusal(error: grpc.aio.AioRpcError) -> str:
    if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return f"bad:{error.code().name}"
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    reason, retry = "", False
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = True
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason = info.reason
    trailing = dict(error.trailing_metadata() or ())
    if not retry or "retry-after-ms" not in trailing:
        return "bad:RESOURCE_EXHAUSTED without retry info"
    return f"shed:{reason}"


async def run(args: argparse.Namespace) -> int:
    global PACE_MS
    PACE_MS = f"{args.pace_ms:g}"
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "gateway.toml"
        store = (
            f'store = "redis"\nredis_url = "{args.redis_url}"\n'
            f'redis_prefix = "bench-shed-{os.getpid()}"\n'
            if args.store == "redis"
            else ""
        )
        config.write_text(f"[server]\nmax_streams = {args.capacity}\n{store}")
        command = [sys.executable, "-m", "tokenrelay_server.cli", "serve", "--port", "0"]
        process = await asyncio.create_subprocess_exec(
            *command,
            "--config",
            str(config),
            "--log-level",
            "warning",
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "TOKENRELAY_RESUME_SECRET": BENCH_SECRET},
        )
        try:
            assert process.stdout is not None
            line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
            match = re.match(r"port (\d+)", line)
            if match is None:
                raise SystemExit(f"the gateway did not print its port: {line!r}")
            address = f"127.0.0.1:{match.group(1)}"
            offered = round(args.capacity * args.factor)
            channels = [grpc.aio.insecure_channel(address) for _ in range(args.channels)]
            try:
                stubs = [pbg.RelayStub(channel) for channel in channels]
                began = time.perf_counter()
                outcomes = await asyncio.gather(
                    *(
                        one_call(stubs[n % len(stubs)], f"prompt {n}", args.tokens)
                        for n in range(offered)
                    )
                )
                seconds = time.perf_counter() - began
            finally:
                for channel in channels:
                    await channel.close()
        finally:
            process.terminate()
            await process.wait()
    counts = collections.Counter(outcomes)
    bad = sum(n for outcome, n in counts.items() if outcome.startswith("bad:"))
    print(
        f"{offered} starts at once against max_streams {args.capacity} "
        f"({args.factor:g}x), {args.tokens} tokens each at sim.pace_ms {PACE_MS}, "
        f"{seconds:.1f} s:"
    )
    for outcome, n in sorted(counts.items()):
        print(f"  {outcome:<45} {n}")
    print(
        "OK: every refusal RESOURCE_EXHAUSTED with retry info, every admitted stream exact"
        if not bad
        else f"FAILED: {bad} call(s) broke the rules"
    )
    summary = {
        "bench": "load_shedding",
        "capacity": args.capacity,
        "offered": offered,
        "tokens": args.tokens,
        "pace_ms": args.pace_ms,
        "outcomes": dict(counts),
        "bad": bad,
        "seconds": round(seconds, 2),
    }
    print(json.dumps(summary))
    return 1 if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=100, help="max_streams (100)")
    parser.add_argument("--factor", type=float, default=2.5, help="starts per slot (2.5)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per stream (200)")
    parser.add_argument("--channels", type=int, default=4, help="client channels (4)")
    parser.add_argument("--pace-ms", type=float, default=20.0, help="sim.pace_ms (20; 0: flood)")
    parser.add_argument("--store", choices=["memory", "redis"], default="memory")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
