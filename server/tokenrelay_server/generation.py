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
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from . import classify
from .errors import ErrorType, Fault, SuggestedAction, UpstreamError, UpstreamTimeout
from .model import Chunk, End, LogEntry, Notice, StartRequest, StreamMeta, Usage
from .providers.base import Finish, Provider, ProviderRequest, TextDelta, UsageReport
from .store.base import StreamStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a generation goes: a provider and its upstream model name."""

    provider: Provider
    upstream_model: str


@dataclass(frozen=True, slots=True)
class Timeouts:
    first_token_s: float = 30.0
    stall_s: float = 30.0


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


class Generation:
    def __init__(
        self,
        *,
        meta: StreamMeta,
        request: StartRequest,
        route: Route,
        store: StreamStore,
        timeouts: Timeouts,
        detach_grace_s: float,
        on_detached_expired: Callable[[Generation], None] | None = None,
    ) -> None:
        self.meta = meta
        self.stream_id = meta.stream_id
        self.request = request
        self.route = route
        self._store = store
        self._timeouts = timeouts
        self._detach_grace_s = detach_grace_s
        self.entries: list[LogEntry] = []
        self._chunk_index: list[int] = []  # entries index of chunk seq s at [s - 1]
        self._subscribers: set[Subscription] = set()
        self._grace_timer: asyncio.TimerHandle | None = None
        self._stop_scope: asyncio.Timeout | None = None
        self._stop_fault: Fault | None = None
        self._digest = hashlib.sha256()
        self.last_seq = 0
        self.end: End | None = None
        self.finished = asyncio.Event()
        self.upstream_cancelled = False  # the provider call was cut short by a stop

    # -- reading -------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def attach(self, subscription: Subscription) -> None:
        self._subscribers.add(subscription)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def detach(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        if not self._subscribers and self.end is None and self._grace_timer is None:
            # Guarantee 4: keep generating for a grace period so a reconnect
            # loses nothing, then stop paying for tokens nobody reads.
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

    async def follow(self, after_seq: int, subscription: Subscription) -> AsyncIterator[LogEntry]:
        """Every entry after chunk `after_seq`, then live ones, until the End.
        The caller must have attached `subscription` (and detaches it)."""
        index = self._chunk_index[after_seq - 1] + 1 if after_seq > 0 else 0
        while True:
            if subscription.violation is not None:
                raise subscription.violation
            if index < len(self.entries):
                batch = self.entries[index:]
                index += len(batch)
                for entry in batch:
                    yield entry
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
        request = ProviderRequest(
            model=self.route.upstream_model,
            messages=self.request.messages,
            params=self.request.params,
            attempt=1,
            metadata=self.request.metadata,
        )
        provider = self.route.provider
        finish: Finish | None = None
        usage: Usage | None = None
        tokens = 0
        try:
            async with asyncio.timeout(None) as scope:
                self._stop_scope = scope
                if self._stop_fault is not None:  # stopped before we started
                    scope.reschedule(asyncio.get_running_loop().time())
                async with contextlib.aclosing(provider.stream(request)) as deltas:
                    iterator = aiter(deltas)
                    while True:
                        limit = self._timeouts.stall_s if tokens else self._timeouts.first_token_s
                        try:
                            async with asyncio.timeout(limit):
                                delta = await anext(iterator)
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            if self._stop_fault is not None:
                                raise
                            raise UpstreamTimeout(
                                classify.stall_timeout(
                                    limit, first_token=tokens == 0, tokens_received=tokens
                                ).with_context(provider=provider.name, attempt=request.attempt)
                            ) from None
                        if isinstance(delta, TextDelta):
                            if delta.text:
                                tokens += 1
                                await self._emit_chunk(delta.text, provider.name, request.attempt)
                        elif isinstance(delta, UsageReport):
                            usage = delta.usage
                        else:
                            finish = delta
                            usage = delta.usage or usage
                            break
        except TimeoutError:
            if self._stop_fault is None:
                raise
            self.upstream_cancelled = True
            return self._partial_end(self._stop_fault)
        except UpstreamError as error:
            fault = error.fault.with_context(
                fatal=True,
                provider=error.fault.provider or provider.name,
                attempt=error.fault.attempt or request.attempt,
            )
            log.info("stream %s: upstream failed: %s", self.stream_id, error)
            return self._partial_end(fault)
        finally:
            self._stop_scope = None
        if finish is None:
            fault = classify.missing_finish(tokens_received=tokens).with_context(
                provider=provider.name, attempt=request.attempt
            )
            return self._partial_end(fault)
        return End(
            finish_reason=finish.reason,
            total_seq=self.last_seq,
            text_sha256=self._digest.hexdigest(),
            usage=usage or Usage(completion_tokens=self.last_seq),
        )

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
        self.last_seq = chunk.seq
        self._digest.update(text.encode())

    async def notice(self, fault: Fault) -> None:
        """Tell every client about a failure the gateway is recovering from."""
        await self._append([Notice(after_seq=self.last_seq, fault=fault.with_context(fatal=False))])

    async def _append(self, entries: list[LogEntry]) -> None:
        await self._store.append(self.stream_id, entries)
        for entry in entries:
            if isinstance(entry, Chunk):
                self._chunk_index.append(len(self.entries))
            self.entries.append(entry)
        self._wake_all()

    def _wake_all(self) -> None:
        for subscription in self._subscribers:
            subscription.wake.set()
