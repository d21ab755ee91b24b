"""Takeover latency: from kill -9 of a stream's owner to the first continued
chunk on a survivor (issue 9 defect 7; goal: p99 <= 3 s over 20 kills).

    .venv/bin/python bench/takeover_latency.py [--kills 20] [--replicas 3]
        [--redis-url redis://127.0.0.1:6379/0 | --cluster]
        [--heartbeat-interval-s 0.5] [--heartbeat-ttl-s 2] [--lease-ttl-s 10]

N replica processes (`tokenrelay serve`, real processes on real time) share
one Redis (or, with --cluster, a throwaway local three-master Redis Cluster).
Each round starts a paced `sim` stream on one replica (the owner, in turn),
reads it to chunk 10, kills the owner with SIGKILL, and resumes at once on the
next replica with the last seq it had, as a client would. Measured at the
client: from the kill to the first chunk the survivor generated, the one after
its non-fatal OWNER_LOST notice (chunks the owner stored before it died may
come first; every seq is checked to follow the one before).
The killed replica is then restarted for the next round. The lease TTL is
left at the production default (10 s): without heartbeats every takeover
would wait for it.

What is in the figure: the owner's heartbeat lapsing (between TTL - interval
and TTL after the kill), the follower's next look (just after the lapse), the
takeover (lease, log read, continuation request) and one sim pace.

Measured here (2 shared cores, load average ~6-7 from other work), 20 kills
each: on one Redis p50 2104 ms, p99 2392 ms; on the local cluster p50 2120 ms,
p99 2459 ms. With the machine at load ~13 a run gave p99 4524 ms: the figure
moves with how soon the survivor's process gets the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_devtools.redis_cluster import LocalRedisCluster

SECRET = "bench-secret-0123456789abcdef"
PACE_MS = 20
SEEN_BEFORE_KILL = 10


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


class Replica:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.address = ""

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tokenrelay_server.cli", "serve", "--config", str(self.config)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 60)
        if not line.startswith(b"port "):
            raise RuntimeError(f"replica {self.config.stem} did not start: {line!r}")
        self.address = f"127.0.0.1:{int(line.split()[1])}"

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
        if self.process is not None:
            await self.process.wait()


def start_request() -> pb.StreamRequest:
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model="sim",
            messages=[pb.Message(role="user", content=f"takeover bench {uuid.uuid4().hex}")],
            params=pb.GenerationParams(max_tokens=100_000),
            metadata={"sim.pace_ms": str(PACE_MS)},
        )
    )


async def one_kill(owner: Replica, survivor: Replica) -> float:
    """Seconds from SIGKILL of `owner` to the first continued chunk on `survivor`."""
    async with grpc.aio.insecure_channel(owner.address) as on_owner:
        call = pbg.RelayStub(on_owner).Stream(iter([start_request()]))
        token, last_seq = "", 0
        async for event in call:
            if event.HasField("started"):
                token = event.started.resume_token
            elif event.HasField("checkpoint"):
                token = event.checkpoint.resume_token
            elif event.HasField("chunk"):
                last_seq = event.chunk.seq
                if last_seq >= SEEN_BEFORE_KILL:
                    break
        killed_at = time.monotonic()
        owner.kill()
        call.cancel()
    resume = pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=last_seq))
    requests: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
    requests.put_nowait(resume)

    async def outbox() -> AsyncIterator[pb.StreamRequest]:
        while (request := await requests.get()) is not None:
            yield request

    async with grpc.aio.insecure_channel(survivor.address) as on_survivor:
        call = pbg.RelayStub(on_survivor).Stream(outbox())
        taken_over = False
        expected_seq = last_seq + 1
        async for event in call:
            if event.HasField("error") and event.error.code == "OWNER_LOST":
                # The survivor's takeover notice: what follows, it generates.
                # (Chunks before it the owner stored before it died.)
                taken_over = True
            elif event.HasField("chunk"):
                if event.chunk.seq != expected_seq:
                    raise RuntimeError(f"expected seq {expected_seq}, got {event.chunk.seq}")
                expected_seq += 1
                if taken_over:
                    latency = time.monotonic() - killed_at
                    requests.put_nowait(pb.StreamRequest(cancel=pb.Cancel(reason="bench done")))
                    requests.put_nowait(None)
                    async for _ in call:  # to its End (CANCELLED)
                        pass
                    return latency
            elif event.HasField("end"):
                raise RuntimeError(f"the stream ended instead of continuing: {event.end}")
    raise RuntimeError("the resumed call closed without a continued chunk")


@contextlib.contextmanager
def redis_for(args: argparse.Namespace) -> Iterator[tuple[str, bool]]:
    if args.cluster:
        with LocalRedisCluster.start() as cluster:
            yield cluster.url, True
    else:
        yield args.redis_url, False


async def main(args: argparse.Namespace) -> dict[str, object]:
    with redis_for(args) as (url, cluster), tempfile.TemporaryDirectory() as folder:
        prefix = f"trbench-{uuid.uuid4().hex[:8]}"
        replicas = []
        for index in range(args.replicas):
            config = Path(folder) / f"replica-{index}.toml"
            config.write_text(
                '[server]\nport = 0\nstore = "redis"\n'
                f'redis_url = "{url}"\nredis_prefix = "{prefix}"\n'
                f"redis_cluster = {'true' if cluster else 'false'}\n"
                f'resume_secret = "{SECRET}"\nlog_level = "warning"\n'
                f"lease_ttl_s = {args.lease_ttl_s}\n"
                f"heartbeat_interval_s = {args.heartbeat_interval_s}\n"
                f"heartbeat_ttl_s = {args.heartbeat_ttl_s}\n"
            )
            replicas.append(Replica(config))
        samples: list[float] = []
        try:
            await asyncio.gather(*(replica.start() for replica in replicas))
            for kill in range(args.kills):
                owner = replicas[kill % len(replicas)]
                survivor = replicas[(kill + 1) % len(replicas)]
                latency = await one_kill(owner, survivor)
                samples.append(latency)
                print(f"kill {kill + 1:3}: {latency * 1000:8.1f} ms", flush=True)
                await owner.stop()
                await owner.start()
        finally:
            await asyncio.gather(*(replica.stop() for replica in replicas))
    p50, p99 = percentile(samples, 0.5), percentile(samples, 0.99)
    where = "a local 3-master Redis Cluster" if args.cluster else args.redis_url
    print(
        f"{len(samples)} kills, {args.replicas} replicas on {where}; heartbeat every "
        f"{args.heartbeat_interval_s:g} s, TTL {args.heartbeat_ttl_s:g} s; "
        f"lease {args.lease_ttl_s:g} s"
    )
    print(
        f"kill -9 -> first continued chunk: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"max {max(samples) * 1000:.0f} ms (goal: p99 <= 3000 ms)"
    )
    return {
        "kills": len(samples),
        "replicas": args.replicas,
        "cluster": bool(args.cluster),
        "heartbeat_interval_s": args.heartbeat_interval_s,
        "heartbeat_ttl_s": args.heartbeat_ttl_s,
        "lease_ttl_s": args.lease_ttl_s,
        "p50_ms": round(p50 * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "mean_ms": round(statistics.mean(samples) * 1000, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster", action="store_true", help="on a throwaway local cluster")
    parser.add_argument("--heartbeat-interval-s", type=float, default=0.5)
    parser.add_argument("--heartbeat-ttl-s", type=float, default=2.0)
    parser.add_argument("--lease-ttl-s", type=float, default=10.0)
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
