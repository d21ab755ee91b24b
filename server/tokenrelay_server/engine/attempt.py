"""One upstream attempt: call the provider, watch it, emit what it says.

An attempt ends in exactly one of three ways, and `run_attempt` tells them
apart so the caller can settle the breaker and the health score once:

- the provider finished: an `AttemptReport` with `finish` set;
- it failed (a provider error, a first-token or stall timeout, the stream's
  size cap): an `AttemptReport` with `fault` set;
- it was stopped from outside (cancel, deadline, grace, memory, drain): the
  enclosing stop scope's TimeoutError, or a CancelledError, propagates out
  unchanged. The provider's response is closed on the way (`aclosing`).

The idle watchdog is one timer per timeout period on the injected clock,
not one per token: a token only stores its time; the timer, when it fires,
re-arms itself at the next possible deadline or expires the attempt.

What the provider's deltas become for the client (stitched text, reasoning
or not, tool calls held whole or streamed) is the `TurnShaper`'s decision
(core/turn.py); this module only feeds it and emits what it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokenrelay_server.core import classify
from tokenrelay_server.core.clock import Clock, Deadline, Timer
from tokenrelay_server.core.errors import DataError, Fault, UpstreamError
from tokenrelay_server.core.limits import Timeouts
from tokenrelay_server.core.turn import Piece, TurnShaper
from tokenrelay_server.engine.routing import Route
from tokenrelay_server.upstream.base import (
    Finish,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    UsageReport,
)

# emit(piece, answer_deltas): store and show one piece; `answer_deltas` counts
# the provider deltas of the answer (text and tool calls, not reasoning) this
# attempt showed so far, this piece's included.
Emit = Callable[[Piece, int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AttemptReport:
    """How an attempt that was not stopped from outside ended."""

    finish: Finish | None  # set when the provider finished the answer
    fault: Fault | None  # set when the attempt failed
    deltas: int  # content deltas the provider sent (text, reasoning, tool-call pieces)
    # Answer deltas shown to clients: text and tool-call deltas minus what the
    # stitcher dropped (a tool call held whole counts all of its deltas).
    emitted: int
    prompt_tokens: int  # as the provider reported them (0 when it did not)
    completion_tokens: int  # as the provider reported them (0 when it did not)
    first_token_s: float | None = None
    inter_token_s: float | None = None

    @property
    def succeeded(self) -> bool:
        return self.fault is None

    @property
    def bytes_received(self) -> int:
        """What the provider counted (0 where it does not count bytes)."""
        if self.fault is not None:
            return self.fault.bytes_received
        return self.finish.bytes_received if self.finish is not None else 0


class IdleWatchdog:
    """Expires `scope` when the upstream is silent too long: the first-token
    timeout before the first token, the stall timeout between tokens."""

    def __init__(self, clock: Clock, scope: Deadline, timeouts: Timeouts) -> None:
        self._clock = clock
        self._scope = scope
        self._timeouts = timeouts
        self._started_at = clock.monotonic()
        self.last_token_at: float | None = None
        self.expired_after: float | None = None  # the limit that ran out
        # Checks come at least every stall_s, so a stall right after the first
        # token is caught on time even when the first-token limit is longer.
        first_check = min(timeouts.first_token_s, timeouts.stall_s)
        self._timer: Timer = clock.call_later(first_check, self._check)

    def _check(self) -> None:
        now = self._clock.monotonic()
        if self.last_token_at is None:
            limit = self._timeouts.first_token_s
            deadline = self._started_at + limit
            next_check = min(deadline, now + self._timeouts.stall_s)
        else:
            limit = self._timeouts.stall_s
            deadline = next_check = self.last_token_at + limit
        if now >= deadline:
            self.expired_after = limit
            self._scope.expire()
        else:
            self._timer = self._clock.call_later(next_check - now, self._check)

    def cancel(self) -> None:
        self._timer.cancel()


async def run_attempt(
    route: Route,
    request: ProviderRequest,
    *,
    clock: Clock,
    emit: Emit,
    shaper: TurnShaper,
) -> AttemptReport:
    """Stream one attempt of `request` from `route`, emitting each piece."""
    provider = route.provider
    started = clock.monotonic()
    first_token_at: float | None = None
    last_token_at = started
    deltas = emitted = 0
    reported_prompt = reported_completion = 0
    finish: Finish | None = None

    async def show(pieces: list[Piece]) -> None:
        nonlocal emitted
        for piece in pieces:
            if piece.counts_toward_answer:
                emitted += piece.deltas
            await emit(piece, emitted)

    def arrived() -> None:
        """A content delta came: the upstream is alive."""
        nonlocal deltas, first_token_at, last_token_at
        deltas += 1
        watchdog.last_token_at = last_token_at = clock.monotonic()
        if first_token_at is None:
            first_token_at = last_token_at

    def report(fault: Fault | None) -> AttemptReport:
        gaps = (
            (last_token_at - first_token_at) / (deltas - 1)
            if first_token_at is not None and deltas > 1
            else None
        )
        return AttemptReport(
            finish=finish,
            fault=fault,
            deltas=deltas,
            emitted=emitted,
            prompt_tokens=reported_prompt,
            completion_tokens=reported_completion,
            first_token_s=None if first_token_at is None else first_token_at - started,
            inter_token_s=gaps,
        )

    try:
        async with clock.deadline(None) as idle_scope:
            watchdog = IdleWatchdog(clock, idle_scope, route.timeouts)
            try:
                async with contextlib.aclosing(provider.stream(request)) as stream:
                    async for delta in stream:
                        if isinstance(delta, TextDelta):
                            text = delta.text
                            if not text:
                                continue
                            # The common case inline (per token): what
                            # arrived() and show() do, for one text piece.
                            deltas += 1
                            watchdog.last_token_at = last_token_at = clock.monotonic()
                            if first_token_at is None:
                                first_token_at = last_token_at
                            if shaper.passes_text_through:
                                emitted += 1
                                await emit(Piece("text", text), emitted)
                            else:
                                await show(shaper.text(text))
                        elif isinstance(delta, ReasoningDelta):
                            if not delta.text:
                                continue
                            arrived()
                            await show(shaper.reasoning(delta.text))
                        elif isinstance(delta, ToolCallDelta):
                            arrived()
                            await show(shaper.tool_call(delta))
                        elif isinstance(delta, ToolCallDone):
                            await show(shaper.tool_call_done(delta.index))
                        elif isinstance(delta, UsageReport):
                            reported_prompt = delta.usage.prompt_tokens or reported_prompt
                            reported_completion = (
                                delta.usage.completion_tokens or reported_completion
                            )
                        elif isinstance(delta, Finish):
                            finish = delta
                            if delta.usage is not None:
                                reported_prompt = delta.usage.prompt_tokens or reported_prompt
                                reported_completion = (
                                    delta.usage.completion_tokens or reported_completion
                                )
                            break
            finally:
                watchdog.cancel()
    except TimeoutError:
        if watchdog.expired_after is None:
            raise  # the stop scope's, not ours: a stop from outside
        fault = classify.stall_timeout(
            watchdog.expired_after, first_token=deltas == 0, tokens_received=deltas
        ).with_context(provider=provider.name, attempt=request.attempt)
        return report(fault)
    except UpstreamError as error:
        fault = error.fault.with_context(
            provider=error.fault.provider or provider.name,
            attempt=error.fault.attempt or request.attempt,
            tokens_received=error.fault.tokens_received or deltas,
        )
        return report(fault)
    if finish is None:
        missing = DataError(
            classify.missing_finish(tokens_received=deltas).with_context(
                provider=provider.name, attempt=request.attempt
            )
        )
        return report(missing.fault)
    try:
        # The stitcher's held text, the tool call held whole (its arguments
        # checked): the answer is complete only once they are shown.
        await show(shaper.finish())
    except UpstreamError as error:
        finish = None
        return report(
            error.fault.with_context(
                provider=provider.name, attempt=request.attempt, tokens_received=deltas
            )
        )
    return report(None)
