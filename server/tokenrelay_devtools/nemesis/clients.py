"""Nemesis clients: one per stream, on raw gRPC stubs (so every status and
every chunk is seen as the wire has it, with no client library smoothing
it over), recording everything into a `ClientRecord`.

A client starts its stream on one replica, and then, whenever the call
breaks (a status, no event for `idle_timeout_s`, or a drop it planned at a
seq of its own choosing), resumes on a replica picked at random with the
last resume token it holds and the last seq it holds, until it has read
the End or its `deadline_s` passed. Before it was told the stream id it
sends the same `start` again with the same idempotency key, so a start
that reached a replica is attached to, not started twice.

It never gives up on a status: a bug status (INTERNAL) is recorded for the
checker and the client resumes anyway, so that the log's End can still be
checked. Only statuses that say the stream cannot be had (NOT_FOUND,
PERMISSION_DENIED, INVALID_ARGUMENT) end it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_devtools.nemesis.history import (
    Call,
    ClientRecord,
    SeenChunk,
    SeenEnd,
    SeenStatus,
)
from tokenrelay_server.core.model import Message
from tokenrelay_server.upstream.sim import SimSettings, plan_attempt

# Statuses after which a resume cannot help: the client stops there.
FINAL_STATUSES = frozenset({"NOT_FOUND", "PERMISSION_DENIED", "INVALID_ARGUMENT"})

CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """What one client asks for and how it misbehaves."""

    name: str  # also the idempotency key
    prompt: str
    max_tokens: int
    seed: str
    pace_ms: int
    start_replica: int
    drops: tuple[int, ...]  # drop the call on receiving these seqs (ascending)

    def expected_text(self) -> str:
        """The simulator's clean answer (a continuation carries it on)."""
        plan = plan_attempt(
            (Message("user", self.prompt),),
            max_tokens=self.max_tokens,
            attempt=1,
            settings=SimSettings(seed=self.seed),
        )
        return "".join(plan.pieces)

    def start_request(self) -> pb.StreamRequest:
        return pb.StreamRequest(
            start=pb.StartGeneration(
                model="sim",
                messages=[pb.Message(role="user", content=self.prompt)],
                params=pb.GenerationParams(max_tokens=self.max_tokens),
                idempotency_key=self.name,
                metadata={"sim.pace_ms": str(self.pace_ms), "sim.seed": self.seed},
            )
        )


def plan_streams(
    rng: random.Random, *, prefix: str, count: int, replicas: int, drop_rate: float = 0.5
) -> list[StreamPlan]:
    plans = []
    for index in range(count):
        max_tokens = rng.randint(30, 120)
        drops: list[int] = []
        seq = 0
        while rng.random() < drop_rate and len(drops) < 3:
            seq = rng.randint(seq + 1, seq + max(2, max_tokens // 2))
            if seq >= max_tokens:
                break
            drops.append(seq)
        plans.append(
            StreamPlan(
                name=f"{prefix}-{index}",
                prompt=f"nemesis {index % 5}",
                max_tokens=max_tokens,
                seed=str(rng.randrange(1000)),
                pace_ms=rng.randint(5, 30),
                start_replica=rng.randrange(replicas),
                drops=tuple(drops),
            )
        )
    return plans


class Channels:
    """One channel per replica address, kept across replica restarts (grpc
    reconnects by itself, quickly with CHANNEL_OPTIONS)."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._channels = [
            grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for address in addresses
        ]
        self.stubs = [pbg.RelayStub(channel) for channel in self._channels]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


@dataclass
class ClientSettings:
    idle_timeout_s: float = 4.0  # no event for this long: the call is given up and resumed
    deadline_s: float = 120.0  # the whole stream; only guards against a stream that never ends
    backoff_s: tuple[float, float] = (0.05, 0.3)  # between calls
    # After its End a call must close within this (beyond any pause the
    # nemesis holds a replica in); only guards against a call that hangs.
    close_timeout_s: float = 15.0


async def _await_close(
    call: grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamEvent],
    record: Call,
    timeout_s: float,
) -> None:
    """Wait for the status that follows the End; record it unless OK, or
    record that it never came."""
    try:
        async with asyncio.timeout(timeout_s):
            code = await call.code()
            details = await call.details()
    except TimeoutError:
        record.hung_after_end = True
        return
    if code != grpc.StatusCode.OK:
        record.status = SeenStatus(code.name, details or "")


async def run_client(
    plan: StreamPlan,
    record: ClientRecord,
    channels: Channels,
    rng: random.Random,
    on_chunk: Callable[[], None],
    settings: ClientSettings,
) -> None:
    """Read `plan`'s stream to its End through faults, recording every call."""
    deadline = time.monotonic() + settings.deadline_s
    held = 0  # the last seq held, contiguous from 1
    token = ""
    drops = list(plan.drops)
    replica = plan.start_replica
    while time.monotonic() < deadline:
        if record.calls:
            await asyncio.sleep(rng.uniform(*settings.backoff_s))
            replica = rng.randrange(len(channels.stubs))
        call_record = Call(replica=replica, kind="resume" if token else "start", after_seq=held)
        record.calls.append(call_record)
        request = (
            pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=held))
            if token
            else plan.start_request()
        )
        closed = asyncio.Event()

        async def requests(
            first: pb.StreamRequest = request, closed: asyncio.Event = closed
        ) -> AsyncIterator[pb.StreamRequest]:
            yield first
            await closed.wait()  # keep the request side open while reading

        call = channels.stubs[replica].Stream(requests())
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    call_record.outcome = "deadline"
                    break
                try:
                    async with asyncio.timeout(min(settings.idle_timeout_s, remaining)):
                        event = await call.read()
                except TimeoutError:
                    call_record.outcome = (
                        "idle" if remaining > settings.idle_timeout_s else ("deadline")
                    )
                    break
                if event is grpc.aio.EOF:
                    code = await call.code()
                    details = await call.details()
                    call_record.status = SeenStatus(code.name, details or "")
                    call_record.outcome = "status"
                    break
                assert isinstance(event, pb.StreamEvent)
                kind = event.WhichOneof("kind")
                if kind == "started":
                    call_record.stream_id = event.started.stream_id
                    token = event.started.resume_token
                elif kind == "chunk":
                    chunk = event.chunk
                    chunk_kind = chunk.WhichOneof("content") or "text"
                    text = chunk.text if chunk_kind == "text" else chunk.reasoning
                    call_record.chunks.append(SeenChunk(chunk.seq, chunk_kind, text))
                    on_chunk()
                    if chunk.seq == held + 1:
                        held = chunk.seq
                    if drops and chunk.seq >= drops[0]:
                        drops.pop(0)
                        call_record.outcome = "dropped"
                        break
                elif kind == "checkpoint":
                    token = event.checkpoint.resume_token or token
                elif kind == "error":
                    call_record.notices.append(event.error.code)
                elif kind == "end":
                    end = event.end
                    call_record.end = SeenEnd(
                        finish_reason=end.finish_reason,
                        total_seq=end.total_seq,
                        text_sha256=end.text_sha256,
                        chunks_sha256=end.chunks_sha256,
                        partial=end.partial,
                        error_code=end.error.code if end.partial else "",
                    )
                    call_record.outcome = "end"
                    await _await_close(call, call_record, settings.close_timeout_s)
                    break
        except grpc.aio.AioRpcError as exc:
            call_record.status = SeenStatus(exc.code().name, exc.details() or "")
            call_record.outcome = "status"
        finally:
            closed.set()
            call.cancel()
        if call_record.outcome == "end":
            return
        if call_record.status is not None and call_record.status.code in FINAL_STATUSES:
            return
    if record.calls and record.calls[-1].outcome != "end":
        record.calls[-1].outcome = "deadline"
