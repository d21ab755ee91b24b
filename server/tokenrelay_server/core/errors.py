"""Every error tokenrelay raises, in one tree.

    TokenRelayError
     ├── RequestError            the client's request is wrong      → INVALID_ARGUMENT
     │    ├── UnknownModel       no such model alias                → INVALID_ARGUMENT
     │    └── FirstMessageTimeout  no `start`/`resume` in time       → DEADLINE_EXCEEDED
     ├── ResumeDenied            tampered or foreign resume token   → PERMISSION_DENIED
     ├── StreamNotFound          expired or unknown stream          → NOT_FOUND
     ├── Overloaded              load shedding, quotas              → RESOURCE_EXHAUSTED
     ├── Draining                the server is shutting down        → UNAVAILABLE
     └── UpstreamError           a provider attempt failed; carries a `Fault`
          ├── NetworkError       reset, refused, DNS, TLS, body cut short
          ├── ProtocolError      HTTP status, wrong content type
          ├── ApplicationError   an error payload from the provider
          ├── DataError          garbled or wrongly shaped data, missing end marker
          ├── ResourceError      size caps, memory limits
          └── UpstreamTimeout    connect, first token, stall, total deadline

The first group never reaches a running stream: the servicer maps them to a
gRPC status in one table. `UpstreamError`s happen inside a generation and
reach the client as a typed `StreamError` event, built from their `Fault`.

Client text that an error message (or a StreamEnd) repeats goes through
`excerpt` / `truncate` first: a message never carries more of what the client
sent than a few hundred characters, so a 5 MB field cannot come back as a
5 MB status or End that readers with gRPC's 4 MiB default cannot receive.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TypedDict, Unpack


class ErrorType(enum.IntEnum):
    """The layer a failure was detected in (values match the proto enum)."""

    NETWORK = 1
    PROTOCOL = 2
    APPLICATION = 3
    DATA = 4
    RESOURCE = 5
    TIMEOUT = 6


class SuggestedAction(enum.IntEnum):
    """What to do about a failure (values match the proto enum)."""

    RETRY = 1
    RESUME = 2
    FALLBACK = 3
    ABORT = 4


@dataclass(frozen=True, slots=True)
class Fault:
    """A classified failure: what the client sees as a `StreamError`."""

    type: ErrorType
    code: str
    message: str
    retryable: bool
    suggested_action: SuggestedAction
    fatal: bool = True
    bytes_received: int = 0
    tokens_received: int = 0
    provider: str = ""
    attempt: int = 0
    retry_after_s: float | None = None

    def with_context(self, **changes: Unpack[FaultChanges]) -> Fault:
        return replace(self, **changes)

    def to_json(self) -> dict[str, object]:
        return {
            "type": int(self.type),
            "code": self.code,
            "message": self.message,
            "retryable": self.retryable,
            "suggested_action": int(self.suggested_action),
            "fatal": self.fatal,
            "bytes_received": self.bytes_received,
            "tokens_received": self.tokens_received,
            "provider": self.provider,
            "attempt": self.attempt,
            "retry_after_s": self.retry_after_s,
        }

    @classmethod
    def from_json(cls, raw: dict[str, object]) -> Fault:
        retry_after = raw.get("retry_after_s")
        return cls(
            type=ErrorType(_as_int(raw["type"])),
            code=str(raw["code"]),
            message=str(raw["message"]),
            retryable=bool(raw["retryable"]),
            suggested_action=SuggestedAction(_as_int(raw["suggested_action"])),
            fatal=bool(raw["fatal"]),
            bytes_received=_as_int(raw.get("bytes_received", 0)),
            tokens_received=_as_int(raw.get("tokens_received", 0)),
            provider=str(raw.get("provider", "")),
            attempt=_as_int(raw.get("attempt", 0)),
            retry_after_s=None if retry_after is None else _as_float(retry_after),
        )


class FaultChanges(TypedDict, total=False):
    """The fields `Fault.with_context` may replace (all of them), typed."""

    type: ErrorType
    code: str
    message: str
    retryable: bool
    suggested_action: SuggestedAction
    fatal: bool
    bytes_received: int
    tokens_received: int
    provider: str
    attempt: int
    retry_after_s: float | None


# What JSON decodes a number to (the codec wrote ints and floats); anything
# else is a TypeError, as int() and float() raise for it.
def _as_int(value: object) -> int:
    if isinstance(value, int | float | str):
        return int(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


def _as_float(value: object) -> float:
    if isinstance(value, int | float | str):
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}")


class TokenRelayError(Exception):
    """Base of every tokenrelay error."""


class RequestError(TokenRelayError):
    """The request is malformed; the message names the field. Fix it; do not retry."""


class UnknownModel(RequestError):
    """The model alias is not configured. Use one the gateway lists; do not retry."""


class FirstMessageTimeout(RequestError):
    """The call sent no first message (`start` or `resume`) within the
    gateway's `first_message_timeout_s`. Send the first message as soon as
    the call is open; nothing was started."""


class ResumeDenied(TokenRelayError):
    """The resume token was tampered with, signed with a key id this gateway
    does not list, expired, or belongs to another tenant (`reason` says
    which: TOKEN_MALFORMED, TOKEN_UNKNOWN_KID, TOKEN_BAD_MAC, TOKEN_EXPIRED,
    TOKEN_OTHER_TENANT). Start a new stream; retrying with this token will
    not help."""

    def __init__(self, message: str, *, reason: str = "TOKEN_DENIED") -> None:
        super().__init__(message)
        self.reason = reason


class Unauthenticated(TokenRelayError):
    """The call carries no API key, a malformed one, or one the gateway does
    not know (never issued, or revoked). Send `authorization: Bearer <key>`
    with a valid key; retrying the same key will not help."""


class AuthUnavailable(TokenRelayError):
    """The store that holds the API keys cannot be reached, so the key could
    not be checked. Retry with backoff (or on another replica)."""


class QuotaUnavailable(TokenRelayError):
    """The store that counts tenant quotas cannot be reached, so a start
    could not be admitted. Nothing was started; retry with backoff."""


class PermissionDenied(TokenRelayError):
    """The caller's tenant may not do this: a model it is not allowed, or a
    cancel on a call that only holds a resume token. Do not retry."""


class QuotaExceeded(TokenRelayError):
    """A tenant's quota (`limit`: max_concurrent_streams or
    tokens_per_minute) is spent. Retry after `retry_after_s`."""

    def __init__(self, message: str, *, tenant: str, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s


class StreamNotFound(TokenRelayError):
    """The stream expired (past retention) or never existed. Start a new stream."""


class Overloaded(TokenRelayError):
    """The gateway is shedding load or a quota is spent. Retry later with
    backoff: after `retry_after_s` when it is set (the servicer sends it as
    a google.rpc.RetryInfo and `retry-after-ms` trailing metadata), on this
    replica or another. `reason` names the limit (`MAX_STREAMS`,
    `MEMORY_LIMIT`, `LOOP_LAG`, ...; "" when not said)."""

    def __init__(
        self, message: str, *, reason: str = "", retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s


class TakeoverRefused(Overloaded):
    """A resumed stream's owner died and this replica has no room to continue
    it (at `max_streams`, over its memory limit, or saturated: `reason` says
    which, as for `Overloaded`). Nothing changed: the stream is intact, with
    no owner. Resume it on another replica, or here after `retry_after_s`."""


class Draining(TokenRelayError):
    """The server is shutting down. Reconnect (to another replica) and resume."""


class UpstreamError(TokenRelayError):
    """A provider attempt failed. `fault` says how; its suggested_action says
    whether to retry, resume from the last checkpoint, fall back or give up."""

    error_type: ErrorType = ErrorType.NETWORK

    def __init__(self, fault: Fault) -> None:
        super().__init__(f"{fault.code}: {fault.message}")
        self.fault = fault


class NetworkError(UpstreamError):
    """Connection refused or reset, DNS, TLS, a body cut short. Retry, or resume
    from the last checkpoint when tokens were delivered."""

    error_type = ErrorType.NETWORK


class ProtocolError(UpstreamError):
    """An HTTP status or content type that is not a stream. 429/5xx: retry after
    the delay; other 4xx: abort."""

    error_type = ErrorType.PROTOCOL


class ApplicationError(UpstreamError):
    """The provider sent an error payload. Rate limit/overloaded: retry later;
    invalid request/auth: abort."""

    error_type = ErrorType.APPLICATION


class DataError(UpstreamError):
    """Garbled or wrongly shaped data, or a stream that ended without its end
    marker. Abort by default, keeping the partial answer."""

    error_type = ErrorType.DATA


class ResourceError(UpstreamError):
    """A size cap or memory limit was hit. Return the partial answer."""

    error_type = ErrorType.RESOURCE


class UpstreamTimeout(UpstreamError):
    """Connect, first-token, stall or total deadline passed. Retry, or resume
    when tokens were delivered."""

    error_type = ErrorType.TIMEOUT


_BY_TYPE: dict[ErrorType, type[UpstreamError]] = {
    ErrorType.NETWORK: NetworkError,
    ErrorType.PROTOCOL: ProtocolError,
    ErrorType.APPLICATION: ApplicationError,
    ErrorType.DATA: DataError,
    ErrorType.RESOURCE: ResourceError,
    ErrorType.TIMEOUT: UpstreamTimeout,
}


# --- client text in messages --------------------------------------------------------

EXCERPT_CHARS = 64


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted (repr) for an error message, cut to `limit` characters
    with a note of its real length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def truncate(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with a marker saying so (free text a
    message carries as it is, such as a cancel reason)."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [truncated from {len(text)} characters]"


def upstream_error(fault: Fault) -> UpstreamError:
    """The exception class that matches a fault's type."""
    return _BY_TYPE[fault.type](fault)
