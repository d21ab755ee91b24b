"""The recovery loop: attempts until one finishes or `decide()` gives up.

Per attempt: take a breaker permit for the chain entry (none: the fault is
BREAKER_OPEN and no call is made), run the attempt, settle the permit once
(a success, the provider's failure, or no verdict: a caller's fault or a
stop), then ask `decide()` (core/recovery.py) what to do and do exactly
that: wait on the clock, retry, resume by continuation, fall back, or end.
The loop decides nothing itself; every input of the decision (breakers,
retry budget, the caller's token budget, rate limits in the fault) goes into
the `Situation`.

Agent turns (issue 12): the loop keeps the stream's `TurnState` (what the
clients were shown of tool calls) and gives each attempt a `TurnShaper`
(core/turn.py): reasoning only when nothing was shown before the attempt,
the stitcher when answer text was. `decide()` ends a turn whose tool calls
were shown (TOOL_CALLS: the End says "tool_calls", a notice says what broke)
or cut in part (INTERRUPTED: partial, TOOL_CALL_INTERRUPTED).

A stop from outside (cancel, deadline, grace, memory, drain) arrives as the
enclosing scope's TimeoutError or a CancelledError, in an attempt or in a
wait between attempts; it propagates out, and the permit's `with` block
releases the probe on the way (issue 8: an abandoned probe used to keep the
slot and the breaker half open forever).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace

from tokenrelay_server.core import classify
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction
from tokenrelay_server.core.model import StartRequest
from tokenrelay_server.core.recovery import Decision, RecoveryConfig, Situation, Step, decide
from tokenrelay_server.core.stitch import Stitcher
from tokenrelay_server.core.turn import Piece, TurnShaper, TurnState
from tokenrelay_server.engine.attempt import AttemptReport, Emit, run_attempt
from tokenrelay_server.engine.events import (
    AttemptEnded,
    AttemptStarted,
    Observers,
    RecoveryAction,
)
from tokenrelay_server.engine.routing import Route
from tokenrelay_server.engine.selection import UpstreamHealth
from tokenrelay_server.upstream.base import Finish, ProviderRequest

log = logging.getLogger(__name__)

ACTION_FOR_STEP = {
    Step.RETRY: SuggestedAction.RETRY,
    Step.RESUME: SuggestedAction.RESUME,
    Step.FALLBACK: SuggestedAction.FALLBACK,
}


@dataclass(frozen=True)
class Recovery:
    """What every generation of a replica shares to recover: the health of
    the upstreams (breakers, budgets, scores), the policy, time, jitter."""

    health: UpstreamHealth
    config: RecoveryConfig
    clock: Clock
    rng: random.Random


@dataclass
class Tally:
    """Tokens of one stream over all its attempts, in two senses.

    - `completion_tokens` (and `prompt_tokens`): what the upstream calls
      cost, as the providers reported it, summed over attempts; an attempt
      that broke before its usage came counts its deltas, weighed by what the
      provider's earlier answers reported per delta. This is the End's usage.
    - `delivered_tokens`: the tokens of the answer the clients were shown
      (text and tool calls; the caller's max_tokens budget, a Checkpoint's
      token_count). Text a model repeated in a continuation, and reasoning,
      were paid for but are not the answer, so the two can differ.
    """

    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    delivered_tokens: int = 0

    def add(self, report: AttemptReport, weight: float) -> None:
        """Count a finished or failed attempt. `weight`: tokens per delta when
        the provider reported no usage."""
        self.prompt_tokens += report.prompt_tokens
        if report.completion_tokens and report.deltas:
            weight = report.completion_tokens / report.deltas
            self.completion_tokens += report.completion_tokens
        else:
            self.completion_tokens += round(report.deltas * weight)
        self.delivered_tokens += round(report.emitted * weight)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the loop ended: `finish` when the answer is complete, else `fault`
    (the error the stream ends partial with)."""

    finish: Finish | None = None
    fault: Fault | None = None


def breaker_open_fault(route: Route) -> Fault:
    return Fault(
        type=ErrorType.APPLICATION,
        code="BREAKER_OPEN",
        message=f"the circuit breaker of {route.provider.name}/{route.upstream_model} is open",
        retryable=True,
        suggested_action=SuggestedAction.FALLBACK,
        provider=route.provider.name,
    )


@dataclass
class RecoveryLoop:
    stream_id: str
    request: StartRequest
    chain: list[Route]
    policy: RecoveryConfig
    recovery: Recovery
    tally: Tally
    # Store and show one chunk: (piece, provider, attempt, tokens_so_far).
    emit_chunk: Callable[[Piece, str, int, int], Awaitable[None]]
    # The same without a coroutine, where the log allows it (the memory
    # store's own log; a log that writes behind): None, or what to await
    # before the next chunk (a write-behind log with its window full).
    emit_chunk_now: Callable[[Piece, str, int, int], Awaitable[None] | None] | None
    # Store and show one non-fatal notice.
    notice: Callable[[Fault], Awaitable[None]]
    # What was delivered so far (the continuation prefix) and its chunk count.
    delivered_text: Callable[[], str]
    delivered_chunks: Callable[[], int]
    # Wait until what was emitted is durable (a log that writes behind,
    # engine/fanout.py; at once otherwise): every decision and continuation
    # needs all of it.
    settle: Callable[[], Awaitable[None]]
    model: str = ""  # the alias, for observers
    observe: Observers = field(default_factory=Observers)
    # What the clients were shown of the turn's tool calls (a takeover
    # restores it from the log).
    turn: TurnState = field(default_factory=TurnState)
    _retries: list[int] = field(default_factory=list)
    _given_up: set[int] = field(default_factory=set)
    # Where the loop is, for operators (and tests that move a manual clock):
    # "attempt" while an upstream call runs, "backoff" while it waits on the
    # clock to try again, "done" once it returned.
    phase: str = "attempt"

    async def run(self) -> Outcome:
        # (One frame, not a wrapper: a suspended frame per stream is memory.)
        try:
            restored = self._restored_turn_outcome()
            if restored is not None:
                return restored
            health = self.recovery.health
            self._retries = [0] * len(self.chain)
            index = health.choose(self.chain, self.policy.selection)
            if index is None:
                # Every breaker is open: no call is made; the decision says how it ends.
                index = 0
            while True:
                route = self.chain[index]
                permit = health.breaker(route).try_acquire()
                if permit is None:
                    fault = breaker_open_fault(route)
                    if self.observe:
                        self._attempt_ended(route, self.tally.attempts, "refused", fault, None, 0.0)
                else:
                    with permit:
                        self.tally.attempts += 1
                        health.budget(route).record_request()
                        continues = self.delivered_chunks() > 0
                        report = await self._observed_attempt(route, self.tally.attempts)
                        await self.settle()
                        route_health = health.health(route)
                        self.tally.add(report, route_health.delta_weight())
                        if report.fault is None:
                            permit.succeeded()
                            route_health.observe_success(report.first_token_s, report.inter_token_s)
                            if not continues:
                                # Only a fresh answer teaches tokens per delta: a
                                # continuation's deltas are reshaped (an Anthropic
                                # prefill loses its trailing whitespace, the model
                                # writes it again, the adapter drops that delta and
                                # the usage counts its token).
                                route_health.observe_usage(report.deltas, report.completion_tokens)
                            assert report.finish is not None
                            return Outcome(finish=report.finish)
                        fault = report.fault
                        if classify.counts_against_provider(fault):
                            permit.failed()
                            health.health(route).observe_failure()
                        else:
                            permit.released()
                decision = decide(self._situation(fault, index), self.policy, self.recovery.rng)
                # The lifecycle lines (a recovery action, the end) are the log
                # observer's (obs/logs.py); why the loop stopped is a detail.
                if decision.step is Step.COMPLETE:
                    log.debug("stream %s: %s", self.stream_id, decision.reason)
                    return Outcome(finish=Finish("length"))
                if decision.step is Step.TOOL_CALLS:
                    log.debug("stream %s: the turn ends: %s", self.stream_id, decision.reason)
                    calls = self.turn.complete_calls
                    await self.notice(
                        replace(
                            fault,
                            fatal=False,
                            message=(
                                f"{fault.message}; the turn ends with the {calls} complete "
                                "tool call(s) made so far (a turn is never continued past "
                                "its tool calls)"
                            ),
                        )
                    )
                    return Outcome(finish=Finish("tool_calls"))
                if decision.step is Step.INTERRUPTED:
                    log.debug("stream %s: giving up: %s", self.stream_id, decision.reason)
                    index_cut = self.turn.open_call
                    assert index_cut is not None
                    return Outcome(fault=classify.tool_call_interrupted(fault, index_cut))
                if not decision.continues:
                    log.debug("stream %s: giving up: %s", self.stream_id, decision.reason)
                    return Outcome(fault=fault)
                await self._announce(fault, decision, route)
                if self.observe:
                    self.observe(
                        RecoveryAction(
                            stream_id=self.stream_id,
                            model=self.model,
                            step=str(decision.step),
                            fault=fault,
                            from_provider=route.provider.name,
                            to_provider=self.chain[decision.provider_index].provider.name,
                            delay_s=decision.delay_s,
                            at_seq=self.delivered_chunks(),
                            at=self.recovery.clock.monotonic(),
                        )
                    )
                if decision.step is Step.FALLBACK:
                    self._given_up.add(index)
                else:
                    self._retries[index] += 1
                    health.budget(route).spend_retry()
                index = decision.provider_index
                if decision.delay_s > 0:
                    # "backoff" means a timer of the clock is what the loop waits
                    # for; a fallback (no delay) goes straight to its attempt.
                    self.phase = "backoff"
                await self.recovery.clock.sleep(decision.delay_s)
                self.phase = "attempt"
        finally:
            self.phase = "done"

    def _situation(self, fault: Fault, index: int) -> Situation:
        health = self.recovery.health
        limit = self.request.params.max_tokens
        return Situation(
            fault=fault,
            tokens_delivered=self.delivered_chunks(),
            provider_index=index,
            retries_on_provider=self._retries[index],
            usable=tuple(
                i not in self._given_up and health.breaker(route).available()
                for i, route in enumerate(self.chain)
            ),
            budget_allows_retry=health.budget(self.chain[index]).allows_retry(),
            answer_complete=limit is not None and self.tally.delivered_tokens >= limit,
            tool_calls_shown=self.turn.complete_calls,
            tool_call_cut=self.turn.open_call,
        )

    def _restored_turn_outcome(self) -> Outcome | None:
        """A stream taken over after its tool calls were shown, or after its
        owner stored the last token of the caller's `max_tokens` (but not the
        End): there is nothing to continue (the decision's rule, without an
        attempt; asking for one more token would exceed the budget)."""
        limit = self.request.params.max_tokens
        if limit is not None and self.tally.delivered_tokens >= limit:
            return Outcome(finish=Finish("length"))
        if self.turn.open_call is not None:
            cause = Fault(
                type=ErrorType.APPLICATION,
                code="OWNER_LOST",
                message="the replica generating this stream stopped",
                retryable=True,
                suggested_action=SuggestedAction.RETRY,
            )
            return Outcome(fault=classify.tool_call_interrupted(cause, self.turn.open_call))
        if self.turn.complete_calls:
            return Outcome(finish=Finish("tool_calls"))
        return None

    async def _observed_attempt(self, route: Route, attempt: int) -> AttemptReport:
        """`_attempt`, told to the observers as it starts and however it ends."""
        if not self.observe:
            return await self._attempt(route, attempt)
        clock = self.recovery.clock
        started = clock.monotonic()
        self.observe(
            AttemptStarted(
                stream_id=self.stream_id,
                model=self.model,
                provider=route.provider.name,
                upstream_model=route.upstream_model,
                attempt=attempt,
                continuation=self.delivered_chunks() > 0,
                at=started,
            )
        )
        try:
            report = await self._attempt(route, attempt)
        except BaseException:
            self._attempt_ended(route, attempt, "stopped", None, None, clock.monotonic() - started)
            raise
        outcome = "success" if report.fault is None else "failure"
        self._attempt_ended(
            route, attempt, outcome, report.fault, report, clock.monotonic() - started
        )
        return report

    def _attempt_ended(
        self,
        route: Route,
        attempt: int,
        outcome: str,
        fault: Fault | None,
        report: AttemptReport | None,
        duration_s: float,
    ) -> None:
        self.observe(
            AttemptEnded(
                stream_id=self.stream_id,
                model=self.model,
                provider=route.provider.name,
                upstream_model=route.upstream_model,
                attempt=attempt,
                outcome=outcome,
                fault=fault,
                deltas=0 if report is None else report.deltas,
                completion_tokens=0 if report is None else report.completion_tokens,
                bytes_received=0 if report is None else report.bytes_received,
                first_token_s=None if report is None else report.first_token_s,
                duration_s=duration_s,
                at=self.recovery.clock.monotonic(),
            )
        )

    def _attempt(self, route: Route, attempt: int) -> Coroutine[None, None, AttemptReport]:
        """The coroutine of one attempt, ready to await (built here, so that no
        frame of this method waits while it runs)."""
        delivered = self.delivered_text() if self.delivered_chunks() else ""
        params = self.request.params
        if params.max_tokens is not None and self.tally.delivered_tokens:
            # The caller's budget covers the whole answer, across attempts.
            remaining = max(params.max_tokens - self.tally.delivered_tokens, 1)
            params = replace(params, max_tokens=remaining)
        request = ProviderRequest(
            model=route.upstream_model,
            messages=self.request.messages,
            params=params,
            attempt=attempt,
            continuation=delivered,
            metadata=self.request.metadata,
            tools=self.request.tools,
            tool_choice=self.request.tool_choice,
        )
        base_tokens = self.tally.delivered_tokens
        weight = self.recovery.health.health(route).delta_weight()
        provider_name = route.provider.name

        emit_now = self.emit_chunk_now

        turn = self.turn

        async def emit(piece: Piece, answer_deltas: int) -> None:
            tokens = base_tokens + (
                answer_deltas if weight == 1.0 else round(answer_deltas * weight)
            )
            if emit_now is not None:
                waiting = emit_now(piece, provider_name, attempt, tokens)
                if waiting is not None:
                    await waiting
            else:
                await self.emit_chunk(piece, provider_name, attempt, tokens)
            if piece.tool_call is not None or turn.open_call is not None:
                turn.shown(piece)  # (text with no call open changes nothing)

        emitter: Emit = emit
        shaper = TurnShaper(
            self.turn,
            # Reasoning only from an attempt that starts the stream: a
            # continuation's model thinks again, and showing that would
            # repeat (or contradict) what the client saw (core/turn.py).
            show_reasoning=self.delivered_chunks() == 0,
            stitcher=Stitcher(delivered) if delivered else None,
        )
        return run_attempt(route, request, clock=self.recovery.clock, emit=emitter, shaper=shaper)

    async def _announce(self, fault: Fault, decision: Decision, failed: Route) -> None:
        """A non-fatal StreamError: what failed and what the gateway does now."""
        target = self.chain[decision.provider_index].provider.name
        breaker = self.recovery.health.breaker(failed)
        at = self.delivered_chunks()
        what = {
            Step.RETRY: f"retrying {target}",
            Step.RESUME: f"resuming on {target} from seq {at}",
            Step.FALLBACK: f"falling back to {target}"
            + (f", resuming from seq {at}" if at else ""),
        }[decision.step]
        if decision.step is Step.FALLBACK and not breaker.available():
            what += f" (the circuit breaker of {breaker.name} is open)"
        await self.notice(
            replace(
                fault,
                fatal=False,
                suggested_action=ACTION_FOR_STEP[decision.step],
                message=f"{fault.message}; {what} in {decision.delay_s:.2f} s",
            )
        )
