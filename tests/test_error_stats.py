"""One suite for every `ErrorStats` (store/error_stats.py): each test runs on
the memory implementation and on real Redis, with a `ManualClock` whose wall
time the test sets and moves across minute, hour and day boundaries (both
implementations bucket by the injected clock, so Redis needs no waiting).
Then the recorder that feeds them from engine events."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction
from tokenrelay_server.engine.events import AttemptEnded
from tokenrelay_server.obs.error_recorder import ErrorRecorder
from tokenrelay_server.store.error_stats import (
    GRANULARITIES,
    ErrorRecord,
    ErrorRow,
    ErrorStats,
    MemoryErrorStats,
    Period,
)
from tokenrelay_server.store.error_stats_redis import MAX_CONNECTIONS, RedisErrorStats

# 30 s before midnight UTC at the end of a Sunday: the next minute, hour,
# day and (ISO) week all begin 30 s later.
T0 = datetime(2030, 1, 6, 23, 59, 30, tzinfo=UTC).timestamp()
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


def record(
    code: str = "ECONNRESET",
    *,
    at: float,
    error_type: ErrorType = ErrorType.NETWORK,
    provider: str = "sim",
    model: str = "sim",
    bytes_received: int = 0,
    tokens_received: int = 0,
    recoverable: bool = True,
) -> ErrorRecord:
    return ErrorRecord(
        type=error_type,
        code=code,
        provider=provider,
        model=model,
        bytes_received=bytes_received,
        tokens_received=tokens_received,
        recoverable=recoverable,
        at=at,
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(wall_start=T0)


@pytest.fixture(params=["memory", "redis", "cluster"])
async def stats(request: pytest.FixtureRequest, clock: ManualClock) -> AsyncIterator[ErrorStats]:
    implementation: ErrorStats
    if request.param == "memory":
        implementation = MemoryErrorStats(clock=clock)
    elif request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        implementation = RedisErrorStats.from_url(url, prefix=prefix, clock=clock)
    else:
        # A batch's buckets land on different masters (issue 9 defect 8).
        url = request.getfixturevalue("redis_cluster_url")
        prefix = request.getfixturevalue("redis_cluster_prefix")
        implementation = RedisErrorStats.from_url(url, prefix=prefix, clock=clock, cluster=True)
    yield implementation
    await implementation.close()


def counts(rows: list[ErrorRow]) -> dict[str, int]:
    return {row.code: row.count for row in rows}


# (time after T0 the error is read at, period, whether it still counts)
BOUNDARIES = [
    pytest.param(0.0, Period.HOUR, True, id="an error counts in the hour it happened"),
    pytest.param(0.0, Period.DAY, True, id="an error counts in the day it happened"),
    pytest.param(0.0, Period.WEEK, True, id="an error counts in the week it happened"),
    pytest.param(31.0, Period.HOUR, True, id="past midnight it is in the last hour"),
    pytest.param(31.0, Period.DAY, True, id="past midnight it is still in the last day"),
    pytest.param(31.0, Period.WEEK, True, id="past the start of a new week it is in the last week"),
    pytest.param(59 * MINUTE + 29, Period.HOUR, True, id="the 60th minute bucket still holds it"),
    pytest.param(59 * MINUTE + 30, Period.HOUR, False, id="when a 61st minute begins it is out"),
    pytest.param(59 * MINUTE + 30, Period.DAY, True, id="an hour later it is still in the day"),
    pytest.param(23 * HOUR + 29, Period.DAY, True, id="the 24th hour bucket still holds it"),
    pytest.param(23 * HOUR + 30, Period.DAY, False, id="when a 25th hour begins it leaves the day"),
    pytest.param(23 * HOUR + 30, Period.WEEK, True, id="a day later it is still in the week"),
    pytest.param(6 * DAY + 29, Period.WEEK, True, id="the 7th day bucket still holds it"),
    pytest.param(6 * DAY + 30, Period.WEEK, False, id="when an 8th day begins it leaves the week"),
]  # fmt: skip


@pytest.mark.parametrize(("later", "period", "counted"), BOUNDARIES)
async def test_an_error_counts_in_a_period_while_its_buckets_cover_it(
    stats: ErrorStats, clock: ManualClock, later: float, period: Period, counted: bool
) -> None:
    await stats.record([record(at=clock.wall())])
    clock.advance(later)
    assert counts(await stats.summary(period)) == ({"ECONNRESET": 1} if counted else {})


async def test_errors_on_both_sides_of_a_boundary_are_summed_where_both_are_covered(
    stats: ErrorStats, clock: ManualClock
) -> None:
    await stats.record([record(at=clock.wall() - 2 * HOUR)])  # earlier the same day
    await stats.record([record(at=clock.wall() - 10)])  # the last minute of the day
    clock.advance(40)  # into the next day, week and hour
    await stats.record([record(at=clock.wall())])
    assert counts(await stats.summary(Period.HOUR)) == {"ECONNRESET": 2}
    assert counts(await stats.summary(Period.DAY)) == {"ECONNRESET": 3}
    assert counts(await stats.summary(Period.WEEK)) == {"ECONNRESET": 3}


async def test_rows_group_by_type_and_code_with_averages_most_frequent_first(
    stats: ErrorStats, clock: ManualClock
) -> None:
    now = clock.wall()
    await stats.record(
        [
            record("HTTP_429", error_type=ErrorType.PROTOCOL, at=now, provider="a"),
            record("ECONNRESET", at=now, bytes_received=100, tokens_received=4, provider="a"),
            record("ECONNRESET", at=now, bytes_received=300, tokens_received=8, provider="b"),
            record("ECONNRESET", at=now, bytes_received=200, tokens_received=0, provider="b"),
            record(
                "HTTP_401",
                error_type=ErrorType.PROTOCOL,
                at=now,
                recoverable=False,
                provider="a",
                model="m2",
            ),
            record("HTTP_429", error_type=ErrorType.PROTOCOL, at=now, provider="a", model="m2"),
        ]
    )
    rows = await stats.summary(Period.HOUR)
    assert [(row.type, row.code, row.count) for row in rows] == [
        (ErrorType.NETWORK, "ECONNRESET", 3),
        (ErrorType.PROTOCOL, "HTTP_429", 2),
        (ErrorType.PROTOCOL, "HTTP_401", 1),
    ]
    reset = rows[0]
    assert reset.avg_bytes_received == 200.0
    assert reset.avg_tokens_received == 4.0
    assert reset.recoverable == 3
    assert reset.providers == ("b", "a")  # b had two of the three
    assert rows[2].recoverable == 0
    assert rows[1].providers == ("a",)  # one row over both upstream models


async def test_the_same_code_under_two_types_is_two_rows(
    stats: ErrorStats, clock: ManualClock
) -> None:
    now = clock.wall()
    await stats.record(
        [
            record("OVERLOADED", error_type=ErrorType.APPLICATION, at=now),
            record("OVERLOADED", error_type=ErrorType.PROTOCOL, at=now),
        ]
    )
    rows = await stats.summary(Period.DAY)
    assert sorted((row.type, row.code) for row in rows) == [
        (ErrorType.PROTOCOL, "OVERLOADED"),
        (ErrorType.APPLICATION, "OVERLOADED"),
    ]


async def test_codes_providers_and_models_of_any_text_come_back_as_they_went_in(
    stats: ErrorStats, clock: ManualClock
) -> None:
    odd = 'a "quoted", [bracketed] | piped: 名前'
    await stats.record([record(odd, at=clock.wall(), provider=odd, model=odd)])
    [row] = await stats.summary(Period.WEEK)
    assert row.code == odd and row.providers == (odd,)


async def test_an_empty_period_has_no_rows_and_an_empty_batch_changes_nothing(
    stats: ErrorStats, clock: ManualClock
) -> None:
    await stats.record([])
    for period in Period:
        assert await stats.summary(period) == []


async def test_memory_buckets_are_dropped_once_no_period_can_read_them(
    clock: ManualClock,
) -> None:
    stats = MemoryErrorStats(clock=clock)
    await stats.record([record(at=clock.wall())])
    assert stats.bucket_count == 3  # a minute, an hour and a day bucket
    clock.advance(2 * HOUR)
    await stats.record([])
    assert stats.bucket_count == 2  # the minute bucket is gone
    clock.advance(8 * DAY)
    await stats.record([])
    assert stats.bucket_count == 0


async def test_redis_buckets_expire_after_their_period_and_the_week_keeps_a_week(
    redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    stats = RedisErrorStats.from_url(redis_url, prefix=redis_prefix, clock=clock)
    try:
        await stats.record([record(at=clock.wall())])
        async with Redis.from_url(redis_url) as client:
            ttls = {}
            for granularity in GRANULARITIES.values():
                key = stats.bucket_key(granularity.name, granularity.index(clock.wall()))
                ttls[granularity.name] = await client.pttl(key) / 1000
                # Redis Cluster: the bucket's id is its key's hash tag.
                assert key.endswith(f"{{{granularity.name}{granularity.index(clock.wall())}}}")
    finally:
        await stats.close()
    # Each bucket lives until no period reads it (plus one bucket): the day
    # bucket of 23:59:30 for 7 days and 30 s, so the week holds a week.
    assert 60 * MINUTE < ttls["m"] <= 61 * MINUTE
    assert 24 * HOUR < ttls["h"] <= 25 * HOUR
    assert 7 * DAY < ttls["d"] <= 8 * DAY


async def test_replicas_writing_to_one_redis_add_into_the_same_buckets(
    redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    replicas = [
        RedisErrorStats.from_url(redis_url, prefix=redis_prefix, clock=clock) for _ in range(2)
    ]
    try:
        await replicas[0].record([record(at=clock.wall(), provider="a")])
        await replicas[1].record([record(at=clock.wall(), provider="b")] * 2)
        for replica in replicas:
            [row] = await replica.summary(Period.HOUR)
            assert row.count == 3 and row.providers == ("b", "a")
    finally:
        for replica in replicas:
            await replica.close()


# --- the recorder ------------------------------------------------------------------------


def attempt_ended(outcome: str, fault: Fault | None) -> AttemptEnded:
    return AttemptEnded(
        stream_id="s1",
        model="alias",
        provider="oa",
        upstream_model="gpt-x",
        attempt=1,
        outcome=outcome,
        fault=fault,
        deltas=3,
        completion_tokens=0,
        bytes_received=42,
        first_token_s=None,
        duration_s=0.1,
        at=0.0,
    )


RESET = Fault(
    type=ErrorType.NETWORK,
    code="ECONNRESET",
    message="reset",
    retryable=True,
    suggested_action=SuggestedAction.RESUME,
    bytes_received=42,
    tokens_received=3,
    provider="oa",
)
BREAKER_OPEN = Fault(
    type=ErrorType.APPLICATION,
    code="BREAKER_OPEN",
    message="open",
    retryable=True,
    suggested_action=SuggestedAction.FALLBACK,
)


@pytest.mark.parametrize(
    ("outcome", "fault", "recorded"),
    [
        pytest.param("failure", RESET, True, id="a failed attempt is recorded"),
        pytest.param("refused", BREAKER_OPEN, True, id="a refusal by an open breaker is recorded"),
        pytest.param("success", None, False, id="a success is not an error"),
        pytest.param("stopped", None, False, id="an attempt stopped from outside is not"),
    ],
)
async def test_the_recorder_records_every_classified_error_of_an_attempt(
    clock: ManualClock, outcome: str, fault: Fault | None, recorded: bool
) -> None:
    stats = MemoryErrorStats(clock=clock)
    recorder = ErrorRecorder(stats, clock)
    recorder(attempt_ended(outcome, fault))
    await recorder.flush()
    rows = await stats.summary(Period.HOUR)
    if not recorded:
        assert rows == []
        return
    assert fault is not None
    [row] = rows
    assert (row.type, row.code, row.count) == (fault.type, fault.code, 1)
    assert row.avg_bytes_received == fault.bytes_received
    assert row.avg_tokens_received == fault.tokens_received
    assert row.recoverable == 1 and row.providers == ("oa",)


async def test_the_recorder_writes_a_burst_in_one_batch_from_its_own_task(
    redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    stats = RedisErrorStats.from_url(redis_url, prefix=redis_prefix, clock=clock)
    recorder = ErrorRecorder(stats, clock)
    recorder.start()
    try:
        for _ in range(50):
            recorder(attempt_ended("failure", RESET))
        assert recorder.pending == 50  # the observer only queued them
        await recorder.stop()  # the writer's last batch is written on the way out
        [row] = await stats.summary(Period.DAY)
        assert row.count == 50
    finally:
        await stats.close()


def _dead_port() -> tuple[socket.socket, int]:
    # A bound socket that never listens: every connection to it is refused.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    return dead, int(dead.getsockname()[1])


async def test_a_store_that_fails_drops_records_counted_and_the_recorder_goes_on(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    dead, port = _dead_port()
    dropped: list[int] = []
    stats = RedisErrorStats.from_url(f"redis://127.0.0.1:{port}/0", clock=clock)
    recorder = ErrorRecorder(stats, clock, on_dropped=dropped.append)
    try:
        for _ in range(2):
            recorder(attempt_ended("failure", RESET))
            await recorder.flush()  # does not raise
    finally:
        await stats.close()
        dead.close()
    assert recorder.dropped == 2 and dropped == [1, 1]
    assert recorder.pending == 0
    warnings = [r for r in caplog.records if "error statistics" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per batch


async def test_the_recorder_queue_is_bounded(clock: ManualClock) -> None:
    stats = MemoryErrorStats(clock=clock)
    recorder = ErrorRecorder(stats, clock, max_pending=3)
    for _ in range(5):
        recorder(attempt_ended("failure", RESET))
    assert recorder.pending == 3 and recorder.dropped == 2
    await recorder.flush()
    [row] = await stats.summary(Period.HOUR)
    assert row.count == 3


async def test_the_redis_error_stats_use_a_bounded_pool_however_many_write_at_once(
    redis_url: str, redis_prefix: str, clock: ManualClock
) -> None:
    # Twenty writers at once (the recorder's task, Admin calls) share at most
    # MAX_CONNECTIONS connections: a slow Redis makes them wait, it never
    # makes the gateway open connection after connection.
    name = f"errstats-{redis_prefix}"
    stats = RedisErrorStats.from_url(redis_url, prefix=redis_prefix, clock=clock, client_name=name)
    observer = Redis.from_url(redis_url, decode_responses=True)
    try:
        await asyncio.gather(*(stats.record([record(at=clock.wall())]) for _ in range(20)))
        clients = await observer.client_list()
        ours = [c for c in clients if c.get("name") == name]
        assert 1 <= len(ours) <= MAX_CONNECTIONS
        assert counts(await stats.summary(Period.HOUR)) == {"ECONNRESET": 20}
    finally:
        await observer.aclose()
        await stats.close()
