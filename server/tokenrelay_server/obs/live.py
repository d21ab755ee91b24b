"""What the per-chunk path feeds: chunk and token counts, inter-token gaps,
recovery latency, recent rates and recent recovery actions.

`LiveStats` is the one observer that handles `ChunkStored`, the engine's hot
path (once per chunk), for both the Prometheus metrics (obs/metrics.py reads
it at scrape time) and the Admin overview (api/admin.py: `tokenrelay top`).
So a chunk costs one dict lookup for its stream, one for its (model,
provider) cell, a few additions and one bisect; no lock (everything runs on
the event loop, and /metrics is served on the same loop), no label
resolution, no allocation but the key tuple.

    inter-token gap    time between two chunks of a stream stored by the same
                       attempt run (the first chunk of a stream is time to
                       first token, AttemptEnded's; the first after a recovery
                       action or a takeover is recovery latency)
    recovery latency   from a RecoveryAction (retry, resume, fallback) or a
                       TakenOver to the stream's next stored chunk, by the step
                       of the first action since the last chunk (a retry that
                       fails again is part of the same recovery)
    tokens             tokens delivered to clients (ChunkStored.tokens_so_far
                       grows by them; a Checkpoint's token_count): text a
                       continuation repeated was paid for but is not counted.
                       After a takeover the first chunk's tokens are unknown
                       (the event does not carry the restored count) and
                       count 0.

Time is the clock's monotonic time carried by each event.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from tokenrelay_server.engine.events import (
    AttemptEnded,
    ChunkStored,
    EngineEvent,
    RecoveryAction,
    StreamEnded,
    StreamStarted,
    TakenOver,
)

# Upper bounds (seconds). Tokens arrive every few ms to ~100 ms; a recovery
# takes a backoff (ms to seconds) plus a new first token.
GAP_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
RECOVERY_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

# `tokenrelay top`'s windows.
TOKEN_RATE_WINDOW_S = 10
ERROR_RATE_WINDOW_S = 60
RECENT_ACTIONS = 32
_RING = 64  # per-second slots kept for the rates (> both windows)


class HistogramCell:
    """Counts per bucket and a sum: a Prometheus histogram without labels,
    locks or cumulative updates (they are summed at scrape time)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. the bucket `le` that holds it.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs as the exposition format has them, +Inf last."""
        running = 0
        pairs: list[tuple[str, int]] = []
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            pairs.append((repr(float(bound)), running))
        pairs.append(("+Inf", running + self.counts[-1]))
        return pairs


class ChunkCell:
    """Everything chunks of one (model, provider) add up to."""

    __slots__ = ("chunks", "gaps", "tokens")

    def __init__(self) -> None:
        self.chunks = 0
        self.tokens = 0
        self.gaps = HistogramCell(GAP_BUCKETS)


class _Stream:
    __slots__ = (
        "cell",
        "last_at",
        "last_tokens",
        "provider",
        "recovering_since",
        "recovering_step",
    )

    def __init__(self, last_tokens: int | None = 0) -> None:
        self.last_at: float | None = None
        self.last_tokens = last_tokens  # None: unknown (after a takeover)
        self.recovering_step: str | None = None
        self.recovering_since = 0.0
        # The cell of the provider that produced the last chunk: a stream
        # changes provider only on a fallback, so most chunks skip the lookup.
        self.provider = ""
        self.cell: ChunkCell | None = None


@dataclass(frozen=True, slots=True)
class RecentAction:
    """A recovery action, for operators (Admin's overview)."""

    at: float  # monotonic
    stream_id: str
    model: str
    step: str  # retry | resume | fallback | takeover
    code: str  # what failed ("" for a takeover)
    from_provider: str
    to_provider: str
    at_seq: int
    delay_s: float


class LiveStats:
    """The engine observer for the per-chunk path (see the module docstring)."""

    def __init__(self) -> None:
        self.cells: dict[tuple[str, str], ChunkCell] = {}
        self.recovery: dict[str, HistogramCell] = {}  # by step
        self.recent: deque[RecentAction] = deque(maxlen=RECENT_ACTIONS)
        self._streams: dict[str, _Stream] = {}
        # Tokens of the current second, then of each of the last _RING seconds.
        self._second = -1
        self._second_tokens = 0
        self._slot_second = [-1] * _RING
        self._slot_tokens = [0] * _RING
        self._error_second = [-1] * _RING
        self._error_counts: list[dict[str, int]] = [{} for _ in range(_RING)]

    def __call__(self, event: EngineEvent) -> None:
        # ChunkStored first, and inline: it is nearly every event. Measured
        # (tests/test_live_stats.py has the behaviour; bench/relay_vs_echo.py
        # --observability the cost): each attribute load and call here shows.
        if type(event) is ChunkStored:
            stream = self._streams.get(event.stream_id)
            if stream is None:  # started before this observer existed
                stream = self._streams[event.stream_id] = _Stream(last_tokens=None)
            cell = stream.cell
            provider = event.provider
            if cell is None or stream.provider != provider:
                cell = stream.cell = self._cell(event.model, provider)
                stream.provider = provider
            at = event.at
            so_far = event.tokens_so_far
            last_tokens = stream.last_tokens
            tokens = 0 if last_tokens is None else so_far - last_tokens
            stream.last_tokens = so_far
            cell.chunks += 1
            cell.tokens += tokens
            if stream.recovering_step is not None:
                self._recovered(stream, at)
            else:
                last_at = stream.last_at
                if last_at is not None:
                    gaps = cell.gaps
                    gap = at - last_at
                    # bisect_left: the first bound >= gap, the bucket `le` holding it.
                    gaps.counts[bisect.bisect_left(gaps.bounds, gap)] += 1
                    gaps.sum += gap
            stream.last_at = at
            second = int(at)
            if second == self._second:
                self._second_tokens += tokens
            else:
                self._roll(second, tokens)
        elif isinstance(event, StreamStarted):
            self._streams[event.stream_id] = _Stream()
        elif isinstance(event, AttemptEnded):
            if event.fault is not None and event.outcome in ("failure", "refused"):
                self._count_error(event.at, event.fault.code)
        elif isinstance(event, RecoveryAction):
            self._recovering(event.stream_id, event.step, event.at)
            self.recent.append(
                RecentAction(
                    at=event.at,
                    stream_id=event.stream_id,
                    model=event.model,
                    step=event.step,
                    code=event.fault.code,
                    from_provider=event.from_provider,
                    to_provider=event.to_provider,
                    at_seq=event.at_seq,
                    delay_s=event.delay_s,
                )
            )
        elif isinstance(event, TakenOver):
            stream = self._streams[event.stream_id] = _Stream(last_tokens=None)
            stream.recovering_step, stream.recovering_since = "takeover", event.at
            self.recent.append(
                RecentAction(
                    at=event.at,
                    stream_id=event.stream_id,
                    model=event.model,
                    step="takeover",
                    code="",
                    from_provider="",
                    to_provider="",
                    at_seq=event.at_seq,
                    delay_s=0.0,
                )
            )
        elif isinstance(event, StreamEnded):
            self._streams.pop(event.stream_id, None)

    def _cell(self, model: str, provider: str) -> ChunkCell:
        key = (model, provider)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = ChunkCell()
        return cell

    def _recovered(self, stream: _Stream, at: float) -> None:
        assert stream.recovering_step is not None
        self._recovery_cell(stream.recovering_step).observe(at - stream.recovering_since)
        stream.recovering_step = None

    def _roll(self, second: int, tokens: int) -> None:
        """A new second: the finished one goes into the ring."""
        if self._second >= 0:
            slot = self._second % _RING
            self._slot_second[slot] = self._second
            self._slot_tokens[slot] = self._second_tokens
        self._second = second
        self._second_tokens = tokens

    # -- the rest ----------------------------------------------------------------------

    def _recovering(self, stream_id: str, step: str, at: float) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = _Stream(last_tokens=None)
        if stream.recovering_step is None:  # the first action since the last chunk
            stream.recovering_step, stream.recovering_since = step, at

    def _recovery_cell(self, step: str) -> HistogramCell:
        cell = self.recovery.get(step)
        if cell is None:
            cell = self.recovery[step] = HistogramCell(RECOVERY_BUCKETS)
        return cell

    def _count_error(self, at: float, code: str) -> None:
        second = int(at)
        slot = second % _RING
        if self._error_second[slot] != second:
            self._error_second[slot] = second
            self._error_counts[slot] = {}
        counts = self._error_counts[slot]
        counts[code] = counts.get(code, 0) + 1

    # -- reading -------------------------------------------------------------------------

    def tokens_per_second(self, now: float, window_s: int = TOKEN_RATE_WINDOW_S) -> float:
        """Tokens delivered per second over the last `window_s` whole seconds
        before `now` and the current one."""
        current = int(now)
        first = current - window_s + 1
        total = self._second_tokens if first <= self._second <= current else 0
        for second in range(first, current + 1):
            slot = second % _RING
            if self._slot_second[slot] == second and second != self._second:
                total += self._slot_tokens[slot]
        return total / window_s

    def errors_per_minute(self, now: float) -> dict[str, int]:
        """Classified errors of upstream attempts in the last minute (the
        current second and the 59 before it), by code."""
        current = int(now)
        counts: dict[str, int] = {}
        for second in range(current - ERROR_RATE_WINDOW_S + 1, current + 1):
            slot = second % _RING
            if self._error_second[slot] == second:
                for code, count in self._error_counts[slot].items():
                    counts[code] = counts.get(code, 0) + count
        return counts

    @property
    def tracked_streams(self) -> int:
        """Streams with per-stream state (tests: nothing is left behind)."""
        return len(self._streams)
