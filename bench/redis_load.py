"""N concurrent paced streams against one `tokenrelay serve` process on a
store, counting every call that did not end with a clean End (issue 9: "500
and 1,500 concurrent paced streams on the Redis store end with 0 errors").

    .venv/bin/python bench/redis_load.py --streams 500                  # Redis at 127.0.0.1:6379
    .venv/bin/python bench/redis_load.py --streams 1500 --redis-url redis://host:port/0
    .venv/bin/python bench/redis_load.py --streams 1500 --store memory  # the same, memory store

Each stream asks the simulator for `--tokens` tokens paced at `--pace-ms`;
the calls are spread over streams/100 client channels (one HTTP/2
connection carries at most ~100 concurrent streams). The gateway runs in its
own process with `max_streams` above the load, so no refusal is expected.
Output: the error count by status (and the first few messages), how many
Ends were partial, and one JSON line. Exit status 1 when any call failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from serverkit import SECRET, end_of, run_to_end, start_request

# Each channel its own connection (grpc shares one per target otherwise).
LOCAL_POOL = "grpc.use_local_subchannel_pool"


async def run(streams: int, tokens: int, pace_ms: int, store: str, redis_url: str) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="redis-load-"))
    config = workdir / "gateway.toml"
    config.write_text(
        "[server]\nport = 0\n"
        f'store = "{store}"\nredis_url = "{redis_url}"\nredis_prefix = "bench-load"\n'
        f'resume_secret = "{SECRET}"\nmax_streams = {streams + 100}\nlog_level = "warning"\n'
        # The store's correctness under load, not load shedding: a burst of
        # this many starts lags the loop past 50 ms (bench/load_shedding.py
        # measures refusals).
        "max_loop_lag_ms = 0\n"
    )
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=(workdir / "gateway.log").open("wb"),
    )  # fmt: skip
    assert server.stdout is not None
    first = (await server.stdout.readline()).decode()
    port = int(first.split()[1])  # serve prints "port N" first when asked for port 0
    channels = [
        grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(max(1, streams // 100))
    ]
    meta = {"sim.pace_ms": str(pace_ms)}
    started = time.monotonic()
    results = await asyncio.gather(
        *(
            run_to_end(channels[i % len(channels)], start_request(max_tokens=tokens, metadata=meta))
            for i in range(streams)
        ),
        return_exceptions=True,
    )
    seconds = time.monotonic() - started
    for channel in channels:
        await channel.close()
    server.terminate()
    await server.wait()
    failures = [r for r in results if isinstance(r, BaseException)]
    codes = Counter(
        str(f.code().name) if isinstance(f, grpc.aio.AioRpcError) else type(f).__name__
        for f in failures
    )
    partial = sum(1 for r in results if not isinstance(r, BaseException) and end_of(r).partial)
    print(f"store {store}: {streams} streams x {tokens} tokens at {pace_ms} ms, {seconds:.1f} s")
    print(f"  errors {len(failures)} {dict(codes)}; partial ends {partial}")
    for failure in failures[:5]:
        details = failure.details() if isinstance(failure, grpc.aio.AioRpcError) else str(failure)
        print(f"  e.g. {str(details)[:160]}")
    summary = {
        "bench": "redis_load", "store": store, "streams": streams, "tokens": tokens,
        "pace_ms": pace_ms, "errors": len(failures), "codes": dict(codes),
        "partial": partial, "seconds": round(seconds, 2),
    }  # fmt: skip
    print(f"  gateway log: {workdir / 'gateway.log'}")
    print(json.dumps(summary))
    return 1 if failures or partial else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--pace-ms", type=int, default=20)
    parser.add_argument("--store", choices=["redis", "memory"], default="redis")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    return asyncio.run(run(args.streams, args.tokens, args.pace_ms, args.store, args.redis_url))


if __name__ == "__main__":
    sys.exit(main())
