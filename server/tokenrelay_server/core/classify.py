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
    protocol     HttpFailure                    HTTP_<status> (QUOTA_EXCEEDED when the
                                                body of a 429 says the quota is spent)
                 WrongContentType               WRONG_CONTENT_TYPE
    application  ProviderErrorPayload           RATE_LIMITED OVERLOADED PROVIDER_ERROR
                                                INVALID_REQUEST AUTHENTICATION_FAILED
                                                PERMISSION_DENIED NOT_FOUND QUOTA_EXCEEDED
                                                CONTEXT_LENGTH_EXCEEDED REQUEST_TOO_LARGE
    data         BadData                        MALFORMED_DATA UNEXPECTED_SHAPE
                                                NO_FINISH_REASON
                 (the tool-call assembler)      INVALID_TOOL_ARGUMENTS
    resource     ResponseTooLarge               RESPONSE_TOO_LARGE
    timeout      TransportFailure (timeouts)    CONNECT_TIMEOUT READ_TIMEOUT WRITE_TIMEOUT
                                                POOL_TIMEOUT
                 (the generation loop)          FIRST_TOKEN_TIMEOUT STALL_TIMEOUT
    (the cause's) (the recovery decision)       TOOL_CALL_INTERRUPTED

One table per question, so two answers cannot disagree (issue 8):

- `HTTP_STATUSES`: what a status means (its `ProviderErrorKind`), both for a
  status line and for an error payload that only carries a status; the kind
  says whether it is retryable. `provider_error_kind` reads the providers'
  own names first and falls back to this table.
- `_BLAME_BY_CODE`: whose failure each code is (`Blame`: the provider's, the
  caller's, or the gateway's own). `counts_against_provider(fault)` answers
  from it, for the circuit breaker and the health scores: a request the
  provider rightly refused (400, 401, 403, 404, 413, context length) must not
  open the breaker for every other client.

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


# --- what a failure means: kinds, and the one HTTP status table --------------------------


class ProviderErrorKind(enum.Enum):
    """What a provider's error means, whatever the provider calls it. The value
    is the fault code of an error payload (`classify_provider_error`)."""

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


class Blame(enum.Enum):
    """Whose failure it is: what it may count toward (issue 8, defect 9)."""

    # The provider's condition (down, overloaded, rate limiting us, unreachable,
    # sending garbage): it counts toward the provider's circuit breaker and
    # health, because the next request, whoever sends it, would likely fail too.
    PROVIDER = "provider"
    # The provider rightly refused this request: its content (bad parameters,
    # too long, too large) or the route's configuration (the API key, the
    # account's quota, the model name). The provider is healthy, a cool-down
    # fixes nothing, and a BREAKER_OPEN for everyone would hide the one error
    # that says what to fix.
    CALLER = "caller"
    # The gateway stopped it (its own caps, its breaker, a cancel, a deadline,
    # a shutdown, a bug): the provider may never have seen the request.
    GATEWAY = "gateway"


# Only these are worth another attempt; every other kind is final.
_RETRYABLE_KINDS = frozenset(
    {ProviderErrorKind.RATE_LIMITED, ProviderErrorKind.OVERLOADED, ProviderErrorKind.SERVER_ERROR}
)
# Overload wants longer waits than a plain failure (DESIGN: "429 rate limit,
# 529 overloaded: retry honouring Retry-After (longer delays)").
_OVERLOAD_KINDS = frozenset({ProviderErrorKind.RATE_LIMITED, ProviderErrorKind.OVERLOADED})


@dataclass(frozen=True, slots=True)
class StatusMeaning:
    """One row of the HTTP status table."""

    kind: ProviderErrorKind
    what: str  # the message of an HTTP_<status> fault


# The one HTTP status table (issue 8, defect 5): what every status the code
# names means, for a status line (`classify_http_status`) and for an error
# payload that only has a status (`provider_error_kind`). Retryability and
# blame follow from the kind. A status not listed takes its class's row.
HTTP_STATUSES: Mapping[int, StatusMeaning] = {
    400: StatusMeaning(ProviderErrorKind.INVALID_REQUEST, "the provider rejected the request"),
    401: StatusMeaning(ProviderErrorKind.AUTHENTICATION, "the provider rejected the credentials"),
    # OpenRouter: "402: your account or API key has insufficient credits".
    402: StatusMeaning(ProviderErrorKind.QUOTA, "the provider account's credits are spent"),
    403: StatusMeaning(ProviderErrorKind.PERMISSION, "the credentials may not use this resource"),
    404: StatusMeaning(ProviderErrorKind.NOT_FOUND, "the provider has no such model or endpoint"),
    # 408 (RFC 9110 §15.5.9): the provider gave up waiting for a request we
    # send in one go; the SDKs of OpenAI and Anthropic retry it
    # (`_should_retry`), and it says nothing against the request itself.
    408: StatusMeaning(
        ProviderErrorKind.SERVER_ERROR, "the provider timed out waiting for the request"
    ),
    # 409: on these APIs a lock timeout on the provider's side, which the same
    # SDKs retry ("Retry on lock timeouts"); the request had no state to clash.
    409: StatusMeaning(ProviderErrorKind.SERVER_ERROR, "the provider reported a conflict"),
    413: StatusMeaning(ProviderErrorKind.REQUEST_TOO_LARGE, "the request is too large"),
    422: StatusMeaning(ProviderErrorKind.INVALID_REQUEST, "the provider could not use the request"),
    # 425 (RFC 8470 §5.2): the provider will not act on TLS early data that
    # might be replayed; the client "MAY automatically retry", whatever it sent.
    425: StatusMeaning(ProviderErrorKind.SERVER_ERROR, "the provider refused early data"),
    429: StatusMeaning(ProviderErrorKind.RATE_LIMITED, "rate limited by the provider"),
    500: StatusMeaning(ProviderErrorKind.SERVER_ERROR, "the provider failed"),
    502: StatusMeaning(
        ProviderErrorKind.SERVER_ERROR, "a proxy got no valid answer from the provider"
    ),
    # 503 is a 5xx like the others (DESIGN: plain backoff, its Retry-After
    # obeyed); the overload statuses that wait longer are 429 and 529.
    503: StatusMeaning(ProviderErrorKind.SERVER_ERROR, "the provider is unavailable"),
    504: StatusMeaning(
        ProviderErrorKind.SERVER_ERROR, "a proxy timed out waiting for the provider"
    ),
    529: StatusMeaning(ProviderErrorKind.OVERLOADED, "the provider is overloaded"),  # Anthropic
}
_OTHER_5XX = StatusMeaning(ProviderErrorKind.SERVER_ERROR, "the provider failed")
# Any other 4xx, and a status outside 4xx/5xx that is still not a stream (a
# redirect we do not follow means the base URL is wrong): final.
_OTHER_STATUS = StatusMeaning(
    ProviderErrorKind.INVALID_REQUEST, "the provider rejected the request"
)


# A 3xx: provider clients never follow redirects (upstream/build.py; a
# redirect could send the request, and its key, to a host the configuration
# never named, issue 13), so it ends the attempt, saying why.
_REDIRECT = StatusMeaning(
    ProviderErrorKind.INVALID_REQUEST,
    "the provider answered with a redirect, which the gateway never follows "
    "(upstream URLs come from the configuration only; check the provider's base_url)",
)


def http_status_meaning(status: int) -> StatusMeaning:
    """The row of `HTTP_STATUSES` for a non-2xx status."""
    meaning = HTTP_STATUSES.get(status)
    if meaning is not None:
        return meaning
    if 300 <= status <= 399:
        return _REDIRECT
    return _OTHER_5XX if status >= 500 else _OTHER_STATUS


def _kind_from_status(status: int | None) -> ProviderErrorKind | None:
    if status is None or not 400 <= status <= 599:
        return None
    return http_status_meaning(status).kind


# --- protocol: HTTP status ----------------------------------------------------------------


def classify_http_status(
    status: int,
    *,
    retry_after_s: float | None = None,
    detail: str = "",
    tokens_received: int = 0,
    bytes_received: int = 0,
) -> Fault:
    """A non-2xx response to the streaming request. The code is
    `HTTP_<status>`; the message does not repeat it."""
    meaning = http_status_meaning(status)
    message = meaning.what + (f" ({detail})" if detail else "")
    return _fault(
        ErrorType.PROTOCOL,
        f"HTTP_{status}",
        message,
        meaning.kind in _RETRYABLE_KINDS,
        tokens_received=tokens_received,
        bytes_received=bytes_received,
        retry_after_s=retry_after_s,
    )


# --- application: provider error payloads ---------------------------------------------------

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

_CONTEXT_LENGTH_PHRASES = (
    "context length",
    "context window",
    "prompt is too long",
    "too many tokens",
    "maximum context",
)


def provider_error_kind(
    error_type: str, code: str = "", message: str = "", status: int | None = None
) -> ProviderErrorKind:
    """What a provider error means, from its code, type, message or status."""
    # The code is more specific than the type ("invalid_request_error" +
    # "context_length_exceeded"), so it is looked up first.
    for name in (code, error_type):
        kind = _KIND_BY_NAME.get(name.strip().lower())
        if kind is not None:
            if kind is ProviderErrorKind.INVALID_REQUEST and _mentions_context_length(message):
                return ProviderErrorKind.CONTEXT_LENGTH
            return kind
    if _mentions_context_length(message):
        return ProviderErrorKind.CONTEXT_LENGTH
    # OpenRouter's errors carry the HTTP status as a numeric code
    # (`{"error": {"code": 400, …}}`), also mid-stream where the status line
    # said 200: it means what the status table says.
    numeric_code = int(code) if code.strip().isdecimal() else None
    by_status = _kind_from_status(numeric_code) or _kind_from_status(status)
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


def invalid_tool_arguments(
    index: int, detail: str, *, tokens_received: int = 0, bytes_received: int = 0
) -> Fault:
    """A tool call the provider finished is not usable (its arguments are not
    a JSON object, or it has no name). With policy.tool_calls WHOLE it was
    held, so the client saw none of it: retryable, the model may get it right
    the next time (issue 12)."""
    return Fault(
        type=ErrorType.DATA,
        code="INVALID_TOOL_ARGUMENTS",
        message=f"the model's tool call {index} is not usable: {_shorten(detail)}",
        retryable=True,
        suggested_action=next_step(True, tokens_received),
        tokens_received=tokens_received,
        bytes_received=bytes_received,
    )


def tool_call_interrupted(cause: Fault, index: int) -> Fault:
    """The error a stream ends with when `cause` broke a tool call whose
    first pieces the client already has (policy.tool_calls STREAM): a tool
    call is never continued or repaired, so the turn must start again."""
    return Fault(
        type=cause.type,
        code="TOOL_CALL_INTERRUPTED",
        message=(
            f"{cause.code} inside tool call {index}, after part of it was streamed "
            f"(policy.tool_calls = STREAM): {cause.message}; a tool call is never continued, "
            "so start the turn again (WHOLE mode recovers this by itself)"
        ),
        retryable=cause.retryable,
        suggested_action=SuggestedAction.RETRY if cause.retryable else SuggestedAction.ABORT,
        bytes_received=cause.bytes_received,
        tokens_received=cause.tokens_received,
        provider=cause.provider,
        attempt=cause.attempt,
        retry_after_s=cause.retry_after_s,
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
        # `insufficient_quota`; Anthropic's billing errors). The payload's
        # meaning wins and its code says so: QUOTA_EXCEEDED is final and not
        # the provider's failure, where HTTP_429 would mean "wait, then retry".
        kind = provider_error_kind(payload.type, payload.code, payload.message, status)
        if kind is ProviderErrorKind.QUOTA:
            quota = classify_provider_error(
                payload.type,
                payload.code,
                payload.message,
                status=status,
                tokens_received=tokens_received,
                bytes_received=bytes_received,
            )
            return quota.with_context(message=f"HTTP {status}, {quota.message}")
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


# --- whose failure it is ---------------------------------------------------------------------

# Every code a fault can carry, and whose failure it is (issue 8, defect 9).
# `HTTP_<status>` codes are not listed: the status table decides them, through
# the kind of the status's row. A code not listed is not the provider's.
_BLAME_BY_CODE: Mapping[str, Blame] = {
    # application: error payloads. The first three are the provider's state;
    # the rest are the request or the route's own key, account or model name.
    ProviderErrorKind.RATE_LIMITED.value: Blame.PROVIDER,
    ProviderErrorKind.OVERLOADED.value: Blame.PROVIDER,
    ProviderErrorKind.SERVER_ERROR.value: Blame.PROVIDER,
    ProviderErrorKind.INVALID_REQUEST.value: Blame.CALLER,
    ProviderErrorKind.AUTHENTICATION.value: Blame.CALLER,
    ProviderErrorKind.PERMISSION.value: Blame.CALLER,
    ProviderErrorKind.NOT_FOUND.value: Blame.CALLER,
    # Like a bad key: every request fails until someone pays; no cool-down helps.
    ProviderErrorKind.QUOTA.value: Blame.CALLER,
    ProviderErrorKind.CONTEXT_LENGTH.value: Blame.CALLER,
    ProviderErrorKind.REQUEST_TOO_LARGE.value: Blame.CALLER,
    # network: the provider (or the path to it) is unreachable for everyone.
    TransportKind.CONNECTION_REFUSED.value: Blame.PROVIDER,
    TransportKind.CONNECTION_RESET.value: Blame.PROVIDER,
    TransportKind.UNEXPECTED_EOF.value: Blame.PROVIDER,
    TransportKind.DNS_FAILURE.value: Blame.PROVIDER,
    TransportKind.TLS_FAILURE.value: Blame.PROVIDER,
    TransportKind.NETWORK_ERROR.value: Blame.PROVIDER,
    # timeouts: the provider did not connect, read or answer in time ...
    TransportKind.CONNECT_TIMEOUT.value: Blame.PROVIDER,
    TransportKind.READ_TIMEOUT.value: Blame.PROVIDER,
    TransportKind.WRITE_TIMEOUT.value: Blame.PROVIDER,
    "FIRST_TOKEN_TIMEOUT": Blame.PROVIDER,
    "STALL_TIMEOUT": Blame.PROVIDER,
    # ... except waiting for our own pool (httpx PoolTimeout: every connection
    # of our `limits` was busy): the request never left the gateway.
    TransportKind.POOL_TIMEOUT.value: Blame.GATEWAY,
    # protocol: a 200 that is not a stream is a proxy in front of the provider
    # answering for it (an HTML error page).
    "WRONG_CONTENT_TYPE": Blame.PROVIDER,
    # data: the provider sent what its own format forbids.
    "MALFORMED_DATA": Blame.PROVIDER,
    "UNEXPECTED_SHAPE": Blame.PROVIDER,
    "NO_FINISH_REASON": Blame.PROVIDER,
    # A tool call whose arguments are not JSON: the provider is up and its
    # format was kept; the model's output for this request's tools was not
    # usable. Not a reason to open the breaker for everyone (issue 12).
    "INVALID_TOOL_ARGUMENTS": Blame.CALLER,
    # resource: our cap, not the provider's failure.
    "RESPONSE_TOO_LARGE": Blame.GATEWAY,
    # made by the engine (engine/generation.py, engine/hub.py), never by an
    # upstream attempt: the breaker refusing, the client cancelling or gone,
    # the caller's deadline, a shutdown, a lost lease, our memory cap, a bug.
    "BREAKER_OPEN": Blame.GATEWAY,
    "CANCELLED": Blame.GATEWAY,
    "CLIENT_GONE": Blame.GATEWAY,
    "DEADLINE_EXCEEDED": Blame.GATEWAY,
    "SERVER_SHUTDOWN": Blame.GATEWAY,
    "OWNER_LOST": Blame.GATEWAY,
    "MEMORY_LIMIT": Blame.GATEWAY,
    "INTERNAL": Blame.GATEWAY,
    # The caller's policy (tool_calls STREAM) ends a stream whose tool call
    # broke mid-way; the break itself (ECONNRESET, …) already counted as the
    # provider's when its attempt failed (issue 12).
    "TOOL_CALL_INTERRUPTED": Blame.GATEWAY,
}

_HTTP_CODE_PREFIX = "HTTP_"


def _status_in_code(code: str) -> int | None:
    digits = code.removeprefix(_HTTP_CODE_PREFIX)
    if digits == code or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def _kind_of_code(code: str) -> ProviderErrorKind | None:
    status = _status_in_code(code)
    if status is not None:
        return http_status_meaning(status).kind
    try:
        return ProviderErrorKind(code)
    except ValueError:
        return None


def blame_of(fault: Fault) -> Blame:
    """Whose failure `fault` is, from its code (see `Blame`)."""
    kind = _kind_of_code(fault.code)
    code = kind.value if kind is not None else fault.code
    return _BLAME_BY_CODE.get(code, Blame.GATEWAY)


def counts_against_provider(fault: Fault) -> bool:
    """True when the failure is the provider's (it should count toward the
    provider's circuit breaker and health), False when the caller caused it
    (a request the provider rightly refused) or the gateway stopped it."""
    return blame_of(fault) is Blame.PROVIDER


def is_overload(fault: Fault) -> bool:
    """A rate limit or an overload (429, 529, or such a payload): the retry
    waits longer when the provider did not say how long."""
    return _kind_of_code(fault.code) in _OVERLOAD_KINDS
