"""Fixtures and helpers for tests that talk to a real gateway over a real port.

Loaded as a pytest plugin from conftest.py. `relay_factory` starts
`RelayServer`s on port 0 and stops them after the test; `RawCall` drives one
`Relay.Stream` call with a request queue the test controls.

Time: a test that needs the gateway's timers starts it on a `ManualClock`
(the `clock` fixture) with `QUIET` timers, so only what it means to happen
happens, and moves the clock itself: `produce` lets a stream paced on the
clock (`PACED`) make its next chunks one at a time; `keeping_time`
(tokenrelay_devtools.timekeeper) moves it whenever every stream provably
waits on time (a backoff, a stalled upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_devtools.timekeeper import TimeKeeper, keeping_time
from tokenrelay_server.api.server import RelayServer, store_sealer
from tokenrelay_server.config.settings import Settings, build_settings, read_config_file
from tokenrelay_server.core.clock import Clock, ManualClock
from tokenrelay_server.engine.generation import Generation
from tokenrelay_server.store.base import StreamStore
from tokenrelay_server.store.redis import RedisStore

SECRET = "53aeb5c1447de373d55030726116959bfa0af6629f4c952589dff538009ae41c"

# Timers far beyond any clock move of a test, so only the timer a test means
# to reach fires. (A Redis lease lapses on the Redis server's own clock: 600 s
# of real time is beyond any test too.)
QUIET: dict[str, Any] = {
    "stall_timeout_s": 10_000,
    "first_token_timeout_s": 10_000,
    "detach_grace_s": 3_600,
    "lease_ttl_s": 600,
}
# A sim stream paced at a token per second of the manual clock: it only
# moves when the clock does.
PACED = {"sim.pace_ms": "1000"}

RelayFactory = Callable[..., Awaitable[RelayServer]]

# Tenant API keys (issue 13): a gateway started with `auth=TENANTS` needs one
# of these on every Relay call (`key=` of RawCall and run_to_end).
ACME_KEY = "trk_acme_" + "a1" * 20
GLOBEX_KEY = "trk_globex_" + "b2" * 20


def tenants(**limits: dict[str, Any]) -> dict[str, Any]:
    """An `auth` setting: keys acme-1 (ACME_KEY) and globex-1 (GLOBEX_KEY),
    and the given [tenants.*] tables."""
    return {
        "keys": [
            {
                "id": "acme-1",
                "tenant": "acme",
                "sha256": hashlib.sha256(ACME_KEY.encode()).hexdigest(),
            },
            {
                "id": "globex-1",
                "tenant": "globex",
                "sha256": hashlib.sha256(GLOBEX_KEY.encode()).hexdigest(),
            },
        ],
        "tenants": limits,
    }


TENANTS = tenants()


def bearer(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if key is None else (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def no_stray_tasks() -> AsyncIterator[None]:
    """Fails the test if it left an asyncio task running."""
    before = asyncio.all_tasks()
    yield
    stray = [t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()]
    assert not stray, stray


@pytest.fixture
async def relay_factory() -> AsyncIterator[RelayFactory]:
    servers: list[RelayServer] = []

    async def start(
        store_instance: StreamStore | None = None,
        *,
        clock: Clock | None = None,
        lag_clock: Clock | None = None,
        **overrides: Any,
    ) -> RelayServer:
        # No shedding on event-loop lag unless a test asks for it: a gateway in
        # the test's process shares the test's loop, whose lag on a loaded
        # machine is the machine's, not the gateway's.
        values: dict[str, Any] = {"port": 0, "resume_secret": SECRET, "max_loop_lag_ms": 0}
        values.update(overrides)
        server = await RelayServer.start(
            Settings(**values), store=store_instance, clock=clock, lag_clock=lag_clock
        )
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(grace=0.5)


@pytest.fixture
async def upstream(clock: ManualClock) -> AsyncIterator[MockUpstream]:
    """The mock upstream on the test's clock, on a free port."""
    mock = MockUpstream(clock=clock)
    await mock.start("127.0.0.1", 0)
    yield mock
    await mock.stop()


@contextlib.asynccontextmanager
async def configured_gateway(
    config_text: str,
    *,
    upstream: MockUpstream,
    relay_factory: RelayFactory,
    tmp_path: Path,
    clock: ManualClock,
) -> AsyncIterator[RelayServer]:
    """A gateway on `clock` configured by `config_text` (its `{base_url}` is
    the mock upstream's), read as `serve --config` reads a file, with a time
    keeper moving the clock while every stream waits on it."""
    config = tmp_path / "tokenrelay.toml"
    config.write_text(config_text.format(base_url=upstream.base_url))
    values = read_config_file(config)
    settings = build_settings(values)
    relay = await relay_factory(clock=clock, **{k: getattr(settings, k) for k in values})
    async with keeping_time(clock, relay, upstream):
        yield relay


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> RelayServer:
    return await relay_factory()


@pytest.fixture
async def channel(relay: RelayServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(relay.address) as channel:
        yield channel


def start_request(
    *,
    model: str = "sim",
    prompt: str = "tell me about streams",
    max_tokens: int | None = 30,
    metadata: dict[str, str] | None = None,
    idempotency_key: str = "",
    checkpoint_interval: int | None = None,
    max_retries: int | None = None,
) -> pb.StreamRequest:
    params = pb.GenerationParams()
    if max_tokens is not None:
        params.max_tokens = max_tokens
    policy = pb.RecoveryPolicy()
    if checkpoint_interval is not None:
        policy.checkpoint_interval = checkpoint_interval
    if max_retries is not None:
        policy.max_retries = max_retries
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model=model,
            messages=[pb.Message(role="user", content=prompt)],
            params=params,
            idempotency_key=idempotency_key,
            policy=policy,
            metadata=metadata or {},
        )
    )


def resume_request(token: str, last_seq: int) -> pb.StreamRequest:
    return pb.StreamRequest(resume=pb.ResumeStream(resume_token=token, last_seq=last_seq))


class RawCall:
    """One Relay.Stream call whose requests the test sends one by one."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *first: pb.StreamRequest,
        key: str | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        self._outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        for request in first:
            self._outbox.put_nowait(request)
        self.call = pbg.RelayStub(channel).Stream(
            self._requests(), metadata=metadata if metadata is not None else bearer(key)
        )

    async def _requests(self) -> AsyncIterator[pb.StreamRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def send(self, request: pb.StreamRequest) -> None:
        self._outbox.put_nowait(request)

    def half_close(self) -> None:
        self._outbox.put_nowait(None)

    async def next_event(self) -> pb.StreamEvent:
        event = await self.call.read()
        if event is grpc.aio.EOF:
            raise EOFError("the call ended")
        return event

    async def events_until(
        self, stop: Callable[[pb.StreamEvent], bool] = lambda e: e.HasField("end")
    ) -> list[pb.StreamEvent]:
        events = []
        while True:
            event = await self.next_event()
            events.append(event)
            if stop(event):
                return events

    def cancel(self) -> None:
        self.call.cancel()


def chunks_of(events: list[pb.StreamEvent]) -> list[pb.TokenChunk]:
    return [e.chunk for e in events if e.HasField("chunk")]


def text_of(events: list[pb.StreamEvent]) -> str:
    return "".join(c.text for c in chunks_of(events))


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def end_of(events: list[pb.StreamEvent]) -> pb.StreamEnd:
    ends = [e.end for e in events if e.HasField("end")]
    assert len(ends) == 1, f"expected one end, got {len(ends)}"
    return ends[0]


async def run_to_end(
    channel: grpc.aio.Channel, request: pb.StreamRequest, *, key: str | None = None
) -> list[pb.StreamEvent]:
    call = RawCall(channel, request, key=key)
    try:
        return await call.events_until()
    finally:
        call.cancel()


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    *,
    within_s: float = 10.0,
    poll_s: float = 0.01,
) -> None:
    """Wait until `predicate()` holds (it may be async: a question to a
    server, Redis or another process), checking every `poll_s`; fail after
    `within_s`. The bound only guards against hanging; no test asserts how
    long it took."""
    async with asyncio.timeout(within_s):
        while True:
            held = predicate()
            if inspect.isawaitable(held):
                held = await held
            if held:
                return
            await asyncio.sleep(poll_s)


def generation_of(relay: RelayServer, started: pb.StreamEvent) -> Generation:
    """The running generation of the stream a `started` event names."""
    generation = relay.hub.generation(started.started.stream_id)
    assert generation is not None, "the stream is not generating here"
    return generation


async def produce(
    clock: ManualClock, relay: RelayServer, generation: Generation, count: int
) -> None:
    """Let a stream paced on `clock` (PACED) store `count` more chunks, one at
    a time: each time it provably waits for its next token (and nothing on
    the gateway waits on anything else), move the clock to that token."""
    keeper = TimeKeeper(clock, relay)
    target = generation.last_seq + count
    while generation.last_seq < target:
        seq = generation.last_seq
        await eventually(keeper.waiting_on_time, poll_s=0.001)
        assert await keeper.move_once()
        await eventually(
            lambda seq=seq: generation.last_seq > seq or generation.phase == "done", poll_s=0.001
        )
        assert generation.last_seq > seq, "the stream ended before it had produced enough"


def assert_contiguous(chunks: list[pb.TokenChunk], first: int = 1) -> None:
    seqs = [c.seq for c in chunks]
    assert seqs == list(range(first, first + len(seqs))), f"seq not contiguous: {seqs}"


def gateway_store(url: str, **kwargs: Any) -> RedisStore:
    """A Redis store that reads what a test gateway wrote: its values are
    sealed with the gateway's resume secret (SECRET)."""
    return RedisStore.from_url(url, sealer=store_sealer(Settings(resume_secret=SECRET)), **kwargs)


def assert_shed(
    error: grpc.aio.AioRpcError,
    reason: str,
    retry_after_s: float,
    code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
) -> None:
    """Load shed: `code` (RESOURCE_EXHAUSTED for a start), an ErrorInfo
    naming `reason`, a RetryInfo and retry-after-ms saying `retry_after_s`."""
    assert error.code() == code, error
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin on the refusal"
    found: dict[str, object] = {}
    for any_detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    info = found["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (reason, "tokenrelay.v1")
    retry = found["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == round(retry_after_s * 1e9)
    trailing = dict(error.trailing_metadata() or ())
    assert trailing["retry-after-ms"] == str(round(retry_after_s * 1000))
