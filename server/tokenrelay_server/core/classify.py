"""Classification: what a failure means, as pure functions.

Each function turns one kind of evidence (an HTTP status, a transport
failure, a provider's error payload, …) into a `Fault`: its layer, a stable
code, whether it is retryable and what to do next. Recovery decisions that
depend on the stream's history belong to the recovery pipeline; the one piece
of context used here is whether tokens were already delivered, which turns
"retry" into "resume".

`classify(evidence, …)` is the single entry point: the evidence types below
are small frozen dataclasses, one per way an upstream attempt can fail, so
the table test can hold one row per case. The helpers it dispatches to
(`classify_http_status`, `connection_reset`, `malformed_data`, …) stay public
for callers that already know what they have (the simulator).

    layer        evidence                       codes
    network      TransportFailure               ECONNREFUSED ECONNRESET UNEXPECTED_EOF
                                                DNS_FAILURE TLS_ERROR NETWORK_ERROR
    protocol     HttpFailure                    HTTP_<status>
                 WrongContentType               WRONG_CONTENT_TYPE
    application  ProviderErrorPayload           RATE_LIMITED OVERLOADED PROVIDER_ERROR
                                                INVALID_REQUEST AUTHENTICATION_FAILED
                                                PERMISSION_DENIED NOT_FOUND QUOTA_EXCEEDED
                                                CONTEXT_LENGTH_EXCEEDED REQUEST_TOO_LARGE
    data         BadData                        MALFORMED_DATA UNEXPECTED_SHAPE
                                                NO_FINISH_REASON
    resource     ResponseTooLarge               RESPONSE_TOO_LARGE
    timeout      TransportFailure (timeouts)    CONNECT_TIMEOUT READ_TIMEOUT WRITE_TIMEOUT
                                                POOL_TIMEOUT
                 (the generation loop)          FIRST_TOKEN_TIMEOUT STALL_TIMEOUT

Nothing here imports httpx: the adapters in `providers/` translate httpx
exceptions into `TransportFailure` at one boundary (STYLE anchor 3).
`transport_kind_of()` helps them by recognising the stdlib exceptions
(ConnectionRefusedError, socket.gaierror, ssl.SSLError, …) that httpx keeps
in `__cause__`.

Retry-After (RFC 9110 §10.2.3) is read by `parse_retry_after()`: the
non-standard `retry-after-ms` first (OpenAI's infrastructure sends it), then
`Retry-After` as delay-seconds or an HTTP-date, measured against an injected
`now` (wall-clock seconds) so tests need no real clock.
"""

from __future__ import annotations

import email.utils
import enum
import errno
import json
import math
import socket
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction

# Statuses that mean "try again later" (RFC 9110 §15.6, plus 429 from RFC 6585
# and Anthropic's 529 "overloaded").
RETRYABLE_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})

# Messages quote at most this much of what the upstream sent.
MAX_DETAIL_CHARS = 300


def next_step(retryable: bool, tokens_received: int) -> SuggestedAction:
    """RETRY before the first token, RESUME after it; ABORT when not retryable."""
    if not retryable:
        return SuggestedAction.ABORT
    return SuggestedAction.RESUME if tokens_received else SuggestedAction.RETRY


def _fault(
    error_type: ErrorType,
    code: str,
    message: str,
    retryable: bool,
    *,
    tokens_received: int,
    bytes_received: int,
    retry_after_s: float | None = None,
) -> Fault:
    return Fault(
        type=error_type,
        code=code,
        message=message,
        retryable=retryable,
        suggested_action=next_step(retryable, tokens_received),
        tokens_received=tokens_received,
        bytes_received=bytes_received,
        retry_after_s=retry_after_s if retryable else None,
    )


def _shorten(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- Retry-After ------------------------------------------------------------------------


def parse_retry_after(
    headers: Mapping[str, str] | Iterable[tuple[str, str]], *, now: float
) -> float | None:
    """Seconds to wait before retrying, from `retry-after-ms` or `Retry-After`.

    `Retry-After` is delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a date
    is measured against `now` (wall-clock seconds since the epoch) and a date
    in the past means 0. Unparseable, negative or non-finite values are
    ignored. Capping the wait is the retry policy's business, not ours.
    """
    items = headers.items() if isinstance(headers, Mapping) else headers
    values = {name.lower(): value.strip() for name, value in items}
    raw_ms = values.get("retry-after-ms")
    if raw_ms:
        milliseconds = _finite_non_negative(raw_ms)
        if milliseconds is not None:
            return milliseconds / 1000.0
    raw = values.get("retry-after")
    if not raw:
        return None
    seconds = _finite_non_negative(raw)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; obsolete forms may parse naive
        return None
    return max(0.0, when.timestamp() - now)


def _finite_non_negative(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


# --- protocol: HTTP status ----------------------------------------------------------------


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


# --- application: provider error payloads ---------------------------------------------------


class ProviderErrorKind(enum.Enum):
    """What a provider's error payload means, whatever the provider calls it."""

    RATE_LIMITED = "RATE_LIMITED"
    OVERLOADED = "OVERLOADED"
    SERVER_ERROR = "PROVIDER_ERROR"
    INVALID_REQUEST = "INVALID_REQUEST"
    AUTHENTICATION = "AUTHENTICATION_FAILED"
    PERMISSION = "PERMISSION_DENIED"
    NOT_FOUND = "NOT_FOUND"
    QUOTA = "QUOTA_EXCEEDED"
    CONTEXT_LENGTH = "CONTEXT_LENGTH_EXCEEDED"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"


_RETRYABLE_KINDS = frozenset(
    {ProviderErrorKind.RATE_LIMITED, ProviderErrorKind.OVERLOADED, ProviderErrorKind.SERVER_ERROR}
)

# Provider vocabularies (Anthropic error `type`s, OpenAI `type`/`code`s, and
# what vLLM, Ollama, llama.cpp and OpenRouter send), lower-cased.
_KIND_BY_NAME: dict[str, ProviderErrorKind] = {
    # Anthropic: https://docs.anthropic.com/en/api/errors
    "rate_limit_error": ProviderErrorKind.RATE_LIMITED,
    "overloaded_error": ProviderErrorKind.OVERLOADED,
    "api_error": ProviderErrorKind.SERVER_ERROR,
    "timeout_error": ProviderErrorKind.SERVER_ERROR,
    "invalid_request_error": ProviderErrorKind.INVALID_REQUEST,
    "authentication_error": ProviderErrorKind.AUTHENTICATION,
    "permission_error": ProviderErrorKind.PERMISSION,
    "not_found_error": ProviderErrorKind.NOT_FOUND,
    "request_too_large": ProviderErrorKind.REQUEST_TOO_LARGE,
    "billing_error": ProviderErrorKind.QUOTA,
    # OpenAI: https://platform.openai.com/docs/guides/error-codes
    "rate_limit_exceeded": ProviderErrorKind.RATE_LIMITED,
    "requests": ProviderErrorKind.RATE_LIMITED,
    "tokens": ProviderErrorKind.RATE_LIMITED,
    "insufficient_quota": ProviderErrorKind.QUOTA,
    "server_error": ProviderErrorKind.SERVER_ERROR,
    "internal_error": ProviderErrorKind.SERVER_ERROR,
    "service_unavailable": ProviderErrorKind.OVERLOADED,
    "server_overloaded": ProviderErrorKind.OVERLOADED,
    "overloaded": ProviderErrorKind.OVERLOADED,
    "invalid_api_key": ProviderErrorKind.AUTHENTICATION,
    "invalid_authentication": ProviderErrorKind.AUTHENTICATION,
    "authentication": ProviderErrorKind.AUTHENTICATION,
    "context_length_exceeded": ProviderErrorKind.CONTEXT_LENGTH,
    "string_above_max_length": ProviderErrorKind.CONTEXT_LENGTH,
    "model_not_found": ProviderErrorKind.NOT_FOUND,
    # vLLM / Ollama / llama.cpp
    "badrequesterror": ProviderErrorKind.INVALID_REQUEST,
    "invalid_request": ProviderErrorKind.INVALID_REQUEST,
    "exceed_context_size_error": ProviderErrorKind.CONTEXT_LENGTH,
    "not_found": ProviderErrorKind.NOT_FOUND,
    "unavailable_error": ProviderErrorKind.OVERLOADED,
    "api_connection_error": ProviderErrorKind.SERVER_ERROR,
}

# The code is more specific than the type ("invalid_request_error" +
# "context_length_exceeded"), so it is looked up first.
_CONTEXT_LENGTH_PHRASES = (
    "context length",
    "context window",
    "prompt is too long",
    "too many tokens",
    "maximum context",
)


def _kind_from_status(status: int | None) -> ProviderErrorKind | None:
    if status is None:
        return None
    if status == 429:
        return ProviderErrorKind.RATE_LIMITED
    if status in (503, 529):
        return ProviderErrorKind.OVERLOADED
    if status >= 500:
        return ProviderErrorKind.SERVER_ERROR
    if status == 401:
        return ProviderErrorKind.AUTHENTICATION
    if status == 403:
        return ProviderErrorKind.PERMISSION
    if status == 404:
        return ProviderErrorKind.NOT_FOUND
    if status == 413:
        return ProviderErrorKind.REQUEST_TOO_LARGE
    if 400 <= status < 500:
        return ProviderErrorKind.INVALID_REQUEST
    return None


def provider_error_kind(
    error_type: str, code: str = "", message: str = "", status: int | None = None
) -> ProviderErrorKind:
    """What a provider error means, from its code, type, message or status."""
    for name in (code, error_type):
        kind = _KIND_BY_NAME.get(name.strip().lower())
        if kind is not None:
            if kind is ProviderErrorKind.INVALID_REQUEST and _mentions_context_length(message):
                return ProviderErrorKind.CONTEXT_LENGTH
            return kind
    if _mentions_context_length(message):
        return ProviderErrorKind.CONTEXT_LENGTH
    by_status = _kind_from_status(status)
    if by_status is not None:
        return by_status
    # An error we do not know, in the middle of a stream: treat it as the
    # provider's own failure (retry/resume), not as our bad request.
    return ProviderErrorKind.SERVER_ERROR


def _mentions_context_length(message: str) -> bool:
    lowered = message.lower()
    return any(phrase in lowered for phrase in _CONTEXT_LENGTH_PHRASES)


def classify_provider_error(
    error_type: str,
    code: str = "",
    message: str = "",
    *,
    status: int | None = None,
    retry_after_s: float | None = None,
    tokens_received: int = 0,
    bytes_received: int = 0,
) -> Fault:
    """An error payload from the provider (a JSON body, or an event mid-stream)."""
    kind = provider_error_kind(error_type, code, message, status)
    retryable = kind in _RETRYABLE_KINDS
    names = ", ".join(part for part in (error_type, code) if part)
    text = f"the provider reported an error ({names or 'unnamed'})"
    if message:
        text += f": {_shorten(message)}"
    return _fault(
        ErrorType.APPLICATION,
        kind.value,
        text,
        retryable,
        tokens_received=tokens_received,
        bytes_received=bytes_received,
        retry_after_s=retry_after_s,
    )


@dataclass(frozen=True, slots=True)
class ErrorPayload:
    """The fields of a provider error object, as strings."""

    type: str
    code: str
    message: str


def error_payload_fields(document: object) -> ErrorPayload | None:
    """The error in `{"error": {...}}` (OpenAI and compatibles, Anthropic's
    `{"type": "error", "error": {...}}`) or `{"error": "text"}` (some
    OpenAI-compatible servers); None when `document` is not an error."""
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    if isinstance(error, str):
        return ErrorPayload(type="", code="", message=error)
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    return ErrorPayload(
        type=str(error.get("type") or ""),
        code="" if code is None else str(code),
        message=str(error.get("message") or ""),
    )


def _payload_of(body: bytes) -> ErrorPayload | None:
    if not body:
        return None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return error_payload_fields(document)


# --- network and timeouts: transport failures ----------------------------------------------


class TransportKind(enum.Enum):
    """How the connection failed. The value is the fault code."""

    CONNECTION_REFUSED = "ECONNREFUSED"
    CONNECTION_RESET = "ECONNRESET"
    UNEXPECTED_EOF = "UNEXPECTED_EOF"  # the body was cut short (FIN before the end)
    DNS_FAILURE = "DNS_FAILURE"
    TLS_FAILURE = "TLS_ERROR"
    NETWORK_ERROR = "NETWORK_ERROR"  # any other failure to send or receive
    CONNECT_TIMEOUT = "CONNECT_TIMEOUT"
    READ_TIMEOUT = "READ_TIMEOUT"
    WRITE_TIMEOUT = "WRITE_TIMEOUT"
    POOL_TIMEOUT = "POOL_TIMEOUT"  # no pooled connection became free in time


_TIMEOUTS = frozenset(
    {
        TransportKind.CONNECT_TIMEOUT,
        TransportKind.READ_TIMEOUT,
        TransportKind.WRITE_TIMEOUT,
        TransportKind.POOL_TIMEOUT,
    }
)

_TRANSPORT_WHAT: dict[TransportKind, str] = {
    TransportKind.CONNECTION_REFUSED: "the upstream refused the connection",
    TransportKind.CONNECTION_RESET: "the upstream connection was reset",
    TransportKind.UNEXPECTED_EOF: "the upstream closed the connection before the response ended",
    TransportKind.DNS_FAILURE: "the upstream host name did not resolve",
    TransportKind.TLS_FAILURE: "the TLS handshake with the upstream failed",
    TransportKind.NETWORK_ERROR: "the upstream connection failed",
    TransportKind.CONNECT_TIMEOUT: "no connection to the upstream",
    TransportKind.READ_TIMEOUT: "no data from the upstream",
    TransportKind.WRITE_TIMEOUT: "the request could not be sent to the upstream",
    TransportKind.POOL_TIMEOUT: "no free connection to the upstream",
}

_ERRNO_KINDS: dict[int, TransportKind] = {
    errno.ECONNREFUSED: TransportKind.CONNECTION_REFUSED,
    errno.ECONNRESET: TransportKind.CONNECTION_RESET,
    errno.ECONNABORTED: TransportKind.CONNECTION_RESET,
    errno.EPIPE: TransportKind.CONNECTION_RESET,
}


def transport_kind_of(exc: BaseException) -> TransportKind | None:
    """The transport failure a stdlib exception (or one in its `__cause__` /
    `__context__` chain) stands for; None when nothing in it is recognised."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        kind = _stdlib_kind(current)
        if kind is not None:
            return kind
        if isinstance(current, BaseExceptionGroup):
            # anyio raises OSError("All connection attempts failed") from a
            # group when several addresses were tried (happy eyeballs).
            pending.extend(current.exceptions)
        cause = current.__cause__ or current.__context__
        if cause is not None:
            pending.append(cause)
    return None


def _stdlib_kind(exc: BaseException) -> TransportKind | None:
    # Order matters: gaierror and SSLError are OSErrors with their own errnos.
    if isinstance(exc, socket.gaierror):
        return TransportKind.DNS_FAILURE
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return TransportKind.TLS_FAILURE
    if isinstance(exc, ConnectionRefusedError):
        return TransportKind.CONNECTION_REFUSED
    if isinstance(exc, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return TransportKind.CONNECTION_RESET
    if isinstance(exc, OSError) and exc.errno in _ERRNO_KINDS:
        return _ERRNO_KINDS[exc.errno]
    if isinstance(exc, TimeoutError):
        return TransportKind.READ_TIMEOUT
    return None


def transport_failure(
    kind: TransportKind,
    detail: str = "",
    *,
    timeout_s: float | None = None,
    tokens_received: int = 0,
    bytes_received: int = 0,
) -> Fault:
    """A connection that failed or timed out. All of these are retryable:
    the next attempt gets a new connection."""
    message = _TRANSPORT_WHAT[kind]
    if kind in _TIMEOUTS and timeout_s is not None:
        message += f" within {timeout_s:g} s"
    if detail:
        message += f" ({_shorten(detail)})"
    return _fault(
        ErrorType.TIMEOUT if kind in _TIMEOUTS else ErrorType.NETWORK,
        kind.value,
        message,
        True,
        tokens_received=tokens_received,
        bytes_received=bytes_received,
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


# --- data ----------------------------------------------------------------------------------------


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


def unexpected_shape(detail: str, *, tokens_received: int = 0, bytes_received: int = 0) -> Fault:
    """Valid JSON, but not the event the format defines (a field of the wrong
    type, a missing field). Like malformed data: abort by default."""
    return _fault(
        ErrorType.DATA,
        "UNEXPECTED_SHAPE",
        f"the upstream sent an event of the wrong shape: {_shorten(detail)}",
        False,
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


# --- resource ------------------------------------------------------------------------------------


def response_too_large(
    limit_bytes: int, *, tokens_received: int = 0, bytes_received: int = 0
) -> Fault:
    """The response passed the size cap. Not retryable: the same request
    would produce the same response; the partial answer is returned."""
    return _fault(
        ErrorType.RESOURCE,
        "RESPONSE_TOO_LARGE",
        f"the upstream response passed the {limit_bytes} byte cap",
        False,
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )


# --- timeouts enforced by the generation loop --------------------------------------------------


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


# --- evidence and the single entry point ----------------------------------------------------------


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """The connection failed: refused, reset, cut short, DNS, TLS, a timeout."""

    kind: TransportKind
    detail: str = ""
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class HttpFailure:
    """A non-2xx status. `body` is the start of the error body, if read."""

    status: int
    headers: Headers = ()
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class WrongContentType:
    """A 2xx response that is not `text/event-stream` (an HTML error page from
    a proxy, a JSON body from a server that ignored `stream`)."""

    status: int
    content_type: str
    body: bytes = b""
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class ProviderErrorPayload:
    """An error object from the provider, in a body or mid-stream."""

    error_type: str
    code: str = ""
    message: str = ""
    status: int | None = None
    headers: Headers = ()


@dataclass(frozen=True, slots=True)
class BadData:
    """What the stream said cannot be used."""

    kind: Literal["invalid_json", "wrong_shape", "no_finish"]
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ResponseTooLarge:
    limit_bytes: int


Evidence = (
    TransportFailure
    | HttpFailure
    | WrongContentType
    | ProviderErrorPayload
    | BadData
    | ResponseTooLarge
)


def classify(
    evidence: Evidence, *, now: float, tokens_received: int = 0, bytes_received: int = 0
) -> Fault:
    """The `Fault` for one piece of evidence. `now` (wall-clock seconds) is
    only used for a `Retry-After` HTTP-date."""
    progress = {"tokens_received": tokens_received, "bytes_received": bytes_received}
    match evidence:
        case TransportFailure(kind=kind, detail=detail, timeout_s=timeout_s):
            return transport_failure(kind, detail, timeout_s=timeout_s, **progress)
        case HttpFailure(status=status, headers=headers, body=body):
            return _http_failure(status, headers, body, now=now, **progress)
        case WrongContentType(status=status, content_type=content_type, body=body, headers=headers):
            return _wrong_content_type(status, content_type, body, headers, now=now, **progress)
        case ProviderErrorPayload(
            error_type=error_type, code=code, message=message, status=status, headers=headers
        ):
            retry_after = parse_retry_after(headers, now=now) if headers else None
            return classify_provider_error(
                error_type, code, message, status=status, retry_after_s=retry_after, **progress
            )
        case BadData(kind="invalid_json", detail=detail):
            return malformed_data(detail or "invalid JSON", **progress)
        case BadData(kind="wrong_shape", detail=detail):
            return unexpected_shape(detail, **progress)
        case BadData(kind="no_finish"):
            return missing_finish(**progress)
        case ResponseTooLarge(limit_bytes=limit):
            return response_too_large(limit, **progress)
    raise TypeError(f"not classification evidence: {evidence!r}")


def _http_failure(
    status: int,
    headers: Headers,
    body: bytes,
    *,
    now: float,
    tokens_received: int,
    bytes_received: int,
) -> Fault:
    retry_after = parse_retry_after(headers, now=now)
    payload = _payload_of(body)
    detail = ""
    if payload is not None:
        names = ", ".join(part for part in (payload.type, payload.code) if part)
        detail = f"{names}: {_shorten(payload.message)}" if names else _shorten(payload.message)
    fault = classify_http_status(
        status,
        retry_after_s=retry_after,
        detail=detail,
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )
    if payload is not None and fault.retryable:
        # A 429 that says the quota is spent will not clear by waiting (OpenAI
        # `insufficient_quota`; Anthropic's billing errors).
        kind = provider_error_kind(payload.type, payload.code, payload.message, status)
        if kind is ProviderErrorKind.QUOTA:
            return fault.with_context(
                retryable=False, suggested_action=SuggestedAction.ABORT, retry_after_s=None
            )
    return fault


def _wrong_content_type(
    status: int,
    content_type: str,
    body: bytes,
    headers: Headers,
    *,
    now: float,
    tokens_received: int,
    bytes_received: int,
) -> Fault:
    payload = _payload_of(body)
    if payload is not None:
        # `200 application/json {"error": …}` is the provider talking.
        return classify_provider_error(
            payload.type,
            payload.code,
            payload.message,
            retry_after_s=parse_retry_after(headers, now=now),
            tokens_received=tokens_received,
            bytes_received=bytes_received,
        )
    shown = content_type or "no content type"
    # Usually a proxy or load balancer answering for the provider (an HTML
    # error page with 200): worth another attempt, which the breaker bounds.
    return _fault(
        ErrorType.PROTOCOL,
        "WRONG_CONTENT_TYPE",
        f"HTTP {status} with {shown} instead of text/event-stream",
        True,
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )


def counts_against_provider(fault: Fault) -> bool:  # TEMPORARY until the classify branch merges
    return fault.retryable and fault.type is not ErrorType.RESOURCE and fault.code not in {
        "BREAKER_OPEN", "CANCELLED", "CLIENT_GONE", "DEADLINE_EXCEEDED", "SERVER_SHUTDOWN",
        "OWNER_LOST", "INTERNAL", "MEMORY_LIMIT"}
