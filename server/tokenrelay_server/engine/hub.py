"""The stream hub: which streams exist, who generates them, who reads them.

The hub owns every generation task of this replica (they outlive the RPC
that started them: guarantee 4) and every attached reader. It knows nothing
of protobuf; the servicer translates.

Reading a stream:
- generated here: from the generation's in-memory entries (already stored),
  then live as they arrive;
- generated elsewhere, or finished: from the store, waiting on it for more.
  When the stream is unfinished and nobody holds its lease (the owning
  replica died), the reader ends it with a typed partial (OWNER_LOST).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import Draining as DrainingError
from tokenrelay_server.core.errors import (
    ErrorType,
    Fault,
    Overloaded,
    RequestError,
    StreamNotFound,
    SuggestedAction,
    UnknownModel,
)
from tokenrelay_server.core.model import (
    Chunk,
    End,
    LogEntry,
    Notice,
    StartRequest,
    StreamMeta,
    Usage,
)
from tokenrelay_server.engine.generation import Generation, Recovery, Subscription, stop_fault
from tokenrelay_server.engine.routing import Router
from tokenrelay_server.store.base import StreamStore

log = logging.getLogger(__name__)


class LogCursor:
    """Where a reader of the stored log stands: after chunk `seq`, having seen
    `notices` of the notices that follow it. `take` drops what was already
    read (a read after chunk S repeats the notices after S)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.notices = 0
        self.ended = False

    def take(self, entries: list[LogEntry]) -> list[LogEntry]:
        fresh: list[LogEntry] = []
        notices_here = 0
        for entry in entries:
            if isinstance(entry, Notice):
                if entry.after_seq == self.seq:
                    notices_here += 1
                    if notices_here <= self.notices:
                        continue
                    self.notices = notices_here
            elif isinstance(entry, Chunk):
                if entry.seq <= self.seq:
                    continue
                self.seq, self.notices, notices_here = entry.seq, 0, 0
            else:
                self.ended = True
            fresh.append(entry)
            if self.ended:
                break
        return fresh


def orphan_end(entries: list[LogEntry]) -> End:
    """The End of a stream whose generation cannot be continued."""
    chunks = [e for e in entries if isinstance(e, Chunk)]
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.text.encode())
    return End(
        finish_reason="error",
        total_seq=len(chunks),
        text_sha256=digest.hexdigest(),
        usage=Usage(completion_tokens=len(chunks)),
        partial=True,
        error=Fault(
            type=ErrorType.APPLICATION,
            code="OWNER_LOST",
            message="the replica generating this stream stopped; this is what it produced",
            retryable=True,
            suggested_action=SuggestedAction.RETRY,
        ),
    )


@dataclass(eq=False)
class Session:
    """One call attached to one stream."""

    meta: StreamMeta
    resumed: bool
    after_seq: int
    subscription: Subscription
    generation: Generation | None

    @property
    def stream_id(self) -> str:
        return self.meta.stream_id


@dataclass(frozen=True, slots=True)
class HubSettings:
    detach_grace_s: float = 60.0
    checkpoint_interval: int = 10
    max_streams: int = 10_000
    lease_ttl_s: float = 10.0
    store_poll_s: float = 1.0
    max_memory_bytes: int = 0  # 0: no limit
    memory_check_interval_s: float = 1.0


class StreamHub:
    def __init__(
        self,
        *,
        store: StreamStore,
        router: Router,
        tokens: ResumeTokens,
        clock: Clock,
        recovery: Recovery,
        settings: HubSettings = HubSettings(),
        replica_id: str | None = None,
    ) -> None:
        self.store = store
        self.router = router
        self.tokens = tokens
        self._clock = clock
        self.recovery = recovery
        self._settings = settings
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self._local: dict[str, Generation] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[Session] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        self.max_memory_bytes = settings.max_memory_bytes
        self.memory_exceeded: int | None = None  # resident bytes when over the limit

    # -- introspection (tests, metrics, the benchmark) ---------------------------------

    @property
    def running_generations(self) -> int:
        return len(self._local)

    @property
    def attached_sessions(self) -> int:
        return len(self._sessions)

    def generation(self, stream_id: str) -> Generation | None:
        return self._local.get(stream_id)

    # -- start and resume ------------------------------------------------------------

    async def start(self, request: StartRequest, *, deadline_s: float | None = None) -> Session:
        """A new stream (or the one its idempotency key names). `deadline_s`
        is the caller's gRPC deadline: the generation stops when it passes."""
        if self.draining:
            raise DrainingError("the server is draining; start the stream on another replica")
        if self.memory_exceeded is not None:
            raise Overloaded(
                f"this replica is over its memory limit ({self.memory_exceeded >> 20} MiB of "
                f"{self.max_memory_bytes >> 20} MiB); retry later or on another replica"
            )
        self.router.validate(request)
        routes = self.router.resolve(request.model)
        if len(self._local) >= self._settings.max_streams:
            raise Overloaded(
                f"this replica is generating {len(self._local)} streams, its limit; retry later"
            )
        meta = StreamMeta(
            stream_id=uuid.uuid4().hex,
            model=request.model,
            created_at=self._clock.wall(),
            checkpoint_interval=request.policy.checkpoint_interval
            or self._settings.checkpoint_interval,
            request=request,
            idempotency_key=request.idempotency_key,
        )
        meta, created = await self.store.create(meta)
        if not created:
            if meta.request is not None and meta.request != request:
                raise RequestError(
                    "start.idempotency_key was already used for a different request "
                    f"(stream {meta.stream_id}); use a new key for a new request"
                )
            return await self._attach(meta, after_seq=0)
        try:
            await self.store.acquire_lease(
                meta.stream_id, self.replica_id, self._settings.lease_ttl_s
            )
            generation = Generation(
                meta=meta,
                request=request,
                chain=routes,
                store=self.store,
                recovery=self.recovery,
                detach_grace_s=self._settings.detach_grace_s,
                deadline_s=deadline_s,
            )
        except BaseException:
            await self.store.delete(meta.stream_id)
            raise
        subscription = Subscription()
        generation.attach(subscription)
        self._run(generation)
        return self._open(Session(meta, False, 0, subscription, generation))

    def _run(self, generation: Generation) -> None:
        """Register a generation and start its task, which the hub owns."""
        self._local[generation.stream_id] = generation
        task = asyncio.create_task(self._own(generation), name=f"generation {generation.stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resume(self, token: str, last_seq: int) -> Session:
        grant = self.tokens.verify(token)
        meta = await self.store.get_meta(grant.stream_id)
        if meta is None:
            raise StreamNotFound(
                f"stream {grant.stream_id} has expired or never existed; start a new stream"
            )
        return await self._attach(meta, after_seq=last_seq)

    async def _attach(self, meta: StreamMeta, *, after_seq: int) -> Session:
        generation = self._local.get(meta.stream_id)
        if generation is not None:
            current = generation.last_seq
        else:
            tail = await self.store.tail(meta.stream_id)
            if tail is None:
                raise StreamNotFound(f"stream {meta.stream_id} has expired; start a new stream")
            current = tail.last_seq
            # A takeover on this replica may have started generating it meanwhile.
            generation = self._local.get(meta.stream_id)
            if generation is not None and generation.last_seq > current:
                current = generation.last_seq
        if after_seq > current:
            raise RequestError(
                f"resume.last_seq={after_seq} is beyond the stream's last seq {current}"
            )
        subscription = Subscription()
        if generation is not None:
            generation.attach(subscription)
        return self._open(Session(meta, True, after_seq, subscription, generation))

    def _open(self, session: Session) -> Session:
        self._sessions.add(session)
        self._idle.clear()
        return session

    # -- reading ---------------------------------------------------------------------

    async def follow(self, session: Session) -> AsyncIterator[list[LogEntry]]:
        """Every entry of the session's stream after its `after_seq`, until the
        End, in batches."""
        generation = session.generation
        try:
            if generation is not None:
                source = generation.follow(session.after_seq, session.subscription)
            else:
                source = self._follow_store(session)
            async with contextlib.aclosing(source) as entries:
                async for batch in entries:
                    yield batch
        finally:
            self.release(session)

    def release(self, session: Session) -> None:
        """Detach a session from its stream (idempotent). The servicer calls it
        when its call ends, whether or not it ever started reading."""
        if session not in self._sessions:
            return
        if session.generation is not None:
            session.generation.detach(session.subscription)
        self._sessions.discard(session)
        if not self._sessions:
            self._idle.set()

    async def _follow_store(self, session: Session) -> AsyncIterator[list[LogEntry]]:
        stream_id = session.stream_id
        cursor = LogCursor(session.after_seq)
        while True:
            if session.subscription.violation is not None:
                raise session.subscription.violation
            entries = await self.store.wait(stream_id, cursor.seq, self._settings.store_poll_s)
            if entries:
                batch = cursor.take(entries)
                if batch:
                    yield batch
                if cursor.ended:
                    return
                continue
            tail = await self.store.tail(stream_id)
            if tail is None:
                raise StreamNotFound(f"stream {stream_id} expired while being read")
            if tail.ended or await self.store.lease_owner(stream_id) is not None:
                continue
            generation = await self._take_over(stream_id)
            if generation is None:
                continue
            # We generate it now: read it live, like any local stream.
            session.generation = generation
            generation.attach(session.subscription)
            async with contextlib.aclosing(
                generation.follow(cursor.seq, session.subscription)
            ) as batches:
                async for entries in batches:
                    batch = cursor.take(entries)
                    if batch:
                        yield batch
            return

    async def _take_over(self, stream_id: str) -> Generation | None:
        """The owner's lease lapsed with the stream unfinished: its replica died.
        Take the lease and continue the generation here by continuation from
        the stored log (guarantee 5). Where that cannot be done (no stored
        request, a model this replica does not route, draining), end it with
        what was produced and OWNER_LOST. None when another replica got the
        lease first or the stream is not ours to continue."""
        ttl_s = self._settings.lease_ttl_s
        if not await self.store.acquire_lease(stream_id, self.replica_id, ttl_s):
            return None
        handed_over = False
        try:
            meta = await self.store.get_meta(stream_id)
            tail = await self.store.tail(stream_id)
            if meta is None or tail is None or tail.ended:
                return None
            entries = await self._read_log(stream_id)
            routes = None
            if meta.request is not None and not self.draining:
                with contextlib.suppress(UnknownModel):
                    routes = self.router.resolve(meta.model)
            if meta.request is None or routes is None:
                await self.store.append(stream_id, [orphan_end(entries)])
                log.warning(
                    "stream %s: owner lost; ended partial at seq %d", stream_id, tail.last_seq
                )
                return None
            generation = Generation(
                meta=meta,
                request=meta.request,
                chain=routes,
                store=self.store,
                recovery=self.recovery,
                detach_grace_s=self._settings.detach_grace_s,
            )
            generation.restore(entries)
            await generation.notice(
                Fault(
                    type=ErrorType.APPLICATION,
                    code="OWNER_LOST",
                    message=(
                        "the replica generating this stream stopped; replica "
                        f"{self.replica_id} continues it from seq {tail.last_seq}"
                    ),
                    retryable=True,
                    suggested_action=SuggestedAction.RESUME,
                    fatal=False,
                )
            )
            self._run(generation)
            generation.arm_grace()
            handed_over = True
            log.warning("stream %s: owner lost; taken over at seq %d", stream_id, tail.last_seq)
            return generation
        finally:
            if not handed_over:
                await self.store.release_lease(stream_id, self.replica_id)

    async def _read_log(self, stream_id: str) -> list[LogEntry]:
        cursor = LogCursor(0)
        entries: list[LogEntry] = []
        while page := cursor.take(await self.store.read(stream_id, cursor.seq)):
            entries += page
        return entries

    # -- control ---------------------------------------------------------------------

    async def cancel(self, session: Session, reason: str) -> None:
        generation = self._local.get(session.stream_id)
        message = "cancelled by the client" + (f": {reason}" if reason else "")
        if generation is not None:
            generation.stop(stop_fault("CANCELLED", message))
        else:
            await self.store.request_cancel(session.stream_id, reason)

    async def _own(self, generation: Generation) -> None:
        keeper = asyncio.create_task(self._keep_lease(generation))
        try:
            await generation.run()
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            self._local.pop(generation.stream_id, None)
            with contextlib.suppress(Exception):
                await self.store.release_lease(generation.stream_id, self.replica_id)

    async def _keep_lease(self, generation: Generation) -> None:
        """Renew the lease and honour cancels sent to other replicas."""
        stream_id = generation.stream_id
        interval = self._settings.lease_ttl_s / 3
        while True:
            await self._clock.sleep(interval)
            try:
                if not await self.store.renew_lease(
                    stream_id, self.replica_id, self._settings.lease_ttl_s
                ):
                    log.warning("stream %s: lost its lease", stream_id)
                reason = await self.store.cancel_requested(stream_id)
            except Exception:
                log.exception("stream %s: lease renewal failed", stream_id)
                continue
            if reason is not None:
                message = "cancelled by the client" + (f": {reason}" if reason else "")
                generation.stop(stop_fault("CANCELLED", message))

    def check_memory(self, resident: int | None) -> None:
        """Enforce the memory limit given the process's resident bytes: over
        it, refuse new streams and end the running ones as typed partials."""
        if not self.max_memory_bytes or resident is None:
            return
        if resident <= self.max_memory_bytes:
            if self.memory_exceeded is not None:
                log.warning("memory back under the limit: taking new streams again")
            self.memory_exceeded = None
            return
        if self.memory_exceeded is None:
            log.warning(
                "memory limit passed (%d MiB of %d MiB): refusing new streams, ending %d",
                resident >> 20,
                self.max_memory_bytes >> 20,
                len(self._local),
            )
        self.memory_exceeded = resident
        fault = Fault(
            type=ErrorType.RESOURCE,
            code="MEMORY_LIMIT",
            message=(
                f"the gateway replica passed its memory limit ({resident >> 20} MiB of "
                f"{self.max_memory_bytes >> 20} MiB); this is what was produced"
            ),
            retryable=True,
            suggested_action=SuggestedAction.RETRY,
        )
        for generation in list(self._local.values()):
            generation.stop(fault)

    async def guard_memory(self, probe: Callable[[], int | None]) -> None:
        """Check the memory limit every `memory_check_interval_s` (owned by
        the server, cancelled when it stops)."""
        while True:
            self.check_memory(probe())
            await self._clock.sleep(self._settings.memory_check_interval_s)

    async def drain(self, grace_s: float) -> None:
        """Stop taking new streams; give open calls and running generations
        `grace_s` to finish; then tell the remaining calls UNAVAILABLE (their
        resume tokens stay valid) and end the remaining generations."""
        self.draining = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
                if self._tasks:
                    await asyncio.wait(set(self._tasks))
        for session in list(self._sessions):
            session.subscription.fail(
                DrainingError(
                    "the server is shutting down; reconnect (to another replica) and resume "
                    "with your latest resume token"
                )
            )
        await self.close()

    async def close(self) -> None:
        """End every generation of this replica (SERVER_SHUTDOWN) and wait for them."""
        for generation in list(self._local.values()):
            generation.stop(
                stop_fault(
                    "SERVER_SHUTDOWN",
                    "the replica generating this stream shut down; start it again",
                    retryable=True,
                )
            )
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
