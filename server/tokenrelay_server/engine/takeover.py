"""Who generates a stream, across replicas: leases, cancels sent to another
replica, and the takeover of a stream whose owner died (guarantee 5).

- A replica that starts a generation holds the stream's lease in the store
  and renews it (`keep_lease`) every third of its TTL, on the injected clock.
  The same loop honours a cancel that a client sent to another replica
  (`request_cancel` in the store).
- A reader that finds an unfinished stream whose lease lapsed (its owner is
  gone: killed, partitioned) takes the lease and continues the generation
  from the stored log by continuation (`take_over`). Where that cannot be
  done (no stored request, a model this replica does not route, draining),
  it ends the stream with what was produced and OWNER_LOST (`orphan_end`).
- Fencing (issue 9): taking the lease raises the stream's epoch; the new
  generation writes with it, so the old owner (paused, not dead) can write
  nothing more. A keeper that finds its lease gone fences its generation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.digest import ChunkDigests
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction, UnknownModel
from tokenrelay_server.core.model import Chunk, End, LogEntry, StreamMeta, Usage
from tokenrelay_server.engine.cursor import LogCursor
from tokenrelay_server.engine.generation import Generation, stop_fault
from tokenrelay_server.engine.routing import Route, Router
from tokenrelay_server.store.base import StreamStore
from tokenrelay_server.store.errors import StoreError, StreamFenced

log = logging.getLogger(__name__)


def cancel_fault(reason: str) -> Fault:
    return stop_fault("CANCELLED", "cancelled by the client" + (f": {reason}" if reason else ""))


def owner_lost_fault(*, continued_by: str | None = None, at_seq: int = 0) -> Fault:
    """The stream's owner stopped: as a notice when `continued_by` carries it
    on, else as the error of the End."""
    if continued_by is not None:
        return Fault(
            type=ErrorType.APPLICATION,
            code="OWNER_LOST",
            message=(
                "the replica generating this stream stopped; replica "
                f"{continued_by} continues it from seq {at_seq}"
            ),
            retryable=True,
            suggested_action=SuggestedAction.RESUME,
            fatal=False,
        )
    return Fault(
        type=ErrorType.APPLICATION,
        code="OWNER_LOST",
        message="the replica generating this stream stopped; this is what it produced",
        retryable=True,
        suggested_action=SuggestedAction.RETRY,
    )


def orphan_end(entries: list[LogEntry]) -> End:
    """The End of a stream whose generation cannot be continued."""
    chunks = [e for e in entries if isinstance(e, Chunk)]
    digests = ChunkDigests.of(chunks)
    return End(
        finish_reason="error",
        total_seq=len(chunks),
        text_sha256=digests.text_sha256(),
        usage=Usage(completion_tokens=max((c.tokens_so_far for c in chunks), default=0)),
        partial=True,
        error=owner_lost_fault(),
        chunks_sha256=digests.chunks_sha256(),
    )


async def read_log(store: StreamStore, stream_id: str) -> list[LogEntry]:
    """The whole stored log of a stream, page by page."""
    cursor = LogCursor(0)
    entries: list[LogEntry] = []
    while page := cursor.take(await store.read(stream_id, cursor.seq)):
        entries += page
    return entries


@dataclass(frozen=True, slots=True)
class Leases:
    """This replica's name and how it holds leases."""

    store: StreamStore
    replica_id: str
    ttl_s: float
    clock: Clock

    async def keep(
        self, generation: Generation, also: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Renew the lease of a generation running here, and honour cancels
        sent to other replicas, until the generation has finished (the hub
        also cancels it then).

        Not on the cancel alone: redis-py (8.1, Python 3.11) can lose a
        cancellation that arrives during a command, and the command then
        returns as if nothing happened; a keeper looping on `while True`
        would renew the lease for ever and the hub, awaiting it, would keep
        the finished generation registered (a stream left DETACHED, its slot
        of max_streams held: found by bench/soak.py on Redis,
        and by the nemesis). `also` renews what lives with the lease (the
        tenant's quota slot, issue 13) in the same step."""
        stream_id = generation.stream_id
        while not generation.finished.is_set():
            await self.clock.sleep(self.ttl_s / 3)
            if generation.finished.is_set():
                return
            try:
                renewed = await self.store.renew_lease(
                    stream_id, self.replica_id, self.ttl_s, epoch=generation.epoch
                )
                if not renewed:
                    log.warning("stream %s: lost its lease; stopping its generation", stream_id)
                    generation.fence(
                        StreamFenced(
                            f"stream {stream_id}: this replica lost its lease; resume it "
                            "(anywhere) with your latest resume token"
                        )
                    )
                    return
                if also is not None:
                    await also()
                reason = await self.store.cancel_requested(stream_id)
            except StoreError as error:
                # Retried within the store's window already; the appends see it too.
                log.warning("stream %s: lease renewal failed: %s", stream_id, error)
                continue
            if reason is not None:
                generation.stop(cancel_fault(reason))


class Takeover:
    """Continue streams whose owner died."""

    def __init__(
        self,
        *,
        leases: Leases,
        router: Router,
        make_generation: Callable[[StreamMeta, list[Route], int], Generation],
        draining: Callable[[], bool],
    ) -> None:
        self._leases = leases
        self._router = router
        self._make_generation = make_generation
        self._draining = draining

    async def take_over(self, stream_id: str) -> Generation | None:
        """Take the lapsed lease of an unfinished stream and return a restored
        generation for the caller to run; or end the stream OWNER_LOST when
        it cannot be continued here. None when another replica got the lease
        first, or there is nothing to continue."""
        store, owner = self._leases.store, self._leases.replica_id
        epoch = await store.acquire_lease(stream_id, owner, self._leases.ttl_s)
        if epoch is None:
            return None
        handed_over = False
        try:
            meta = await store.get_meta(stream_id)
            tail = await store.tail(stream_id)
            if meta is None or tail is None or tail.ended:
                return None
            entries = await read_log(store, stream_id)
            routes = None
            if meta.request is not None and not self._draining():
                with contextlib.suppress(UnknownModel):
                    routes = self._router.resolve(meta.model)
            if meta.request is None or routes is None:
                await store.append(stream_id, [orphan_end(entries)], epoch=epoch)
                log.warning(
                    "stream %s: owner lost; ended partial at seq %d", stream_id, tail.last_seq
                )
                return None
            generation = self._make_generation(meta, routes, epoch)
            generation.restore(entries)
            await generation.notice(owner_lost_fault(continued_by=owner, at_seq=tail.last_seq))
            handed_over = True
            # The hub tells observers (TakenOver); the log observer writes its line.
            return generation
        finally:
            if not handed_over:
                await store.release_lease(stream_id, owner)
