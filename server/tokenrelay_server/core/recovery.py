"""The recovery decision: what to do after an upstream attempt failed.

A pure function from (classified fault, where the stream stands, policy) to a
`Decision`, following DESIGN.md's table:

    error                          no tokens delivered yet      tokens already delivered
    network reset / refused        retry, then fall back        resume, then fall back
    timeout (connect/first/stall)  retry, then fall back        resume, then fall back
    429 / 529                      retry after Retry-After      resume after the delay
                                   (longer), then fall back     then fall back
    5xx                            retry with backoff, then     resume, then fall back
                                   fall back
    other 4xx (auth, bad request)  abort                        abort, partial answer kept
    malformed data                 abort (policy: resume)       same, partial kept
    resource exhaustion            partial with the error       partial with the error

Agent turns (issue 12) come first: a failure while a tool call is shown in
part (policy.tool_calls STREAM) ends the stream (`INTERRUPTED`: a tool call
is never continued or repaired); after complete tool calls the turn is over
(`TOOL_CALLS`: the End follows with finish_reason "tool_calls" and the calls
made so far; a continuation cannot add to a tool call). A failure inside a
call held whole (WHOLE) showed nothing of it: it is decided like a failure
before it, by the table.

Priority: interrupted > tool calls > complete > resume > retry > fallback >
partial > abort. Retries
are counted per provider (`max_retries` each) and need the provider's
breaker and retry budget to agree; a fallback goes to the next usable
provider of the chain. Everything the decision depends on is in the
`Situation`: the fault (its code says "rate limited"), what was delivered,
the breakers (`usable`), the retry budget, and whether the caller's token
budget is already spent; the loop that acts on it (engine/recovery_loop.py)
decides nothing itself.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field, replace
from typing import Literal

from tokenrelay_server.core.classify import is_overload
from tokenrelay_server.core.errors import ErrorType, Fault
from tokenrelay_server.core.model import RecoveryPolicy
from tokenrelay_server.core.retry import BackoffPolicy, next_delay


class Step(enum.StrEnum):
    INTERRUPTED = "interrupted"  # a streamed tool call broke: end partial, TOOL_CALL_INTERRUPTED
    TOOL_CALLS = "tool_calls"  # complete tool calls were shown: end complete, "tool_calls"
    COMPLETE = "complete"  # the caller's token budget is delivered: end complete
    RESUME = "resume"  # same provider, continuation from what was delivered
    RETRY = "retry"  # same provider, the request again (nothing delivered yet)
    FALLBACK = "fallback"  # next provider (continuation when tokens were delivered)
    PARTIAL = "partial"  # options spent: end with what was produced and the error
    ABORT = "abort"  # not recoverable: end with the error (and any partial text)


SelectionMode = Literal["order", "score"]


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    """The recovery policy: the gateway's (from [recovery]), with a call's
    overrides applied by `with_overrides`. Each default is written here once;
    the settings take theirs from this class."""

    max_retries: int = 3
    allow_fallback: bool = True
    allow_partial: bool = True
    resume_on_malformed: bool = False  # treat garbled data as a provider fault
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    # Which chain entry a stream starts on: the first usable one (`order`) or
    # the best health score (`score`).
    selection: SelectionMode = "order"

    def with_overrides(self, overrides: RecoveryPolicy) -> RecoveryConfig:
        """This policy with a call's `policy` fields applied (None: keep ours)."""
        return replace(
            self,
            max_retries=self.max_retries
            if overrides.max_retries is None
            else overrides.max_retries,
            allow_fallback=self.allow_fallback
            if overrides.allow_fallback is None
            else overrides.allow_fallback,
            allow_partial=self.allow_partial
            if overrides.allow_partial is None
            else overrides.allow_partial,
        )


@dataclass(frozen=True, slots=True)
class Situation:
    """Where the stream stands when an attempt failed."""

    fault: Fault
    tokens_delivered: int  # over the whole stream, not just this attempt
    provider_index: int  # the chain entry that failed
    retries_on_provider: int  # retries already made on that entry
    usable: tuple[bool, ...]  # per chain entry: breaker closed (or probe free), not given up on
    budget_allows_retry: bool = True  # the provider's retry budget has room
    answer_complete: bool = False  # every token the caller asked for was delivered
    tool_calls_shown: int = 0  # complete tool calls the clients were shown
    tool_call_cut: int | None = None  # the index of a tool call shown in part (STREAM)


@dataclass(frozen=True, slots=True)
class Decision:
    step: Step
    provider_index: int
    delay_s: float = 0.0
    reason: str = ""

    @property
    def continues(self) -> bool:
        return self.step in (Step.RESUME, Step.RETRY, Step.FALLBACK)


def is_recoverable(fault: Fault, config: RecoveryConfig) -> bool:
    if fault.type is ErrorType.RESOURCE:
        return False
    if fault.type is ErrorType.DATA and fault.code == "MALFORMED_DATA":
        return config.resume_on_malformed
    return fault.retryable


def decide(situation: Situation, config: RecoveryConfig, rng: random.Random) -> Decision:
    fault = situation.fault
    here = situation.provider_index
    delivered = situation.tokens_delivered > 0
    if situation.tool_call_cut is not None:
        return Decision(
            Step.INTERRUPTED,
            here,
            reason=f"{fault.code} inside tool call {situation.tool_call_cut}, part of it shown",
        )
    if situation.tool_calls_shown:
        # Nothing continues a turn past its tool calls; the caller runs them.
        return Decision(
            Step.TOOL_CALLS,
            here,
            reason=f"{fault.code} after {situation.tool_calls_shown} complete tool call(s)",
        )
    if situation.answer_complete:
        # What broke after the last token the caller asked for cannot take
        # any of them away.
        return Decision(Step.COMPLETE, here, reason=f"{fault.code} after the last token")
    if fault.type is ErrorType.RESOURCE:
        return Decision(Step.PARTIAL, here, reason="a resource limit was hit")
    if not is_recoverable(fault, config):
        return Decision(Step.ABORT, here, reason=f"{fault.code} is not recoverable")
    same_provider_usable = here < len(situation.usable) and situation.usable[here]
    if situation.retries_on_provider < config.max_retries and same_provider_usable:
        if situation.budget_allows_retry:
            delay = next_delay(
                situation.retries_on_provider + 1,
                policy=config.backoff,
                rng=rng,
                retry_after_s=fault.retry_after_s,
                rate_limited=is_overload(fault),  # classify's status table: 429, 529
            )
            step = Step.RESUME if delivered else Step.RETRY
            return Decision(step, here, delay, f"{fault.code}: {step} on the same provider")
    if config.allow_fallback:
        order = list(range(here + 1, len(situation.usable))) + list(range(here))
        for index in order:
            if situation.usable[index]:
                return Decision(Step.FALLBACK, index, 0.0, f"{fault.code}: falling back")
    if delivered or config.allow_partial:
        return Decision(Step.PARTIAL, here, reason="every recovery option is spent")
    return Decision(Step.ABORT, here, reason="every recovery option is spent")
