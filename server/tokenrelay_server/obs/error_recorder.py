"""Every classified error of an upstream attempt, recorded for the error
statistics by hour, day and week (store/error_stats.py).

The engine calls observers synchronously and they must not wait, while
recording into Redis is a round trip. So the recorder only queues a record
per error (an `AttemptEnded` that failed or was refused by a breaker) and a
writer task it owns sends the queue in batches: one pipeline per batch,
however many errors a burst had. While the store fails, records are
dropped (counted by `on_dropped`, logged once per outage) rather than
piling up; the queue itself is bounded by `max_pending` for the same reason.
`flush()` writes what is queued now (the Admin service calls it before it
reads, so a replica always sees its own errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from tokenrelay_server.core.clock import Clock
from tokenrelay_server.engine.events import AttemptEnded, EngineEvent
from tokenrelay_server.store.error_stats import ErrorRecord, ErrorStats

log = logging.getLogger(__name__)

MAX_PENDING = 10_000
RECORDED_OUTCOMES = frozenset({"failure", "refused"})


class ErrorRecorder:
    observes_chunks = False  # only AttemptEnded matters (engine/events.py Observers)

    def __init__(
        self,
        stats: ErrorStats,
        clock: Clock,
        *,
        max_pending: int = MAX_PENDING,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self.stats = stats
        self._clock = clock
        self._max_pending = max_pending
        self._on_dropped = on_dropped
        self._pending: list[ErrorRecord] = []
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.dropped = 0

    def __call__(self, event: EngineEvent) -> None:
        if type(event) is not AttemptEnded:  # nearly every event is a ChunkStored
            return
        fault = event.fault
        if fault is None or event.outcome not in RECORDED_OUTCOMES:
            return
        if len(self._pending) >= self._max_pending:
            self._drop(1)
            return
        self._pending.append(
            ErrorRecord(
                type=fault.type,
                code=fault.code,
                provider=event.provider,
                model=event.upstream_model,
                bytes_received=fault.bytes_received,
                tokens_received=fault.tokens_received,
                recoverable=fault.retryable,
                at=self._clock.wall(),
            )
        )
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="error statistics writer")

    async def stop(self) -> None:
        """Stop the writer, then write what is still queued (best effort)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                await self.stats.record(batch)
            except Exception as error:
                self._drop(len(batch))
                if not self._failing:
                    log.warning(
                        "error statistics: cannot store %d error records (%s); dropping them "
                        "until the store answers again",
                        len(batch),
                        error,
                    )
                self._failing = True
                return
            if self._failing:
                log.warning("error statistics: the store answers again")
                self._failing = False

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    def _drop(self, count: int) -> None:
        self.dropped += count
        if self._on_dropped is not None:
            self._on_dropped(count)

    @property
    def pending(self) -> int:
        return len(self._pending)
