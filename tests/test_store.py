"""One suite for every `StreamStore` (base.py): each test runs against the
memory store, the Redis store, and the Redis store on a local three-master
Redis Cluster (issue 9 defect 8: every script's keys in one slot), so the
gateway cannot tell them apart.

Time: the memory store runs on a `ManualClock` that tests move forward; Redis
TTLs run on the server's real clock, so there the same tests poll (with a
bound) for the expected state. No test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import BlockingConnectionPool, Redis

from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import ErrorType, Fault, StreamNotFound, SuggestedAction
from tokenrelay_server.core.model import (
    Chunk,
    End,
    GenerationParams,
    LogEntry,
    Message,
    Notice,
    RecoveryPolicy,
    StartRequest,
    StreamMeta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from tokenrelay_server.store import MemoryStore, StreamStore, StreamTail
from tokenrelay_server.store.codec import decode_entry, decode_meta, encode_meta
from tokenrelay_server.store.errors import StoreUnavailable, StreamFenced
from tokenrelay_server.store.group_commit import PendingAppend
from tokenrelay_server.store.redis import RedisStore

# Redis TTLs are real: polls for "it expired" give up after this many rounds.
POLL_ROUNDS = 500
POLL_INTERVAL_S = 0.01
# A hang guard for calls that must return at once: far above any real latency.
HANG_GUARD_S = 10.0

NETWORK_BLIP = Fault(
    type=ErrorType.NETWORK,
    code="upstream_reset",
    message="connection reset; retrying (接続がリセットされました)",
    retryable=True,
    suggested_action=SuggestedAction.RETRY,
    fatal=False,
    bytes_received=120,
    tokens_received=3,
    provider="sim",
    attempt=1,
    retry_after_s=0.25,
)


# --- the two stores -------------------------------------------------------------


@dataclass
class Backend:
    """Opens stores of one kind and lets time pass for them."""

    kind: str
    clock: ManualClock
    redis_url: str | None = None
    redis_prefix: str | None = None
    opened: list[StreamStore] = field(default_factory=list)

    def open(self, *, retention_s: float = 3600.0) -> StreamStore:
        store: StreamStore
        if self.kind == "memory":
            store = MemoryStore(retention_s=retention_s, clock=self.clock)
        else:
            assert self.redis_url is not None and self.redis_prefix is not None
            # The clock only dates idempotency-key refreshes here; a ManualClock
            # also proves that `wait` does not time out on it.
            store = RedisStore.from_url(
                self.redis_url,
                retention_s=retention_s,
                prefix=self.redis_prefix,
                clock=self.clock,
                cluster=self.kind == "cluster",
            )
        self.opened.append(store)
        return store

    async def let_time_pass(self, seconds: float, until: Callable[[], Awaitable[bool]]) -> bool:
        """Move time on by `seconds`, then report whether `until()` holds. On
        Redis time moves by itself: poll `until()` a bounded number of times."""
        if self.kind == "memory":
            self.clock.advance(seconds)
            return await until()
        for _ in range(POLL_ROUNDS):
            if await until():
                return True
            await asyncio.sleep(POLL_INTERVAL_S)
        return False

    async def parked_waiters(self) -> int:
        """How many readers wait on the Redis stores opened here (all share
        each store's one watcher, store/follow.py); 0 for memory."""
        if self.kind == "memory":
            return 0
        return sum(s.watcher.waiting for s in self.opened if isinstance(s, RedisStore))

    async def until_parked(self, count: int) -> None:
        """Best effort: return once `count` readers wait and (one server) the
        watcher's blocking read is parked in Redis, so an append really has
        to wake them. Correctness never depends on it."""
        if self.kind == "memory":
            for _ in range(10):
                await asyncio.sleep(0)
            return
        for _ in range(POLL_ROUNDS):
            if await self.parked_waiters() >= count and await self._blocked() >= (
                1 if self.kind == "redis" else 0
            ):
                return
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _blocked(self) -> int:
        assert self.redis_url is not None
        if self.kind == "cluster":
            return 0  # the cluster's watcher polls: nothing blocks
        async with Redis.from_url(self.redis_url) as client:
            return int((await client.info("clients"))["blocked_clients"])


@pytest.fixture(params=["memory", "redis", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        backend = Backend("memory", ManualClock())
    elif request.param == "redis":
        backend = Backend(
            "redis",
            ManualClock(),
            redis_url=request.getfixturevalue("redis_url"),
            redis_prefix=request.getfixturevalue("redis_prefix"),
        )
    else:
        backend = Backend(
            "cluster",
            ManualClock(),
            redis_url=request.getfixturevalue("redis_cluster_url"),
            redis_prefix=request.getfixturevalue("redis_cluster_prefix"),
        )
    yield backend
    for store in backend.opened:
        await store.close()


@pytest.fixture
def store(backend: Backend) -> StreamStore:
    return backend.open()


# --- helpers ----------------------------------------------------------------------


def new_stream_id() -> str:
    return f"st-{uuid.uuid4().hex}"


def make_meta(stream_id: str | None = None, *, key: str = "") -> StreamMeta:
    request = StartRequest(
        model="sim-fast",
        messages=(Message("system", "Be brief."), Message("user", "Say hi in 日本語 🚀")),
        params=GenerationParams(max_tokens=64, temperature=0.2, top_p=None, stop=("\n\n",)),
        idempotency_key=key,
        policy=RecoveryPolicy(max_retries=2, allow_fallback=True),
        metadata=(("tenant", "acme"), ("trace", "abc")),
    )
    return StreamMeta(
        stream_id=stream_id or new_stream_id(),
        model="sim-fast",
        created_at=1_700_000_000.25,
        checkpoint_interval=8,
        request=request,
        idempotency_key=key,
        extra={"region": "eu-west", "note": "ünïcödé 🚀"},
    )


async def new_stream(store: StreamStore, *, key: str = "") -> str:
    meta, created = await store.create(make_meta(key=key))
    assert created
    return meta.stream_id


def chunk(seq: int, text: str | None = None) -> Chunk:
    return Chunk(seq=seq, text=f"tok{seq} " if text is None else text, provider="sim", attempt=1)


def notice(after_seq: int) -> Notice:
    return Notice(after_seq=after_seq, fault=NETWORK_BLIP)


def end(total_seq: int) -> End:
    return End(
        finish_reason="stop",
        total_seq=total_seq,
        text_sha256="0" * 64,
        usage=Usage(prompt_tokens=11, completion_tokens=total_seq),
    )


async def read_all(store: StreamStore, stream_id: str) -> list[LogEntry]:
    return await store.read(stream_id, after_seq=0, limit=100_000)


# --- create, meta, delete -------------------------------------------------------------


async def test_create_then_get_meta_returns_the_same_meta(store: StreamStore) -> None:
    meta = make_meta(key="k-meta")
    assert await store.create(meta) == (meta, True)
    assert await store.get_meta(meta.stream_id) == meta


async def test_unknown_stream_has_no_meta_tail_lease_or_cancel(store: StreamStore) -> None:
    stream_id = new_stream_id()
    assert await store.get_meta(stream_id) is None
    assert await store.tail(stream_id) is None
    assert await store.lease_owner(stream_id) is None
    assert await store.renew_lease(stream_id, "replica-a", 1.0) is False
    assert await store.cancel_requested(stream_id) is None


async def test_log_operations_on_unknown_stream_raise_key_error(store: StreamStore) -> None:
    stream_id = new_stream_id()
    with pytest.raises(StreamNotFound):
        await store.append(stream_id, [chunk(1)])
    with pytest.raises(StreamNotFound):
        await store.read(stream_id, after_seq=0)
    with pytest.raises(StreamNotFound):
        await store.wait(stream_id, after_seq=0, timeout_s=0.05)
    with pytest.raises(StreamNotFound):
        await store.acquire_lease(stream_id, "replica-a", 1.0)
    with pytest.raises(StreamNotFound):
        await store.request_cancel(stream_id, "nobody is listening")


async def test_idempotency_key_returns_existing_stream(store: StreamStore) -> None:
    first = make_meta(key="retry-me")
    await store.create(first)
    await store.append(first.stream_id, [chunk(1)])

    again, created = await store.create(make_meta(key="retry-me"))

    assert (again, created) == (first, False)
    assert await read_all(store, first.stream_id) == [chunk(1)]


async def test_retry_with_same_stream_id_and_key_keeps_the_log(store: StreamStore) -> None:
    meta = make_meta(key="same-id")
    await store.create(meta)
    await store.append(meta.stream_id, [chunk(1), chunk(2)])

    assert await store.create(meta) == (meta, False)
    assert await read_all(store, meta.stream_id) == [chunk(1), chunk(2)]


async def test_streams_without_idempotency_key_are_independent(store: StreamStore) -> None:
    first, second = make_meta(), make_meta()
    assert (await store.create(first))[1] is True
    assert (await store.create(second))[1] is True
    assert await store.get_meta(first.stream_id) == first
    assert await store.get_meta(second.stream_id) == second


async def test_concurrent_creates_with_same_key_make_one_stream(store: StreamStore) -> None:
    candidates = [make_meta(key="racy") for _ in range(12)]

    results = await asyncio.gather(*(store.create(meta) for meta in candidates))

    winners = [meta for meta, created in results if created]
    assert len(winners) == 1
    assert {meta.stream_id for meta, _ in results} == {winners[0].stream_id}
    for loser in candidates:
        if loser.stream_id != winners[0].stream_id:
            assert await store.get_meta(loser.stream_id) is None


async def test_delete_forgets_stream_and_key(store: StreamStore) -> None:
    meta = make_meta(key="undo-me")
    await store.create(meta)
    await store.append(meta.stream_id, [chunk(1)])
    assert await store.acquire_lease(meta.stream_id, "replica-a", 30.0)

    await store.delete(meta.stream_id)

    assert await store.get_meta(meta.stream_id) is None
    assert await store.tail(meta.stream_id) is None
    assert await store.lease_owner(meta.stream_id) is None
    with pytest.raises(StreamNotFound):
        await store.read(meta.stream_id, after_seq=0)
    fresh = make_meta(key="undo-me")
    assert await store.create(fresh) == (fresh, True)


async def test_delete_leaves_a_key_that_names_another_stream(store: StreamStore) -> None:
    old = make_meta(key="reused")
    await store.create(old)
    await store.delete(old.stream_id)
    new = make_meta(key="reused")
    await store.create(new)

    await store.delete(old.stream_id)  # a late second undo of the old stream

    assert await store.create(make_meta(key="reused")) == (new, False)


async def test_delete_of_unknown_stream_is_a_no_op(store: StreamStore) -> None:
    await store.delete(new_stream_id())


# --- the log ----------------------------------------------------------------------


async def test_read_after_seq_returns_later_entries_in_order(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), chunk(2)])
    await store.append(stream_id, [chunk(3)])
    await store.append(stream_id, [chunk(4), chunk(5)])

    assert await store.read(stream_id, after_seq=0) == [chunk(s) for s in range(1, 6)]
    assert await store.read(stream_id, after_seq=2) == [chunk(3), chunk(4), chunk(5)]
    assert await store.read(stream_id, after_seq=5) == []
    assert await store.read(stream_id, after_seq=9) == []


async def test_notices_sit_after_their_chunk(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    first_blip = notice(2)
    second_blip = Notice(after_seq=2, fault=NETWORK_BLIP.with_context(attempt=2))
    await store.append(stream_id, [chunk(1), chunk(2), first_blip, second_blip, chunk(3)])

    assert await store.read(stream_id, after_seq=2) == [first_blip, second_blip, chunk(3)]
    assert await store.read(stream_id, after_seq=1) == [chunk(2), first_blip, second_blip, chunk(3)]
    assert await store.read(stream_id, after_seq=3) == []


async def test_notices_before_the_first_chunk_follow_chunk_zero(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [notice(0)])
    await store.append(stream_id, [notice(0), chunk(1)])

    assert await store.read(stream_id, after_seq=0) == [notice(0), notice(0), chunk(1)]
    assert await store.read(stream_id, after_seq=1) == []


async def test_end_sorts_last(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), chunk(2), notice(2), end(2)])

    assert await store.read(stream_id, after_seq=2) == [notice(2), end(2)]
    assert await store.read(stream_id, after_seq=3) == []


async def test_end_of_an_empty_stream_is_its_only_entry(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [end(0)])

    assert await store.read(stream_id, after_seq=0) == [end(0)]
    assert await store.tail(stream_id) == StreamTail(last_seq=0, ended=True)


@pytest.mark.parametrize(
    "bad_seq",
    [pytest.param(4, id="a gap"), pytest.param(2, id="a repeat"), pytest.param(1, id="a rewind")],
)
async def test_append_rejects_gap_in_seq(store: StreamStore, bad_seq: int) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), chunk(2)])

    with pytest.raises(ValueError, match="does not follow"):
        await store.append(stream_id, [chunk(bad_seq)])

    assert await read_all(store, stream_id) == [chunk(1), chunk(2)]
    await store.append(stream_id, [chunk(3)])
    assert await store.tail(stream_id) == StreamTail(last_seq=3, ended=False)


async def test_first_chunk_must_be_seq_one(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    with pytest.raises(ValueError):
        await store.append(stream_id, [chunk(2)])
    assert await read_all(store, stream_id) == []


@pytest.mark.parametrize(
    "late_entry",
    [
        pytest.param(chunk(2), id="a chunk"),
        pytest.param(notice(1), id="a notice"),
        pytest.param(end(1), id="a second end"),
    ],
)
async def test_nothing_appends_after_end(store: StreamStore, late_entry: LogEntry) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), end(1)])

    with pytest.raises(ValueError, match="End"):
        await store.append(stream_id, [late_entry])

    assert await read_all(store, stream_id) == [chunk(1), end(1)]


async def test_empty_append_changes_nothing(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1)])
    await store.append(stream_id, [])
    assert await read_all(store, stream_id) == [chunk(1)]
    assert await store.tail(stream_id) == StreamTail(last_seq=1, ended=False)


async def test_tail_tracks_last_chunk_and_end(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    assert await store.tail(stream_id) == StreamTail(last_seq=0, ended=False)

    await store.append(stream_id, [chunk(1), chunk(2)])
    assert await store.tail(stream_id) == StreamTail(last_seq=2, ended=False)

    await store.append(stream_id, [notice(2)])
    assert await store.tail(stream_id) == StreamTail(last_seq=2, ended=False)

    await store.append(stream_id, [end(2)])
    assert await store.tail(stream_id) == StreamTail(last_seq=2, ended=True)


async def test_unicode_text_round_trips(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    texts = ["日本語 🚀", "e\u0301", "\u200b", '"quotes" \\ and \n newlines', "", "∑ ≠ ∞ 𓂀"]
    entries: list[LogEntry] = [chunk(seq, text) for seq, text in enumerate(texts, start=1)]
    retrying = NETWORK_BLIP.with_context(message="🚀 再試行")
    entries.append(Notice(after_seq=len(texts), fault=retrying))
    entries.append(end(len(texts)))
    await store.append(stream_id, entries)

    assert await read_all(store, stream_id) == entries


AGENT_REQUEST = StartRequest(
    model="sim",
    messages=(
        Message("user", "Weather in Zürich?"),
        Message(
            "assistant",
            "Let me look.",
            tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Zürich"}'),),
        ),
        Message("tool", '{"celsius": 21}', tool_call_id="call_1"),
    ),
    policy=RecoveryPolicy(tool_calls="stream"),
    tools=(
        Tool("get_weather", "The weather now", '{"type": "object"}'),
        Tool("no_args"),
    ),
    tool_choice=ToolChoice(tool_name="get_weather"),
)


async def test_an_agent_request_round_trips_for_a_takeover(store: StreamStore) -> None:
    meta = StreamMeta(
        stream_id=new_stream_id(),
        model="sim",
        created_at=1.5,
        checkpoint_interval=10,
        request=AGENT_REQUEST,
    )
    await store.create(meta)
    assert await store.get_meta(meta.stream_id) == meta


async def test_reasoning_and_tool_call_chunks_round_trip(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    entries: list[LogEntry] = [
        Chunk(1, "Thinking… 🤔", "sim", 1, tokens_so_far=0, kind="reasoning"),
        Chunk(2, "Let me look.", "sim", 1, tokens_so_far=3),
        Chunk(
            3,
            "",
            "sim",
            1,
            tokens_so_far=4,
            kind="tool_call",
            tool_call=ToolCallDelta(0, "call_1", "get_weather", '{"city": "Z'),
        ),
        Chunk(
            4,
            "",
            "sim",
            1,
            tokens_so_far=5,
            kind="tool_call",
            tool_call=ToolCallDelta(0, arguments='ürich"}'),
        ),
        Chunk(
            5,
            "",
            "sim",
            2,
            tokens_so_far=6,
            kind="tool_call",
            tool_call=ToolCallDelta(1, "c2", "f", "{}"),
        ),
        End("tool_calls", 5, "a" * 64, chunks_sha256="b" * 64),
    ]
    await store.append(stream_id, entries)
    assert await read_all(store, stream_id) == entries


def test_entries_and_requests_stored_before_agent_streams_still_decode() -> None:
    # Written by the codec before issue 12: no chunk kind, no chunks digest,
    # messages as [role, content], a policy without tool_calls.
    assert decode_entry('{"k":"c","s":1,"t":"hi","p":"sim","a":1,"n":1}') == Chunk(
        1, "hi", "sim", 1, tokens_so_far=1
    )
    old_end = '{"k": "e", "r": "stop", "s": 1, "h": "ab", "u": [1, 2], "p": false, "f": null}'
    assert decode_entry(old_end) == End("stop", 1, "ab", Usage(1, 2))
    old_meta = (
        '{"id": "st-1", "model": "sim", "created_at": 1.0, "checkpoint_interval": 10, '
        '"request": {"model": "sim", "messages": [["user", "hi"]], "params": {"max_tokens": '
        'null, "temperature": null, "top_p": null, "stop": []}, "idempotency_key": "", '
        '"policy": {"max_retries": null, "allow_fallback": null, "allow_partial": null, '
        '"checkpoint_interval": null}, "metadata": []}, "idempotency_key": "", "extra": {}}'
    )
    meta = decode_meta(old_meta)
    assert meta.request == StartRequest(model="sim", messages=(Message("user", "hi"),))
    assert decode_meta(encode_meta(meta)) == meta


async def test_read_limit_caps_entries(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(s) for s in range(1, 11)])

    assert await store.read(stream_id, after_seq=0, limit=3) == [chunk(1), chunk(2), chunk(3)]
    assert await store.read(stream_id, after_seq=8, limit=5) == [chunk(9), chunk(10)]


async def test_large_stream_reads_back_in_pages(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    total = 2_000
    entries: list[LogEntry] = [chunk(s) for s in range(1, total + 1)]
    entries.append(end(total))
    for start in range(0, len(entries), 100):
        await store.append(stream_id, entries[start : start + 100])

    pages: list[list[LogEntry]] = []
    after_seq = 0
    while True:
        page = await store.read(stream_id, after_seq=after_seq, limit=128)
        if not page:
            break
        pages.append(page)
        if isinstance(page[-1], End):
            break
        last_chunk = page[-1]
        assert isinstance(last_chunk, Chunk)
        after_seq = last_chunk.seq

    assert [entry for page in pages for entry in page] == entries
    assert all(len(page) <= 128 for page in pages)


# --- wait -------------------------------------------------------------------------


async def test_wait_returns_entries_already_there(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), chunk(2)])

    async with asyncio.timeout(HANG_GUARD_S):
        assert await store.wait(stream_id, after_seq=1, timeout_s=60.0) == [chunk(2)]


async def test_open_read_gives_meta_tail_and_entries_in_one_look(store: StreamStore) -> None:
    meta = make_meta()
    await store.create(meta)
    assert await store.open_read("no-such-stream", 0) is None
    await store.append(meta.stream_id, [chunk(1), notice(1), chunk(2), chunk(3)])
    start = await store.open_read(meta.stream_id, 1)
    assert start is not None
    assert start.meta == meta
    assert start.tail == StreamTail(3, False)
    assert start.entries == [notice(1), chunk(2), chunk(3)]
    assert (await store.open_read(meta.stream_id, 0, limit=2)) is not None
    limited = await store.open_read(meta.stream_id, 0, limit=2)
    assert limited is not None and limited.entries == [chunk(1), notice(1)]
    await store.append(meta.stream_id, [end(3)])
    ended = await store.open_read(meta.stream_id, 3)
    assert ended is not None and ended.tail == StreamTail(3, True) and ended.entries == [end(3)]


async def test_wait_past_the_notices_a_reader_saw_waits_for_something_new(
    backend: Backend, store: StreamStore
) -> None:
    # A follower that saw chunk 1 and the notice after it (the owner is in
    # its backoff) waits for the next entry instead of reading the notice
    # again and again.
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), notice(1)])
    assert await store.wait(stream_id, after_seq=1, timeout_s=30.0) == [notice(1)]
    parked_before = await backend.parked_waiters()
    waiting = asyncio.ensure_future(
        store.wait(stream_id, after_seq=1, timeout_s=30.0, seen_notices=1)
    )
    await backend.until_parked(parked_before + 1)
    for _ in range(10):
        await asyncio.sleep(0)
    assert not waiting.done()
    await store.append(stream_id, [chunk(2)])
    async with asyncio.timeout(HANG_GUARD_S):
        assert await waiting == [notice(1), chunk(2)]


async def test_wait_wakes_on_append(backend: Backend, store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1)])
    parked_before = await backend.parked_waiters()

    async with asyncio.TaskGroup() as tasks:
        waiters = [
            tasks.create_task(store.wait(stream_id, after_seq=1, timeout_s=30.0)) for _ in range(3)
        ]
        await backend.until_parked(parked_before + len(waiters))
        await store.append(stream_id, [notice(1), chunk(2)])

    for waiter in waiters:
        assert waiter.result() == [notice(1), chunk(2)]


async def test_wait_times_out_with_empty_list(backend: Backend, store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1)])

    waiter = asyncio.create_task(store.wait(stream_id, after_seq=1, timeout_s=0.05))
    if backend.kind == "memory":  # its timeout runs on the injected clock
        await backend.clock.run_for(0.05)
    async with asyncio.timeout(HANG_GUARD_S):
        assert await waiter == []


async def test_wait_returns_at_once_when_stream_has_ended(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), end(1)])

    async with asyncio.timeout(HANG_GUARD_S):
        assert await store.wait(stream_id, after_seq=1, timeout_s=60.0) == [end(1)]
        assert await store.wait(stream_id, after_seq=2, timeout_s=60.0) == []


async def test_cancelled_wait_leaves_the_store_usable(backend: Backend, store: StreamStore) -> None:
    # A client disconnect cancels its follower's wait mid-block.
    stream_id = await new_stream(store)
    parked_before = await backend.parked_waiters()
    async with asyncio.TaskGroup() as tasks:
        waiter = tasks.create_task(store.wait(stream_id, after_seq=0, timeout_s=30.0))
        await backend.until_parked(parked_before + 1)
        waiter.cancel()
    assert waiter.cancelled()

    await store.append(stream_id, [chunk(1)])
    assert await store.wait(stream_id, after_seq=0, timeout_s=30.0) == [chunk(1)]


# --- leases and cancellation --------------------------------------------------------


async def test_lease_acquire_renew_release(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    assert await store.lease_owner(stream_id) is None

    assert await store.acquire_lease(stream_id, "replica-a", 30.0) == 1  # the first epoch
    assert await store.acquire_lease(stream_id, "replica-b", 30.0) is None
    assert await store.acquire_lease(stream_id, "replica-a", 30.0) == 1  # the holder again
    assert await store.lease_owner(stream_id) == "replica-a"

    assert await store.renew_lease(stream_id, "replica-a", 30.0) is True
    assert await store.renew_lease(stream_id, "replica-b", 30.0) is False

    await store.release_lease(stream_id, "replica-b")  # not the holder: no effect
    assert await store.lease_owner(stream_id) == "replica-a"
    await store.release_lease(stream_id, "replica-a")
    assert await store.lease_owner(stream_id) is None
    assert await store.renew_lease(stream_id, "replica-a", 30.0) is False

    assert await store.acquire_lease(stream_id, "replica-b", 30.0) == 2  # changed hands
    assert await store.lease_owner(stream_id) == "replica-b"


async def test_lease_lapses(backend: Backend, store: StreamStore) -> None:
    stream_id = await new_stream(store)
    assert await store.acquire_lease(stream_id, "replica-a", 0.05) == 1

    async def lapsed() -> bool:
        return await store.lease_owner(stream_id) is None

    assert await backend.let_time_pass(0.1, until=lapsed)
    assert await store.renew_lease(stream_id, "replica-a", 30.0) is False
    assert await store.acquire_lease(stream_id, "replica-b", 30.0) == 2
    assert await store.lease_owner(stream_id) == "replica-b"


async def test_a_lapsed_lease_nobody_took_is_renewed_with_its_epoch(
    backend: Backend, store: StreamStore
) -> None:
    stream_id = await new_stream(store)
    epoch = await store.acquire_lease(stream_id, "replica-a", 0.05)

    async def lapsed() -> bool:
        return await store.lease_owner(stream_id) is None

    assert await backend.let_time_pass(0.1, until=lapsed)
    assert await store.renew_lease(stream_id, "replica-a", 30.0, epoch=epoch) is True
    assert await store.lease_owner(stream_id) == "replica-a"
    await store.append(stream_id, [chunk(1)], epoch=epoch)  # still the writer
    assert await store.read(stream_id, after_seq=0) == [chunk(1)]


async def test_a_takeover_fences_the_old_writer_end_included(
    backend: Backend, store: StreamStore
) -> None:
    stream_id = await new_stream(store)
    old = await store.acquire_lease(stream_id, "replica-a", 0.05)
    await store.append(stream_id, [chunk(1)], epoch=old)

    async def lapsed() -> bool:
        return await store.lease_owner(stream_id) is None

    assert await backend.let_time_pass(0.1, until=lapsed)  # A paused past its lease
    new = await store.acquire_lease(stream_id, "replica-b", 30.0)
    assert new is not None and old is not None and new > old
    await store.append(stream_id, [chunk(2)], epoch=new)

    for stale in ([chunk(3)], [notice(2)], [end(2)]):
        with pytest.raises(StreamFenced):
            await store.append(stream_id, stale, epoch=old)
    assert await store.renew_lease(stream_id, "replica-a", 30.0, epoch=old) is False
    await store.append(stream_id, [chunk(3), end(3)], epoch=new)
    assert await store.read(stream_id, after_seq=0) == [chunk(1), chunk(2), chunk(3), end(3)]


async def test_an_end_must_close_exactly_the_log_it_follows(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    await store.append(stream_id, [chunk(1), chunk(2)])
    for wrong in (1, 3):
        with pytest.raises(ValueError, match="total_seq"):
            await store.append(stream_id, [end(wrong)])
    assert await store.tail(stream_id) == StreamTail(2, False)
    await store.append(stream_id, [end(2)])
    assert await store.tail(stream_id) == StreamTail(2, True)


async def test_the_memory_and_redis_stores_are_always_reachable_or_say_so(
    store: StreamStore,
) -> None:
    await store.ping()  # a live store answers; an unreachable one: tests below
    assert store.label


async def test_cancel_request_round_trip(store: StreamStore) -> None:
    stream_id = await new_stream(store)
    assert await store.cancel_requested(stream_id) is None

    await store.request_cancel(stream_id, "client asked to stop 🛑")

    assert await store.cancel_requested(stream_id) == "client asked to stop 🛑"


# --- retention ----------------------------------------------------------------------


async def test_stream_expires_after_retention(backend: Backend) -> None:
    store = backend.open(retention_s=0.2)
    meta = make_meta(key="short-lived")
    await store.create(meta)
    await store.append(meta.stream_id, [chunk(1), notice(1)])
    await store.acquire_lease(meta.stream_id, "replica-a", 30.0)
    await store.request_cancel(meta.stream_id, "stop")

    async def gone() -> bool:
        return await store.get_meta(meta.stream_id) is None

    assert await backend.let_time_pass(0.3, until=gone)
    assert await store.tail(meta.stream_id) is None
    assert await store.lease_owner(meta.stream_id) is None
    assert await store.cancel_requested(meta.stream_id) is None
    with pytest.raises(StreamNotFound):
        await store.read(meta.stream_id, after_seq=0)
    fresh = make_meta(key="short-lived")
    assert await store.create(fresh) == (fresh, True)


# --- property: read returns exactly what follows a chunk ----------------------------

log_steps = st.lists(
    st.one_of(st.text(max_size=4), st.none()),  # text: a chunk; None: a notice
    max_size=25,
)


def entries_after_chunk(log: list[LogEntry], after_seq: int) -> list[LogEntry]:
    """Rule 1 of base.py, stated on the list of appended entries."""
    if after_seq == 0:
        return log
    for index, entry in enumerate(log):
        if isinstance(entry, Chunk) and entry.seq == after_seq:
            return log[index + 1 :]
    return []


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=log_steps, ended=st.booleans(), data=st.data())
async def test_read_returns_exactly_the_entries_after_a_chunk(
    store: StreamStore, steps: list[str | None], ended: bool, data: st.DataObject
) -> None:
    log: list[LogEntry] = []
    last_seq = 0
    for step in steps:
        if step is None:
            log.append(notice(last_seq))
        else:
            last_seq += 1
            log.append(chunk(last_seq, step))
    if ended:
        log.append(end(last_seq))

    stream_id = await new_stream(store)
    start = 0
    while start < len(log):  # appended in batches of random size
        size = data.draw(st.integers(min_value=1, max_value=5), label="batch size")
        await store.append(stream_id, log[start : start + size])
        start += size
    after_seq = data.draw(st.integers(min_value=0, max_value=last_seq + 2), label="after_seq")

    assert await store.read(stream_id, after_seq=after_seq) == entries_after_chunk(log, after_seq)


# --- Redis only: what the other replicas and the operator rely on ---------------------


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    async with Redis.from_url(redis_url) as client:
        yield client


async def test_redis_keys_of_a_stream_share_a_hash_tag_and_expire(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, retention_s=60.0)
    try:
        meta = make_meta(key="tagged")
        await store.create(meta)
        await store.append(meta.stream_id, [chunk(1)])
        await store.acquire_lease(meta.stream_id, "replica-a", 30.0)

        keys = sorted(k.decode() for k in await redis_client.keys(f"{redis_prefix}:*"))
        tag = f"{{{meta.stream_id}}}"
        assert keys == sorted(
            [
                f"{redis_prefix}:{tag}:log",
                f"{redis_prefix}:{tag}:meta",
                f"{redis_prefix}:{tag}:lease",
                f"{redis_prefix}:idem:tagged",
            ]
        )
        for key in keys:
            assert await redis_client.pttl(key) > 0, key
    finally:
        await store.close()


async def test_redis_append_refreshes_retention(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, retention_s=600.0)
    try:
        stream_id = await new_stream(store)
        await store.append(stream_id, [chunk(1)])
        stream_keys = [f"{redis_prefix}:{{{stream_id}}}:{part}" for part in ("meta", "log")]
        for key in stream_keys:  # as if the stream had sat idle for most of its retention
            await redis_client.pexpire(key, 1_000)

        await store.append(stream_id, [chunk(2)])

        for key in stream_keys:
            assert await redis_client.pttl(key) > 1_000, key
    finally:
        await store.close()


async def test_redis_parked_waiters_leave_the_command_pool_free(
    redis_url: str, redis_prefix: str
) -> None:
    # Two connections for commands; a pool this small would be used up by the
    # waiters below if they blocked on it, and the append would never get through.
    commands = Redis.from_pool(
        BlockingConnectionPool.from_url(redis_url, max_connections=2, timeout=HANG_GUARD_S)
    )
    store = RedisStore(commands, blocking_client=Redis.from_url(redis_url), prefix=redis_prefix)
    backend = Backend("redis", ManualClock(), redis_url=redis_url, redis_prefix=redis_prefix)
    backend.opened.append(store)
    try:
        stream_id = await new_stream(store)
        async with asyncio.TaskGroup() as tasks:
            waiters = [
                tasks.create_task(store.wait(stream_id, after_seq=0, timeout_s=30.0))
                for _ in range(5)
            ]
            await backend.until_parked(len(waiters))
            await store.append(stream_id, [chunk(1)])
        assert all(waiter.result() == [chunk(1)] for waiter in waiters)
    finally:
        await store.close()


def test_redis_prefix_must_not_contain_braces() -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisStore(Redis(), prefix="tr{x}")


async def test_redis_key_left_by_an_expired_stream_is_taken_over(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        old = make_meta(key="outlived")
        await store.create(old)
        # The idempotency key outlives its stream by design (it cannot be
        # refreshed in the append script); simulate the stream expiring first.
        await redis_client.delete(f"{redis_prefix}:{{{old.stream_id}}}:meta")

        new = make_meta(key="outlived")
        assert await store.create(new) == (new, True)
        assert await redis_client.get(f"{redis_prefix}:idem:outlived") == new.stream_id.encode()
    finally:
        await store.close()


async def test_redis_append_keeps_the_idempotency_key_alive(
    redis_url: str, redis_prefix: str, redis_client: Redis
) -> None:
    clock = ManualClock()
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, retention_s=600.0, clock=clock)
    idem_key = f"{redis_prefix}:idem:long-answer"
    try:
        meta = make_meta(key="long-answer")
        await store.create(meta)
        await redis_client.pexpire(idem_key, 1_000)

        await store.append(meta.stream_id, [chunk(1)])  # refreshed recently: left alone
        assert await redis_client.pttl(idem_key) <= 1_000

        clock.advance(150.0)  # a quarter of the retention
        await store.append(meta.stream_id, [chunk(2)])
        assert await redis_client.pttl(idem_key) > 600_000
    finally:
        await store.close()


async def test_redis_wait_survives_a_short_socket_timeout(
    redis_url: str, redis_prefix: str
) -> None:
    # from_url keeps the short timeout for commands but gives blocking reads room.
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, socket_timeout=0.05)
    try:
        stream_id = await new_stream(store)
        assert await store.wait(stream_id, after_seq=0, timeout_s=0.1) == []
        await store.append(stream_id, [chunk(1)])
        assert await store.wait(stream_id, after_seq=0, timeout_s=30.0) == [chunk(1)]
    finally:
        await store.close()


async def test_redis_wait_longer_than_the_socket_timeout_blocks_in_slices(
    redis_url: str, redis_prefix: str
) -> None:
    # Each blocking read must end before the socket timeout (1.2 s) fires.
    blocking = Redis.from_url(redis_url, socket_timeout=1.2)
    store = RedisStore(Redis.from_url(redis_url), blocking_client=blocking, prefix=redis_prefix)
    try:
        stream_id = await new_stream(store)
        assert await store.wait(stream_id, after_seq=0, timeout_s=1.5) == []
    finally:
        await store.close()


def test_redis_blocking_client_needs_room_for_a_blocking_read() -> None:
    with pytest.raises(ValueError, match="socket_timeout"):
        RedisStore(Redis(), blocking_client=Redis(socket_timeout=0.2))


async def test_redis_append_retried_after_an_unknown_outcome_is_stored_once(
    redis_url: str, redis_prefix: str
) -> None:
    # What `_run` does after a connection broke mid-append: run it again,
    # marked as a retry. The batch that landed is not stored twice; one that
    # did not land is stored; a gap or a different batch is still refused.
    store = RedisStore.from_url(redis_url, prefix=redis_prefix)
    try:
        stream_id = await new_stream(store)

        async def retry(entries: list[LogEntry]) -> None:
            # One batch of this stream's append, sent as the retry of a batch
            # whose outcome is unknown.
            pending = PendingAppend(
                stream_id,
                store._payload(stream_id, entries, None),
                len(entries),
                asyncio.get_running_loop().create_future(),
            )
            answers = await store._run(
                "append", stream_id, lambda _: store._append_batch([pending], True)
            )
            (outcome,), _ = store._outcomes([pending], answers)
            if outcome is not None:
                raise outcome

        await store.append(stream_id, [chunk(1), notice(1), chunk(2)])
        await retry([chunk(1), notice(1), chunk(2)])
        await retry([chunk(2)])
        assert await store.read(stream_id, after_seq=0) == [chunk(1), notice(1), chunk(2)]
        with pytest.raises(ValueError, match="does not follow"):
            await store.append(stream_id, [chunk(2)])  # not a retry: a duplicate
        different = Chunk(seq=2, text="something else", provider="sim", attempt=1)
        with pytest.raises(ValueError, match="does not follow"):
            await retry([different])
        with pytest.raises(ValueError, match="does not follow"):
            await retry([chunk(4)])
        await retry([chunk(3)])  # had not landed
        await retry([end(3)])
        await retry([end(3)])
        assert await store.read(stream_id, after_seq=2) == [chunk(3), end(3)]
    finally:
        await store.close()


async def test_redis_unreachable_raises_store_unavailable_naming_the_store() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", retry_window_s=0.05)
    try:
        with pytest.raises(StoreUnavailable, match=f"Redis store at redis://127.0.0.1:{port}"):
            await store.ping()
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await store.create(make_meta())
        with pytest.raises(StoreUnavailable):
            await store.append("some-stream", [chunk(1)])
        with pytest.raises(StoreUnavailable):
            await store.tail("some-stream")
    finally:
        await store.close()


def test_redis_urls_in_messages_hide_the_password() -> None:
    store = RedisStore.from_url("redis://user:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in store.label
    assert "user@127.0.0.1:1" in store.label
