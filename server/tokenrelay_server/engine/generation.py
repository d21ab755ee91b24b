"""One generation, owned by this replica: drive the provider, log, fan out.

Lifecycle:

    running ──provider finishes──────────────▶ ended (End, partial=false)
       │    ──provider fails──────────────────▶ ended (End, partial=true, error)
       │    ──stop(CANCELLED | CLIENT_GONE |──▶ ended (End, partial=true, error)
       │          SERVER_SHUTDOWN)
       └──── task cancelled (store gone) ─────▶ ended locally, End not written

Rules:
- Durable before visible: every entry is appended to the store before it is
  added to `entries`, the list local subscribers read from.
- The generation never waits for a client. Subscribers read `entries` at
  their own pace; a slow client costs memory (the text), never throughput.
- A stop request does not cancel the task from outside: it expires the
  `asyncio.timeout` scope around the provider call, so the provider's
  response is closed (`aclosing`) and the End is still written.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from tokenrelay_server.core import classify
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import (
    DataError,
    ErrorType,
    Fault,
    SuggestedAction,
    UpstreamError,
    UpstreamTimeout,
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
from tokenrelay_server.core.recovery import Decision, RecoveryConfig, Situation, Step, decide
from tokenrelay_server.core.stitch import Stitcher
from tokenrelay_server.engine.routing import Route, Timeouts
from tokenrelay_server.engine.selection import SelectionMode, UpstreamHealth
from tokenrelay_server.store.base import StreamStore
from tokenrelay_server.upstream.base import Finish, ProviderRequest, TextDelta

log = logging.getLogger(__name__)

__all__ = ["Generation", "Recovery", "Route", "Subscription", "Timeouts", "stop_fault"]

ACTION_FOR_STEP = {
    Step.RETRY: SuggestedAction.RETRY,
    Step.RESUME: SuggestedAction.RESUME,
    Step.FALLBACK: SuggestedAction.FALLBACK,
}


@dataclass(frozen=True)
class Recovery:
    """What a generation needs to recover: shared health, policy, time, jitter."""

    health: UpstreamHealth
    config: RecoveryConfig
    clock: Clock
    rng: random.Random
    selection: SelectionMode = "order"


@dataclass(eq=False)
class Subscription:
    """One attached client. The servicer's reader task may set `violation`
    (a bad message on the call) and wake the subscriber to raise it."""

    wake: asyncio.Event = field(default_factory=asyncio.Event)
    violation: BaseException | None = None
    acked_seq: int = 0

    def fail(self, error: BaseException) -> None:
        self.violation = error
        self.wake.set()


def stop_fault(code: str, message: str, *, retryable: bool = False) -> Fault:
    return Fault(
        type=ErrorType.APPLICATION,
        code=code,
        message=message,
        retryable=retryable,
        suggested_action=SuggestedAction.RETRY if retryable else SuggestedAction.ABORT,
    )


def deadline_fault(deadline_s: float) -> Fault:
    return Fault(
        type=ErrorType.TIMEOUT,
        code="DEADLINE_EXCEEDED",
        message=f"the caller's deadline of {deadline_s:.3g} s passed; this is what was produced",
        retryable=True,
        suggested_action=SuggestedAction.RETRY,
    )


def breaker_open_fault(route: Route) -> Fault:
    return Fault(
        type=ErrorType.APPLICATION,
        code="BREAKER_OPEN",
        message=f"the circuit breaker of {route.provider.name}/{route.upstream_model} is open",
        retryable=True,
        suggested_action=SuggestedAction.FALLBACK,
        provider=route.provider.name,
    )


class Generation:
    def __init__(
        self,
        *,
        meta: StreamMeta,
        request: StartRequest,
        chain: list[Route],
        store: StreamStore,
        recovery: Recovery,
        detach_grace_s: float,
        deadline_s: float | None = None,
    ) -> None:
        self.meta = meta
        self.stream_id = meta.stream_id
        self.request = request
        self.chain = chain
        self._store = store
        self._recovery = recovery
        self._config = _config_for(request, recovery.config)
        self._detach_grace_s = detach_grace_s
        self._deadline_s = deadline_s
        self.entries: list[LogEntry] = []
        self._chunk_index: list[int] = []  # entries index of chunk seq s at [s - 1]
        self._subscribers: set[Subscription] = set()
        self._grace_timer: asyncio.TimerHandle | None = None
        self._stop_scope: asyncio.Timeout | None = None
        self._stop_fault: Fault | None = None
        self._digest = hashlib.sha256()
        self._text_parts: list[str] = []
        self.last_seq = 0
        self.attempts = 0
        self.end: End | None = None
        self.finished = asyncio.Event()
        self.upstream_cancelled = False  # the provider call was cut short by a stop

    def restore(self, entries: list[LogEntry]) -> None:
        """Take over a stream another replica started: its stored log becomes
        ours, and the next attempt continues from its text (guarantee 5)."""
        self._record(entries)
        self.attempts = max((e.attempt for e in entries if isinstance(e, Chunk)), default=0)

    # -- reading -------------------------------------------------------------------

    def attach(self, subscription: Subscription) -> None:
        self._subscribers.add(subscription)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def detach(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        self.arm_grace()

    def arm_grace(self) -> None:
        """With nobody attached, start the grace period (guarantee 4): keep
        generating so a reconnect loses nothing, then stop paying for tokens
        nobody reads."""
        if not self._subscribers and self.end is None and self._grace_timer is None:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(self._detach_grace_s, self._grace_expired)

    def _grace_expired(self) -> None:
        self._grace_timer = None
        if not self._subscribers:
            self.stop(
                stop_fault(
                    "CLIENT_GONE",
                    f"no client attached for {self._detach_grace_s:g} s; generation stopped",
                )
            )

    async def follow(
        self, after_seq: int, subscription: Subscription
    ) -> AsyncIterator[list[LogEntry]]:
        """Every entry after chunk `after_seq`, then live ones, until the End,
        in batches (whatever arrived since the last look: one hop per batch,
        not per chunk). The caller attached `subscription` and detaches it."""
        index = self._chunk_index[after_seq - 1] + 1 if after_seq > 0 else 0
        while True:
            if subscription.violation is not None:
                raise subscription.violation
            if index < len(self.entries):
                batch = self.entries[index:]
                index += len(batch)
                yield batch
                continue
            if self.end is not None:
                return
            subscription.wake.clear()
            await subscription.wake.wait()

    # -- control -------------------------------------------------------------------

    def stop(self, fault: Fault) -> None:
        """End the generation now with a partial answer and `fault`."""
        if self.end is not None or self._stop_fault is not None:
            return
        self._stop_fault = fault
        if self._stop_scope is not None:
            self._stop_scope.reschedule(asyncio.get_running_loop().time())

    # -- running -------------------------------------------------------------------

    async def run(self) -> None:
        """Produce the stream; always leaves an End in the store unless the
        task itself is cancelled."""
        deadline = None
        if self._deadline_s is not None:
            # The caller's gRPC deadline is the generation's total deadline.
            deadline = asyncio.get_running_loop().call_later(
                self._deadline_s, self.stop, deadline_fault(self._deadline_s)
            )
        try:
            end = await self._produce()
        except Exception:
            log.exception("stream %s: generation failed", self.stream_id)
            end = self._partial_end(
                stop_fault(
                    "INTERNAL",
                    "the gateway failed while generating; see its logs",
                    retryable=True,
                )
            )
        finally:
            if deadline is not None:
                deadline.cancel()
            if self._grace_timer is not None:
                self._grace_timer.cancel()
                self._grace_timer = None
        try:
            await self._append([end])
        except Exception:
            # The store is gone; local subscribers still learn how it ended.
            log.exception("stream %s: could not store the End", self.stream_id)
            self.entries.append(end)
        self.end = end
        self._wake_all()
        self.finished.set()

    async def _produce(self) -> End:
        """Attempts until one finishes or the recovery decision gives up."""
        health = self._recovery.health
        retries = [0] * len(self.chain)
        given_up: set[int] = set()
        try:
            async with asyncio.timeout(None) as scope:
                self._stop_scope = scope
                if self._stop_fault is not None:  # stopped before we started
                    scope.reschedule(asyncio.get_running_loop().time())
                index = health.choose(self.chain, self._recovery.selection)
                if index is None:
                    return self._partial_end(breaker_open_fault(self.chain[0]))
                while True:
                    route = self.chain[index]
                    breaker = health.breaker(route)
                    self.attempts += 1
                    try:
                        if not breaker.allow():
                            raise _BreakerOpen(breaker_open_fault(route))
                        health.budget(route).record_request()
                        finish = await self._attempt(route, self.attempts)
                    except UpstreamError as error:
                        fault = error.fault.with_context(
                            provider=error.fault.provider or route.provider.name,
                            attempt=error.fault.attempt or self.attempts,
                        )
                        if not isinstance(error, _BreakerOpen):
                            breaker.record_failure()
                            health.health(route).observe_failure()
                        if self._budget_spent():
                            # Every token the caller asked for is delivered;
                            # what broke afterwards cannot take any away.
                            log.info(
                                "stream %s: %s after the last token", self.stream_id, fault.code
                            )
                            return self._complete_end(Finish("length"))
                        decision = self._decide(fault, index, retries, given_up)
                        if not decision.continues:
                            log.info("stream %s: giving up: %s", self.stream_id, decision.reason)
                            return self._partial_end(fault)
                        await self._announce(fault, decision, route)
                        if decision.step is Step.FALLBACK:
                            given_up.add(index)
                        else:
                            retries[index] += 1
                            health.budget(route).spend_retry()
                        index = decision.provider_index
                        await self._recovery.clock.sleep(decision.delay_s)
                        continue
                    breaker.record_success()
                    return self._complete_end(finish)
        except TimeoutError:
            if self._stop_fault is None:
                raise
            self.upstream_cancelled = True
            return self._partial_end(self._stop_fault)
        finally:
            self._stop_scope = None

    def _budget_spent(self) -> bool:
        limit = self.request.params.max_tokens
        return limit is not None and self.last_seq >= limit

    def _complete_end(self, finish: Finish) -> End:
        usage = finish.usage or Usage(completion_tokens=self.last_seq)
        if self.attempts > 1:  # the answer spans attempts: count what we sent
            usage = Usage(usage.prompt_tokens, completion_tokens=self.last_seq)
        return End(
            finish_reason=finish.reason,
            total_seq=self.last_seq,
            text_sha256=self._digest.hexdigest(),
            usage=usage,
        )

    def _decide(self, fault: Fault, index: int, retries: list[int], given_up: set[int]) -> Decision:
        health = self._recovery.health
        usable = tuple(
            i not in given_up and health.breaker(route).available()
            for i, route in enumerate(self.chain)
        )
        situation = Situation(
            fault=fault,
            tokens_delivered=self.last_seq,
            provider_index=index,
            retries_on_provider=retries[index],
            usable=usable,
            budget_allows_retry=health.budget(self.chain[index]).allows_retry(),
        )
        return decide(situation, self._config, self._recovery.rng)

    async def _announce(self, fault: Fault, decision: Decision, failed: Route) -> None:
        """A non-fatal StreamError: what failed and what the gateway does now."""
        target = self.chain[decision.provider_index].provider.name
        breaker = self._recovery.health.breaker(failed)
        what = {
            Step.RETRY: f"retrying {target}",
            Step.RESUME: f"resuming on {target} from seq {self.last_seq}",
            Step.FALLBACK: f"falling back to {target}"
            + (f", resuming from seq {self.last_seq}" if self.last_seq else ""),
        }[decision.step]
        if decision.step is Step.FALLBACK and not breaker.available():
            what += f" (the circuit breaker of {breaker.name} is open)"
        log.info(
            "stream %s: %s (%s) -> %s in %.2fs",
            self.stream_id,
            fault.code,
            fault.provider,
            what,
            decision.delay_s,
        )
        await self.notice(
            replace(
                fault,
                fatal=False,
                suggested_action=ACTION_FOR_STEP[decision.step],
                message=f"{fault.message}; {what} in {decision.delay_s:.2f} s",
            )
        )

    async def _attempt(self, route: Route, attempt: int) -> Finish:
        """One upstream call. Returns its Finish; raises UpstreamError."""
        delivered = "".join(self._text_parts) if self.last_seq else ""
        params = self.request.params
        if delivered and params.max_tokens is not None:
            params = replace(params, max_tokens=params.max_tokens - self.last_seq)
        request = ProviderRequest(
            model=route.upstream_model,
            messages=self.request.messages,
            params=params,
            attempt=attempt,
            continuation=delivered,
            metadata=self.request.metadata,
        )
        stitcher = Stitcher(delivered) if delivered else None
        provider = route.provider
        loop = asyncio.get_running_loop()
        started = loop.time()
        first_token_at: float | None = None
        tokens = 0
        finish: Finish | None = None
        try:
            async with asyncio.timeout(None) as idle_scope:
                watchdog = IdleWatchdog(loop, idle_scope, route.timeouts)
                try:
                    async with contextlib.aclosing(provider.stream(request)) as deltas:
                        async for delta in deltas:
                            if isinstance(delta, TextDelta):
                                if not delta.text:
                                    continue
                                tokens += 1
                                watchdog.last_token_at = now = loop.time()
                                if first_token_at is None:
                                    first_token_at = now
                                if stitcher is None:
                                    await self._emit_chunk(delta.text, provider.name, attempt)
                                else:
                                    for piece in stitcher.feed(delta.text):
                                        await self._emit_chunk(piece, provider.name, attempt)
                            elif isinstance(delta, Finish):
                                finish = delta
                                break
                finally:
                    watchdog.cancel()
        except TimeoutError:
            if watchdog.expired_after is None:
                raise  # the stop scope's, not ours
            raise UpstreamTimeout(
                classify.stall_timeout(
                    watchdog.expired_after, first_token=tokens == 0, tokens_received=tokens
                ).with_context(provider=provider.name, attempt=attempt)
            ) from None
        if finish is None:
            raise upstream_missing_finish(provider.name, attempt, tokens)
        for piece in stitcher.finish() if stitcher is not None else ():
            await self._emit_chunk(piece, provider.name, attempt)
        self._recovery.health.health(route).observe_success(
            None if first_token_at is None else first_token_at - started,
            None
            if tokens < 2 or first_token_at is None
            else (loop.time() - first_token_at) / (tokens - 1),
        )
        return finish

    def _partial_end(self, fault: Fault) -> End:
        return End(
            finish_reason="cancelled" if fault.code == "CANCELLED" else "error",
            total_seq=self.last_seq,
            text_sha256=self._digest.hexdigest(),
            usage=Usage(completion_tokens=self.last_seq),
            partial=True,
            error=fault.with_context(fatal=True),
        )

    async def _emit_chunk(self, text: str, provider: str, attempt: int) -> None:
        chunk = Chunk(seq=self.last_seq + 1, text=text, provider=provider, attempt=attempt)
        await self._append([chunk])

    async def notice(self, fault: Fault) -> None:
        """Tell every client about a failure the gateway is recovering from."""
        await self._append([Notice(after_seq=self.last_seq, fault=fault.with_context(fatal=False))])

    async def _append(self, entries: list[LogEntry]) -> None:
        if self._store.in_process:
            # Nothing in an in-process append can suspend, so no cancellation
            # can land between the write and our record of it.
            await self._store.append(self.stream_id, entries)
        else:
            # A stop or shutdown may cancel us while the write is on the wire;
            # the write may still land. Let it finish, record it, then go on
            # being cancelled, so what clients saw and the End always agree.
            write = asyncio.ensure_future(self._store.append(self.stream_id, entries))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await write
                if write.done() and not write.cancelled() and write.exception() is None:
                    self._record(entries)
                raise
        self._record(entries)

    def _record(self, entries: list[LogEntry]) -> None:
        for entry in entries:
            if isinstance(entry, Chunk):
                self._chunk_index.append(len(self.entries))
                self.last_seq = entry.seq
                self._digest.update(entry.text.encode())
                self._text_parts.append(entry.text)
            self.entries.append(entry)
        self._wake_all()

    def _wake_all(self) -> None:
        for subscription in self._subscribers:
            subscription.wake.set()


class IdleWatchdog:
    """Expires `scope` when the upstream is silent too long: first-token
    timeout before the first token, stall timeout between tokens.

    One timer per timeout period instead of one per token: a token only
    stores its time (`last_token_at`); the timer, when it fires, re-arms
    itself at the next possible deadline or expires the scope."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, scope: asyncio.Timeout, timeouts: Timeouts
    ) -> None:
        self._loop = loop
        self._scope = scope
        self._timeouts = timeouts
        self._started_at = loop.time()
        self.last_token_at: float | None = None
        self.expired_after: float | None = None  # the limit that ran out
        # Checks come at least every stall_s, so a stall right after the first
        # token is caught on time even when the first-token limit is longer.
        first_check = min(timeouts.first_token_s, timeouts.stall_s)
        self._handle = loop.call_at(self._started_at + first_check, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self.last_token_at is None:
            limit, deadline = (
                self._timeouts.first_token_s,
                self._started_at + self._timeouts.first_token_s,
            )
            next_check = min(deadline, now + self._timeouts.stall_s)
        else:
            limit, deadline = self._timeouts.stall_s, self.last_token_at + self._timeouts.stall_s
            next_check = deadline
        if now >= deadline:
            self.expired_after = limit
            self._scope.reschedule(now)
        else:
            self._handle = self._loop.call_at(next_check, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class _BreakerOpen(UpstreamError):
    """No call was made: the breaker refused it."""


def upstream_missing_finish(provider: str, attempt: int, tokens: int) -> UpstreamError:
    return DataError(
        classify.missing_finish(tokens_received=tokens).with_context(
            provider=provider, attempt=attempt
        )
    )


def _config_for(request: StartRequest, base: RecoveryConfig) -> RecoveryConfig:
    """The gateway's recovery policy with the call's overrides applied."""
    policy = request.policy
    return replace(
        base,
        max_retries=base.max_retries if policy.max_retries is None else policy.max_retries,
        allow_fallback=(
            base.allow_fallback if policy.allow_fallback is None else policy.allow_fallback
        ),
        allow_partial=base.allow_partial if policy.allow_partial is None else policy.allow_partial,
    )
