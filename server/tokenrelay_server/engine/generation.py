"""One generation owned by this replica: its lifecycle, its timers, its End.

    RUNNING ──the recovery loop returned──────────────▶ ENDING ──End stored──▶ ENDED
    RUNNING ──stop(fault)─────────────────────────────▶ STOPPING
    STOPPING ──the loop left (scope expired)──────────▶ ENDING ──End stored──▶ ENDED
    ENDING ──fenced (another replica owns it)─────────────────────────────────▶ ENDED

Store failures (issue 9, store/errors.py): when the store refuses a write
because another replica took the stream over (`StreamFenced`, or the lease
keeper finds the lease gone: `fence`), the generation stops at once and
quietly: it writes nothing more (no End: the new owner writes it) and its
readers get the error (UNAVAILABLE: resume elsewhere). When the store stays
unreachable past its retry window (`StoreUnavailable`), the readers here get
a partial End with STORE_UNAVAILABLE (retryable, RESUME) that could not be
stored; the stream's lease then lapses and a resume continues it.

`stop(fault)` is how everything outside ends a generation early: a client's
`cancel`, the caller's deadline, the detach grace (guarantee 4), the memory
guard, a drain or shutdown. It never cancels the task from outside: it
expires the stop scope around the recovery loop, so the provider's response
is closed (`aclosing`), the breaker permit is released, and the End
(partial, with `fault`) is still written. The legal changes of state are the
table `TRANSITIONS`; `_apply` is the only place the state changes.

The parts: `LocalLog` (fanout.py) stores and shows entries; `RecoveryLoop`
(recovery_loop.py) runs attempts and asks the decision; this module owns the
timers (deadline, grace, on the injected clock) and builds the End.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from tokenrelay_server.core.clock import Deadline, Timer
from tokenrelay_server.core.errors import ErrorType, Fault, ResourceError, SuggestedAction
from tokenrelay_server.core.model import (
    Chunk,
    End,
    LogEntry,
    Notice,
    StartRequest,
    StreamMeta,
    Usage,
)
from tokenrelay_server.core.turn import Piece, TurnState
from tokenrelay_server.engine.events import ChunkStored, Observers, StreamEnded
from tokenrelay_server.engine.fanout import LocalLog, Subscription
from tokenrelay_server.engine.recovery_loop import Outcome, Recovery, RecoveryLoop, Tally
from tokenrelay_server.engine.routing import Route
from tokenrelay_server.store.base import StreamStore
from tokenrelay_server.store.errors import StoreUnavailable, StreamFenced, store_unavailable_fault

log = logging.getLogger(__name__)


class GenerationState(enum.StrEnum):
    RUNNING = "running"
    STOPPING = "stopping"  # stop() was called; the loop is being left
    ENDING = "ending"  # the End is being written
    ENDED = "ended"


class GenerationEvent(enum.StrEnum):
    STOP = "stop"
    LOOP_LEFT = "loop_left"
    END_STORED = "end_stored"
    FENCED = "fenced"


_S, _E = GenerationState, GenerationEvent

TRANSITIONS: dict[tuple[GenerationState, GenerationEvent], GenerationState] = {
    (_S.RUNNING, _E.STOP): _S.STOPPING,
    (_S.RUNNING, _E.LOOP_LEFT): _S.ENDING,
    (_S.STOPPING, _E.LOOP_LEFT): _S.ENDING,
    (_S.ENDING, _E.END_STORED): _S.ENDED,
    (_S.ENDING, _E.FENCED): _S.ENDED,
}

del _S, _E


def stop_fault(code: str, message: str, *, retryable: bool = False) -> Fault:
    """A fault the gateway itself ends a stream with (cancel, shutdown, …)."""
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


def stream_too_large_fault(limit: int, *, provider: str, attempt: int) -> Fault:
    return Fault(
        type=ErrorType.RESOURCE,
        code="RESPONSE_TOO_LARGE",
        message=(
            f"the answer passed the gateway's limit of {limit} bytes per stream "
            "(max_response_bytes); this is what was produced"
        ),
        retryable=False,
        suggested_action=SuggestedAction.ABORT,
        provider=provider,
        attempt=attempt,
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
        max_stream_bytes: int = 0,
        observe: Observers | None = None,
        epoch: int | None = None,
    ) -> None:
        self.meta = meta
        self.stream_id = meta.stream_id
        self.request = request
        self.chain = chain
        self._clock = recovery.clock
        self._detach_grace_s = detach_grace_s
        self._deadline_s = deadline_s
        self._max_stream_bytes = max_stream_bytes
        # The epoch this generation writes with (fencing, store/base.py rule 8).
        self.epoch = epoch
        self.log = LocalLog(
            meta.stream_id,
            store,
            on_unattended=self.arm_grace,
            epoch=epoch,
            on_write_failed=self._write_failed,
            on_durable=self._stored,
        )
        self._fenced: StreamFenced | None = None
        self.tally = Tally()
        self.state = GenerationState.RUNNING
        self._stop_fault: Fault | None = None
        self._stop_scope: Deadline | None = None
        self._grace_timer: Timer | None = None
        self.finished = asyncio.Event()
        self.upstream_cancelled = False  # the provider call was cut short by a stop
        self._observe = observe or Observers()
        self.started_at = self._clock.monotonic()
        self._loop = RecoveryLoop(
            stream_id=self.stream_id,
            request=request,
            chain=chain,
            policy=recovery.config.with_overrides(request.policy),
            recovery=recovery,
            tally=self.tally,
            emit_chunk=self._emit_chunk,
            emit_chunk_now=self._chunk_emitter_now(),
            notice=self.notice,
            delivered_text=self.log.text,
            delivered_chunks=lambda: self.log.last_seq,
            settle=self.log.settle,
            model=meta.model,
            observe=self._observe,
            turn=TurnState(request.tool_call_mode),
        )

    # -- what it holds ---------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.log.last_seq

    @property
    def end(self) -> End | None:
        return self.log.end

    @property
    def attempts(self) -> int:
        return self.tally.attempts

    @property
    def phase(self) -> str:
        """ "attempt" (an upstream call runs), "backoff" (waiting on the clock
        to try again) or "done" (the End is being written or was)."""
        return self._loop.phase

    def restore(self, entries: list[LogEntry]) -> None:
        """Take over a stream another replica started: its stored log becomes
        ours, and the next attempt continues from its text (guarantee 5)."""
        self.log.restore(entries)
        chunks = [e for e in entries if isinstance(e, Chunk)]
        # Tool calls already shown end the turn instead (core/turn.py).
        self._loop.turn = TurnState.restored(self.request.tool_call_mode, chunks)
        self.tally.attempts = max((c.attempt for c in chunks), default=0)
        delivered = max((c.tokens_so_far for c in chunks), default=0)
        self.tally.delivered_tokens = self.tally.completion_tokens = delivered

    # -- readers ---------------------------------------------------------------------

    def attach(self, subscription: Subscription) -> None:
        self.log.attach(subscription)
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def detach(self, subscription: Subscription) -> None:
        self.log.detach(subscription)  # arms the grace when it was the last

    def follow(
        self, after_seq: int, subscription: Subscription
    ) -> AsyncGenerator[list[LogEntry], None]:
        return self.log.follow(after_seq, subscription)

    def arm_grace(self) -> None:
        """With nobody attached, start the grace period (guarantee 4): keep
        generating so a reconnect loses nothing, then stop paying for tokens
        nobody reads."""
        if self.log.attended or self.state is not GenerationState.RUNNING:
            return
        if self._grace_timer is None:
            self._grace_timer = self._clock.call_later(self._detach_grace_s, self._grace_expired)

    def _grace_expired(self) -> None:
        self._grace_timer = None
        if not self.log.attended:
            self.stop(
                stop_fault(
                    "CLIENT_GONE",
                    f"no client attached for {self._detach_grace_s:g} s; generation stopped",
                )
            )

    # -- control ---------------------------------------------------------------------

    def stop(self, fault: Fault) -> None:
        """End the generation now with a partial answer and `fault` (the first
        stop wins; a stop after the loop left changes nothing)."""
        if self.state is not GenerationState.RUNNING:
            return
        self._apply(GenerationEvent.STOP)
        self._stop_fault = fault
        if self._stop_scope is not None:
            self._stop_scope.expire()

    def fence(self, error: StreamFenced) -> None:
        """Another replica owns the stream now (the lease keeper lost the
        lease): stop at once, store nothing more, send the readers elsewhere."""
        if self._fenced is None:
            self._fenced = error
        self.stop(stop_fault("OWNERSHIP_LOST", str(error), retryable=True))

    def _write_failed(self, error: BaseException) -> None:
        """A chunk written behind was refused or never acknowledged: stop now
        (the writer may be waiting on its clock, not on the log); the End
        path's `settle` raises `error` and the End says what happened."""
        if isinstance(error, StreamFenced):
            self.fence(error)
        elif isinstance(error, StoreUnavailable):
            self.stop(store_unavailable_fault(str(error)))
        else:
            self.stop(
                stop_fault(
                    "INTERNAL", "the store refused a write; see the gateway's logs", retryable=True
                )
            )

    def _apply(self, event: GenerationEvent) -> None:
        after = TRANSITIONS.get((self.state, event))
        if after is None:
            raise RuntimeError(
                f"stream {self.stream_id}: no transition from {self.state} on {event}"
            )
        self.state = after

    # -- running ---------------------------------------------------------------------

    async def run(self) -> None:
        """Produce the stream; always leaves an End in the store unless the
        task itself is cancelled (then local readers still get the End)."""
        deadline: Timer | None = None
        if self._deadline_s is not None:
            # The caller's gRPC deadline is the generation's total deadline.
            deadline = self._clock.call_later(
                self._deadline_s, lambda: self.stop(deadline_fault(self._deadline_s or 0.0))
            )
        store_down = False
        try:
            end = await self._produce()
        except asyncio.CancelledError:
            # Cancelled from outside (a shutdown that could not wait): no End
            # can be stored, but the readers here still learn how it ended,
            # after what is on the wire (so the End covers what they saw).
            await self.log.settle_quietly()
            self.log.record_unstored(
                self._partial_end(
                    stop_fault(
                        "SERVER_SHUTDOWN",
                        "the replica generating this stream shut down; start it again",
                        retryable=True,
                    )
                )
            )
            self.state = GenerationState.ENDED
            self.finished.set()
            raise
        except StreamFenced as error:
            self._fenced = self._fenced or error
            end = self._partial_end(stop_fault("OWNERSHIP_LOST", str(error), retryable=True))
        except StoreUnavailable as error:
            store_down = True
            end = self._store_unavailable_end(error)
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
        if self.state is not GenerationState.ENDING:  # _produce raised
            self._apply(GenerationEvent.LOOP_LEFT)
        if self._fenced is None and not store_down:
            try:
                await self.log.append([end])
            except StreamFenced as error:
                self._fenced = error
            except StoreUnavailable as error:
                # The End did not reach the store: what readers here are told
                # must not claim more than the log will hold (a resume
                # continues it once the store is back).
                end = self._store_unavailable_end(error)
                store_down = True
            except Exception:
                log.exception("stream %s: could not store the End", self.stream_id)
                self.log.record_unstored(end)
        if store_down:
            log.warning("stream %s: store unavailable; ended unstored", self.stream_id)
            self.log.record_unstored(end)
        if self._fenced is not None:
            # Quietly: the new owner writes the End; our readers resume there.
            log.info("stream %s: fenced (%s); stopped", self.stream_id, self._fenced)
            self.log.fail_readers(self._fenced)
            self._apply(GenerationEvent.FENCED)
        else:
            self._apply(GenerationEvent.END_STORED)
        self.finished.set()
        if self._observe:
            now = self._clock.monotonic()
            self._observe(
                StreamEnded(
                    stream_id=self.stream_id,
                    model=self.meta.model,
                    end=end,
                    attempts=self.tally.attempts,
                    duration_s=now - self.started_at,
                    at=now,
                )
            )

    async def _produce(self) -> End:
        try:
            async with self._clock.deadline(None) as scope:
                self._stop_scope = scope
                if self._stop_fault is not None:  # stopped before we started
                    scope.expire()
                outcome = await self._loop.run()
        except TimeoutError:
            if self._stop_fault is None:
                raise
            self.upstream_cancelled = True
            outcome = Outcome(fault=self._stop_fault)
        finally:
            self._stop_scope = None
        if self._stop_fault is not None and outcome.fault is None and outcome.finish is None:
            outcome = Outcome(fault=self._stop_fault)
        # The End covers exactly what is durable: every chunk written behind
        # lands first (a failed write raises here, and the End says so).
        await self.log.settle()
        self._apply(GenerationEvent.LOOP_LEFT)
        if outcome.finish is not None:
            return End(
                finish_reason=outcome.finish.reason,
                total_seq=self.log.last_seq,
                text_sha256=self.log.digest(),
                usage=self._usage(),
                chunks_sha256=self.log.chunks_digest(),
            )
        assert outcome.fault is not None
        return self._partial_end(outcome.fault)

    def _store_unavailable_end(self, error: StoreUnavailable) -> End:
        return self._partial_end(
            store_unavailable_fault(
                f"{error}; this is what was stored so far: resume with your latest "
                "resume token once the store is back"
            )
        )

    def _usage(self) -> Usage:
        # An attempt cut short by a stop never reported: its delivered tokens
        # (the last chunk's count) are the least it cost.
        return Usage(
            prompt_tokens=self.tally.prompt_tokens,
            completion_tokens=max(self.tally.completion_tokens, self.log.tokens_so_far),
        )

    def _partial_end(self, fault: Fault) -> End:
        return End(
            finish_reason="cancelled" if fault.code == "CANCELLED" else "error",
            total_seq=self.log.last_seq,
            text_sha256=self.log.digest(),
            usage=self._usage(),
            partial=True,
            error=fault.with_context(fatal=True),
            chunks_sha256=self.log.chunks_digest(),
        )

    # -- writing ---------------------------------------------------------------------

    async def _emit_chunk(self, piece: Piece, provider: str, attempt: int, tokens: int) -> None:
        """Store one chunk and show it, for a log that neither shares the
        store's nor writes behind (`emit_chunk_now` serves those)."""
        chunk = self._chunk(piece, provider, attempt, tokens)
        await self.log.append([chunk])
        self._stored(chunk)

    def _chunk_emitter_now(
        self,
    ) -> Callable[[Piece, str, int, int], Awaitable[None] | None] | None:
        """How this log stores a chunk without a coroutine: at once (the
        memory store's own log), or behind (a store that queues appends);
        None when each chunk must be awaited (`_emit_chunk`)."""
        if self.log.appends_now:
            return self._emit_chunk_now
        if self.log.writes_behind:
            return self._emit_chunk_behind
        return None

    def _emit_chunk_behind(
        self, piece: Piece, provider: str, attempt: int, tokens: int
    ) -> Awaitable[None] | None:
        """`_emit_chunk` for a log that writes behind, without a coroutine:
        None, or what to await before the next chunk (the stream has
        WRITE_BEHIND_ENTRIES waiting). ChunkStored comes from the write's
        callback, once the chunk is durable."""
        return self.log.hand_over_chunk(self._chunk(piece, provider, attempt, tokens))

    def _emit_chunk_now(self, piece: Piece, provider: str, attempt: int, tokens: int) -> None:
        """`_emit_chunk` for a log that appends without awaiting (the memory
        store's): no coroutine per token, and the common case inline."""
        log = self.log
        entries = log.entries
        text = piece.text
        limit = self._max_stream_bytes
        if piece.tool_call is not None or (limit and entries.text_bytes + 4 * len(text) > limit):
            chunk = self._chunk(piece, provider, attempt, tokens)  # counts the bytes
        else:
            chunk = Chunk(entries.last_seq + 1, text, provider, attempt, tokens, kind=piece.kind)
        log.append_now([chunk])
        if self._observe.chunks:
            self._stored(chunk)

    def _chunk(self, piece: Piece, provider: str, attempt: int, tokens: int) -> Chunk:
        chunk = Chunk(
            seq=self.log.next_seq,
            text=piece.text,
            provider=provider,
            attempt=attempt,
            tokens_so_far=tokens,
            kind=piece.kind,
            tool_call=piece.tool_call,
        )
        log = self.log
        limit = self._max_stream_bytes
        # A UTF-8 character is at most 4 bytes: count the bytes only near the
        # limit (a tool call's pieces always: their text is in tool_call).
        if limit and (piece.tool_call is not None or log.text_bytes + 4 * len(piece.text) > limit):
            if log.text_bytes + chunk.content_bytes > limit:
                raise ResourceError(
                    stream_too_large_fault(limit, provider=provider, attempt=attempt)
                )
        return chunk

    def _stored(self, chunk: Chunk) -> None:
        if self._observe.chunks:
            self._observe(
                ChunkStored(
                    stream_id=self.stream_id,
                    model=self.meta.model,
                    provider=chunk.provider,
                    seq=chunk.seq,
                    tokens_so_far=chunk.tokens_so_far,
                    at=self._clock.monotonic(),
                    kind=chunk.kind,
                    text=chunk.text,
                )
            )

    async def notice(self, fault: Fault) -> None:
        """Tell every reader about a failure the gateway is recovering from."""
        # It sits after the last chunk handed over (written behind or not).
        await self.log.append(
            [Notice(after_seq=self.log.next_seq - 1, fault=fault.with_context(fatal=False))]
        )
