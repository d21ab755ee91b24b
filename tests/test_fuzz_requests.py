"""Fuzzing the edge: whatever a client sends, the answer is never INTERNAL or
UNKNOWN, every refusal says what is wrong, and the server is unchanged after.

Requests are drawn from the contract itself: a hypothesis strategy walks
`StreamRequest`'s descriptor (oneofs, proto3 optionals, repeated fields, maps,
enums with unknown values, strings empty and huge, integer edges), with field
values biased towards what the gateway parses (model names, roles, `sim.*`
metadata and fault scripts, resume tokens). Each call sends 1-4 frames: those
messages encoded, or encodings with flipped bytes, cut short or extended, or
random bytes. All against one real server on a real port; after every call it
must have no generation running, no call attached, no task beyond those it
had, health SERVING and nothing logged as an error, and it must still serve a
clean stream.

Valid streams are kept short (a sim pace of at most a few milliseconds, no
Retry-After waits): the point is the edge, not generation.

The gateway runs on a ManualClock with short timers: a time keeper moves it
only when every stream provably waits on time (a pace, a stalled answer), and
a timer set for "now" (the detach grace of 0) fires without time moving, as
it would at once on a real clock. So no example waits on the wall clock, and
what happens in one (a stall timeout, an expired token) never depends on how
fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from serverkit import SECRET, RelayFactory, eventually, run_to_end, start_request
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.timekeeper import POLL_S, TimeKeeper
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.core.clock import ManualClock, SystemClock

MAX_PROMPT_BYTES = 64 << 10
EVENTS_READ_PER_CALL = 200  # a long valid stream: this many events is enough
HANG_GUARD_S = 20.0  # a deadline only against hanging; nothing asserts how long a call took

UINT32_EDGES = [0, 1, 2, 3, 9, 10, 100, 101, 1_000_000, 1_000_001, 2**31 - 1, 2**31, 2**32 - 1]
UINT64_EDGES = [0, 1, 2, 3, 4, 5, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1]
INT32_EDGES = [0, 1, -1, 7, 2**31 - 1, -(2**31)]
HUGE = "x" * (MAX_PROMPT_BYTES + 10)

STRINGS = [
    "",
    " ",
    "sim",
    " sim ",
    "gpt-9",
    "user",
    "system",
    "assistant",
    "wizard",
    "\x00",
    "²",
    "٣",
    "é" * 300,
    "🚀",
    "x" * 257,
    "x" * 600,
    "x" * 5000,
    HUGE,
]
SIM_KEYS = ["sim.faults", "sim.pace_ms", "sim.seed", "sim.overlap", "sim.retry_after_s", "sim."]
# No 429/503/529: their Retry-After (default 1 s) would make the gateway
# really wait; they are typed like any other status in test_relay_stream.
FAULT_ITEMS = [
    "ok",
    "reset@0",
    "reset@2",
    "stall@1",
    "eof@1",
    "garbage@2",
    "http:400",
    "http:401",
    "http:500",
    "http:200",
    "http:600",
    "reset@²",
    "reset@٣",
    "http:٤٠٠",
    "explode@1",
    "reset@",
    "@3",
    "",
]
NUMBERS = ["0", "1", "2", "-1", "0.5", "1e3", "nan", "inf", "²", "٣", " 1 ", "1_0", "", "x"]


def sim_values(key: str) -> st.SearchStrategy[str]:
    if key == "sim.faults":
        return st.lists(st.sampled_from(FAULT_ITEMS), min_size=1, max_size=3).map(",".join)
    if key == "sim.seed":
        return st.sampled_from(STRINGS) | st.text(max_size=10)
    return st.sampled_from(NUMBERS)


@st.composite
def metadata_entries(draw: st.DrawFn) -> dict[str, str]:
    entries: dict[str, str] = {}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(SIM_KEYS) | st.sampled_from(STRINGS) | st.text(max_size=8))
        value = draw(sim_values(key) if key in SIM_KEYS else st.sampled_from(STRINGS))
        entries[key] = value
    if draw(st.integers(0, 19)) == 19:  # past the entry limit
        entries.update({f"k{i}": "v" for i in range(65)})
    return entries


def scalar(field: FieldDescriptor, tokens: list[str]) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        if field.name == "resume_token":
            return st.sampled_from(tokens) | st.sampled_from(STRINGS) | st.text(max_size=80)
        return st.sampled_from(STRINGS) | st.text(max_size=12)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=32)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.floats(width=32) | st.sampled_from([0.0, 1.0, 2.0, 2.0001, -0.0])
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.sampled_from(UINT32_EDGES) | st.integers(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.sampled_from(UINT64_EDGES) | st.integers(0, 2**64 - 1)
    if kind == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.sampled_from(known) | st.sampled_from([99, -5, 2**31 - 1])  # unknown too
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
        return st.integers(-(2**63), 2**63 - 1)
    return st.sampled_from(INT32_EDGES) | st.integers(-(2**31), 2**31 - 1)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, tokens: list[str], depth: int = 0) -> Message:
    """A message of `descriptor`, every field decided from its descriptor."""
    message = message_factory.GetMessageClass(descriptor)()
    chosen = {
        oneof.name: draw(st.sampled_from([None, *oneof.fields])) for oneof in descriptor.oneofs
    }
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None and chosen[oneof.name] is not field:
            continue
        if oneof is None and not draw(st.booleans()):
            continue  # left at its default
        if _is_map(field):
            getattr(message, field.name).update(draw(metadata_entries()))
        elif field.message_type is not None:
            if depth > 2:
                continue
            children = st.deferred(lambda f=field: messages(f.message_type, tokens, depth + 1))
            if field.is_repeated:
                for child in draw(st.lists(children, max_size=3)):
                    getattr(message, field.name).add().CopyFrom(child)
            else:
                getattr(message, field.name).CopyFrom(draw(children))
        elif field.is_repeated:
            getattr(message, field.name).extend(draw(st.lists(scalar(field, tokens), max_size=3)))
        else:
            setattr(message, field.name, draw(scalar(field, tokens)))
    return message


@st.composite
def mostly_valid_start(draw: st.DrawFn, tokens: list[str]) -> pb.StreamRequest:
    """A start that often gets past validation, so that later frames and the
    stream itself are reached: a good one with some of its parts fuzzed."""
    request = start_request(
        max_tokens=draw(st.sampled_from([1, 3, 12, 40])), metadata={"sim.pace_ms": "0"}
    )
    start = request.start
    if draw(st.booleans()):
        start.params.CopyFrom(draw(messages(pb.GenerationParams.DESCRIPTOR, tokens)))
    if draw(st.booleans()):
        start.policy.CopyFrom(draw(messages(pb.RecoveryPolicy.DESCRIPTOR, tokens)))
    if draw(st.booleans()):
        start.metadata.update(draw(metadata_entries()))
    # Rare branches take the high values: hypothesis favours small integers.
    if draw(st.integers(0, 9)) >= 8:
        del start.messages[:]
        start.messages.extend(draw(st.lists(messages(pb.Message.DESCRIPTOR, tokens), max_size=3)))
    if draw(st.integers(0, 9)) >= 8:
        start.idempotency_key = draw(st.sampled_from(["k1", "k2", *STRINGS]))
    return request


@st.composite
def resume_with(draw: st.DrawFn, tokens: list[str]) -> pb.StreamRequest:
    token = draw(st.sampled_from(tokens))
    last_seq = draw(st.sampled_from(UINT64_EDGES))
    return pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=last_seq))


@st.composite
def mutated(draw: st.DrawFn, encoded: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "truncate", "extend", "as-is"]))
    if how == "flip" and encoded:
        data = bytearray(encoded)
        for _ in range(draw(st.integers(1, 3))):
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if how == "truncate" and encoded:
        return encoded[: draw(st.integers(0, len(encoded) - 1))]
    if how == "extend":
        return encoded + draw(st.binary(min_size=1, max_size=8))
    return encoded


def frames(tokens: list[str]) -> st.SearchStrategy[list[bytes]]:
    any_request = messages(pb.StreamRequest.DESCRIPTOR, tokens)
    encoded = any_request.map(lambda m: m.SerializeToString())
    one_frame = encoded | encoded.flatmap(mutated) | st.binary(max_size=64)
    valid_start = mostly_valid_start(tokens).map(lambda m: m.SerializeToString())
    resume = resume_with(tokens).map(lambda m: m.SerializeToString())
    # Weighted towards starts that get through, to reach later frames and streams.
    first = st.sampled_from(["start", "start", "start", "resume", "any", "any"]).flatmap(
        lambda kind: {"start": valid_start, "resume": resume, "any": one_frame}[kind]
    )
    later = (
        st.sampled_from([pb.StreamRequest(ack=pb.Ack(seq=1)), pb.StreamRequest(cancel=pb.Cancel())])
        .map(lambda m: m.SerializeToString())
        .flatmap(mutated)
        | one_frame
    )
    return st.tuples(first, st.lists(later, max_size=3)).map(lambda t: [t[0], *t[1]])


class ErrorRecords(logging.Handler):
    """Every ERROR the gateway logs: an internal error may also happen where
    no status shows it (a request reader, a generation)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def error_records() -> Iterator[ErrorRecords]:
    handler = ErrorRecords()
    logger = logging.getLogger("tokenrelay_server")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def live_tasks() -> Counter[str]:
    """Running tasks by coroutine, pytest's own (the test, one per example,
    and the fixture wrappers) aside."""
    names = (t.get_coro().__qualname__ for t in asyncio.all_tasks() if not t.done())
    return Counter(name for name in names if not name.startswith(("test_", "_wrap_")))


def play(channel: grpc.Channel, sent: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Send `sent` as raw frames, half-close, read; the server's status (OK
    for a stream that ended, or that we stopped reading after enough events).

    Synchronous grpc, run in a thread: grpc's asyncio client reports INTERNAL
    "Internal error from Core" instead of the server's status when the server
    ends a call while frames are still being written (grpc/grpc#36066), and
    this test is about what the server answers."""
    call = channel.stream_stream(
        "/tokenrelay.v1.Relay/Stream",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.StreamEvent.FromString,
    )(iter(sent), timeout=HANG_GUARD_S)
    try:
        for read, _ in enumerate(call, start=1):
            if read >= EVENTS_READ_PER_CALL:
                break
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        return error.code(), error.details() or ""  # type: ignore[attr-defined]
    finally:
        call.cancel()


async def keep_time(clock: ManualClock, keeper: TimeKeeper) -> None:
    """Fire the timers due now (moving time by nothing), else let the keeper
    move the clock when every stream waits on time; one task, so the clock
    is never moved by two at once."""
    while True:
        due = clock.next_due()
        if due is not None and due <= clock.monotonic():
            await clock.run_for(0)
        elif not await keeper.move_once():
            await asyncio.sleep(POLL_S)


@pytest.fixture
async def fuzz_relay(relay_factory: RelayFactory) -> AsyncIterator[RelayServer]:
    clock = ManualClock()
    relay = await relay_factory(
        clock=clock,
        detach_grace_s=0,  # a call we stop reading takes its generation with it
        max_prompt_bytes=MAX_PROMPT_BYTES,
        backoff_base_s=0,
        backoff_cap_s=0,
        # On the manual clock: a stall costs the keeper one move, and the
        # caller's deadline (HANG_GUARD_S, on the same clock) stays far away.
        stall_timeout_s=0.05,
        first_token_timeout_s=0.5,
    )
    keeper = asyncio.create_task(keep_time(clock, TimeKeeper(clock, relay)), name="fuzz clock")
    yield relay
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper


@pytest.fixture
async def fuzz_state(fuzz_relay: RelayServer) -> AsyncIterator[dict[str, Any]]:
    """One channel for every example, real tokens to resume with, and the
    task census before the first example."""
    channel = grpc.aio.insecure_channel(fuzz_relay.address)
    await channel.channel_ready()
    sync_channel = grpc.insecure_channel(fuzz_relay.address)
    baseline = live_tasks()  # the server and the channel, no call open
    finished = await run_to_end(channel, start_request(max_tokens=3))
    token = finished[0].started.resume_token
    signer = ResumeTokens(SECRET.encode(), ttl_s=60, clock=SystemClock())
    tokens = [token, token[:-1], token + "x", signer.issue("f" * 32), signer.issue("")]
    await eventually(lambda: fuzz_relay.hub.running_generations == 0)
    yield {"channel": channel, "sync": sync_channel, "tokens": tokens, "baseline": baseline}
    sync_channel.close()
    await channel.close()


async def assert_unchanged(relay: RelayServer, channel: grpc.aio.Channel, baseline) -> None:
    """Nothing of the call is left: no generation, no attached call, no task
    beyond those the server had before, health still SERVING, and a clean
    stream still comes out whole."""
    try:
        await eventually(
            lambda: (
                relay.hub.running_generations == 0
                and relay.hub.attached_sessions == 0
                and live_tasks() == baseline
            ),
            within_s=5.0,
        )
    except TimeoutError:
        pytest.fail(
            f"left behind: {relay.hub.running_generations} generation(s), "
            f"{relay.hub.attached_sessions} call(s), tasks {live_tasks() - baseline}"
        )
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "tokenrelay.v1.Relay"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    events = await run_to_end(channel, start_request(max_tokens=3))
    assert events[-1].end.total_seq == 3 and not events[-1].end.partial
    await eventually(lambda: relay.hub.running_generations == 0)


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
    # No shrinking: each step replays calls against the server, which takes
    # minutes; the failing example is printed as found (frames are labelled).
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one server for every example, on purpose
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_fuzzed_requests_never_get_internal_or_unknown_and_change_nothing(
    fuzz_relay: RelayServer, fuzz_state: dict[str, Any], error_records: ErrorRecords, data
) -> None:
    channel = fuzz_state["channel"]
    sent = data.draw(frames(fuzz_state["tokens"]), label="frames")
    code, details = await asyncio.to_thread(play, fuzz_state["sync"], sent)
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"the call hung: {details}"
    if code != grpc.StatusCode.OK:
        assert details.strip(), f"{code.name} without a message"
        assert len(details) < 2_000, f"{code.name} echoes too much: {len(details)} characters"
    await assert_unchanged(fuzz_relay, channel, fuzz_state["baseline"])
    assert not error_records.records, [r.getMessage() for r in error_records.records]
