"""Recovery latency: from an upstream failure to the first recovered chunk.

    .venv/bin/python bench/recovery_latency.py [--runs 200] [--backoff-ms 50]

One gateway (in this process) and the mock upstream (real HTTP, OpenAI
format) in this process too. Each run streams a generation whose first
attempt is reset after 10 tokens:

- resume on the same provider: retry after the configured backoff
  (`backoff_base_s`, no jitter), by continuation;
- fallback: `max_retries = 0` on a two-provider chain, so the gateway falls
  back at once (the configured delay is 0).

Measured at the client, from the arrival of chunk 10 (the mock upstream
resets the connection right after sending it) to the arrival of chunk 11,
the first of the recovered attempt. The deliberate delay is subtracted: what
is left is tokenrelay's overhead (noticing the reset, deciding, the new HTTP
request with the continuation, the stitcher, the log), the ceiling being the
ordinary gap between two chunks, printed as the baseline. Also printed: the
same for the in-process `sim` provider, which has no HTTP round trip.
p50/p99 over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.config.settings import build_settings, read_config_file

CONFIG = """
[server]
sim = true  # the in-process case below uses model sim beside the aliases

[recovery]
backoff_base_s = {backoff}
jitter = 0.0
retry_budget_ratio = 1000

[breaker]
failure_threshold = 1000000
failure_rate = 1.0

[providers.a]
kind = "openai"
base_url = "{url}"
forward_sim_headers = true

[providers.b]
kind = "openai"
base_url = "{url}"
forward_sim_headers = true

[models.same]
chain = [{{ provider = "a", model = "m" }}]

[models.pair]
chain = [{{ provider = "a", model = "m" }}, {{ provider = "b", model = "m" }}]
"""


async def one_run(stub: pbg.RelayStub, model: str, max_retries: int | None) -> float:
    """Seconds from chunk 10 (the last before the reset) to chunk 11."""
    policy = pb.RecoveryPolicy()
    if max_retries is not None and max_retries >= 0:
        policy.max_retries = max_retries
    request = pb.StreamRequest(
        start=pb.StartGeneration(
            model=model,
            messages=[pb.Message(role="user", content="measure recovery")],
            params=pb.GenerationParams(max_tokens=20),
            policy=policy,
            metadata={"sim.faults": "ok" if max_retries == -1 else "reset@10,ok"},
        )
    )

    async def requests():
        yield request
        await asyncio.Event().wait()

    call = stub.Stream(requests())
    noticed: float | None = None
    recovered: float | None = None
    try:
        async for event in call:
            if event.HasField("chunk") and event.chunk.seq == 10:
                noticed = time.perf_counter()
            elif event.HasField("chunk") and event.chunk.seq == 11:
                recovered = time.perf_counter()
            elif event.HasField("end"):
                assert not event.end.partial, event.end.error
                break
    finally:
        call.cancel()
    assert noticed is not None and recovered is not None
    return recovered - noticed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def main(runs: int, backoff_ms: float) -> dict[str, object]:
    upstream = MockUpstream()
    await upstream.start("127.0.0.1", 0)
    backoff_s = backoff_ms / 1000
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.toml"
        path.write_text(CONFIG.format(backoff=backoff_s, url=upstream.base_url))
        values = read_config_file(path)
    settings = build_settings(
        {
            **values,
            "port": 0,
            "resume_secret": "fb4119eb43f581a675489fb0d4093765018545f4a1b8fdfc9c27bbf1111b22a5",
        }
    )
    server = await RelayServer.start(settings)
    results: dict[str, object] = {"runs": runs, "backoff_ms": backoff_ms}
    cases = [
        ("resume, same provider (HTTP)", "same", None, backoff_s),
        ("fallback, next provider (HTTP)", "pair", 0, 0.0),
        ("resume, in-process sim", "sim", None, backoff_s),
        ("baseline: no failure (gap 10 -> 11)", "same", -1, 0.0),
    ]
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pbg.RelayStub(channel)
            for _ in range(5):  # warm-up
                await one_run(stub, "same", None)
            print(f"{runs} runs per case, reset after 10 tokens, backoff {backoff_ms:g} ms")
            print(f"{'case':34} {'delay':>8} {'p50':>9} {'p99':>9} {'overhead p50':>13} {'p99':>9}")
            for label, model, retries, delay in cases:
                samples = [await one_run(stub, model, retries) for _ in range(runs)]
                p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
                print(
                    f"{label:34} {delay * 1000:6.1f}ms {p50 * 1000:7.2f}ms {p99 * 1000:7.2f}ms "
                    f"{(p50 - delay) * 1000:11.2f}ms {(p99 - delay) * 1000:7.2f}ms"
                )
                results[label] = {
                    "delay_ms": delay * 1000,
                    "p50_ms": round(p50 * 1000, 3),
                    "p99_ms": round(p99 * 1000, 3),
                    "overhead_p50_ms": round((p50 - delay) * 1000, 3),
                    "overhead_p99_ms": round((p99 - delay) * 1000, 3),
                    "mean_ms": round(statistics.mean(samples) * 1000, 3),
                }
    finally:
        await server.stop()
        await upstream.stop()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--backoff-ms", type=float, default=50.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.runs, args.backoff_ms))))
