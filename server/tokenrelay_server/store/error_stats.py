"""Error statistics by hour, day and week: every classified error the
gateway met (DESIGN: Operations), as time-bucketed aggregates.

One record per classified error of an upstream attempt: type, code,
provider, upstream model, the bytes and tokens received before it, whether it
was recoverable (retryable), and when (wall-clock seconds). Records are
added into buckets of three sizes, and a period is read by summing its
buckets:

    period  bucket   buckets read               a bucket is kept (from its start)
    HOUR    1 min    the current one + 59       61 minutes
    DAY     1 h      the current one + 23       25 hours
    WEEK    1 day    the current one + 6        8 days (a week and a margin)

So "the last hour" is the current minute and the 59 before it (between 59
and 60 minutes of history), and likewise for days and weeks. Buckets are
aligned on the Unix epoch: days begin at 00:00 UTC.

Rules (tests/test_error_stats.py runs one suite against every implementation):

1. `summary(period)` returns one row per (type, code) of the period's
   buckets: count, total bytes and tokens received, recoverable count and
   the providers that had it (most errors first); rows most frequent first,
   ties by type then code.
2. A record counts in every period whose buckets cover its time, and in no
   other: crossing a bucket boundary moves the oldest bucket out.
3. Every replica writing to one store (Redis) adds into the same buckets.
4. A bucket is gone after it can no longer be read (the table above).

Time comes from the injected clock (its `wall`), on writes and reads alike,
so a test moves a `ManualClock` across minute, hour and day boundaries.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.errors import ErrorType


class Period(enum.StrEnum):
    HOUR = "hour"
    DAY = "day"
    WEEK = "week"


@dataclass(frozen=True, slots=True)
class Granularity:
    """The buckets a period is read from."""

    name: str  # one letter, part of the bucket's key
    seconds: int  # the size of one bucket
    count: int  # how many buckets make the period (the current one included)

    def index(self, at: float) -> int:
        return int(at // self.seconds)

    def indexes(self, now: float) -> range:
        """The buckets of the period that ends now, oldest first."""
        current = self.index(now)
        return range(current - self.count + 1, current + 1)

    def expires_at(self, index: int) -> float:
        """When bucket `index` can no longer be read, plus one bucket of margin
        (a replica whose clock is a little behind still finds it)."""
        return float((index + self.count + 1) * self.seconds)


GRANULARITIES: Mapping[Period, Granularity] = {
    Period.HOUR: Granularity("m", 60, 60),
    Period.DAY: Granularity("h", 3600, 24),
    Period.WEEK: Granularity("d", 86400, 7),
}


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One classified error of an upstream attempt."""

    type: ErrorType
    code: str
    provider: str
    model: str  # the upstream model
    bytes_received: int
    tokens_received: int
    recoverable: bool
    at: float  # wall-clock seconds


# What a bucket holds per (type, code, provider, model).
AggregateKey = tuple[int, str, str, str]


@dataclass(slots=True)
class Totals:
    count: int = 0
    bytes_received: int = 0
    tokens_received: int = 0
    recoverable: int = 0

    def add(self, other: Totals) -> None:
        self.count += other.count
        self.bytes_received += other.bytes_received
        self.tokens_received += other.tokens_received
        self.recoverable += other.recoverable


def aggregate(records: Iterable[ErrorRecord]) -> dict[AggregateKey, Totals]:
    """Records summed per (type, code, provider, model)."""
    totals: dict[AggregateKey, Totals] = {}
    for record in records:
        key = (int(record.type), record.code, record.provider, record.model)
        entry = totals.get(key)
        if entry is None:
            entry = totals[key] = Totals()
        entry.count += 1
        entry.bytes_received += record.bytes_received
        entry.tokens_received += record.tokens_received
        entry.recoverable += record.recoverable
    return totals


@dataclass(frozen=True, slots=True)
class ErrorRow:
    """One (type, code) of a period."""

    type: ErrorType
    code: str
    count: int
    bytes_received: int  # in total
    tokens_received: int  # in total
    recoverable: int
    providers: tuple[str, ...]  # most errors first

    @property
    def avg_bytes_received(self) -> float:
        return self.bytes_received / self.count if self.count else 0.0

    @property
    def avg_tokens_received(self) -> float:
        return self.tokens_received / self.count if self.count else 0.0


def rows_of(buckets: Iterable[Mapping[AggregateKey, Totals]]) -> list[ErrorRow]:
    """Rule 1: the buckets of a period as rows by (type, code)."""
    by_code: dict[tuple[int, str], Totals] = {}
    providers: dict[tuple[int, str], dict[str, int]] = {}
    for bucket in buckets:
        for (error_type, code, provider, _model), totals in bucket.items():
            key = (error_type, code)
            by_code.setdefault(key, Totals()).add(totals)
            seen = providers.setdefault(key, {})
            seen[provider] = seen.get(provider, 0) + totals.count
    rows = [
        ErrorRow(
            type=ErrorType(error_type),
            code=code,
            count=totals.count,
            bytes_received=totals.bytes_received,
            tokens_received=totals.tokens_received,
            recoverable=totals.recoverable,
            providers=tuple(
                name
                for name, _ in sorted(
                    providers[(error_type, code)].items(), key=lambda item: (-item[1], item[0])
                )
            ),
        )
        for (error_type, code), totals in by_code.items()
        if totals.count
    ]
    rows.sort(key=lambda row: (-row.count, int(row.type), row.code))
    return rows


class ErrorStats(Protocol):
    """Where error records go and how periods are read back."""

    async def record(self, records: Sequence[ErrorRecord]) -> None:
        """Add records into their buckets (raises when the store cannot be
        written; the caller decides whether to retry or drop them)."""
        ...

    async def summary(self, period: Period) -> list[ErrorRow]:
        """The rows of the period that ends now (rule 1)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryErrorStats:
    """The embedded default: the buckets in a dict, for one process."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock = clock or SystemClock()
        self._buckets: dict[tuple[str, int], dict[AggregateKey, Totals]] = {}

    async def record(self, records: Sequence[ErrorRecord]) -> None:
        by_bucket: dict[tuple[str, int], list[ErrorRecord]] = {}
        for granularity in GRANULARITIES.values():
            for record in records:
                by_bucket.setdefault((granularity.name, granularity.index(record.at)), []).append(
                    record
                )
        for key, bucket_records in by_bucket.items():
            bucket = self._buckets.setdefault(key, {})
            for aggregate_key, totals in aggregate(bucket_records).items():
                bucket.setdefault(aggregate_key, Totals()).add(totals)
        self._expire()

    async def summary(self, period: Period) -> list[ErrorRow]:
        self._expire()
        granularity = GRANULARITIES[period]
        indexes = granularity.indexes(self._clock.wall())
        return rows_of(
            self._buckets[(granularity.name, index)]
            for index in indexes
            if (granularity.name, index) in self._buckets
        )

    async def close(self) -> None:
        self._buckets.clear()

    def _expire(self) -> None:
        """Rule 4 (the Redis store has TTLs for it)."""
        now = self._clock.wall()
        by_name = {g.name: g for g in GRANULARITIES.values()}
        for key in [k for k in self._buckets if by_name[k[0]].expires_at(k[1]) <= now]:
            del self._buckets[key]

    @property
    def bucket_count(self) -> int:
        """How many buckets are held (tests of rule 4)."""
        return len(self._buckets)


__all__ = [
    "GRANULARITIES",
    "ErrorRecord",
    "ErrorRow",
    "ErrorStats",
    "Granularity",
    "MemoryErrorStats",
    "Period",
]
