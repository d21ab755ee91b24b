"""The recovery decision, one row per branch of DESIGN.md's table."""

from __future__ import annotations

import random

import pytest

from tokenrelay_server.core import classify
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction
from tokenrelay_server.core.recovery import Decision, RecoveryConfig, Situation, Step, decide
from tokenrelay_server.core.retry import BackoffPolicy

NO_JITTER = RecoveryConfig(backoff=BackoffPolicy(jitter=0.0))


def fault(code: str, error_type: ErrorType, retryable: bool, retry_after: float | None = None):
    return Fault(
        type=error_type,
        code=code,
        message=code,
        retryable=retryable,
        suggested_action=SuggestedAction.RETRY if retryable else SuggestedAction.ABORT,
        retry_after_s=retry_after,
    )


RESET = classify.connection_reset()
STALL = classify.stall_timeout(30, first_token=False)
RATE_LIMITED = classify.classify_http_status(429, retry_after_s=7.0)
OVERLOADED = classify.classify_http_status(529)
SERVER_ERROR = classify.classify_http_status(503)
UNAUTHORIZED = classify.classify_http_status(401)
BAD_REQUEST = classify.classify_http_status(400)
GARBAGE = classify.malformed_data("bad json")
TOO_LARGE = fault("RESPONSE_TOO_LARGE", ErrorType.RESOURCE, False)


def situation(
    f: Fault,
    *,
    tokens: int = 0,
    retries: int = 0,
    index: int = 0,
    usable: tuple[bool, ...] = (True, True),
    budget: bool = True,
    complete: bool = False,
    tool_calls: int = 0,
    cut: int | None = None,
) -> Situation:
    return Situation(
        f,
        tokens,
        index,
        retries,
        usable,
        budget,
        answer_complete=complete,
        tool_calls_shown=tool_calls,
        tool_call_cut=cut,
    )


ROWS = [
    (
        "a reset before any token is retried after the base backoff",
        situation(RESET),
        NO_JITTER,
        Decision(Step.RETRY, 0, 1.0),
    ),
    (
        "a reset after tokens resumes on the same provider",
        situation(RESET, tokens=12),
        NO_JITTER,
        Decision(Step.RESUME, 0, 1.0),
    ),
    (
        "the third retry waits four times the base",
        situation(RESET, retries=2),
        NO_JITTER,
        Decision(Step.RETRY, 0, 4.0),
    ),
    (
        "retries spent on a provider fall back to the next",
        situation(RESET, retries=3),
        NO_JITTER,
        Decision(Step.FALLBACK, 1),
    ),
    (
        "a stall after tokens resumes",
        situation(STALL, tokens=5),
        NO_JITTER,
        Decision(Step.RESUME, 0, 1.0),
    ),
    (
        "a 429 waits what Retry-After says",
        situation(RATE_LIMITED),
        NO_JITTER,
        Decision(Step.RETRY, 0, 7.0),
    ),
    (
        "a 529 without Retry-After waits twice the backoff",
        situation(OVERLOADED),
        NO_JITTER,
        Decision(Step.RETRY, 0, 2.0),
    ),
    (
        "a 503 after tokens resumes with backoff",
        situation(SERVER_ERROR, tokens=3, retries=1),
        NO_JITTER,
        Decision(Step.RESUME, 0, 2.0),
    ),
    ("a 401 aborts", situation(UNAUTHORIZED), NO_JITTER, Decision(Step.ABORT, 0)),
    (
        "a 400 after tokens aborts keeping the partial answer",
        situation(BAD_REQUEST, tokens=9),
        NO_JITTER,
        Decision(Step.ABORT, 0),
    ),
    (
        "malformed data aborts by default",
        situation(GARBAGE, tokens=4),
        NO_JITTER,
        Decision(Step.ABORT, 0),
    ),
    (
        "malformed data resumes when the policy treats it as a provider fault",
        situation(GARBAGE, tokens=4),
        RecoveryConfig(resume_on_malformed=True, backoff=BackoffPolicy(jitter=0.0)),
        Decision(Step.RESUME, 0, 1.0),
    ),
    (
        "a resource limit ends with the partial answer",
        situation(TOO_LARGE, tokens=100),
        NO_JITTER,
        Decision(Step.PARTIAL, 0),
    ),
    (
        "an open breaker on the failed provider falls back at once",
        situation(RESET, usable=(False, True)),
        NO_JITTER,
        Decision(Step.FALLBACK, 1),
    ),
    (
        "an empty retry budget falls back",
        situation(RESET, budget=False),
        NO_JITTER,
        Decision(Step.FALLBACK, 1),
    ),
    (
        "fallback skips providers whose breaker is open",
        situation(RESET, retries=3, usable=(True, False, True)),
        NO_JITTER,
        Decision(Step.FALLBACK, 2),
    ),
    (
        "fallback wraps around to earlier providers of the chain",
        situation(RESET, retries=3, index=1, usable=(True, True)),
        NO_JITTER,
        Decision(Step.FALLBACK, 0),
    ),
    (
        "with fallback disallowed, spent retries end partial",
        situation(RESET, tokens=4, retries=3),
        RecoveryConfig(allow_fallback=False, backoff=BackoffPolicy(jitter=0.0)),
        Decision(Step.PARTIAL, 0),
    ),
    (
        "with nothing usable after tokens, the answer is partial",
        situation(RESET, tokens=4, retries=3, usable=(True, False)),
        NO_JITTER,
        Decision(Step.PARTIAL, 0),
    ),
    (
        "with nothing usable, no tokens and partial disallowed, abort",
        situation(RESET, retries=3, usable=(True, False)),
        RecoveryConfig(allow_partial=False, backoff=BackoffPolicy(jitter=0.0)),
        Decision(Step.ABORT, 0),
    ),
    (
        "max_retries=0 falls back on the first failure",
        situation(RESET),
        RecoveryConfig(max_retries=0),
        Decision(Step.FALLBACK, 1),
    ),
    (
        "a break after the last token the caller asked for ends complete",
        situation(RESET, tokens=30, complete=True),
        NO_JITTER,
        Decision(Step.COMPLETE, 0),
    ),
    # agent turns (issue 12)
    (
        "a reset inside a streamed tool call ends the stream, never continues it",
        situation(RESET, tokens=6, cut=0),
        NO_JITTER,
        Decision(Step.INTERRUPTED, 0),
    ),
    (
        "a cut streamed tool call wins over complete calls before it",
        situation(RESET, tokens=6, tool_calls=1, cut=1),
        NO_JITTER,
        Decision(Step.INTERRUPTED, 0),
    ),
    (
        "a cut streamed tool call ends the stream even when the fault is not recoverable",
        situation(BAD_REQUEST, tokens=6, cut=0),
        NO_JITTER,
        Decision(Step.INTERRUPTED, 0),
    ),
    (
        "a reset after a complete tool call ends the turn with the calls made",
        situation(RESET, tokens=6, tool_calls=1),
        NO_JITTER,
        Decision(Step.TOOL_CALLS, 0),
    ),
    (
        "complete tool calls end the turn even when the caller's budget is also spent",
        situation(RESET, tokens=6, tool_calls=2, complete=True),
        NO_JITTER,
        Decision(Step.TOOL_CALLS, 0),
    ),
    (
        "a stall inside a tool call held whole (text before it) resumes like any break",
        situation(STALL, tokens=4),
        NO_JITTER,
        Decision(Step.RESUME, 0, 1.0),
    ),
    (
        "a reset inside a tool call held whole with nothing shown is retried",
        situation(RESET),
        NO_JITTER,
        Decision(Step.RETRY, 0, 1.0),
    ),
    (
        "arguments that are not JSON in a call held whole are retried",
        situation(classify.invalid_tool_arguments(0, "not JSON"), tokens=3),
        NO_JITTER,
        Decision(Step.RESUME, 0, 1.0),
    ),
]


@pytest.mark.parametrize(
    ("situation_", "config", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_decision(situation_: Situation, config: RecoveryConfig, expected: Decision) -> None:
    got = decide(situation_, config, random.Random(0))
    assert (got.step, got.provider_index) == (expected.step, expected.provider_index)
    assert got.delay_s == pytest.approx(expected.delay_s)
    assert got.reason
