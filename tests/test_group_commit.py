"""Group commit (store/group_commit.py; issue 10, item 1).

The writer's rules are tested on their own with a `send` scripted in the
test (the writer's only dependency: it knows nothing of Redis), then over a
real Redis and a real Redis Cluster through `RedisStore`: many streams'
appends become few script calls, each stream's log is exact, one stream's
refusal fails only its append, and a batch Redis never acknowledges fails
all of its appends, typed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
from redis.asyncio import Redis

from logkit import chunk, end, meta
from redisproc import RedisProcess
from tokenrelay_server.core.errors import StreamNotFound
from tokenrelay_server.core.model import LogEntry
from tokenrelay_server.store.errors import StoreUnavailable, StreamFenced
from tokenrelay_server.store.group_commit import GroupCommit, Outcome, PendingAppend
from tokenrelay_server.store.redis import RedisStore


class ScriptedStore:
    """A `send` whose batches the test releases one by one (so what is on
    the wire at any moment is the test's choice), recording what each held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.refuse: dict[str, BaseException] = {}
        self.fail_next: BaseException | None = None
        self._gates: list[asyncio.Future[None]] = []
        self.auto = False

    async def send(self, batch: Sequence[PendingAppend]) -> list[Outcome]:
        self.batches.append([p.stream_id for p in batch])
        if not self.auto:
            gate = asyncio.get_running_loop().create_future()
            self._gates.append(gate)
            await gate
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return [self.refuse.get(p.stream_id) for p in batch]

    def release(self) -> None:
        """Acknowledge the oldest batch on the wire."""
        gate = next(g for g in self._gates if not g.done())
        gate.set_result(None)

    @property
    def on_wire(self) -> int:
        return sum(1 for g in self._gates if not g.done())


async def settle() -> None:
    """Let every task that can run, run (no time passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_appends_of_one_step_go_in_one_batch() -> None:
    store = ScriptedStore()
    store.auto = True
    writer = GroupCommit(store.send)
    await asyncio.gather(*(writer.append(f"s{i}", None, 1) for i in range(50)))
    assert store.batches == [[f"s{i}" for i in range(50)]]
    assert (writer.stats.batches, writer.stats.appends, writer.stats.entries) == (1, 50, 50)


async def test_a_posted_append_is_answered_by_its_callback_in_the_batchs_own_step() -> None:
    """`post` (the per-token path): each callback is called once, in batch
    order, before the batch's step returns (no loop step of its own), with
    None or what the store answered; one callback that raises loses no
    other's answer."""
    store = ScriptedStore()
    store.refuse["s2"] = StreamNotFound("s2")
    writer = GroupCommit(store.send, max_wait_s=0)
    answers: list[tuple[str, Outcome]] = []
    errors: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    def done(name: str) -> Callable[[Outcome], None]:
        def record(outcome: Outcome) -> None:
            answers.append((name, outcome))
            if name == "s1":
                raise ValueError("a caller's bug")

        return record

    for i in range(4):
        writer.post(f"s{i}", None, 1, done(f"s{i}"))
    await settle()
    assert store.on_wire == 1 and answers == []
    store.release()
    # The batch's task wakes on the release; its callbacks run in that step.
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [name for name, _ in answers] == ["s0", "s1", "s2", "s3"]
    assert [outcome for name, outcome in answers if name != "s2"] == [None, None, None]
    assert isinstance(dict(answers)["s2"], StreamNotFound)
    assert [str(context["exception"]) for context in errors] == ["a caller's bug"]
    await settle()
    assert len(answers) == 4  # once each


async def test_appends_gather_while_the_slots_are_busy_and_go_when_one_returns() -> None:
    store = ScriptedStore()
    writer = GroupCommit(store.send, max_in_flight=1, max_wait_s=0)
    first = asyncio.ensure_future(writer.append("a", None, 1))
    await settle()
    assert store.batches == [["a"]]
    later = [asyncio.ensure_future(writer.append(f"s{i}", None, 1)) for i in range(10)]
    await settle()
    assert store.on_wire == 1 and writer.waiting == 10  # nothing more was sent
    assert not any(f.done() for f in later)
    store.release()
    await settle()
    assert first.done() and store.batches[1] == [f"s{i}" for i in range(10)]
    store.release()
    await asyncio.gather(*later)


async def test_a_batch_waits_for_company_until_it_is_full() -> None:
    # max_wait far off: a lone append waits for more; the append that fills
    # the batch sends it at once.
    store = ScriptedStore()
    writer = GroupCommit(store.send, max_entries=4, max_in_flight=2, max_wait_s=3600)
    tasks = [asyncio.ensure_future(writer.append(f"s{i}", None, 1)) for i in range(3)]
    await settle()
    assert store.batches == []  # 3 entries: under max_entries, the clock is far off
    tasks.append(asyncio.ensure_future(writer.append("s3", None, 1)))
    await settle()
    assert store.batches == [["s0", "s1", "s2", "s3"]]
    store.release()
    await asyncio.gather(*tasks)


async def test_a_waiting_append_goes_after_max_wait_on_a_free_slot() -> None:
    store = ScriptedStore()
    writer = GroupCommit(store.send, max_entries=100, max_in_flight=2, max_wait_s=0.0)
    first = asyncio.ensure_future(writer.append("a", None, 1))
    await settle()
    second = asyncio.ensure_future(writer.append("b", None, 1))
    await settle()
    # max_wait 0: b is due at once and the second slot is free.
    assert store.batches == [["a"], ["b"]]
    store.release()
    store.release()
    await asyncio.gather(first, second)


async def test_a_batch_never_exceeds_max_entries_and_a_big_append_goes_alone() -> None:
    store = ScriptedStore()
    store.auto = True
    writer = GroupCommit(store.send, max_entries=10)
    await asyncio.gather(
        writer.append("big", None, 25), *(writer.append(f"s{i}", None, 3) for i in range(6))
    )
    sizes = list(writer.stats.sizes)
    assert sum(sizes) == 25 + 18
    assert sizes[0] == 25  # one append is never split
    assert max(sizes[1:]) <= 10


async def test_one_stream_is_never_twice_on_the_wire_and_stays_in_order() -> None:
    store = ScriptedStore()
    writer = GroupCommit(store.send, max_in_flight=4, max_wait_s=0.0)
    one = asyncio.ensure_future(writer.append("a", 1, 1))
    await settle()
    two = asyncio.ensure_future(writer.append("a", 2, 1))
    other = asyncio.ensure_future(writer.append("b", 1, 1))
    await settle()
    # b took a free slot; a's second append waits for its first.
    assert store.batches == [["a"], ["b"]]
    store.release()
    await settle()
    assert one.done() and store.batches[2] == ["a"]
    store.release()
    store.release()
    await asyncio.gather(two, other)


async def test_a_refusal_fails_only_its_append() -> None:
    store = ScriptedStore()
    store.auto = True
    store.refuse["bad"] = StreamFenced("stale epoch")
    writer = GroupCommit(store.send)
    results = await asyncio.gather(
        writer.append("good", None, 1), writer.append("bad", None, 1), return_exceptions=True
    )
    assert results[0] is None
    assert isinstance(results[1], StreamFenced)
    assert store.batches == [["good", "bad"]]


async def test_a_failed_batch_fails_each_of_its_appends_and_the_next_batch_goes() -> None:
    store = ScriptedStore()
    store.auto = True
    store.fail_next = StoreUnavailable("Redis did not answer")
    writer = GroupCommit(store.send)
    results = await asyncio.gather(
        *(writer.append(f"s{i}", None, 1) for i in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert writer.stats.failed_batches == 1
    await writer.append("s0", None, 1)  # the writer goes on
    assert writer.stats.batches == 1


async def test_a_cancelled_waiter_does_not_stop_the_batch_or_the_writer() -> None:
    store = ScriptedStore()
    writer = GroupCommit(store.send, max_in_flight=1, max_wait_s=0)
    first = asyncio.ensure_future(writer.append("a", None, 1))
    await settle()
    queued = asyncio.ensure_future(writer.append("b", None, 1))
    await settle()
    queued.cancel()  # never sent: dropped from the queue
    first.cancel()  # on the wire: the batch is still answered
    await settle()
    store.release()
    await settle()
    assert store.batches == [["a"]]
    store.auto = True
    await writer.append("c", None, 1)
    assert store.batches == [["a"], ["c"]]


async def test_close_sends_what_is_queued_then_refuses() -> None:
    store = ScriptedStore()
    writer = GroupCommit(store.send, max_in_flight=1, max_wait_s=0)
    tasks = [asyncio.ensure_future(writer.append("a", None, 1))]
    await settle()
    tasks += [asyncio.ensure_future(writer.append(f"s{i}", None, 1)) for i in range(4)]
    await settle()
    assert writer.waiting == 4  # queued behind the batch on the wire
    closing = asyncio.ensure_future(writer.close())
    store.release()
    await settle()
    assert not closing.done() and store.batches[1] == ["s0", "s1", "s2", "s3"]
    store.release()
    await closing
    await asyncio.gather(*tasks)
    with pytest.raises(RuntimeError, match="closed"):
        await writer.append("late", None, 1)


def test_settings_are_checked() -> None:
    async def send(batch: Sequence[PendingAppend]) -> list[Outcome]:
        return []

    with pytest.raises(ValueError, match="max_entries"):
        GroupCommit(send, max_entries=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        GroupCommit(send, max_wait_s=-1)
    with pytest.raises(ValueError, match="max_in_flight"):
        GroupCommit(send, max_in_flight=0)


# --- over a real Redis --------------------------------------------------------------------


async def evalsha_calls(client: Redis) -> int:
    """EVALSHA calls that ran (a NOSCRIPT before the script is loaded is a failed call)."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))


async def write_streams(store: RedisStore, streams: list[str], chunks: int) -> None:
    """Each stream appends its chunks one awaited append at a time, all
    streams at once (as generations do)."""

    async def one(stream_id: str) -> None:
        for seq in range(1, chunks + 1):
            await store.append(stream_id, [chunk(seq)])
        await store.append(stream_id, [end(chunks)])

    await asyncio.gather(*(one(s) for s in streams))


async def test_redis_many_streams_share_script_calls_and_every_log_is_exact(
    own_redis: RedisProcess,
) -> None:
    # A Redis of its own: its command counts are this test's alone.
    store = RedisStore.from_url(own_redis.url)
    counter = Redis.from_url(own_redis.url)
    try:
        streams = [f"gc-{i}" for i in range(60)]
        for stream_id in streams:
            await store.create(meta(stream_id))
        before = await evalsha_calls(counter)
        await write_streams(store, streams, chunks=20)
        calls = await evalsha_calls(counter) - before
        stats = store.group_commit.stats
        assert stats.appends == 60 * 21
        # Batched: far fewer script calls than appends (one per batch).
        assert calls == stats.batches
        assert stats.batches * 4 <= stats.appends
        for stream_id in streams:
            entries: list[LogEntry] = await store.read(stream_id, after_seq=0)
            assert entries == [*(chunk(s) for s in range(1, 21)), end(20)]
    finally:
        await counter.aclose()
        await store.close()


async def test_redis_a_refused_append_fails_alone_in_its_batch(
    redis_url: str, redis_prefix: str
) -> None:
    # One writer fenced, one gap, one unknown stream, in one batch with good
    # appends: each refusal is its own, typed as the memory store's.
    store = RedisStore.from_url(redis_url, prefix=redis_prefix, group_commit_max_in_flight=1)
    try:
        for stream_id in ("good", "fenced", "gap"):
            await store.create(meta(stream_id))
        assert await store.acquire_lease("fenced", "me", 10) == 1
        await store.release_lease("fenced", "me")
        assert await store.acquire_lease("fenced", "other", 10) == 2
        results = await asyncio.gather(
            store.append("good", [chunk(1)]),
            store.append("fenced", [chunk(1)], epoch=1),
            store.append("gap", [chunk(2)]),
            store.append("never-created", [chunk(1)]),
            return_exceptions=True,
        )
        assert results[0] is None
        assert isinstance(results[1], StreamFenced)
        assert isinstance(results[2], ValueError) and "does not follow" in str(results[2])
        assert isinstance(results[3], StreamNotFound)
        assert store.group_commit.stats.largest_batch == 4  # all four went together
        assert await store.read("good", 0) == [chunk(1)]
        assert await store.read("fenced", 0) == []
        assert await store.read("gap", 0) == []
    finally:
        await store.close()


async def test_redis_a_batch_redis_never_acknowledges_fails_every_append_typed(
    own_redis: RedisProcess,
) -> None:
    store = RedisStore.from_url(own_redis.url, retry_window_s=0.2)
    try:
        for i in range(5):
            await store.create(meta(f"s{i}"))
        own_redis.stop()
        results = await asyncio.gather(
            *(store.append(f"s{i}", [chunk(1)]) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert "did not answer" in str(results[0])
    finally:
        await store.close()


async def test_redis_cluster_batches_streams_of_many_slots(
    redis_cluster_url: str, redis_cluster_prefix: str
) -> None:
    store = RedisStore.from_url(redis_cluster_url, prefix=redis_cluster_prefix, cluster=True)
    try:
        streams = [f"gc-{i}" for i in range(40)]  # spread over the three masters' slots
        for stream_id in streams:
            await store.create(meta(stream_id))
        await write_streams(store, streams, chunks=10)
        stats = store.group_commit.stats
        assert stats.appends == 40 * 11
        assert stats.batches * 4 <= stats.appends
        for stream_id in streams:
            assert await store.read(stream_id, after_seq=0) == [
                *(chunk(s) for s in range(1, 11)),
                end(10),
            ]
    finally:
        await store.close()
