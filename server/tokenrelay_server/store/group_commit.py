"""Group commit: one writer per store collects the appends of every stream
of the process and sends them to the store together (issue 10).

Rules:

- Durable before visible is the caller's, unchanged: an append is answered
  only once the batch holding it is acknowledged. `post` answers through a
  callback run from the batch's own step (no future, no extra loop step per
  append: the per-token path, engine/fanout.py); `submit` answers through a
  future (and can be withdrawn).
- Up to `max_in_flight` batches are on the wire at once. A batch leaves on
  a free slot once its oldest append has waited `max_wait_s` or it holds
  `max_entries` entries, whichever comes first; with every slot busy,
  appends gather until a batch returns. The wait is what makes batches at a
  steady pace: without it, at 250 streams of 50 tokens/s a batch held 1.75
  appends on average and the cost of a round trip per append saturated the
  process (bench/redis_speed.py); it adds at most `max_wait_s` before a
  chunk is shown, and nothing to a generation's pace (chunks are written
  behind, engine/fanout.py).
- A stream has at most one append in a batch and at most one batch on the
  wire: its next append waits for the one in flight, so a stream's appends
  reach the store in the order they were submitted (and each keeps its own
  epoch, checked by the store in the same step as the write).
- A batch that fails as a whole (the store is unreachable past its retry
  window) fails each of its appends with that error; an append the store
  refuses (a gap, a stale epoch, an unknown stream) fails alone.

The writer knows nothing of Redis: `send(batch)` is the store's, and answers
one outcome per append (None for stored, else the exception to raise).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Defaults: a batch of a few hundred entries is one short script run on
# Redis; 2 ms is far under a token's spacing at any real pace, and against
# 1 ms it cut the gateway's CPU at 250 paced streams from 91-94 % to 85-88 %
# of a core (bench/redis_speed.py --only paced --max-wait-ms 1 / 2).
DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_WAIT_S = 0.002
DEFAULT_MAX_IN_FLIGHT = 2


Outcome = BaseException | None
Done = Callable[[Outcome], None]


@dataclass(slots=True, eq=False)
class PendingAppend:
    """One stream's append, encoded by the store, waiting for its batch."""

    stream_id: str
    payload: Any  # what the store's `send` needs (already encoded)
    entries: int
    done: Done  # told the outcome once, from the batch's step
    queued_at: float = 0.0
    future: asyncio.Future[None] | None = None  # `submit`'s: cancelled = withdrawn


def _resolve(future: asyncio.Future[None]) -> Done:
    def done(outcome: Outcome) -> None:
        if future.done():
            return
        if outcome is None:
            future.set_result(None)
        else:
            future.set_exception(outcome)

    return done


Send = Callable[[Sequence[PendingAppend]], Awaitable[Sequence[Outcome]]]
BatchObserver = Callable[[int, float], None]


@dataclass
class GroupCommitStats:
    """What the writer did (for tests and operators)."""

    batches: int = 0
    appends: int = 0
    entries: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1024))


class GroupCommit:
    """The writer. `submit` from any task on the loop; `close` when done."""

    def __init__(
        self,
        send: Send,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"group commit max_entries must be at least 1, not {max_entries}")
        if max_wait_s < 0:
            raise ValueError(f"group commit max_wait_s must not be negative, not {max_wait_s}")
        if max_in_flight < 1:
            raise ValueError(f"group commit max_in_flight must be at least 1, not {max_in_flight}")
        self._send = send
        self.max_entries = max_entries
        self.max_wait_s = max_wait_s
        self.max_in_flight = max_in_flight
        self.on_batch = on_batch
        self.stats = GroupCommitStats()
        self._pending: deque[PendingAppend] = deque()
        self._pending_entries = 0
        self._busy_streams: set[str] = set()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._flush_soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    # -- submitting --------------------------------------------------------------------

    async def append(self, stream_id: str, payload: Any, entries: int) -> None:
        """Queue one append and wait until its batch is acknowledged; raises
        what the store answered for it."""
        await self.submit(stream_id, payload, entries)

    def submit(self, stream_id: str, payload: Any, entries: int) -> asyncio.Future[None]:
        """Queue one append; the future resolves once its batch is
        acknowledged (or fails with what the store answered for it).
        Cancelling the future before its batch is sent withdraws the append;
        after, the batch is answered all the same."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue(PendingAppend(stream_id, payload, entries, _resolve(future), future=future))
        return future

    def post(self, stream_id: str, payload: Any, entries: int, done: Done) -> None:
        """Queue one append; `done(outcome)` is called once its batch is
        answered (None: stored; else what to raise), from the batch's own
        step. It cannot be withdrawn. `done` must not raise (what it raises
        goes to the loop's exception handler)."""
        self._queue(PendingAppend(stream_id, payload, entries, done))

    def _queue(self, pending: PendingAppend) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")
        loop = asyncio.get_running_loop()
        pending.queued_at = loop.time()
        self._pending.append(pending)
        self._pending_entries += pending.entries
        self._schedule(loop)

    @property
    def waiting(self) -> int:
        """Appends queued and not yet sent."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Batches on the wire."""
        return len(self._in_flight)

    # -- the writer --------------------------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending or len(self._in_flight) >= self.max_in_flight:
            return
        if self._pending_entries >= self.max_entries or self.max_wait_s <= 0:
            # A full batch (or no lingering): go on the next step, taking
            # along whatever else arrives in this one.
            if self._flush_soon is None:
                self._flush_soon = loop.call_soon(self._flush)
            return
        # A slot is free: the gathered appends go once the oldest has waited
        # max_wait_s (or the batch fills up first).
        if self._timer is None:
            due = self._pending[0].queued_at + self.max_wait_s
            self._timer = loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self._flush_soon = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._pending and len(self._in_flight) < self.max_in_flight:
            batch = self._take()
            if not batch:
                # Every waiting stream has a batch on the wire: each such
                # batch schedules the next when it returns.
                return
            task = loop.create_task(self._run(batch))
            self._in_flight.add(task)
        self._schedule(loop)

    def _take(self) -> list[PendingAppend]:
        """The next batch: in queue order, one append per stream, none of a
        stream with a batch on the wire, up to max_entries entries (always at
        least one append, however large)."""
        batch: list[PendingAppend] = []
        kept: deque[PendingAppend] = deque()
        entries = 0
        busy = self._busy_streams
        pending_queue = self._pending
        while pending_queue and entries < self.max_entries:
            pending = pending_queue.popleft()
            if pending.future is not None and pending.future.cancelled():
                self._pending_entries -= pending.entries
                continue
            too_big = batch and entries + pending.entries > self.max_entries
            if too_big or pending.stream_id in busy:
                kept.append(pending)
                continue
            busy.add(pending.stream_id)
            batch.append(pending)
            entries += pending.entries
            self._pending_entries -= pending.entries
        kept.extend(pending_queue)
        self._pending = kept
        return batch

    async def _run(self, batch: list[PendingAppend]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        entries = sum(p.entries for p in batch)
        outcomes: Sequence[Outcome]
        cancelled = False
        try:
            outcomes = await self._send(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError(
                    f"the store answered {len(outcomes)} outcomes for {len(batch)} appends"
                )
        except asyncio.CancelledError:
            cancelled = True
            self.stats.failed_batches += 1
            closed = RuntimeError("the store closed while the append was on the wire")
            outcomes = [closed] * len(batch)
        except Exception as error:  # handed to every append of the batch
            self.stats.failed_batches += 1
            outcomes = [error] * len(batch)
        else:
            self._count(batch, entries)
            if self.on_batch is not None:
                self.on_batch(entries, loop.time() - started)
        for pending in batch:
            self._busy_streams.discard(pending.stream_id)
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.discard(task)
        for pending, outcome in zip(batch, outcomes, strict=True):
            try:
                pending.done(outcome)
            except Exception as error:  # one caller's bug must not lose the others' answers
                loop.call_exception_handler(
                    {"message": "a group-commit callback raised", "exception": error}
                )
        if cancelled:
            raise asyncio.CancelledError
        if not self._closed:
            self._schedule(loop)

    def _count(self, batch: Sequence[PendingAppend], entries: int) -> None:
        stats = self.stats
        stats.batches += 1
        stats.appends += len(batch)
        stats.entries += entries
        stats.largest_batch = max(stats.largest_batch, entries)
        stats.sizes.append(entries)

    # -- closing -----------------------------------------------------------------------

    async def close(self) -> None:
        """Send what is queued, wait for every batch on the wire, then refuse
        new appends."""
        while self._pending or self._in_flight:
            if self._pending and len(self._in_flight) < self.max_in_flight:
                self._flush()
            if self._in_flight:
                await asyncio.wait(set(self._in_flight))
            elif self._pending:
                await asyncio.sleep(0)
        self._closed = True
        for handle in (self._flush_soon, self._timer):
            if handle is not None:
                handle.cancel()


__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MAX_WAIT_S",
    "Done",
    "GroupCommit",
    "GroupCommitStats",
    "PendingAppend",
]
