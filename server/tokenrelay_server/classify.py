"""Classification: what a failure means, as pure functions.

Each function turns one kind of evidence (an HTTP status, a transport
exception, a provider's error payload, …) into a `Fault`: its layer, a stable
code, whether it is retryable and what to do next. Recovery decisions that
depend on the stream's history belong to the recovery pipeline; the one piece
of context used here is whether tokens were already delivered, which turns
"retry" into "resume".
"""

from __future__ import annotations

from .errors import ErrorType, Fault, SuggestedAction

# Statuses that mean "try again later" (RFC 9110 §15.6, plus 429 from RFC 6585
# and Anthropic's 529 "overloaded").
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


def next_step(retryable: bool, tokens_received: int) -> SuggestedAction:
    """RETRY before the first token, RESUME after it; ABORT when not retryable."""
    if not retryable:
        return SuggestedAction.ABORT
    return SuggestedAction.RESUME if tokens_received else SuggestedAction.RETRY


def classify_http_status(
    status: int,
    *,
    retry_after_s: float | None = None,
    detail: str = "",
    tokens_received: int = 0,
    bytes_received: int = 0,
) -> Fault:
    """A non-2xx response to the streaming request."""
    retryable = status in RETRYABLE_STATUSES or status >= 500
    if status == 429:
        what = "rate limited by the provider"
    elif status == 529:
        what = "the provider is overloaded"
    elif status in (401, 403):
        what = "the provider rejected the credentials"
    elif status >= 500:
        what = "the provider failed"
    else:
        what = "the provider rejected the request"
    message = f"HTTP {status}: {what}" + (f" ({detail})" if detail else "")
    return Fault(
        type=ErrorType.PROTOCOL,
        code=f"HTTP_{status}",
        message=message,
        retryable=retryable,
        suggested_action=next_step(retryable, tokens_received),
        tokens_received=tokens_received,
        bytes_received=bytes_received,
        retry_after_s=retry_after_s if retryable else None,
    )


def connection_reset(*, tokens_received: int = 0, bytes_received: int = 0) -> Fault:
    return Fault(
        type=ErrorType.NETWORK,
        code="ECONNRESET",
        message="the upstream connection was reset",
        retryable=True,
        suggested_action=next_step(True, tokens_received),
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )


def malformed_data(detail: str, *, tokens_received: int = 0, bytes_received: int = 0) -> Fault:
    return Fault(
        type=ErrorType.DATA,
        code="MALFORMED_DATA",
        message=f"the upstream sent malformed data: {detail}",
        retryable=False,
        suggested_action=SuggestedAction.ABORT,
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )


def missing_finish(*, tokens_received: int = 0, bytes_received: int = 0) -> Fault:
    return Fault(
        type=ErrorType.DATA,
        code="NO_FINISH_REASON",
        message="the upstream stream ended without a finish reason",
        retryable=True,
        suggested_action=next_step(True, tokens_received),
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )


def stall_timeout(
    timeout_s: float, *, first_token: bool, tokens_received: int = 0, bytes_received: int = 0
) -> Fault:
    if first_token:
        code, what = "FIRST_TOKEN_TIMEOUT", "no first token"
    else:
        code, what = "STALL_TIMEOUT", "no token"
    return Fault(
        type=ErrorType.TIMEOUT,
        code=code,
        message=f"{what} from the upstream within {timeout_s:g} s",
        retryable=True,
        suggested_action=next_step(True, tokens_received),
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )
