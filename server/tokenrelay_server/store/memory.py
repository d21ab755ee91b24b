"""The in-memory stream log: the embedded default (one process, nothing to
install). It keeps the same rules as the Redis store (see base.py) so the
gateway cannot tell them apart, except that it dies with the process."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.compact_log import CompactLog
from tokenrelay_server.core.errors import StreamNotFound
from tokenrelay_server.core.model import LogEntry, StreamMeta
from tokenrelay_server.store.base import AppendObserver, ReadStart, StreamTail
from tokenrelay_server.store.errors import StreamFenced


@dataclass
class _Stream:
    meta: StreamMeta
    expires_at: float
    log: CompactLog = field(default_factory=CompactLog)
    cancel_reason: str | None = None
    lease: tuple[str, float] | None = None
    epoch: int = 0  # raised each time the lease changes hands (fencing, base.py rule 8)
    changed: asyncio.Event | None = None  # made by the first waiter, set by the next append


class MemoryStore:
    in_process = True
    label = "the memory store"

    def __init__(
        self,
        *,
        retention_s: float = 3600.0,
        clock: Clock | None = None,
        append_observer: AppendObserver | None = None,
    ) -> None:
        self._clock = clock or SystemClock()
        # Told of each append (base.py ObservableStore): the metrics.
        self.append_observer = append_observer
        self._retention_s = retention_s
        self._streams: dict[str, _Stream] = {}
        self._idempotency: dict[str, str] = {}
        self._last_sweep = self._clock.wall()

    # -- lifecycle ---------------------------------------------------------------

    async def create(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        self._sweep()
        key = meta.idempotency_key
        if key:
            existing_id = self._idempotency.get(key)
            existing = self._live(existing_id) if existing_id else None
            if existing is not None:
                return existing.meta, False
            self._idempotency[key] = meta.stream_id
        self._streams[meta.stream_id] = _Stream(meta, self._clock.wall() + self._retention_s)
        return meta, True

    async def find_idempotent(self, idempotency_key: str) -> StreamMeta | None:
        self._sweep()
        existing_id = self._idempotency.get(idempotency_key)
        existing = self._live(existing_id) if existing_id else None
        return None if existing is None else existing.meta

    async def get_meta(self, stream_id: str) -> StreamMeta | None:
        stream = self._live(stream_id)
        return None if stream is None else stream.meta

    async def delete(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.meta.idempotency_key:
            if self._idempotency.get(stream.meta.idempotency_key) == stream_id:
                del self._idempotency[stream.meta.idempotency_key]

    # -- the log -----------------------------------------------------------------

    async def append(
        self, stream_id: str, entries: Sequence[LogEntry], *, epoch: int | None = None
    ) -> None:
        self.append_now(stream_id, entries, epoch=epoch)

    def append_now(
        self, stream_id: str, entries: Sequence[LogEntry], *, epoch: int | None = None
    ) -> None:
        observer = self.append_observer
        started = self._clock.monotonic() if observer is not None else 0.0
        now = self._clock.wall()
        stream = self._streams.get(stream_id)
        if stream is None or stream.expires_at <= now:
            stream = self._require(stream_id)  # raises, and forgets an expired one
        if epoch is not None and epoch != stream.epoch:
            raise StreamFenced(
                f"stream {stream_id}: epoch {epoch} is stale: the stream is at epoch "
                f"{stream.epoch}; another replica took it over: resume it (anywhere) with "
                "your latest resume token"
            )
        try:
            # The whole batch is checked first: a rejected append stores nothing.
            stream.log.append(entries)
        except ValueError as error:
            raise ValueError(f"{error} in {stream_id}") from None
        stream.expires_at = now + self._retention_s
        if stream.changed is not None:
            stream.changed.set()
            stream.changed = None
        if observer is not None:
            observer(len(entries), self._clock.monotonic() - started)

    def shared_log(self, stream_id: str) -> CompactLog | None:
        stream = self._live(stream_id)
        return None if stream is None else stream.log

    async def read(self, stream_id: str, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        return self._require(stream_id).log.read(after_seq, limit)

    async def wait(
        self, stream_id: str, after_seq: int, timeout_s: float, *, seen_notices: int = 0
    ) -> list[LogEntry]:
        stream = self._require(stream_id)
        entries = await self.read(stream_id, after_seq)
        if len(entries) > seen_notices or stream.log.end is not None:
            return entries
        if stream.changed is None:
            stream.changed = asyncio.Event()
        changed = stream.changed
        try:
            async with self._clock.deadline(timeout_s):
                await changed.wait()
        except TimeoutError:
            return []
        return await self.read(stream_id, after_seq)

    async def open_read(
        self, stream_id: str, after_seq: int, limit: int = 1000
    ) -> ReadStart | None:
        stream = self._live(stream_id)
        if stream is None:
            return None
        log = stream.log
        tail = StreamTail(log.last_seq, log.end is not None)
        return ReadStart(stream.meta, tail, log.read(after_seq, limit))

    async def tail(self, stream_id: str) -> StreamTail | None:
        stream = self._live(stream_id)
        if stream is None:
            return None
        return StreamTail(stream.log.last_seq, stream.log.end is not None)

    # -- ownership and cancellation ------------------------------------------------

    async def acquire_lease(self, stream_id: str, owner: str, ttl_s: float) -> int | None:
        stream = self._require(stream_id)
        now = self._clock.monotonic()
        held = stream.lease is not None and stream.lease[1] > now
        if held and stream.lease is not None and stream.lease[0] != owner:
            return None
        if not held:
            stream.epoch += 1
        stream.lease = (owner, now + ttl_s)
        return stream.epoch

    async def renew_lease(
        self, stream_id: str, owner: str, ttl_s: float, *, epoch: int | None = None
    ) -> bool:
        stream = self._live(stream_id)
        if stream is None:
            return False
        now = self._clock.monotonic()
        held = stream.lease is not None and stream.lease[1] > now
        if held and stream.lease is not None and stream.lease[0] == owner:
            stream.lease = (owner, now + ttl_s)
            return True
        if not held and epoch is not None and epoch == stream.epoch:
            # It lapsed and nobody took it over: ours again (only a takeover fences).
            stream.lease = (owner, now + ttl_s)
            return True
        return False

    async def release_lease(self, stream_id: str, owner: str) -> None:
        stream = self._live(stream_id)
        if stream is not None and stream.lease is not None and stream.lease[0] == owner:
            stream.lease = None

    async def lease_owner(self, stream_id: str) -> str | None:
        stream = self._live(stream_id)
        if stream is None or stream.lease is None:
            return None
        owner, expires_at = stream.lease
        return owner if expires_at > self._clock.monotonic() else None

    async def request_cancel(self, stream_id: str, reason: str) -> None:
        self._require(stream_id).cancel_reason = reason

    async def cancel_requested(self, stream_id: str) -> str | None:
        stream = self._live(stream_id)
        return None if stream is None else stream.cancel_reason

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""

    async def close(self) -> None:
        self._streams.clear()
        self._idempotency.clear()

    # -- helpers -------------------------------------------------------------------

    def _live(self, stream_id: str) -> _Stream | None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return None
        if stream.expires_at <= self._clock.wall():
            self._forget(stream_id, stream)
            return None
        return stream

    def _require(self, stream_id: str) -> _Stream:
        stream = self._live(stream_id)
        if stream is None:
            raise StreamNotFound(f"stream {stream_id} is unknown or expired")
        return stream

    def _forget(self, stream_id: str, stream: _Stream) -> None:
        self._streams.pop(stream_id, None)
        key = stream.meta.idempotency_key
        if key and self._idempotency.get(key) == stream_id:
            del self._idempotency[key]

    def _sweep(self) -> None:
        now = self._clock.wall()
        if now - self._last_sweep < 5.0:
            return
        self._last_sweep = now
        for stream_id, stream in list(self._streams.items()):
            if stream.expires_at <= now:
                self._forget(stream_id, stream)

    def __len__(self) -> int:
        return len(self._streams)


__all__ = ["MemoryStore"]
