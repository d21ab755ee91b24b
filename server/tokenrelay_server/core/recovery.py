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

Priority: resume > retry > fallback > partial > abort. Retries are counted
per provider (`max_retries` each) and need the provider's breaker and retry
budget to agree; a fallback goes to the next usable provider of the chain.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from tokenrelay_server.core.classify import is_overload
from tokenrelay_server.core.errors import ErrorType, Fault
from tokenrelay_server.core.retry import BackoffPolicy, next_delay


class Step(enum.StrEnum):
    RESUME = "resume"  # same provider, continuation from what was delivered
    RETRY = "retry"  # same provider, the request again (nothing delivered yet)
    FALLBACK = "fallback"  # next provider (continuation when tokens were delivered)
    PARTIAL = "partial"  # options spent: end with what was produced and the error
    ABORT = "abort"  # not recoverable: end with the error (and any partial text)


@dataclass(frozen=True, slots=True)
class RecoveryConfig:
    max_retries: int = 3
    allow_fallback: bool = True
    allow_partial: bool = True
    resume_on_malformed: bool = False  # treat garbled data as a provider fault
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)


@dataclass(frozen=True, slots=True)
class Situation:
    """Where the stream stands when an attempt failed."""

    fault: Fault
    tokens_delivered: int  # over the whole stream, not just this attempt
    provider_index: int  # the chain entry that failed
    retries_on_provider: int  # retries already made on that entry
    usable: tuple[bool, ...]  # per chain entry: breaker closed (or probe free), not given up on
    budget_allows_retry: bool = True


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
