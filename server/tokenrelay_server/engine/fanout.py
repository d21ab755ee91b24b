"""A generation's log as this replica holds it, and its readers.

Rules:
- Durable before visible (guarantee 3): `append` writes to the store first
  and records the entries here (where readers see them) only once the store
  has them.
- What readers were shown and what the store holds agree even when the
  writer is cancelled mid-write: a store write that may still land is let
  finish, and recorded if it did, before the cancellation goes on.
- The writer never waits for a reader: readers take what is new at their
  own pace (a slow reader costs memory, the text, never throughput).
- Write-behind (a store that queues appends itself, group commit): a chunk
  is handed to the store and the writer goes on; chunks handed over while
  a write is on the wire go together in the next one (one write per stream
  on the wire, up to `WRITE_BEHIND_ENTRIES` entries waiting). Readers still
  see a chunk only once its write is acknowledged, and `entries`, `text()`,
  the digests and `last_seq` are what is durable. Anything that depends on
  the whole of what was written (a notice, the End, the decision after an
  attempt, a continuation's prefix) calls `settle()` first: it waits until
  every write landed and raises the first write's failure, after which the
  log takes no more chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from tokenrelay_server.core.compact_log import CompactLog
from tokenrelay_server.core.model import Chunk, End, LogEntry
from tokenrelay_server.store.base import SharesLogs, StreamStore, SubmitsAppends


@dataclass(eq=False)
class Subscription:
    """One attached reader. The servicer may `fail` it (a bad message on its
    call, a drain) to end its read with that error.

    A reader that caught up parks on a future of its own, resolved by the
    next `ring` (a bare future, not an asyncio.Event: one object and one
    callback per token, not an Event's waiter list and wait coroutine). A
    ring while it is not parked is dropped: the reader looks at the log (and
    at `violation`) before it parks again, with no await in between."""

    violation: BaseException | None = None
    acked_seq: int = 0
    _parked: asyncio.Future[None] | None = field(default=None, repr=False)

    def ring(self) -> None:
        """Something new for this reader (or it failed): wake it if parked."""
        parked = self._parked
        if parked is not None and not parked.done():
            parked.set_result(None)

    async def park(self) -> None:
        """Wait for the next `ring`; call right after looking, with no await
        in between."""
        parked = self._parked = asyncio.get_running_loop().create_future()
        try:
            await parked
        finally:
            self._parked = None

    def fail(self, error: BaseException) -> None:
        self.violation = error
        self.ring()


# How many entries of one stream may wait for the store (on the wire and
# queued) before the writer waits for a write to land.
WRITE_BEHIND_ENTRIES = 512


_ABILITIES: dict[type, tuple[bool, bool]] = {}


def _abilities(store: StreamStore) -> tuple[bool, bool]:
    """(SharesLogs, SubmitsAppends) for the store's class: an isinstance on
    a runtime Protocol inspects the class's attributes (tens of µs), so once
    per class, not once per stream."""
    kind = type(store)
    known = _ABILITIES.get(kind)
    if known is None:
        known = _ABILITIES[kind] = (
            isinstance(store, SharesLogs),
            isinstance(store, SubmitsAppends),
        )
    return known


class LocalLog:
    """The entries of one stream generated here: stored, then shown."""

    def __init__(
        self,
        stream_id: str,
        store: StreamStore,
        *,
        on_unattended: Callable[[], None] | None = None,
        epoch: int | None = None,
        on_write_failed: Callable[[BaseException], None] | None = None,
        on_durable: Callable[[Chunk], None] | None = None,
    ) -> None:
        self.stream_id = stream_id
        # Every append carries it: a stale one is refused (store/base.py rule 8).
        self.epoch = epoch
        self._store = store
        # An in-process store's own log is ours too: one buffer, one append
        # (SharesLogs in store/base.py); otherwise a copy of what was stored.
        shares, submits = _abilities(store)
        sharing = cast(SharesLogs, store) if shares else None
        shared = sharing.shared_log(stream_id) if sharing is not None else None
        self._shared = shared is not None
        self.entries = shared if shared is not None else CompactLog()
        # Appends that need no await (the store's own log is ours): the
        # writer calls `append_now`; otherwise it awaits `append`.
        self._sharing = sharing if shared is not None else None
        self.appends_now = self._sharing is not None
        # A store that queues appends (group commit) answers by a callback;
        # chunks are then written behind (the module docstring).
        self._submits = cast(SubmitsAppends, store) if submits else None
        self.writes_behind = self._submits is not None and not self._shared
        self._unsent: list[LogEntry] = []
        self._unsent_bytes = 0  # content bytes of the chunks in _unsent
        self._on_wire: list[LogEntry] = []
        self._on_wire_bytes = 0
        self._writing = False  # a write of ours is on the wire
        self._submitted_seq = 0  # the last chunk handed to the store
        self._failure: BaseException | None = None
        self._progress = asyncio.Event()  # set whenever a write lands or fails
        # Told of the first failed write at once (the writer may be waiting
        # on something else than the log, e.g. its clock).
        self._on_write_failed = on_write_failed
        # Told of each chunk written behind once it is durable (ChunkStored).
        self._on_durable = on_durable
        self._subscribers: set[Subscription] = set()
        # Called when the last reader detaches (the generation arms its grace).
        self._on_unattended = on_unattended

    # -- what it holds ---------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.entries.last_seq

    @property
    def end(self) -> End | None:
        return self.entries.end

    @property
    def next_seq(self) -> int:
        """The seq the next chunk takes (after the chunks still being written)."""
        return max(self.entries.last_seq, self._submitted_seq) + 1

    @property
    def text_bytes(self) -> int:
        """Content bytes of every chunk handed over (durable or not yet)."""
        return self.entries.text_bytes + self._on_wire_bytes + self._unsent_bytes

    @property
    def tokens_so_far(self) -> int:
        return self.entries.tokens_so_far()

    def text(self) -> str:
        """The answer text so far (text chunks only: the continuation prefix)."""
        return self.entries.text()

    def digest(self) -> str:
        """Hex SHA-256 of the answer text so far (an End's text_sha256)."""
        return self.entries.text_sha256()

    def chunks_digest(self) -> str:
        """Hex SHA-256 of every chunk so far (an End's chunks_sha256)."""
        return self.entries.chunks_sha256()

    # -- readers ---------------------------------------------------------------------

    @property
    def attended(self) -> bool:
        return bool(self._subscribers)

    @property
    def readers(self) -> int:
        """How many calls are attached (for operators)."""
        return len(self._subscribers)

    def attach(self, subscription: Subscription) -> None:
        self._subscribers.add(subscription)

    def detach(self, subscription: Subscription) -> None:
        if subscription not in self._subscribers:
            return
        self._subscribers.discard(subscription)
        if not self._subscribers:
            self._settle_finished()
            if self._on_unattended is not None:
                self._on_unattended()

    def _settle_finished(self) -> None:
        """An ended log nobody reads live keeps no chunk objects."""
        if self.entries.end is not None and not self._subscribers:
            self.entries.drop_recent()

    async def follow(
        self, after_seq: int, subscription: Subscription
    ) -> AsyncGenerator[list[LogEntry], None]:
        """Every entry after chunk `after_seq`, then live ones, until the End,
        in batches (whatever arrived since the last look)."""
        cursor = self.entries.cursor(after_seq)
        while True:
            if subscription.violation is not None:
                raise subscription.violation
            batch = cursor.take()
            if batch:
                yield batch
                continue
            if cursor.done:
                return
            await subscription.park()

    # -- writing ---------------------------------------------------------------------

    def restore(self, entries: Sequence[LogEntry]) -> None:
        """Hold entries another replica stored (a takeover): they are durable
        (and already here when the log is the store's own)."""
        if not self._shared:
            self._record(entries)

    def append_now(self, entries: Sequence[LogEntry]) -> None:
        """`append` for a store that shares its log (`appends_now`)."""
        sharing = self._sharing
        assert sharing is not None, "append_now needs a store that shares its log"
        sharing.append_now(self.stream_id, entries, epoch=self.epoch)
        self._wake()

    def hand_over_chunk(self, chunk: Chunk) -> Awaitable[None] | None:
        """Store one chunk behind, then show it (a log that `writes_behind`),
        without a coroutine: hands the chunk over and returns None, or, with
        `WRITE_BEHIND_ENTRIES` of this stream waiting, what to await before
        the next. Raises the failure of an earlier write."""
        self._hand_over((chunk,))
        if len(self._unsent) + len(self._on_wire) >= WRITE_BEHIND_ENTRIES:
            return self._room()
        return None

    async def _room(self) -> None:
        while len(self._unsent) + len(self._on_wire) >= WRITE_BEHIND_ENTRIES:
            if self._failure is not None:
                raise self._failure
            self._progress.clear()
            await self._progress.wait()

    def _hand_over(self, entries: Sequence[LogEntry]) -> None:
        """Queue entries behind those already handed over, and send them if
        no write is on the wire. Raises the failure of an earlier write."""
        if self._failure is not None:
            raise self._failure
        self._unsent.extend(entries)
        for entry in entries:
            if isinstance(entry, Chunk):
                self._unsent_bytes += entry.content_bytes
                self._submitted_seq = entry.seq
        if not self._writing:
            self._send()

    async def settle(self) -> None:
        """Wait until every chunk written behind is durable (and shown);
        raise the failure of the first write that failed."""
        while self._failure is None and (self._writing or self._unsent):
            self._progress.clear()
            await self._progress.wait()
        if self._failure is not None:
            raise self._failure

    async def settle_quietly(self) -> None:
        """`settle` for a writer that was cancelled: let what is on the wire
        land (and be shown) so what readers saw and the End agree; errors are
        not this caller's any more."""
        with contextlib.suppress(Exception):
            await self.settle()

    def _send(self) -> None:
        submits = self._submits
        assert submits is not None
        entries, self._unsent = self._unsent, []
        self._on_wire, self._on_wire_bytes = entries, self._unsent_bytes
        self._unsent_bytes = 0
        self._writing = True
        try:
            submits.post_append(self.stream_id, entries, self._written, epoch=self.epoch)
        except Exception as error:  # the store is closed: fail as a write would
            self._written(error)

    def _written(self, error: BaseException | None) -> None:
        """The store's answer to the write on the wire (called once, from
        the store's step: no loop step of its own before readers see it)."""
        entries, self._on_wire = self._on_wire, []
        self._writing = False
        self._on_wire_bytes = 0  # (recorded now, or dropped with the failure)
        if error is None:
            if self.entries.end is None:  # (an unstored End may have closed it meanwhile)
                self._record(entries)
                durable = self._on_durable
                if durable is not None:
                    for entry in entries:
                        if type(entry) is Chunk:
                            durable(entry)
            if self._unsent and self._failure is None:
                self._send()
        elif self._failure is None:
            # Nothing after a failed write can be stored in order: what is
            # queued is dropped, and the writer learns of it at its next step.
            self._failure = error
            self._unsent = []
            self._unsent_bytes = 0
            self._submitted_seq = self.entries.last_seq
            if self._on_write_failed is not None:
                self._on_write_failed(error)
        self._progress.set()

    async def append(self, entries: Sequence[LogEntry]) -> None:
        """Store `entries`, then show them. Raises what the store raises."""
        if self.appends_now:
            self.append_now(entries)
            return
        if self.writes_behind:
            # In order behind every chunk written behind, recorded by the
            # write's own callback (so a cancelled caller changes nothing).
            self._hand_over(entries)
            await self.settle()
            return
        if self._store.in_process:
            # Nothing in an in-process append can suspend, so no cancellation
            # can land between the write and our record of it.
            await self._store.append(self.stream_id, entries, epoch=self.epoch)
            self._record(entries)
            return
        write = asyncio.ensure_future(self._store.append(self.stream_id, entries, epoch=self.epoch))
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # A stop or shutdown cancelled us while the write was on the wire;
            # it may still land. Let it finish, record it if it did, then go
            # on being cancelled, so what clients saw and the End agree.
            with contextlib.suppress(Exception):
                await write
            if write.done() and not write.cancelled() and write.exception() is None:
                self._record(entries)
            raise
        self._record(entries)

    def fail_readers(self, error: BaseException) -> None:
        """End every attached reader's read with `error` (a fenced writer)."""
        for subscription in list(self._subscribers):
            subscription.fail(error)

    def record_unstored(self, end: End) -> None:
        """The store is gone: let local readers at least learn how it ended."""
        if self.entries.end is None:
            self.entries.add([end])
        self._wake()

    def _record(self, entries: Sequence[LogEntry]) -> None:
        if not self._shared:  # a shared log got them from the store's append
            self.entries.add(entries)
        self._wake()

    def _wake(self) -> None:
        for subscription in self._subscribers:
            subscription.ring()
        if self.entries.end is not None:
            self._settle_finished()
