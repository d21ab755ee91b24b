"""The stream hub: which streams exist, who generates them, who reads them.

The hub owns every generation task of this replica (they outlive the RPC
that started them: guarantee 4) and every attached reader. It knows nothing
of protobuf or resume tokens; the servicer translates and verifies.

Reading a stream:
- generated here: from the generation's local log (already stored), then
  live as it grows;
- generated elsewhere, or finished: from the store, waiting on it for more.
  When the stream is unfinished and nobody holds its lease, or the lease's
  owner has no heartbeat any more (the owning replica died: issue 9 defect
  7, store/heartbeat.py), the reader takes it over and continues it here
  (takeover.py), or ends it OWNER_LOST when it cannot be continued.

Admission is one synchronous step: the check against `max_streams` and the
reservation of the slot happen with no await between them, so concurrent
starts can never admit more than the limit. A start is refused (`Overloaded`,
with the `shed_retry_after_s` to wait) while the replica is over
`max_streams` (running and detached generations), over its memory limit, or
while its event loop lags (loop_lag.py): the servicer decides it after
reading the first request, so a refusal is a clean RESOURCE_EXHAUSTED. A
takeover is a new generation too, held to the same limits (`_take_over`):
refused, it is `TakeoverRefused` (UNAVAILABLE) and the stream is left as it
was, for another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import Draining as DrainingError
from tokenrelay_server.core.errors import (
    ErrorType,
    Fault,
    Overloaded,
    QuotaExceeded,
    RequestError,
    StreamNotFound,
    SuggestedAction,
    TakeoverRefused,
)
from tokenrelay_server.core.limits import HubSettings
from tokenrelay_server.core.model import LogEntry, StartRequest, StreamMeta
from tokenrelay_server.engine.cursor import LogCursor
from tokenrelay_server.engine.events import Observers, ReaderAttached, StreamStarted, TakenOver
from tokenrelay_server.engine.fanout import Subscription
from tokenrelay_server.engine.generation import Generation, stop_fault
from tokenrelay_server.engine.loop_lag import LoopLagMonitor
from tokenrelay_server.engine.recovery_loop import Recovery
from tokenrelay_server.engine.routing import Route, Router
from tokenrelay_server.engine.takeover import Leases, Takeover, cancel_fault
from tokenrelay_server.store.base import ReadStart, StreamStore, StreamTail
from tokenrelay_server.store.errors import StoreError, StoreUnavailable, StreamFenced
from tokenrelay_server.store.heartbeat import Heartbeats
from tokenrelay_server.store.quota import Quota, QuotaLimits

log = logging.getLogger(__name__)

# A follower looks at a live owner's heartbeat again this long after it
# would lapse (a renewal in flight, the store's TTL timer).
HEARTBEAT_RECHECK_SLACK_S = 0.05


NO_QUOTA = QuotaLimits()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who starts or resumes a stream (issue 13): the tenant of the call's API
    key ("" on a gateway with no keys) and that tenant's quota."""

    tenant: str = ""
    limits: QuotaLimits = NO_QUOTA
    default_max_tokens: int = 1024

    @property
    def has_quota(self) -> bool:
        return (
            self.limits.max_concurrent_streams is not None
            or self.limits.tokens_per_minute is not None
        )


ANONYMOUS = Caller()


def tenant_of(meta: StreamMeta) -> str:
    """The tenant a stream belongs to ("" when started on an open gateway)."""
    return meta.extra.get("tenant", "")


@dataclass(eq=False)
class Session:
    """One call attached to one stream."""

    meta: StreamMeta
    resumed: bool
    after_seq: int
    subscription: Subscription
    generation: Generation | None
    # Entries a resume's first look already read (store.open_read): the
    # follower starts with them instead of reading again.
    prefetched: list[LogEntry] | None = None

    @property
    def stream_id(self) -> str:
        return self.meta.stream_id


class StreamHub:
    def __init__(
        self,
        *,
        store: StreamStore,
        router: Router,
        clock: Clock,
        recovery: Recovery,
        settings: HubSettings | None = None,
        replica_id: str | None = None,
        observers: Observers | None = None,
        heartbeats: Heartbeats | None = None,
        loop_lag: LoopLagMonitor | None = None,
        quota: Quota | None = None,
    ) -> None:
        self.store = store
        self.loop_lag = loop_lag
        self.quota = quota
        self.router = router
        self._clock = clock
        self.recovery = recovery
        self._settings = settings or HubSettings()
        self.replica_id = replica_id or uuid.uuid4().hex[:12]
        self.observe = observers or Observers()
        # None (the memory store): no other replica; streams change owner
        # only when a lease lapses.
        self.heartbeats = heartbeats
        self._local: dict[str, Generation] = {}
        self._admitting = 0  # starts admitted but not yet registered in _local
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: set[Session] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        # False while the server's store probe cannot reach the store: new
        # streams are refused at once (UNAVAILABLE naming the store).
        self.store_available = True
        self.max_memory_bytes = self._settings.max_memory_bytes
        self.memory_exceeded: int | None = None  # resident bytes when over the limit
        self.leases = Leases(store, self.replica_id, self._settings.lease_ttl_s, clock)
        self._takeover = Takeover(
            leases=self.leases,
            router=router,
            make_generation=lambda meta, routes, epoch: self._generation(
                meta, meta.request, routes, epoch=epoch
            ),
            draining=lambda: self.draining,
        )

    # -- introspection (tests, metrics, the benchmark) ---------------------------------

    @property
    def running_generations(self) -> int:
        return len(self._local)

    @property
    def attached_sessions(self) -> int:
        return len(self._sessions)

    def generation(self, stream_id: str) -> Generation | None:
        return self._local.get(stream_id)

    def generations(self) -> list[Generation]:
        """Every generation running on this replica (a time keeper must know
        them all to know that none of them waits on anything but time)."""
        return list(self._local.values())

    def sessions(self) -> list[Session]:
        """Every call attached to a stream on this replica (a copy)."""
        return list(self._sessions)

    # -- start and resume ------------------------------------------------------------

    def _admit(self) -> None:
        """Refuse a new generation (raise), or reserve its slot; no await here."""
        if self.draining:
            raise DrainingError("the server is draining; start the stream on another replica")
        if not self.store_available:
            raise StoreUnavailable(
                f"{self.store.label} is unreachable; start the stream on another replica "
                "or retry shortly"
            )
        wait_s = self._settings.shed_retry_after_s
        self._shed(Overloaded, f"retry in {wait_s:g} s or on another replica")
        self._admitting += 1

    def _shed(self, refusal: type[Overloaded], advice: str) -> None:
        """Raise `refusal` while this replica has no room for another
        generation: at max_streams, over its memory limit, or saturated."""
        wait_s = self._settings.shed_retry_after_s
        running = len(self._local) + self._admitting
        if running >= self._settings.max_streams:
            raise refusal(
                f"this replica is generating {running} streams (running and detached), its "
                f"limit (max_streams); {advice}",
                reason="MAX_STREAMS",
                retry_after_s=wait_s,
            )
        if self.memory_exceeded is not None:
            raise refusal(
                f"this replica is over its memory limit ({self.memory_exceeded >> 20} MiB of "
                f"{self.max_memory_bytes >> 20} MiB); {advice}",
                reason="MEMORY_LIMIT",
                retry_after_s=wait_s,
            )
        lag = self.loop_lag
        if lag is not None and lag.overloaded:
            settings = lag.settings
            raise refusal(
                f"this replica is saturated: its event loop's p{settings.quantile * 100:g} lag "
                f"over the last {settings.window_s:g} s is {lag.lag_s() * 1000:.0f} ms, above "
                f"max_loop_lag_ms {settings.threshold_s * 1000:g}; {advice}",
                reason="LOOP_LAG",
                retry_after_s=wait_s,
            )

    async def _take_over(self, stream_id: str) -> Generation | None:
        """`Takeover.take_over` within this replica's limits: a stream whose
        owner died is a new generation here, so it is shed as a start is
        (TakeoverRefused, UNAVAILABLE: the stream stays intact and unowned,
        for another replica or a later resume here)."""
        wait_s = self._settings.shed_retry_after_s
        self._shed(
            TakeoverRefused,
            f"so it cannot continue stream {stream_id}, whose owner stopped; the stream is "
            f"intact: resume it on another replica, or here in {wait_s:g} s",
        )
        self._admitting += 1  # the slot is held across the takeover's awaits
        try:
            generation = await self._takeover.take_over(stream_id)
            if generation is not None:
                self._run(generation)
            return generation
        finally:
            self._admitting -= 1

    async def start(
        self,
        request: StartRequest,
        *,
        deadline_s: float | None = None,
        caller: Caller = ANONYMOUS,
    ) -> Session:
        """A new stream (or the one its idempotency key names, among the
        caller's tenant's). `deadline_s` is the caller's gRPC deadline: the
        generation stops when it passes."""
        self.router.validate(request)
        routes = self.router.resolve(request.model)
        self._admit()
        try:
            return await self._start_admitted(request, routes, deadline_s, caller)
        finally:
            self._admitting -= 1

    async def _admit_quota(self, caller: Caller, stream_id: str, request: StartRequest) -> bool:
        """Take the tenant's slot and token reservation (raises QuotaExceeded);
        False when the tenant has no quota."""
        if self.quota is None or not caller.has_quota:
            return False
        reserve = request.params.max_tokens or caller.default_max_tokens
        per_minute = caller.limits.tokens_per_minute
        if per_minute is not None and reserve > per_minute:
            raise RequestError(
                f"params.max_tokens ({reserve}) is more than tenant {caller.tenant}'s "
                f"tokens_per_minute ({per_minute}); ask for fewer tokens"
            )
        await self.quota.admit(caller.tenant, stream_id, caller.limits, reserve)
        return True

    async def _start_admitted(
        self,
        request: StartRequest,
        routes: list[Route],
        deadline_s: float | None,
        caller: Caller = ANONYMOUS,
    ) -> Session:
        key = request.idempotency_key
        meta = StreamMeta(
            # 128 random bits (issue 13): a stream id cannot be guessed.
            stream_id=secrets.token_hex(16),
            model=request.model,
            created_at=self._clock.wall(),
            checkpoint_interval=request.policy.checkpoint_interval
            or self._settings.checkpoint_interval,
            request=request,
            # Scoped to the tenant: another tenant's identical key is another stream.
            idempotency_key=f"{caller.tenant or '-'}:{key}" if key else "",
            extra={"tenant": caller.tenant} if caller.tenant else {},
        )
        stream_id = meta.stream_id  # the slot's, whatever `create` answers
        try:
            holds_slot = await self._admit_quota(caller, stream_id, request)
        except QuotaExceeded:
            # A retry of a start that already runs is attached, not refused
            # (the running stream holds its slot already): asked only here,
            # so a start under its quota makes no extra store call.
            existing = await self.store.find_idempotent(meta.idempotency_key) if key else None
            if existing is None:
                raise
            return await self._attach_retry(existing, request, caller)

        async def give_back_slot() -> None:
            if holds_slot:
                await self._release_slot(caller.tenant, stream_id, 0)

        try:
            meta, created = await self.store.create(meta)
        except BaseException:
            await give_back_slot()
            raise
        if not created:
            # An idempotent retry: `meta` is the existing stream's, and so
            # is its slot; the one taken for this call goes back.
            await give_back_slot()
            return await self._attach_retry(meta, request, caller)
        try:
            epoch = await self.store.acquire_lease(
                meta.stream_id, self.replica_id, self.leases.ttl_s
            )
            generation = self._generation(meta, request, routes, deadline_s=deadline_s, epoch=epoch)
        except BaseException:
            with contextlib.suppress(StoreError):
                await self.store.delete(meta.stream_id)
            await give_back_slot()
            raise
        subscription = Subscription()
        generation.attach(subscription)
        self._run(generation)
        if self.observe:
            prompt = request.messages[-1].content if request.messages else ""
            self.observe(StreamStarted(meta.stream_id, meta.model, self._clock.monotonic(), prompt))
        return self._open(Session(meta, False, 0, subscription, generation))

    async def _attach_retry(
        self, meta: StreamMeta, request: StartRequest, caller: Caller
    ) -> Session:
        """Attach an idempotent retry to the stream its key names (`meta`),
        if it is the same tenant's same request."""
        if tenant_of(meta) != caller.tenant or (
            meta.request is not None and meta.request != request
        ):
            # Never names the stream: the key may be a guess at someone else's.
            raise RequestError(
                "start.idempotency_key was already used for a different request; "
                "use a new key for a new request"
            )
        return await self._attach(meta, after_seq=0)

    def _generation(
        self,
        meta: StreamMeta,
        request: StartRequest | None,
        routes: list[Route],
        *,
        deadline_s: float | None = None,
        epoch: int | None = None,
    ) -> Generation:
        assert request is not None
        return Generation(
            meta=meta,
            request=request,
            chain=routes,
            store=self.store,
            recovery=self.recovery,
            detach_grace_s=self._settings.detach_grace_s,
            deadline_s=deadline_s,
            max_stream_bytes=self._settings.max_stream_bytes,
            observe=self.observe,
            epoch=epoch,
        )

    def _run(self, generation: Generation) -> None:
        """Register a generation and start its task, which the hub owns."""
        self._local[generation.stream_id] = generation
        task = asyncio.create_task(self._own(generation), name=f"generation {generation.stream_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _own(self, generation: Generation) -> None:
        tenant = tenant_of(generation.meta)
        quota = self.quota if tenant else None
        stream_id = generation.stream_id

        async def renew_slot() -> None:
            assert quota is not None
            await quota.renew(tenant, stream_id)

        # A tenant's slot lives with the generation's lease: renewed in the
        # same step, lapsing with it if this replica dies (store/quota.py).
        keeper = asyncio.create_task(
            self.leases.keep(generation, renew_slot if quota is not None else None),
            name="lease keeper",
        )
        try:
            await generation.run()
        finally:
            keeper.cancel()
            try:
                await keeper
            except asyncio.CancelledError:
                pass
            except Exception:  # never leave the generation registered
                log.exception("stream %s: its lease keeper failed", stream_id)
            self._local.pop(stream_id, None)
            with contextlib.suppress(Exception):
                await self.store.release_lease(stream_id, self.replica_id)
            if quota is not None:
                end = generation.end
                used = end.usage.completion_tokens if end is not None else 0
                await self._release_slot(tenant, stream_id, used)

    # -- heartbeat ---------------------------------------------------------------------

    async def beat(self) -> None:
        """Renew this replica's heartbeat once (the server does it before it
        serves, so no lease of ours ever exists without a heartbeat)."""
        if self.heartbeats is not None:
            await self.heartbeats.beat(self.replica_id, self._settings.heartbeat_ttl_s)

    async def keep_heartbeat(self) -> None:
        """Renew this replica's heartbeat every `heartbeat_interval_s` of the
        heartbeats' own clock (their TTL runs on it) until cancelled. A failed
        renewal is logged and retried at the next beat: while the store
        cannot be reached, other replicas may take our streams over, which
        is what the heartbeat is for."""
        if self.heartbeats is None:
            return
        while True:
            await self.heartbeats.clock.sleep(self._settings.heartbeat_interval_s)
            try:
                await self.beat()
            except Exception as error:  # a dependency failure, typed by the store
                log.warning("heartbeat not renewed: %s", error)

    async def stop_heartbeat(self) -> None:
        """Say this replica is gone (after its generations ended)."""
        if self.heartbeats is not None:
            await self.heartbeats.stop(self.replica_id)

    async def _owner_heartbeat_left(self, owner: str) -> float:
        """Seconds the owner of a lease still counts as alive: 0 when its
        heartbeat is gone; infinite without heartbeats, for ourselves, or when
        the store cannot say (then only the lease's lapse frees the stream)."""
        if self.heartbeats is None or owner == self.replica_id:
            return math.inf
        try:
            left = await self.heartbeats.remaining(owner)
        except Exception as error:  # typed by the store; assume it lives
            log.warning("cannot read the heartbeat of replica %s: %s", owner, error)
            return math.inf
        return 0.0 if left is None else left

    async def _release_slot(self, tenant: str, stream_id: str, used_tokens: int) -> None:
        """Free a slot; a store failure only delays it (the slot lapses with its TTL)."""
        if self.quota is None:
            return
        try:
            await self.quota.release(tenant, stream_id, used_tokens)
        except Exception:
            log.warning("stream %s: the quota slot could not be freed now; it lapses", stream_id)

    async def resume(self, stream_id: str, last_seq: int, *, tenant: str = "") -> Session:
        """Attach to a stream (the servicer verified the token naming it for
        `tenant`)."""
        gone = StreamNotFound(
            f"stream {stream_id} has expired or never existed; start a new stream"
        )
        generation = self._local.get(stream_id)
        if generation is not None:
            # Generated here: what a reader needs is in memory.
            if tenant_of(generation.meta) != tenant:
                raise gone
            return await self._attach(generation.meta, after_seq=last_seq)
        start = await self.store.open_read(stream_id, last_seq)
        if start is None or tenant_of(start.meta) != tenant:
            raise gone
        return await self._attach(start.meta, after_seq=last_seq, start=start)

    async def _fence_if_stale(self, generation: Generation) -> None:
        """A client has seen more of a stream than the generation running
        here: when the store holds more too, another replica took the stream
        over while this one was away (paused past its lease) and what this
        replica holds is stale. Stop it (as a refused append would) and send
        the client elsewhere; a client that is merely ahead of the log is
        refused by the caller."""
        tail = await self.store.tail(generation.stream_id)
        if tail is None or tail.last_seq <= generation.last_seq:
            return
        fenced = StreamFenced(
            f"stream {generation.stream_id} is continued by another replica; resume it "
            "again (on any replica) with your latest resume token"
        )
        generation.fence(fenced)
        raise fenced

    async def _attach(
        self, meta: StreamMeta, *, after_seq: int, start: ReadStart | None = None
    ) -> Session:
        generation = self._local.get(meta.stream_id)
        prefetched: list[LogEntry] | None = None
        if generation is not None:
            current = generation.last_seq
            if after_seq > current:
                await self._fence_if_stale(generation)
        else:
            if start is not None:
                tail: StreamTail | None = start.tail
                prefetched = start.entries
            else:
                tail = await self.store.tail(meta.stream_id)
            if tail is None:
                raise StreamNotFound(f"stream {meta.stream_id} has expired; start a new stream")
            current = tail.last_seq
            # A takeover on this replica may have started generating it meanwhile
            # (during the await): read the live one.
            generation = self._local.get(meta.stream_id)
            if generation is not None:
                current = max(current, generation.last_seq)
        if after_seq > current:
            raise RequestError(
                f"resume.last_seq={after_seq} is beyond the stream's last seq {current}"
            )
        subscription = Subscription()
        if generation is not None:
            generation.attach(subscription)
            prefetched = None  # read live from the generation
        return self._open(Session(meta, True, after_seq, subscription, generation, prefetched))

    def _open(self, session: Session) -> Session:
        self._sessions.add(session)
        self._idle.clear()
        if self.observe:
            self.observe(
                ReaderAttached(
                    stream_id=session.stream_id,
                    model=session.meta.model,
                    resumed=session.resumed,
                    after_seq=session.after_seq,
                    at=self._clock.monotonic(),
                )
            )
        return session

    # -- reading ---------------------------------------------------------------------

    def follow(self, session: Session) -> AsyncGenerator[list[LogEntry], None]:
        """Every entry of the session's stream after its `after_seq`, until the
        End, in batches. The caller closes it, then `release`s the session
        (no wrapper generator of ours in between: one layer less per token)."""
        generation = session.generation
        if generation is not None:
            return generation.follow(session.after_seq, session.subscription)
        return self._follow_store(session)

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

    async def _follow_store(self, session: Session) -> AsyncGenerator[list[LogEntry], None]:
        stream_id = session.stream_id
        cursor = LogCursor(session.after_seq)
        poll_s = self._settings.store_poll_s
        # The first look does not wait: a resume of a dead owner's stream is
        # taken over as soon as its heartbeat is gone, not a poll later.
        wait_s = 0.0
        while True:
            if session.subscription.violation is not None:
                raise session.subscription.violation
            if session.prefetched is not None:
                entries, session.prefetched = session.prefetched, None
            else:
                entries = await self.store.wait(
                    stream_id, cursor.seq, wait_s, seen_notices=cursor.notices
                )
            wait_s = poll_s
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
            if tail.ended:
                continue
            owner = await self.store.lease_owner(stream_id)
            if owner is not None:
                left = await self._owner_heartbeat_left(owner)
                if left > 0:
                    # Look again right after its heartbeat would lapse, if
                    # that comes before the next poll.
                    wait_s = min(poll_s, left + HEARTBEAT_RECHECK_SLACK_S)
                    continue
                # Its owner's heartbeat is gone: free the lease (only if that
                # owner still holds it) and take the stream over, without
                # waiting for the lease to lapse. An owner that was only
                # paused finds its lease gone when it wakes.
                log.warning(
                    "stream %s: owner %s has no heartbeat; taking the stream over",
                    stream_id,
                    owner,
                )
                await self.store.release_lease(stream_id, owner)
            generation = await self._take_over(stream_id)
            if generation is None:
                continue
            generation.arm_grace()
            if self.observe:
                self.observe(
                    TakenOver(
                        stream_id=stream_id,
                        model=generation.meta.model,
                        at_seq=generation.last_seq,
                        at=self._clock.monotonic(),
                    )
                )
            # We generate it now: read it live, like any local stream.
            session.generation = generation
            generation.attach(session.subscription)
            async with contextlib.aclosing(
                generation.follow(cursor.seq, session.subscription)
            ) as batches:
                async for live in batches:
                    batch = cursor.take(live)
                    if batch:
                        yield batch
            return

    # -- control ---------------------------------------------------------------------

    async def cancel(self, session: Session, reason: str) -> None:
        generation = self._local.get(session.stream_id)
        if generation is not None:
            generation.stop(cancel_fault(reason))
        else:
            await self.store.request_cancel(session.stream_id, reason)

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
            async with self._clock.deadline(grace_s):
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
        """End every generation of this replica (SERVER_SHUTDOWN) and wait for
        them, up to `shutdown_wait_s`; cancel what is still running then."""
        for generation in list(self._local.values()):
            generation.stop(
                stop_fault(
                    "SERVER_SHUTDOWN",
                    "the replica generating this stream shut down; start it again",
                    retryable=True,
                )
            )
        tasks = set(self._tasks)
        if not tasks:
            return
        with contextlib.suppress(TimeoutError):
            async with self._clock.deadline(self._settings.shutdown_wait_s):
                await asyncio.wait(tasks)
        pending = [task for task in tasks if not task.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
