"""The Python client: reconnect decisions (pure), the reconnect loop against a
scripted gRPC server, and whole streams against a real gateway whose
connection a real TCP proxy cuts.

No test sleeps: the client is given a `sleep` that records the delay and
returns at once, and where a test needs an attempt's connect window to pass,
a `deadline` on a ManualClock of its own that the test moves once the client
provably waits on nothing but that window. The gateway runs on a ManualClock
too: a paced stream makes its chunks only when the test lets it (`produce`).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import pytest
from rich.console import Console

from serverkit import PACED, QUIET, eventually, produce
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_client import (
    Chunk,
    DigestMismatch,
    End,
    Event,
    Notice,
    ProtocolViolation,
    Reconnected,
    Reconnecting,
    ReconnectsExhausted,
    RelayClient,
    ResumeRejected,
    Started,
    StreamFailed,
    Tool,
    ToolCall,
    ToolCallDelta,
    backoff_delay,
    is_transient,
    text_sha256,
    tool_result,
    verify_assembly,
)
from tokenrelay_client.chat import EXIT_FAILED, EXIT_OK, EXIT_PARTIAL, run_chat
from tokenrelay_devtools.demo import run_demo
from tokenrelay_devtools.netfault import FaultProxy
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.config.settings import Settings
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.engine.generation import Generation

SECRET = "757c0a99601ccd000414ff137362a92c4b016c1249745b271888a5174ae5c5db"
PROMPT = [("user", "tell me about streams that survive failure")]


class RecordingSleep:
    """Stands in for asyncio.sleep: remembers the delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        await asyncio.sleep(0)


async def collect(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


def chunks(events: Sequence[Event]) -> list[Chunk]:
    return [event for event in events if isinstance(event, Chunk)]


# --- backoff (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s", "jitter", "rng_value", "expected"),
    [
        pytest.param(1, 1.0, 30.0, 0.1, 0.5, 1.0, id="first attempt waits the base"),
        pytest.param(2, 1.0, 30.0, 0.1, 0.5, 2.0, id="second attempt doubles"),
        pytest.param(3, 1.0, 30.0, 0.1, 0.5, 4.0, id="third attempt doubles again"),
        pytest.param(1, 1.0, 30.0, 0.1, 0.0, 0.9, id="lowest jitter takes ten percent off"),
        pytest.param(1, 1.0, 30.0, 0.1, 1.0, 1.1, id="highest jitter adds ten percent"),
        pytest.param(6, 1.0, 30.0, 0.1, 0.5, 30.0, id="the cap bounds the exponential"),
        pytest.param(6, 1.0, 30.0, 0.1, 1.0, 30.0, id="jitter never pushes past the cap"),
        pytest.param(6, 1.0, 30.0, 0.1, 0.0, 27.0, id="jitter at the cap only shortens"),
        pytest.param(4, 0.25, 30.0, 0.0, 0.9, 2.0, id="no jitter ignores the rng"),
        pytest.param(3, 0.0, 30.0, 0.5, 0.0, 0.0, id="a zero base never waits"),
        pytest.param(40, 1.0, 30.0, 0.1, 0.5, 30.0, id="huge attempts stay at the cap"),
    ],
)
def test_backoff_delay_table(attempt, base_s, cap_s, jitter, rng_value, expected):
    delay = backoff_delay(attempt, base_s=base_s, cap_s=cap_s, jitter=jitter, rng=lambda: rng_value)
    assert delay == pytest.approx(expected)


def test_backoff_delay_rejects_attempt_zero():
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0, base_s=1.0, cap_s=30.0, jitter=0.1, rng=lambda: 0.5)


# --- which statuses reconnect (pure) ----------------------------------------------------


@pytest.mark.parametrize(
    ("code", "details", "expected"),
    [
        pytest.param(grpc.StatusCode.UNAVAILABLE, "draining", True, id="draining reconnects"),
        pytest.param(
            grpc.StatusCode.UNAVAILABLE,
            "Stream removed (recvmsg:Connection reset by peer)",
            True,
            id="a reset reconnects",
        ),
        pytest.param(grpc.StatusCode.CANCELLED, "Cancelled", True, id="a remote cancel resumes"),
        pytest.param(
            grpc.StatusCode.INTERNAL,
            "Received RST_STREAM with error code 2",
            True,
            id="internal from a broken transport reconnects",
        ),
        pytest.param(grpc.StatusCode.UNKNOWN, "Stream removed", True, id="stream removed resumes"),
        pytest.param(
            grpc.StatusCode.INTERNAL,
            "incident 7f3a: unexpected error",
            False,
            id="a real server error is final",
        ),
        pytest.param(
            grpc.StatusCode.UNKNOWN,
            "Exception calling application",
            False,
            id="an unknown server exception is final",
        ),
        pytest.param(
            grpc.StatusCode.INVALID_ARGUMENT, "start.model", False, id="a bad request is final"
        ),
        pytest.param(
            grpc.StatusCode.PERMISSION_DENIED, "token", False, id="a foreign token is final"
        ),
        pytest.param(grpc.StatusCode.NOT_FOUND, "expired", False, id="an expired stream is final"),
        pytest.param(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota", False, id="a quota is final"),
        pytest.param(
            grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", False, id="a deadline is final"
        ),
    ],
)
def test_is_transient_table(code, details, expected):
    assert is_transient(code, details) is expected


# --- digest verification (pure) ----------------------------------------------------------


def test_verify_assembly_accepts_the_matching_text():
    verify_assembly("héllo 🚀", 3, total_seq=3, expected_sha256=text_sha256("héllo 🚀"))


def test_verify_assembly_raises_digest_mismatch_on_other_text():
    with pytest.raises(DigestMismatch, match="sha256") as caught:
        verify_assembly("hello", 2, total_seq=2, expected_sha256=text_sha256("hellO"))
    assert caught.value.expected_sha256 == text_sha256("hellO")
    assert caught.value.actual_sha256 == hashlib.sha256(b"hello").hexdigest()


def test_verify_assembly_raises_digest_mismatch_on_a_missing_chunk():
    with pytest.raises(DigestMismatch, match=r"1\.\.4"):
        verify_assembly("hello", 3, total_seq=4, expected_sha256=text_sha256("hello"))


def test_text_sha256_hashes_utf8():
    assert text_sha256("日本語") == hashlib.sha256("日本語".encode()).hexdigest()


# --- request building ------------------------------------------------------------------------


async def test_messages_may_be_tuples_or_dicts():
    server = ScriptedRelay([[started(), end_for("")]])
    async with server.running() as address, RelayClient(address) as client:
        await client.generate(
            "sim", [("system", "be brief"), {"role": "user", "content": "hi"}], max_tokens=5
        )
    start = server.first_requests[0].start
    assert [(m.role, m.content) for m in start.messages] == [
        ("system", "be brief"),
        ("user", "hi"),
    ]
    assert start.params.max_tokens == 5
    assert not start.params.HasField("temperature")


async def test_a_message_that_is_neither_tuple_nor_dict_is_refused():
    async with RelayClient("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match="role, content"):
            client.stream("sim", ["hello"])  # type: ignore[list-item]


async def test_an_unknown_policy_field_is_refused():
    async with RelayClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="max_retrys"):
            client.stream("sim", PROMPT, policy={"max_retrys": 2})


# --- the reconnect loop, against a scripted server ----------------------------------------


Step = pb.StreamEvent | tuple[grpc.StatusCode, str]


def started(resumed: bool = False) -> pb.StreamEvent:
    return pb.StreamEvent(
        started=pb.StreamStarted(
            stream_id="s1", resume_token=f"token-{resumed}", resumed=resumed, model="sim"
        )
    )


def chunk(seq: int) -> pb.StreamEvent:
    return pb.StreamEvent(chunk=pb.TokenChunk(seq=seq, text=f"t{seq} ", provider="sim", attempt=1))


def text_upto(last: int) -> str:
    return "".join(f"t{seq} " for seq in range(1, last + 1))


def end_for(text: str, total_seq: int = 0, digest: str | None = None) -> pb.StreamEvent:
    return pb.StreamEvent(
        end=pb.StreamEnd(
            finish_reason="stop",
            total_seq=total_seq,
            text_sha256=digest if digest is not None else text_sha256(text),
        )
    )


def notice(code: str) -> pb.StreamEvent:
    return pb.StreamEvent(
        error=pb.StreamError(code=code, message="retrying upstream", retryable=True, fatal=False)
    )


def unavailable(details: str = "draining") -> tuple[grpc.StatusCode, str]:
    return (grpc.StatusCode.UNAVAILABLE, details)


@dataclass
class ScriptedRelay(pbg.RelayServicer):
    """A Relay server that plays one scripted list of steps per call (the
    last script repeats) and records each call's first request."""

    scripts: list[list[Step]]
    first_requests: list[pb.StreamRequest] = field(default_factory=list)
    later_requests: list[pb.StreamRequest] = field(default_factory=list)

    async def Stream(self, request_iterator, context):
        script = self.scripts[min(len(self.first_requests), len(self.scripts) - 1)]
        requests = aiter(request_iterator)
        self.first_requests.append(await anext(requests))
        reader = asyncio.ensure_future(self._record_rest(requests))
        try:
            for step in script:
                if isinstance(step, tuple):
                    await context.abort(*step)
                yield step
        finally:
            reader.cancel()

    async def _record_rest(self, requests: AsyncIterator[pb.StreamRequest]) -> None:
        async for request in requests:
            self.later_requests.append(request)

    def running(self) -> _Running:
        return _Running(self)


class _Running:
    def __init__(self, servicer: ScriptedRelay) -> None:
        self._servicer = servicer
        self._server = grpc.aio.server()

    async def __aenter__(self) -> str:
        pbg.add_RelayServicer_to_server(self._servicer, self._server)
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc_info: object) -> None:
        await self._server.stop(grace=None)


def scripted_client(address: str, sleep: RecordingSleep, **kwargs) -> RelayClient:
    return RelayClient(address, sleep=sleep, rng=random.Random(7), **kwargs)


async def test_a_start_retried_before_started_reuses_the_idempotency_key():
    server = ScriptedRelay(
        [[unavailable()], [started(resumed=True), chunk(1), end_for(text_upto(1), 1)]]
    )
    sleep = RecordingSleep()
    async with server.running() as address, scripted_client(address, sleep) as client:
        events = await collect(client.stream("sim", PROMPT))
    first, second = server.first_requests
    assert first.HasField("start") and second.HasField("start")
    assert first.start.idempotency_key
    assert second.start.idempotency_key == first.start.idempotency_key
    assert [c.seq for c in chunks(events)] == [1]
    assert len(sleep.delays) == 1


async def test_a_given_idempotency_key_is_sent_as_is():
    server = ScriptedRelay([[started(), end_for("")]])
    async with server.running() as address, RelayClient(address) as client:
        await client.generate("sim", PROMPT, idempotency_key="order-42")
    assert server.first_requests[0].start.idempotency_key == "order-42"


async def test_resume_after_unavailable_uses_latest_token_and_drops_replayed_chunks():
    checkpoint = pb.StreamEvent(checkpoint=pb.Checkpoint(seq=2, token_count=2, resume_token="cp2"))
    server = ScriptedRelay(
        [
            [started(), chunk(1), chunk(2), checkpoint, chunk(3), unavailable()],
            # A sloppy server that replays 2 and 3: the client must drop them.
            [started(resumed=True), chunk(2), chunk(3), chunk(4), end_for(text_upto(4), 4)],
        ]
    )
    sleep = RecordingSleep()
    async with server.running() as address, scripted_client(address, sleep) as client:
        relay_stream = client.stream("sim", PROMPT)
        events = await collect(relay_stream)
    resume = server.first_requests[1].resume
    assert (resume.resume_token, resume.last_seq) == ("cp2", 3)
    assert [c.seq for c in chunks(events)] == [1, 2, 3, 4]
    assert relay_stream.duplicates_dropped == 2
    assert relay_stream.text == text_upto(4)
    reconnected = [e for e in events if isinstance(e, Reconnected)]
    assert len(reconnected) == 1
    assert reconnected[0].last_seq == 3 and reconnected[0].attempt == 1
    assert "UNAVAILABLE" in reconnected[0].cause
    end = events[-1]
    assert isinstance(end, End) and end.verified


async def test_reconnect_events_come_in_order_around_the_resume():
    server = ScriptedRelay(
        [
            [started(), chunk(1), unavailable()],
            [started(resumed=True), chunk(2), end_for(text_upto(2), 2)],
        ]
    )
    async with server.running() as address, scripted_client(address, RecordingSleep()) as client:
        events = await collect(client.stream("sim", PROMPT))
    kinds = [type(event).__name__ for event in events]
    assert kinds == ["Started", "Chunk", "Reconnecting", "Reconnected", "Started", "Chunk", "End"]


async def test_a_notice_replayed_after_resume_is_delivered_once():
    server = ScriptedRelay(
        [
            [started(), chunk(1), notice("HTTP_429"), unavailable()],
            [started(resumed=True), notice("HTTP_429"), chunk(2), end_for(text_upto(2), 2)],
        ]
    )
    async with server.running() as address, scripted_client(address, RecordingSleep()) as client:
        events = await collect(client.stream("sim", PROMPT))
    assert [e.code for e in events if isinstance(e, Notice)] == ["HTTP_429"]


async def test_reconnects_exhausted_after_the_budget_with_the_partial_text():
    server = ScriptedRelay([[started(), chunk(1), chunk(2), unavailable()], [unavailable()]])
    sleep = RecordingSleep()
    async with (
        server.running() as address,
        scripted_client(address, sleep, max_reconnects=3) as client,
    ):
        with pytest.raises(ReconnectsExhausted) as caught:
            await collect(client.stream("sim", PROMPT))
    error = caught.value
    assert error.attempts == 3
    assert error.partial is not None
    assert (error.partial.last_seq, error.partial.text) == (2, text_upto(2))
    assert error.partial.resume_token == "token-False"
    assert len(server.first_requests) == 4  # the call, then three reconnects
    rng = random.Random(7)
    assert sleep.delays == [
        backoff_delay(n, base_s=1.0, cap_s=30.0, jitter=0.1, rng=rng.random) for n in (1, 2, 3)
    ]


async def test_progress_resets_the_reconnect_budget():
    # Every call delivers one new chunk and then breaks: with a budget of one
    # reconnect the stream still completes, because each chunk is progress.
    scripts: list[list[Step]] = [[started(), chunk(1), unavailable()]]
    for seq in range(2, 6):
        scripts.append([started(resumed=True), chunk(seq), unavailable()])
    scripts.append([started(resumed=True), chunk(6), end_for(text_upto(6), 6)])
    server = ScriptedRelay(scripts)
    sleep = RecordingSleep()
    async with (
        server.running() as address,
        scripted_client(address, sleep, max_reconnects=1) as client,
    ):
        relay_stream = client.stream("sim", PROMPT)
        events = await collect(relay_stream)
    assert [c.seq for c in chunks(events)] == [1, 2, 3, 4, 5, 6]
    assert relay_stream.reconnects == 5
    # Each round is a fresh first attempt, so every delay is the base delay.
    assert all(0.9 <= delay <= 1.1 for delay in sleep.delays)


async def test_attaching_without_a_new_chunk_is_not_progress():
    server = ScriptedRelay(
        [[started(), chunk(1), unavailable()], [started(resumed=True), unavailable()]]
    )
    async with (
        server.running() as address,
        scripted_client(address, RecordingSleep(), max_reconnects=2) as client,
    ):
        with pytest.raises(ReconnectsExhausted):
            await collect(client.stream("sim", PROMPT))
    assert len(server.first_requests) == 3


async def test_invalid_argument_is_not_retried():
    server = ScriptedRelay([[(grpc.StatusCode.INVALID_ARGUMENT, "start.model: unknown model")]])
    sleep = RecordingSleep()
    async with server.running() as address, scripted_client(address, sleep) as client:
        with pytest.raises(StreamFailed) as caught:
            await collect(client.stream("nope", PROMPT))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "start.model" in caught.value.details
    assert len(server.first_requests) == 1
    assert sleep.delays == []


async def test_a_real_server_error_is_not_retried():
    server = ScriptedRelay([[started(), chunk(1), (grpc.StatusCode.INTERNAL, "incident 42")]])
    sleep = RecordingSleep()
    async with server.running() as address, scripted_client(address, sleep) as client:
        with pytest.raises(StreamFailed) as caught:
            await collect(client.stream("sim", PROMPT))
    assert caught.value.partial is not None and caught.value.partial.text == text_upto(1)
    assert sleep.delays == []


async def test_a_refused_resume_raises_resume_rejected():
    server = ScriptedRelay(
        [[started(), chunk(1), unavailable()], [(grpc.StatusCode.NOT_FOUND, "stream expired")]]
    )
    async with server.running() as address, scripted_client(address, RecordingSleep()) as client:
        with pytest.raises(ResumeRejected) as caught:
            await collect(client.stream("sim", PROMPT))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.partial is not None and caught.value.partial.last_seq == 1


async def test_a_wrong_digest_at_the_end_raises_digest_mismatch():
    server = ScriptedRelay([[started(), chunk(1), chunk(2), end_for("t1 t2", 2)]])
    async with server.running() as address, RelayClient(address) as client:
        with pytest.raises(DigestMismatch) as caught:
            await collect(client.stream("sim", PROMPT))
    assert caught.value.partial is not None and caught.value.partial.text == text_upto(2)


async def test_a_seq_gap_raises_protocol_violation():
    server = ScriptedRelay([[started(), chunk(1), chunk(3), end_for(text_upto(3), 3)]])
    async with server.running() as address, RelayClient(address) as client:
        with pytest.raises(ProtocolViolation, match="1 chunk"):
            await collect(client.stream("sim", PROMPT))


async def test_a_first_event_that_is_not_started_raises_protocol_violation():
    server = ScriptedRelay([[chunk(1)]])
    async with server.running() as address, RelayClient(address) as client:
        with pytest.raises(ProtocolViolation, match="started"):
            await collect(client.stream("sim", PROMPT))


async def test_cancel_sends_a_cancel_request():
    cancelled_end = pb.StreamEvent(
        end=pb.StreamEnd(finish_reason="cancelled", total_seq=1, text_sha256=text_sha256("t1 "))
    )
    gate = asyncio.Event()

    class WaitsForCancel(ScriptedRelay):
        async def Stream(self, request_iterator, context):
            requests = aiter(request_iterator)
            self.first_requests.append(await anext(requests))
            yield started()
            yield chunk(1)
            self.later_requests.append(await anext(requests))
            gate.set()
            yield cancelled_end

    server = WaitsForCancel([])
    async with server.running() as address, RelayClient(address) as client:
        relay_stream = client.stream("sim", PROMPT)
        events = []
        async for event in relay_stream:
            events.append(event)
            if isinstance(event, Chunk):
                await relay_stream.cancel("enough")
    assert gate.is_set()
    assert server.later_requests[0].cancel.reason == "enough"
    assert isinstance(events[-1], End) and events[-1].finish_reason == "cancelled"


async def test_resume_without_the_earlier_text_cannot_verify_but_still_checks_the_count():
    server = ScriptedRelay([[started(resumed=True), chunk(3), end_for(text_upto(3), 3)]])
    async with server.running() as address, RelayClient(address) as client:
        events = await collect(client.resume("tok", 2))
    end = events[-1]
    assert isinstance(end, End) and not end.verified
    assert server.first_requests[0].resume.last_seq == 2


async def test_resume_with_the_earlier_text_verifies_the_whole_digest():
    server = ScriptedRelay([[started(resumed=True), chunk(3), end_for(text_upto(3), 3)]])
    async with server.running() as address, RelayClient(address) as client:
        relay_stream = client.resume("tok", 2, text_so_far=text_upto(2))
        events = await collect(relay_stream)
    end = events[-1]
    assert isinstance(end, End) and end.verified
    assert relay_stream.text == text_upto(3)


# --- against a real gateway, through a real proxy ---------------------------------------------


@pytest.fixture
async def gateway(clock: ManualClock) -> AsyncIterator[RelayServer]:
    # On a ManualClock with its timers out of reach (QUIET): a stream paced on
    # it (PACED) makes a chunk only when the test lets it (`produce`), so it
    # is exactly where the test wants it when the proxy cuts it, however fast
    # or slow the machine. Unpaced streams run to their end by themselves.
    server = await RelayServer.start(Settings(port=0, resume_secret=SECRET, **QUIET), clock=clock)
    try:
        yield server
    finally:
        await server.stop(grace=0.5)


def generation_for(gateway: RelayServer, stream_id: str) -> Generation:
    generation = gateway.hub.generation(stream_id)
    assert generation is not None, "the stream is not generating on the gateway"
    return generation


async def until_resumed(gateway: RelayServer) -> None:
    """Until a resumed call is attached to the gateway (the client is back)."""
    await eventually(lambda: any(session.resumed for session in gateway.hub.sessions()))


async def let_the_connect_window_pass(client_clock: ManualClock, seconds: float) -> None:
    """Once the client waits on an attempt's connect deadline (on its own
    clock), move that clock past it. Only for an attempt that can end no
    other way (nothing accepts its connection)."""
    await eventually(lambda: client_clock.pending > 0)
    await client_clock.run_for(seconds)


@pytest.fixture
async def proxy(gateway: RelayServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy.for_target(gateway.address) as fault_proxy:
        yield fault_proxy


async def reference_text(address: str, max_tokens: int, seed: str) -> str:
    async with RelayClient(address) as client:
        result = await client.generate(
            "sim", PROMPT, max_tokens=max_tokens, metadata={"sim.seed": seed}
        )
    return result.text


async def test_a_clean_stream_is_contiguous_and_verified(gateway):
    async with RelayClient(gateway.address) as client:
        relay_stream = client.stream("sim", PROMPT, max_tokens=45)
        events = await collect(relay_stream)
    assert isinstance(events[0], Started) and not events[0].resumed
    assert [c.seq for c in chunks(events)] == list(range(1, 46))
    end = events[-1]
    assert isinstance(end, End)
    assert end.verified and not end.partial and end.total_seq == 45
    assert end.text_sha256 == text_sha256("".join(c.text for c in chunks(events)))
    assert relay_stream.reconnects == 0 and relay_stream.duplicates_dropped == 0


async def test_generate_collects_the_verified_text(gateway):
    async with RelayClient(gateway.address) as client:
        result = await client.generate("sim", PROMPT, max_tokens=20)
    assert result.chunks == 20
    assert result.end.text_sha256 == text_sha256(result.text)


async def test_a_connection_cut_mid_stream_is_resumed_seamlessly(gateway, clock, proxy):
    expected = await reference_text(gateway.address, 40, "cut")
    sleep = RecordingSleep()
    async with RelayClient(proxy.address, sleep=sleep) as client:
        relay_stream = client.stream(
            "sim", PROMPT, max_tokens=40, metadata={**PACED, "sim.seed": "cut"}
        )
        events = []
        async for event in relay_stream:
            events.append(event)
            if isinstance(event, Started):
                # Ten chunks on the first connection, then the stream waits
                # (mid-generation) for the cut; the rest once the client is back.
                generation = generation_for(gateway, event.stream_id)
                await produce(clock, gateway, generation, 30 if event.resumed else 10)
            if isinstance(event, Chunk) and event.seq == 10:
                assert generation.last_seq == 10  # still generating when it is cut
                assert proxy.cut_all() == 1
    seqs = [c.seq for c in chunks(events)]
    assert seqs == list(range(1, 41)), "every seq exactly once, in order"
    assert relay_stream.text == expected
    assert relay_stream.reconnects == 1
    assert [e.last_seq for e in events if isinstance(e, Reconnected)] == [10]
    resumed = [e for e in events if isinstance(e, Started) and e.resumed]
    assert len(resumed) == 1
    end = events[-1]
    assert isinstance(end, End) and end.verified and end.total_seq == 40
    assert proxy.connections_accepted == 2


async def test_an_unreachable_gateway_exhausts_reconnects_and_the_stream_resumes_later(
    gateway, clock, proxy
):
    expected = await reference_text(gateway.address, 30, "gone")
    sleep = RecordingSleep()
    # Each reconnect waits up to connect_timeout_s for a connection the proxy
    # keeps resetting: the window passes on the client's own manual clock.
    client_clock = ManualClock()
    async with RelayClient(
        proxy.address,
        sleep=sleep,
        max_reconnects=3,
        connect_timeout_s=0.2,
        deadline=client_clock.deadline,
    ) as client:
        relay_stream = client.stream(
            "sim", PROMPT, max_tokens=30, metadata={**PACED, "sim.seed": "gone"}
        )
        windows: list[asyncio.Task[None]] = []
        with pytest.raises(ReconnectsExhausted) as caught:
            async for event in relay_stream:
                if isinstance(event, Started):
                    generation = generation_for(gateway, event.stream_id)
                    await produce(clock, gateway, generation, 5)
                if isinstance(event, Chunk) and event.seq == 5:
                    proxy.refuse_new = True
                    proxy.cut_all()
                if isinstance(event, Reconnecting):
                    # Every connection is reset: the attempt can only run out of time.
                    windows.append(
                        asyncio.create_task(let_the_connect_window_pass(client_clock, 0.2))
                    )
        await asyncio.gather(*windows)
        partial = caught.value.partial
        assert partial is not None and partial.last_seq == 5
        assert partial.text == expected[: len(partial.text)]
        assert len(sleep.delays) == len(windows) == 3

        # The gateway kept the generation running (it waits for chunk 6);
        # once the network is back, the partial stream resumes and the whole
        # digest checks out.
        assert not generation.finished.is_set() and generation.last_seq == 5
        proxy.refuse_new = False
        resumed = client.resume(partial.resume_token, partial.last_seq, text_so_far=partial.text)
        reading = asyncio.create_task(collect(resumed))
        await until_resumed(gateway)
        await produce(clock, gateway, generation, 25)
        events = await reading
    assert [c.seq for c in chunks(events)] == list(range(partial.last_seq + 1, 31))
    assert resumed.text == expected
    end = events[-1]
    assert isinstance(end, End) and end.verified


async def test_an_unknown_model_fails_at_once_without_reconnecting(gateway):
    sleep = RecordingSleep()
    async with RelayClient(gateway.address, sleep=sleep) as client:
        with pytest.raises(StreamFailed) as caught:
            await client.generate("no-such-model", PROMPT)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert sleep.delays == []


async def test_a_gateway_never_reached_is_reported_by_its_connection_error():
    # Issue 8: reconnects wait for the channel, and a dead address used to
    # end in "no StreamStarted within 2 s" instead of the refused connection.
    sleep = RecordingSleep()
    client_clock = ManualClock()
    with socket.socket() as dead:  # bound, never listening: connections are refused
        dead.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{dead.getsockname()[1]}"
        async with RelayClient(
            address,
            sleep=sleep,
            max_reconnects=2,
            connect_timeout_s=0.2,
            deadline=client_clock.deadline,
        ) as client:
            relay_stream = client.stream("sim", PROMPT)
            events: list[Event] = []
            windows: list[asyncio.Task[None]] = []
            with pytest.raises(ReconnectsExhausted) as caught:
                async for event in relay_stream:
                    events.append(event)
                    if isinstance(event, Reconnecting):
                        # A reconnect waits for a channel that never connects:
                        # only its window ends it. (The first attempt ends by
                        # the refusal itself: its window never passes.)
                        windows.append(
                            asyncio.create_task(let_the_connect_window_pass(client_clock, 0.2))
                        )
            await asyncio.gather(*windows)
    assert len(windows) == 2
    causes = [e.cause for e in events if isinstance(e, Reconnecting)]
    assert len(causes) == 2
    for cause in [*causes, caught.value.cause]:
        assert "Connection refused" in cause, cause
        assert "no StreamStarted" not in cause
    assert relay_stream.stream_id == ""


class SilentRelay(pbg.RelayServicer):
    """Accepts the call and never answers."""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def Stream(self, request_iterator, context):
        self.called.set()
        await asyncio.Event().wait()  # until the client cancels the call
        yield pb.StreamEvent()  # pragma: no cover - never reached


async def test_a_gateway_that_connects_but_never_starts_says_so():
    server = grpc.aio.server()
    silent = SilentRelay()
    pbg.add_RelayServicer_to_server(silent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client_clock = ManualClock()
    try:
        async with RelayClient(
            f"127.0.0.1:{port}",
            sleep=RecordingSleep(),
            max_reconnects=0,
            connect_timeout_s=0.2,
            deadline=client_clock.deadline,
        ) as client:
            reading = asyncio.create_task(collect(client.stream("sim", PROMPT)))
            # The call reached the server, which will never answer: only the
            # window is left to pass.
            async with asyncio.timeout(10):  # a guard against hanging only
                await silent.called.wait()
            await let_the_connect_window_pass(client_clock, 0.2)
            with pytest.raises(ReconnectsExhausted) as caught:
                await reading
    finally:
        await server.stop(grace=None)
    assert caught.value.cause == "no StreamStarted within 0.2 s"


async def test_a_forged_resume_token_is_rejected(gateway):
    sleep = RecordingSleep()
    async with RelayClient(gateway.address, sleep=sleep) as client:
        result = await client.generate("sim", PROMPT, max_tokens=3)
        forged = f"v2.k0.-.{result.stream_id}.1.9999999999." + "A" * 43
        with pytest.raises(ResumeRejected):
            await collect(client.resume(forged, 0))
    assert sleep.delays == []


async def test_the_same_idempotency_key_attaches_to_the_same_stream(gateway):
    async with RelayClient(gateway.address) as client:
        first = await client.generate("sim", PROMPT, max_tokens=8, idempotency_key="same-key")
        again = client.stream("sim", PROMPT, max_tokens=8, idempotency_key="same-key")
        events = await collect(again)
    assert isinstance(events[0], Started) and events[0].resumed
    assert events[0].stream_id == first.stream_id
    assert again.text == first.text


async def test_cancel_ends_the_stream_with_finish_cancelled(gateway, clock):
    async with RelayClient(gateway.address) as client:
        relay_stream = client.stream("sim", PROMPT, max_tokens=500, metadata=PACED)
        async for event in relay_stream:
            if isinstance(event, Started):
                await produce(clock, gateway, generation_for(gateway, event.stream_id), 3)
            if isinstance(event, Chunk) and event.seq == 3:
                await relay_stream.cancel("enough")  # while it waits for chunk 4
    assert relay_stream.end is not None
    assert relay_stream.end.finish_reason == "cancelled"
    assert relay_stream.end.verified
    assert relay_stream.last_seq == relay_stream.end.total_seq == 3


# --- chat and demo -------------------------------------------------------------------------------


async def test_chat_prints_the_answer_to_stdout_and_a_summary_to_stderr(gateway):
    expected = await reference_text(gateway.address, 12, "0")
    out, err = io.StringIO(), io.StringIO()
    code = await run_chat(
        gateway.address, PROMPT[0][1], max_tokens=12, metadata={"sim.seed": "0"}, out=out, err=err
    )
    assert code == EXIT_OK
    assert out.getvalue() == expected + "\n"
    assert "12 chunks" in err.getvalue() and "verified" in err.getvalue()


async def test_chat_reports_a_bad_request_with_exit_code_1(gateway):
    out, err = io.StringIO(), io.StringIO()
    code = await run_chat(gateway.address, "hi", model="no-such-model", out=out, err=err)
    assert code == EXIT_FAILED
    assert out.getvalue() == ""
    assert "INVALID_ARGUMENT" in err.getvalue()


async def test_chat_to_a_dead_address_says_it_cannot_reach_it_and_why():
    # `tokenrelay chat --reconnects 1` to a dead address (test_cli runs the
    # command with no reconnect): the reconnect's window passes on the
    # client's own clock once chat has said it is trying again.
    client_clock = ManualClock()
    out, err = io.StringIO(), io.StringIO()
    with socket.socket() as dead:  # bound, never listening: connections are refused
        dead.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{dead.getsockname()[1]}"
        async with RelayClient(
            address,
            sleep=RecordingSleep(),
            max_reconnects=1,
            connect_timeout_s=0.2,
            backoff_base_s=0.0,
            deadline=client_clock.deadline,
        ) as client:
            chat = asyncio.create_task(run_chat(address, "hi", client=client, out=out, err=err))
            await eventually(lambda: "trying again" in err.getvalue())
            await let_the_connect_window_pass(client_clock, 0.2)
            code = await chat
    assert code == EXIT_FAILED
    assert out.getvalue() == ""
    said = err.getvalue()
    assert "no StreamStarted" not in said, said
    assert f"[cannot reach the gateway at {address}: " in said and "attempt 1/1]" in said
    [last] = said.splitlines()[-1:]
    assert last.startswith(f"error: the gateway at {address} is unreachable: ")
    assert "Connection refused" in last, said


@pytest.mark.parametrize("terminal", [False, True], ids=["plain lines", "live display"])
async def test_the_demo_survives_its_cut_and_passes_its_checks(gateway, clock, terminal):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=120)

    async def let_the_demo_stream() -> None:
        # Paced on the gateway's manual clock: ten chunks, then the stream
        # waits (mid-generation) while the demo cuts and resumes; the rest
        # once it is back. So the cut always lands while chunks are still due.
        await eventually(lambda: bool(gateway.hub.generations()))
        [generation] = gateway.hub.generations()
        await produce(clock, gateway, generation, 10)
        await until_resumed(gateway)
        await produce(clock, gateway, generation, 20)

    async with asyncio.TaskGroup() as group:
        demo = group.create_task(
            run_demo(
                gateway.address,
                tokens=30,
                pace_ms=1000.0,  # PACED: a chunk only when the clock moves
                cut_after=10,
                console=console,
                backoff_base_s=0.0,
            )
        )
        group.create_task(let_the_demo_stream())
    code = demo.result()
    output = buffer.getvalue()
    assert code == 0, output
    assert "reconnect" in output
    assert "same text as an uninterrupted run" in output


def test_the_demo_refuses_a_cut_after_the_end():
    with pytest.raises(ValueError, match="cut_after"):
        asyncio.run(run_demo(tokens=10, cut_after=10))


async def test_chat_exits_2_on_a_partial_answer_and_says_why():
    partial_end = pb.StreamEvent(
        end=pb.StreamEnd(
            finish_reason="error",
            partial=True,
            error=pb.StreamError(code="ECONNRESET", message="upstream reset", fatal=True),
            total_seq=2,
            text_sha256=text_sha256(text_upto(2)),
        )
    )
    server = ScriptedRelay([[started(), chunk(1), chunk(2), partial_end]])
    out, err = io.StringIO(), io.StringIO()
    async with server.running() as address:
        code = await run_chat(address, "hi", out=out, err=err)
    assert code == EXIT_PARTIAL
    assert out.getvalue() == text_upto(2) + "\n"
    assert "ECONNRESET" in err.getvalue()


async def test_chat_keeps_reconnect_messages_out_of_the_answer():
    server = ScriptedRelay(
        [
            [started(), chunk(1), unavailable()],
            [started(resumed=True), chunk(2), end_for(text_upto(2), 2)],
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    async with server.running() as address, scripted_client(address, RecordingSleep()) as client:
        code = await run_chat(address, "hi", client=client, out=out, err=err)
    assert code == EXIT_OK
    assert out.getvalue() == text_upto(2) + "\n"
    assert "connection lost at seq 1" in err.getvalue()
    assert "1 reconnect(s)" in err.getvalue()


async def test_leaving_early_keeps_the_generation_for_a_later_resume(gateway, clock):
    expected = await reference_text(gateway.address, 25, "later")
    async with RelayClient(gateway.address) as client:
        relay_stream = client.stream(
            "sim", PROMPT, max_tokens=25, metadata={**PACED, "sim.seed": "later"}
        )
        async with relay_stream:
            async for event in relay_stream:
                if isinstance(event, Started):
                    generation = generation_for(gateway, event.stream_id)
                    await produce(clock, gateway, generation, 5)
                if isinstance(event, Chunk) and event.seq == 5:
                    break
        partial = relay_stream.partial()
        assert partial.last_seq == 5
        await eventually(lambda: gateway.hub.attached_sessions == 0)
        assert not generation.finished.is_set()  # kept, waiting for chunk 6
        resumed = client.resume(partial.resume_token, partial.last_seq, text_so_far=partial.text)
        collecting = asyncio.create_task(resumed.collect())
        await until_resumed(gateway)
        await produce(clock, gateway, generation, 20)
        result = await collecting
    assert result.text == expected
    assert result.end.verified


async def test_a_partial_answer_is_a_result_unless_strict():
    from tokenrelay_client import PartialAnswer, RelayClient
    from tokenrelay_server.api.server import RelayServer
    from tokenrelay_server.config.settings import Settings

    server = await RelayServer.start(
        Settings(
            port=0, resume_secret="0ce4090cfd1684b1c96b4da04f26be870a1b0790aaf6969d86f9b5e03c3aeb15"
        )
    )
    try:
        async with RelayClient(server.address) as client:
            kwargs = {
                "max_tokens": 20,
                "metadata": {"sim.faults": "http:401"},
            }
            result = await client.generate("sim", [("user", "hi")], **kwargs)
            assert result.partial and result.end.error is not None
            assert result.end.error.code == "HTTP_401"
            with pytest.raises(PartialAnswer) as caught:
                await client.generate("sim", [("user", "hi")], strict=True, **kwargs)
            assert caught.value.result.end.error.code == "HTTP_401"
    finally:
        await server.stop()


# --- agent turns: reasoning, tool calls, chunks_sha256 (issue 12) ---------------------------------


def records(*chunks_: pb.TokenChunk) -> bytes:
    """The contract's chunk records, written out here from relay.proto's
    comment (independently of both implementations)."""
    out = b""
    for c in chunks_:
        which = c.WhichOneof("content")
        if which == "tool_call":
            call = c.tool_call
            out += b"C" + call.index.to_bytes(4, "big")
            for part in (call.id, call.name, call.arguments):
                out += len(part.encode()).to_bytes(4, "big") + part.encode()
        else:
            value = c.reasoning if which == "reasoning" else c.text
            out += b"R" if which == "reasoning" else b"T"
            out += len(value.encode()).to_bytes(4, "big") + value.encode()
    return out


AGENT_CHUNKS = [
    pb.TokenChunk(seq=1, reasoning="Weather… ", provider="sim", attempt=1),
    pb.TokenChunk(seq=2, text="Let me look.", provider="sim", attempt=1),
    pb.TokenChunk(
        seq=3,
        tool_call=pb.ToolCallDelta(index=0, id="call_1", name="get_weather", arguments='{"city"'),
        provider="sim",
        attempt=1,
    ),
    pb.TokenChunk(
        seq=4,
        tool_call=pb.ToolCallDelta(index=0, arguments=': "Zürich"}'),
        provider="sim",
        attempt=1,
    ),
]


def agent_end(chunks_digest: str | None = None) -> pb.StreamEvent:
    return pb.StreamEvent(
        end=pb.StreamEnd(
            finish_reason="tool_calls",
            total_seq=4,
            text_sha256=text_sha256("Let me look."),
            chunks_sha256=(
                hashlib.sha256(records(*AGENT_CHUNKS)).hexdigest()
                if chunks_digest is None
                else chunks_digest
            ),
        )
    )


def agent_script(end: pb.StreamEvent) -> list[Step]:
    return [started(), *(pb.StreamEvent(chunk=c) for c in AGENT_CHUNKS), end]


async def test_reasoning_and_tool_call_chunks_are_events_and_the_result_assembles_them():
    server = ScriptedRelay([agent_script(agent_end())])
    async with server.running() as address, RelayClient(address) as client:
        relay_stream = client.stream("sim", PROMPT)
        events = await collect(relay_stream)
        result = await client.generate("sim", PROMPT)
    kinds = [c.kind for c in chunks(events)]
    assert kinds == ["reasoning", "text", "tool_call", "tool_call"]
    first = chunks(events)[0]
    assert (first.text, first.reasoning) == ("", "Weather… ")
    assert chunks(events)[2].tool_call == ToolCallDelta(0, "call_1", "get_weather", '{"city"')
    assert relay_stream.text == "Let me look."
    assert relay_stream.reasoning == "Weather… "
    assert relay_stream.tool_calls == (ToolCall("call_1", "get_weather", '{"city": "Zürich"}'),)
    end = events[-1]
    assert isinstance(end, End) and end.verified and end.chunks_verified
    assert result.tool_calls[0].parsed_arguments() == {"city": "Zürich"}
    assert result.reasoning == "Weather… " and result.text == "Let me look."


async def test_chunks_that_do_not_match_chunks_sha256_raise_digest_mismatch():
    server = ScriptedRelay([agent_script(agent_end("0" * 64))])
    async with server.running() as address, RelayClient(address) as client:
        with pytest.raises(DigestMismatch) as caught:
            await client.generate("sim", PROMPT)
    assert caught.value.expected_chunks_sha256 == "0" * 64
    assert caught.value.partial is not None
    assert caught.value.partial.tool_calls[0].name == "get_weather"


async def test_a_server_without_chunks_sha256_is_still_verified_by_the_text():
    server = ScriptedRelay([agent_script(agent_end(""))])
    async with server.running() as address, RelayClient(address) as client:
        result = await client.generate("sim", PROMPT)
    assert result.end.verified and not result.end.chunks_verified


async def test_a_resume_mid_stream_cannot_check_the_chunks_but_checks_the_text():
    end = agent_end()
    server = ScriptedRelay([[started(resumed=True), pb.StreamEvent(chunk=AGENT_CHUNKS[3]), end]])
    async with server.running() as address, RelayClient(address) as client:
        relay_stream = client.resume("tok", 3, text_so_far="Let me look.")
        events = await collect(relay_stream)
    assert isinstance(events[-1], End) and events[-1].verified
    assert not events[-1].chunks_verified


async def test_tools_tool_choice_the_policy_and_tool_messages_reach_the_server():
    server = ScriptedRelay([[started(), end_for("", 0)]])
    async with server.running() as address, RelayClient(address) as client:
        await client.generate(
            "sim",
            [
                ("user", "Weather?"),
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [ToolCall("call_1", "get_weather", '{"city": "Oslo"}')],
                },
                tool_result("call_1", "8 C"),
            ],
            tools=[Tool("get_weather", "The weather", {"type": "object"}), {"name": "no_args"}],
            tool_choice={"name": "get_weather"},
            policy={"tool_calls": "stream"},
        )
    start = server.first_requests[0].start
    assert [t.name for t in start.tools] == ["get_weather", "no_args"]
    assert start.tools[0].parameters_json == '{"type": "object"}'
    assert start.tools[1].parameters_json == ""
    assert start.tool_choice.tool_name == "get_weather"
    assert start.policy.tool_calls == pb.TOOL_CALL_MODE_STREAM
    assert start.messages[1].tool_calls[0].arguments_json == '{"city": "Oslo"}'
    assert (start.messages[2].role, start.messages[2].tool_call_id) == ("tool", "call_1")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"tool_choice": "sometimes"}, "tool_choice", id="an unknown tool choice"),
        pytest.param(
            {"policy": {"tool_calls": "partly"}}, "tool_calls", id="an unknown tool call mode"
        ),
    ],
)
async def test_bad_agent_options_are_refused_before_any_call(kwargs, match):
    async with RelayClient("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match=match):
            client.stream("sim", PROMPT, **kwargs)


WEATHER_TOOL = Tool(
    "get_weather", "The weather now", {"type": "object", "properties": {"city": {"type": "string"}}}
)


async def test_an_agent_loop_calls_a_tool_sends_the_result_and_gets_the_answer(gateway):
    async with RelayClient(gateway.address) as client:
        conversation: list = [("user", "What is the weather in Zürich?")]
        turn = await client.generate(
            "sim", conversation, tools=[WEATHER_TOOL], metadata={"sim.reasoning": "3"}
        )
        assert turn.end.finish_reason == "tool_calls" and turn.end.chunks_verified
        assert turn.reasoning and turn.text
        (call,) = turn.tool_calls
        assert call.name == "get_weather" and "city" in call.parsed_arguments()
        conversation += [turn.assistant_message(), tool_result(call.id, '{"celsius": 21}')]
        final = await client.generate("sim", conversation, tools=[WEATHER_TOOL], max_tokens=15)
    assert final.end.finish_reason == "stop" and not final.tool_calls
    assert final.text and final.end.verified and final.end.chunks_verified


async def test_chat_shows_reasoning_and_tool_calls_on_stderr_and_only_the_answer_on_stdout(gateway):
    out, err = io.StringIO(), io.StringIO()
    code = await run_chat(
        gateway.address,
        "weather?",
        metadata={"sim.reasoning": "4"},
        tools=[WEATHER_TOOL],
        tool_calls="stream",
        out=out,
        err=err,
        color=True,
    )
    assert code == EXIT_OK
    async with RelayClient(gateway.address) as client:
        reference = await client.generate(
            "sim", [("user", "weather?")], tools=[WEATHER_TOOL], metadata={"sim.reasoning": "4"}
        )
    assert out.getvalue() == reference.text + "\n"
    printed = err.getvalue()
    assert "[reasoning] " in printed and "\x1b[2m" in printed  # dimmed
    (call,) = reference.tool_calls
    assert f"[tool call get_weather] {call.arguments}\n" in printed
    assert "finish 'tool_calls', 1 tool call(s)" in printed


async def test_chat_holds_a_tool_call_until_the_answers_line_ends_when_they_share_a_screen():
    tool_piece = pb.StreamEvent(
        chunk=pb.TokenChunk(
            seq=2, tool_call=pb.ToolCallDelta(index=0, id="c", name="f", arguments="{}")
        )
    )
    records_ = records(pb.TokenChunk(seq=1, text="Sure"), tool_piece.chunk)
    end = pb.StreamEvent(
        end=pb.StreamEnd(
            finish_reason="tool_calls",
            total_seq=2,
            text_sha256=text_sha256("Sure"),
            chunks_sha256=hashlib.sha256(records_).hexdigest(),
        )
    )
    text_chunk = pb.StreamEvent(chunk=pb.TokenChunk(seq=1, text="Sure"))
    server = ScriptedRelay([[started(), text_chunk, tool_piece, end]])
    screen = io.StringIO()  # stdout and stderr on one screen
    async with server.running() as address:
        code = await run_chat(address, "hi", out=screen, err=screen)
    assert code == EXIT_OK
    assert screen.getvalue().startswith("Sure\n[tool call f] {}\n")
