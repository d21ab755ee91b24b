"""Throughput of the upstream HTTP side, with ceilings measured in the same run.

1. The sans-IO SSE decoder on a generated OpenAI-format stream (MB/s and
   events/s), in large reads and in small ones (per-read overhead), then
   decoder + Chat Completions parser (deltas/s).
2. The HTTP path at full speed: the real adapter (OpenAI and Anthropic) over
   the mock upstream on a real socket, against the in-process SimProvider
   producing the same text; both counted in deltas/s, with the ratio and the
   per-delta overhead of the HTTP path.

By default the mock upstream runs in a child process, so the figures are the
adapter's own cost; `--same-process` puts it on the benchmark's event loop
(then the server's work is included).

    .venv/bin/python bench/sse_decoder.py [--mb 50] [--tokens 20000] [--same-process]
    .venv/bin/python bench/sse_decoder.py --http-only [--rounds 3] [--uvloop]

The HTTP figures include this process's CPU time per delta (time.process_time,
the best of `--rounds` answers): the gateway's cost of a delta, which depends
far less on what else the machine runs than the wall-clock rate does (the
mock in its child process is often the slower side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_server.config.upstream import ProviderConfig
from tokenrelay_server.core.model import GenerationParams, Message
from tokenrelay_server.upstream.anthropic import AnthropicProvider
from tokenrelay_server.upstream.base import Delta, ProviderRequest, TextDelta
from tokenrelay_server.upstream.build import make_client
from tokenrelay_server.upstream.openai import ChatCompletionsParser, OpenAIProvider
from tokenrelay_server.upstream.sim import SimAnswer, SimProvider
from tokenrelay_server.upstream.sse import SSEDecoder

MESSAGES = (Message("user", "Write a long essay about token relays."),)


def openai_stream(megabytes: float) -> tuple[bytes, int]:
    """A Chat Completions stream of about `megabytes` MB and its event count."""
    answer = SimAnswer(MESSAGES, seed="bench")
    parts: list[bytes] = []
    size = 0
    index = 0
    target = int(megabytes * 1_000_000)
    while size < target:
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "bench",
            "choices": [
                {"index": 0, "delta": {"content": answer.token(index)}, "finish_reason": None}
            ],
        }
        line = f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        parts.append(line)
        size += len(line)
        index += 1
    parts.append(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n')
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts), index + 2


def reads(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def bench_decoder(stream: bytes, read_size: int) -> tuple[float, int]:
    pieces = reads(stream, read_size)
    decoder = SSEDecoder()
    events = 0
    start = time.perf_counter()
    for piece in pieces:
        events += len(decoder.feed(piece))
    decoder.feed(b"")
    return time.perf_counter() - start, events


def bench_parser(stream: bytes, read_size: int) -> tuple[float, int]:
    pieces = reads(stream, read_size)
    decoder, parser = SSEDecoder(), ChatCompletionsParser()
    deltas = 0
    start = time.perf_counter()
    for piece in pieces:
        for event in decoder.feed(piece):
            deltas += len(parser.on_event(event))
    deltas += len(parser.on_end())
    return time.perf_counter() - start, deltas


async def count_deltas(stream: AsyncIterator[Delta]) -> tuple[float, float, int, str]:
    """(wall seconds, this process's CPU seconds, text deltas, text)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    count = 0
    texts: list[str] = []
    async for delta in stream:
        if isinstance(delta, TextDelta):
            count += 1
            texts.append(delta.text)
    return time.perf_counter() - start, time.process_time() - cpu_start, count, "".join(texts)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.asynccontextmanager
async def mock_upstream(same_process: bool) -> AsyncIterator[str]:
    if same_process:
        upstream = MockUpstream()
        await upstream.start()
        try:
            yield upstream.base_url
        finally:
            await upstream.stop()
        return
    port = free_port()
    code = f"from tokenrelay_devtools.mock_upstream import main; main('127.0.0.1', {port})"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                break
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        child.terminate()
        async with asyncio.timeout(10):
            await child.wait()


async def bench_http(tokens: int, same_process: bool, rounds: int) -> None:
    request = ProviderRequest(
        model="bench", messages=MESSAGES, params=GenerationParams(max_tokens=tokens)
    )
    where = "same process" if same_process else "child process"
    async with mock_upstream(same_process) as base_url:
        sim_seconds, sim_cpu, sim_count, sim_text = await count_deltas(
            SimProvider().stream(request)
        )
        sim_rate = sim_count / sim_seconds
        sim_cpu_us = sim_cpu / sim_count * 1e6
        print(
            f"in-process SimProvider:              {sim_rate:>12,.0f} deltas/s "
            f"({sim_count} deltas); CPU {sim_cpu_us:.1f} µs per delta"
        )
        for kind, cls in (("openai", OpenAIProvider), ("anthropic", AnthropicProvider)):
            config = ProviderConfig(kind=kind, base_url=base_url)  # type: ignore[arg-type]
            provider = cls(f"bench-{kind}", config, make_client(config))
            try:
                await count_deltas(provider.stream(request))  # warm the pool
                best: tuple[float, float, int, str] | None = None
                for _ in range(rounds):
                    measured = await count_deltas(provider.stream(request))
                    if best is None or measured[1] < best[1]:
                        best = measured
                assert best is not None
                seconds, cpu, count, text = best
            finally:
                await provider.aclose()
            assert text == sim_text, f"{kind}: the HTTP text differs from the simulator's"
            rate = count / seconds
            overhead_us = (1 / rate - 1 / sim_rate) * 1e6
            cpu_us = cpu / count * 1e6
            print(
                f"{kind:>9} adapter ← mock ({where}): {rate:>12,.0f} deltas/s; "
                f"ratio to in-process {rate / sim_rate:.3f}; "
                f"HTTP path costs {overhead_us:.1f} µs per delta (wall); "
                f"CPU {cpu_us:.1f} µs per delta, {cpu_us - sim_cpu_us:.1f} µs more than the sim's "
                f"(best of {rounds})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of the generated stream")
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens per HTTP answer")
    parser.add_argument("--same-process", action="store_true", help="run the mock in-process")
    parser.add_argument("--rounds", type=int, default=3, help="HTTP rounds per adapter (best CPU)")
    parser.add_argument("--http-only", action="store_true", help="skip the decoder figures")
    parser.add_argument("--uvloop", action="store_true", help="run the HTTP part on uvloop")
    args = parser.parse_args()

    run = asyncio.run
    if args.uvloop:
        import uvloop

        run = uvloop.run
    if args.http_only:
        run(bench_http(args.tokens, args.same_process, args.rounds))
        return
    stream, events = openai_stream(args.mb)
    megabytes = len(stream) / 1_000_000
    print(f"stream: {megabytes:.1f} MB, {events:,} events (OpenAI chunks)")
    for read_size in (65_536, 1_024, 64):
        seconds, decoded = bench_decoder(stream, read_size)
        assert decoded == events
        print(
            f"decoder, {read_size:>6} B reads:         {megabytes / seconds:>8.1f} MB/s "
            f"{decoded / seconds:>12,.0f} events/s"
        )
    seconds, deltas = bench_parser(stream, 65_536)
    print(
        f"decoder + parser, 65536 B reads:   {megabytes / seconds:>8.1f} MB/s "
        f"{deltas / seconds:>12,.0f} deltas/s"
    )
    run(bench_http(args.tokens, args.same_process, args.rounds))


if __name__ == "__main__":
    main()
