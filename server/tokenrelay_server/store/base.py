"""The contract every stream log implementation keeps.

Rules (tests/test_store.py runs one suite against every implementation):

1. Entries of a stream are ordered: chunk seq s sorts after every entry that
   was appended before it; a `Notice` sits after chunk `after_seq`; the `End`
   sorts last. `read(after_seq=S)` returns everything after chunk S, in order,
   starting with the notices that followed chunk S.
2. `append` returns only once the entries are durable (for Redis: acknowledged
   by the server). The gateway shows a chunk to clients only after that.
3. Nothing is appended after an `End`.
4. `create` with an idempotency key that is already taken returns the existing
   stream's meta and creates nothing.
5. A stream and everything about it is gone after the retention period.
6. Operations on a stream that is unknown or expired raise `StreamNotFound`
   (except `get_meta`, `tail`, `lease_owner` and `cancel_requested`, which
   answer None).
7. A rejected `append` (a seq gap, anything after the End, an End whose
   total_seq is not the log's last seq) stores nothing of its batch and
   raises ValueError.
8. Fencing: each stream has an epoch. `acquire_lease` raises it whenever the
   lease changes hands (a start's first acquire makes it 1, every takeover
   raises it) and returns it; an `append` that carries an epoch other than
   the stream's raises `StreamFenced` and stores nothing, checked in the same
   atomic step as the append.
9. Failures are ours (store/errors.py): a store that cannot be reached
   retries within its retry window, then raises `StoreUnavailable`; nothing
   of its client library escapes. An `append` retried after an unknown
   outcome never stores its batch twice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tokenrelay_server.core.compact_log import CompactLog
from tokenrelay_server.core.model import LogEntry, StreamMeta


@dataclass(frozen=True, slots=True)
class StreamTail:
    """Where a stream's log stands: the last chunk's seq and whether it ended."""

    last_seq: int
    ended: bool


@dataclass(frozen=True, slots=True)
class ReadStart:
    """What a resume needs first, in one look: the stream's meta, where its
    log stands, and up to `limit` entries after the reader's seq."""

    meta: StreamMeta
    tail: StreamTail
    entries: list[LogEntry]


@runtime_checkable
class SharesLogs(Protocol):
    """An in-process store whose log of a stream the engine may read directly:
    the generation's local log is then the store's, not a copy (one buffer,
    one append). Only for stores where an append cannot suspend."""

    def shared_log(self, stream_id: str) -> CompactLog | None:
        """The store's own log of a live stream (None: unknown or expired)."""
        ...

    def append_now(
        self, stream_id: str, entries: Sequence[LogEntry], *, epoch: int | None = None
    ) -> None:
        """`append`, done before it returns (no await on the per-token path)."""
        ...


# Told the outcome of an append once: None when it is durable, else what
# `append` would have raised.
AppendDone = Callable[[BaseException | None], None]


@runtime_checkable
class SubmitsAppends(Protocol):
    """A store that queues appends itself (group commit): `post_append` is
    `append` with a callback, so the per-token path needs no task, future
    or loop step of its own. `done(None)` once the entries are durable (rule
    2), `done(error)` with what `append` would have raised; called once,
    from the store's own step. Raises at once when the store is closed."""

    def post_append(
        self, stream_id: str, entries: Sequence[LogEntry], done: AppendDone, *, epoch: int | None
    ) -> None: ...


class StreamStore(Protocol):
    """Durable, ordered log of each stream, plus its metadata and lease."""

    # True when no method ever suspends (the memory store): callers may skip
    # guarding writes against cancellation.
    in_process: bool
    # Names the store in messages ("the Redis store at redis://…").
    label: str

    async def create(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        """Register a stream. Returns (meta, created). When meta.idempotency_key
        already names a stream, returns (that stream's meta, False)."""
        ...

    async def find_idempotent(self, idempotency_key: str) -> StreamMeta | None:
        """The live stream `idempotency_key` names (as `create` would answer
        it), or None; creates nothing."""
        ...

    async def get_meta(self, stream_id: str) -> StreamMeta | None:
        """The stream's meta, or None when it expired or never existed."""
        ...

    async def delete(self, stream_id: str) -> None:
        """Forget a stream and its idempotency key (used to undo a failed start)."""
        ...

    async def append(
        self, stream_id: str, entries: Sequence[LogEntry], *, epoch: int | None = None
    ) -> None:
        """Durably append entries (see rule 1 for their order). With `epoch`,
        only while it is the stream's epoch (rule 8)."""
        ...

    async def read(self, stream_id: str, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        """Up to `limit` entries after chunk `after_seq`, in log order."""
        ...

    async def open_read(
        self, stream_id: str, after_seq: int, limit: int = 1000
    ) -> ReadStart | None:
        """`get_meta`, `tail` and `read` in one look (for Redis: one round
        trip); None when the stream expired or never existed."""
        ...

    async def wait(
        self, stream_id: str, after_seq: int, timeout_s: float, *, seen_notices: int = 0
    ) -> list[LogEntry]:
        """Like `read`, but when nothing is there yet past the first
        `seen_notices` notices after chunk `after_seq` (the reader saw them),
        wait up to `timeout_s` for something to be appended. Returns [] on
        timeout. (A follower of a stream in backoff after a notice waits
        instead of reading it again and again.)"""
        ...

    async def tail(self, stream_id: str) -> StreamTail | None:
        """The last chunk's seq and whether the stream ended; None if unknown."""
        ...

    async def acquire_lease(self, stream_id: str, owner: str, ttl_s: float) -> int | None:
        """Take ownership of a stream's generation if nobody else holds it.
        Returns the epoch to write with (rule 8), None when someone else holds it."""
        ...

    async def renew_lease(
        self, stream_id: str, owner: str, ttl_s: float, *, epoch: int | None = None
    ) -> bool:
        """Extend our lease; False when someone else holds it (or it lapsed and
        was taken). A lease that lapsed with the stream still at `epoch`
        (nobody took it over) is taken back."""
        ...

    async def release_lease(self, stream_id: str, owner: str) -> None:
        """Give up ownership (only if we hold it)."""
        ...

    async def lease_owner(self, stream_id: str) -> str | None:
        """Who owns the generation now, or None when the lease lapsed."""
        ...

    async def request_cancel(self, stream_id: str, reason: str) -> None:
        """Ask the owner (on whatever replica) to stop the generation."""
        ...

    async def cancel_requested(self, stream_id: str) -> str | None:
        """The reason given to `request_cancel`, or None."""
        ...

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless the store answers now (the health probe)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class AppendObserver(Protocol):
    """Told of every durable append: how many entries the batch held and how
    long the store took (seconds on the store's clock). The metrics
    (obs/metrics.py: tokenrelay_store_append_seconds, _entries) are one.
    Called on the event loop; must be quick and must not raise."""

    def __call__(self, entries: int, seconds: float) -> None: ...


@runtime_checkable
class ObservableStore(Protocol):
    """A store that reports its appends. The server assembly sets
    `append_observer` when metrics are on; a store calls it after each
    successful `append` (rule 2: once the batch is durable), with the size of
    the batch it wrote. The memory store does; a store that batches appends
    itself (group commit, issue 10) reports each batch it sends."""

    append_observer: AppendObserver | None
