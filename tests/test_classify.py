"""Classification is a pure function: one table row per failure the issue lists."""

from __future__ import annotations

import errno
import json
import socket
import ssl

import pytest

from tokenrelay_server.core import classify
from tokenrelay_server.core.classify import (
    BadData,
    HttpFailure,
    ProviderErrorKind,
    ProviderErrorPayload,
    ResponseTooLarge,
    TransportFailure,
    TransportKind,
    WrongContentType,
)
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction

NOW = 1_700_000_000.0  # a fixed wall clock: Tue, 14 Nov 2023 22:13:20 GMT

NETWORK, PROTOCOL, APPLICATION = ErrorType.NETWORK, ErrorType.PROTOCOL, ErrorType.APPLICATION
DATA, RESOURCE, TIMEOUT = ErrorType.DATA, ErrorType.RESOURCE, ErrorType.TIMEOUT
RETRY, RESUME, ABORT = SuggestedAction.RETRY, SuggestedAction.RESUME, SuggestedAction.ABORT


def _body(error: dict[str, object]) -> bytes:
    return json.dumps({"error": error}).encode()


ROWS = [
    # network
    pytest.param(
        TransportFailure(TransportKind.CONNECTION_REFUSED), 0,
        NETWORK, "ECONNREFUSED", True, RETRY,
        id="a refused connection is a retryable network error",
    ),
    pytest.param(
        TransportFailure(TransportKind.CONNECTION_RESET), 0,
        NETWORK, "ECONNRESET", True, RETRY,
        id="a reset before the first token is retried",
    ),
    pytest.param(
        TransportFailure(TransportKind.CONNECTION_RESET), 12,
        NETWORK, "ECONNRESET", True, RESUME,
        id="a reset after tokens were delivered is resumed",
    ),
    pytest.param(
        TransportFailure(TransportKind.UNEXPECTED_EOF), 3,
        NETWORK, "UNEXPECTED_EOF", True, RESUME,
        id="a body cut short mid stream is resumed",
    ),
    pytest.param(
        TransportFailure(TransportKind.DNS_FAILURE), 0,
        NETWORK, "DNS_FAILURE", True, RETRY,
        id="a host name that does not resolve is a network error",
    ),
    pytest.param(
        TransportFailure(TransportKind.TLS_FAILURE), 0,
        NETWORK, "TLS_ERROR", True, RETRY,
        id="a failed TLS handshake is a network error",
    ),
    # protocol
    pytest.param(
        HttpFailure(429, (("Retry-After", "7"),)), 0,
        PROTOCOL, "HTTP_429", True, RETRY,
        id="HTTP 429 is retried after the delay",
    ),
    pytest.param(
        HttpFailure(529), 0, PROTOCOL, "HTTP_529", True, RETRY,
        id="HTTP 529 overloaded is retried",
    ),
    *[
        pytest.param(
            HttpFailure(status), 0, PROTOCOL, f"HTTP_{status}", True, RETRY,
            id=f"HTTP {status} is retried",
        )
        for status in (500, 502, 503, 504)
    ],
    pytest.param(
        HttpFailure(503), 4, PROTOCOL, "HTTP_503", True, RESUME,
        id="a 5xx after tokens were delivered is resumed",
    ),
    pytest.param(
        HttpFailure(401), 0, PROTOCOL, "HTTP_401", False, ABORT,
        id="HTTP 401 bad credentials is not retried",
    ),
    pytest.param(
        HttpFailure(400, body=_body({"type": "invalid_request_error", "message": "bad"})), 0,
        PROTOCOL, "HTTP_400", False, ABORT,
        id="HTTP 400 bad request is not retried",
    ),
    pytest.param(
        HttpFailure(429, body=_body({"type": "insufficient_quota", "code": "insufficient_quota"})),
        0, APPLICATION, "QUOTA_EXCEEDED", False, ABORT,
        id="HTTP 429 for a spent quota is a final quota error because waiting will not help",
    ),
    pytest.param(
        WrongContentType(200, "text/html; charset=utf-8", b"<html>502 Bad Gateway</html>"), 0,
        PROTOCOL, "WRONG_CONTENT_TYPE", True, RETRY,
        id="an HTML page with 200 is the wrong content type",
    ),
    # application
    pytest.param(
        WrongContentType(200, "application/json", _body({"type": "rate_limit_error"})), 0,
        APPLICATION, "RATE_LIMITED", True, RETRY,
        id="a JSON error body with 200 is the provider's error",
    ),
    pytest.param(
        ProviderErrorPayload("rate_limit_error", message="slow down"), 0,
        APPLICATION, "RATE_LIMITED", True, RETRY,
        id="an Anthropic rate limit payload is retried",
    ),
    pytest.param(
        ProviderErrorPayload("requests", "rate_limit_exceeded"), 0,
        APPLICATION, "RATE_LIMITED", True, RETRY,
        id="an OpenAI rate limit payload is retried",
    ),
    pytest.param(
        ProviderErrorPayload("overloaded_error", message="Overloaded"), 9,
        APPLICATION, "OVERLOADED", True, RESUME,
        id="an overloaded error mid stream is resumed",
    ),
    pytest.param(
        ProviderErrorPayload("api_error"), 0, APPLICATION, "PROVIDER_ERROR", True, RETRY,
        id="a provider internal error is retried",
    ),
    pytest.param(
        ProviderErrorPayload("invalid_request_error", message="messages: field required"), 0,
        APPLICATION, "INVALID_REQUEST", False, ABORT,
        id="an invalid request payload is not retried",
    ),
    pytest.param(
        ProviderErrorPayload("authentication_error", message="invalid x-api-key"), 0,
        APPLICATION, "AUTHENTICATION_FAILED", False, ABORT,
        id="an authentication payload is not retried",
    ),
    pytest.param(
        ProviderErrorPayload("invalid_request_error", "context_length_exceeded"), 0,
        APPLICATION, "CONTEXT_LENGTH_EXCEEDED", False, ABORT,
        id="an OpenAI context length payload is not retried",
    ),
    pytest.param(
        ProviderErrorPayload(
            "invalid_request_error", message="prompt is too long: 210000 tokens > 200000 maximum"
        ),
        0, APPLICATION, "CONTEXT_LENGTH_EXCEEDED", False, ABORT,
        id="an Anthropic prompt too long message is a context length error",
    ),
    # data
    pytest.param(
        BadData("invalid_json", "unterminated string"), 5, DATA, "MALFORMED_DATA", False, ABORT,
        id="invalid JSON aborts by default",
    ),
    pytest.param(
        BadData("wrong_shape", "choices is not a list"), 5,
        DATA, "UNEXPECTED_SHAPE", False, ABORT,
        id="an event of the wrong shape aborts by default",
    ),
    pytest.param(
        BadData("no_finish"), 5, DATA, "NO_FINISH_REASON", True, RESUME,
        id="a stream that ends without a finish reason is resumed",
    ),
    # resource
    pytest.param(
        ResponseTooLarge(100 * 1024 * 1024), 40, RESOURCE, "RESPONSE_TOO_LARGE", False, ABORT,
        id="a response over the size cap keeps the partial answer and stops",
    ),
    # timeout
    pytest.param(
        TransportFailure(TransportKind.CONNECT_TIMEOUT, timeout_s=5), 0,
        TIMEOUT, "CONNECT_TIMEOUT", True, RETRY,
        id="a connect timeout is retried",
    ),
    pytest.param(
        TransportFailure(TransportKind.POOL_TIMEOUT, timeout_s=5), 0,
        TIMEOUT, "POOL_TIMEOUT", True, RETRY,
        id="waiting too long for a pooled connection is a timeout",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("evidence", "tokens", "error_type", "code", "retryable", "action"), ROWS)
def test_classify_gives_layer_code_retryability_and_next_step(
    evidence, tokens, error_type, code, retryable, action
):
    fault = classify.classify(evidence, now=NOW, tokens_received=tokens, bytes_received=321)
    assert (fault.type, fault.code, fault.retryable, fault.suggested_action) == (
        error_type,
        code,
        retryable,
        action,
    )
    assert fault.tokens_received == tokens
    assert fault.bytes_received == 321
    assert fault.message


def test_http_failure_carries_retry_after_from_the_headers():
    fault = classify.classify(HttpFailure(429, (("retry-after", "7"),)), now=NOW)
    assert fault.retry_after_s == 7.0


def test_http_failure_names_the_provider_error_in_its_message():
    body = _body({"type": "invalid_request_error", "message": "max_tokens: too large"})
    fault = classify.classify(HttpFailure(400, body=body), now=NOW)
    assert "invalid_request_error" in fault.message
    assert "max_tokens: too large" in fault.message


def test_a_non_retryable_status_drops_retry_after():
    fault = classify.classify(HttpFailure(400, (("retry-after", "7"),)), now=NOW)
    assert fault.retry_after_s is None


def test_connect_timeout_message_says_how_long_was_waited():
    fault = classify.classify(
        TransportFailure(TransportKind.CONNECT_TIMEOUT, timeout_s=2.5), now=NOW
    )
    assert "2.5 s" in fault.message


def test_long_provider_messages_are_shortened():
    fault = classify.classify(ProviderErrorPayload("api_error", message="x" * 5000), now=NOW)
    assert len(fault.message) < 400


def test_classify_rejects_what_is_not_evidence():
    with pytest.raises(TypeError):
        classify.classify("boom", now=NOW)  # type: ignore[arg-type]


# --- Retry-After ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"Retry-After": "5"}, 5.0, id="delay seconds"),
        pytest.param({"retry-after": "1.5"}, 1.5, id="fractional seconds are accepted"),
        pytest.param(
            {"Retry-After": "Tue, 14 Nov 2023 22:13:50 GMT"}, 30.0, id="an HTTP date in the future"
        ),
        pytest.param(
            {"Retry-After": "Tue, 14 Nov 2023 22:00:00 GMT"},
            0.0,
            id="an HTTP date in the past is now",
        ),
        pytest.param(
            {"retry-after-ms": "250", "retry-after": "9"},
            0.25,
            id="retry-after-ms wins over Retry-After",
        ),
        pytest.param(
            {"retry-after-ms": "soon", "retry-after": "9"},
            9.0,
            id="an unreadable retry-after-ms falls back to Retry-After",
        ),
        pytest.param({"Retry-After": "soon"}, None, id="garbage is ignored"),
        pytest.param({"Retry-After": "-3"}, None, id="a negative delay is ignored"),
        pytest.param({"Retry-After": "inf"}, None, id="an infinite delay is ignored"),
        pytest.param({"Retry-After": "nan"}, None, id="NaN is ignored"),
        pytest.param({}, None, id="no header means no delay"),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None):
    assert classify.parse_retry_after(headers, now=NOW) == expected


def test_parse_retry_after_accepts_header_pairs():
    assert classify.parse_retry_after([("RETRY-AFTER", "3")], now=NOW) == 3.0


# --- transport failures from stdlib exceptions ------------------------------------------------


def _chained(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        pytest.param(ConnectionRefusedError(), TransportKind.CONNECTION_REFUSED, id="refused"),
        pytest.param(
            OSError(errno.ECONNREFUSED, "Connect call failed"),
            TransportKind.CONNECTION_REFUSED,
            id="an OSError with errno ECONNREFUSED is refused",
        ),
        pytest.param(ConnectionResetError(), TransportKind.CONNECTION_RESET, id="reset"),
        pytest.param(
            BrokenPipeError(), TransportKind.CONNECTION_RESET, id="a broken pipe is a reset"
        ),
        pytest.param(
            socket.gaierror(-2, "Name or service not known"), TransportKind.DNS_FAILURE, id="DNS"
        ),
        pytest.param(ssl.SSLError(1, "wrong version number"), TransportKind.TLS_FAILURE, id="TLS"),
        pytest.param(
            ssl.SSLCertVerificationError(1, "certificate verify failed"),
            TransportKind.TLS_FAILURE,
            id="a bad certificate is a TLS failure",
        ),
        pytest.param(
            _chained(RuntimeError("wrapped"), ConnectionResetError()),
            TransportKind.CONNECTION_RESET,
            id="the cause chain is searched",
        ),
        pytest.param(
            _chained(
                OSError("All connection attempts failed"),
                ExceptionGroup("attempts", [ConnectionRefusedError(), ConnectionRefusedError()]),
            ),
            TransportKind.CONNECTION_REFUSED,
            id="happy eyeballs failures inside an exception group are found",
        ),
        pytest.param(ValueError("nope"), None, id="anything else is not recognised"),
    ],
)
def test_transport_kind_of_recognises_stdlib_errors(exc: BaseException, kind):
    assert classify.transport_kind_of(exc) is kind


# --- provider vocabularies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_type", "code", "message", "status", "kind"),
    [
        pytest.param(
            "",
            "",
            "",
            429,
            ProviderErrorKind.RATE_LIMITED,
            id="an unnamed error with 429 is a rate limit",
        ),
        pytest.param(
            "",
            "",
            "",
            529,
            ProviderErrorKind.OVERLOADED,
            id="an unnamed error with 529 is overload",
        ),
        pytest.param(
            "BadRequestError",
            "400",
            "",
            None,
            ProviderErrorKind.INVALID_REQUEST,
            id="vLLM bad request",
        ),
        pytest.param(
            "BadRequestError",
            "400",
            "This model's maximum context length is 4096 tokens. However, you requested 5000",
            None,
            ProviderErrorKind.CONTEXT_LENGTH,
            id="vLLM context length message",
        ),
        pytest.param(
            "api_error", "", "", None, ProviderErrorKind.SERVER_ERROR, id="Anthropic api_error"
        ),
        pytest.param(
            "permission_error",
            "",
            "",
            None,
            ProviderErrorKind.PERMISSION,
            id="Anthropic permission_error",
        ),
        pytest.param(
            "not_found_error",
            "",
            "",
            None,
            ProviderErrorKind.NOT_FOUND,
            id="Anthropic not_found_error",
        ),
        pytest.param(
            "insufficient_quota",
            "",
            "",
            None,
            ProviderErrorKind.QUOTA,
            id="OpenAI insufficient_quota",
        ),
        pytest.param(
            "weird_new_error",
            "",
            "",
            None,
            ProviderErrorKind.SERVER_ERROR,
            id="an unknown error is the provider's failure",
        ),
    ],
)
def test_provider_error_kind_reads_every_vendor(error_type, code, message, status, kind):
    assert classify.provider_error_kind(error_type, code, message, status) is kind


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        pytest.param(
            {"error": {"message": "m", "type": "t", "code": "c"}},
            classify.ErrorPayload("t", "c", "m"),
            id="the OpenAI error object",
        ),
        pytest.param(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            classify.ErrorPayload("overloaded_error", "", "Overloaded"),
            id="the Anthropic error object",
        ),
        pytest.param(
            {"error": {"code": 502, "message": "upstream"}},
            classify.ErrorPayload("", "502", "upstream"),
            id="a numeric code as OpenRouter sends it",
        ),
        pytest.param(
            {"error": "model not loaded"},
            classify.ErrorPayload("", "", "model not loaded"),
            id="a bare error string",
        ),
        pytest.param({"choices": []}, None, id="a chunk is not an error"),
        pytest.param([1, 2], None, id="a list is not an error"),
    ],
)
def test_error_payload_fields(document, expected):
    assert classify.error_payload_fields(document) == expected


# --- the helpers the simulator already uses keep working -----------------------------------------


def test_existing_helpers_keep_their_codes():
    assert classify.connection_reset(tokens_received=1).code == "ECONNRESET"
    assert classify.malformed_data("x").code == "MALFORMED_DATA"
    assert classify.missing_finish().code == "NO_FINISH_REASON"
    assert classify.stall_timeout(3, first_token=True).code == "FIRST_TOKEN_TIMEOUT"
    assert (
        classify.stall_timeout(3, first_token=False, tokens_received=2).suggested_action is RESUME
    )
    assert classify.classify_http_status(429, retry_after_s=2.0).retry_after_s == 2.0


# --- the one HTTP status table (issue 8, defect 5) ------------------------------------------------

PROVIDER, CALLER, GATEWAY = classify.Blame.PROVIDER, classify.Blame.CALLER, classify.Blame.GATEWAY
K = ProviderErrorKind

# Every status HTTP_STATUSES names, plus one of each class it does not.
STATUS_ROWS = [
    pytest.param(
        400, K.INVALID_REQUEST, False, CALLER, id="400 bad request is final and the caller's"
    ),
    pytest.param(
        401, K.AUTHENTICATION, False, CALLER, id="401 bad credentials is final and ours to fix"
    ),
    pytest.param(402, K.QUOTA, False, CALLER, id="402 spent credits is a final quota error"),
    pytest.param(403, K.PERMISSION, False, CALLER, id="403 forbidden is final and ours to fix"),
    pytest.param(404, K.NOT_FOUND, False, CALLER, id="404 unknown model is final and ours to fix"),
    pytest.param(
        408,
        K.SERVER_ERROR,
        True,
        PROVIDER,
        id="408 request timeout is retried as the provider's failure",
    ),
    pytest.param(
        409,
        K.SERVER_ERROR,
        True,
        PROVIDER,
        id="409 lock conflict is retried as the provider's failure",
    ),
    pytest.param(
        413, K.REQUEST_TOO_LARGE, False, CALLER, id="413 too large is final and the caller's"
    ),
    pytest.param(
        422, K.INVALID_REQUEST, False, CALLER, id="422 unprocessable is final and the caller's"
    ),
    pytest.param(
        425, K.SERVER_ERROR, True, PROVIDER, id="425 too early is retried as the provider's failure"
    ),
    pytest.param(
        429,
        K.RATE_LIMITED,
        True,
        PROVIDER,
        id="429 rate limit is retried and counts against the provider",
    ),
    pytest.param(
        500, K.SERVER_ERROR, True, PROVIDER, id="500 is retried and counts against the provider"
    ),
    pytest.param(
        502, K.SERVER_ERROR, True, PROVIDER, id="502 is retried and counts against the provider"
    ),
    pytest.param(
        503, K.SERVER_ERROR, True, PROVIDER, id="503 is retried and counts against the provider"
    ),
    pytest.param(
        504, K.SERVER_ERROR, True, PROVIDER, id="504 is retried and counts against the provider"
    ),
    pytest.param(
        529, K.OVERLOADED, True, PROVIDER, id="529 overloaded is retried and the provider's"
    ),
    pytest.param(
        418, K.INVALID_REQUEST, False, CALLER, id="an unlisted 4xx is final and the caller's"
    ),
    pytest.param(
        507, K.SERVER_ERROR, True, PROVIDER, id="an unlisted 5xx is retried and the provider's"
    ),
    pytest.param(
        302,
        K.INVALID_REQUEST,
        False,
        CALLER,
        id="a redirect we do not follow is a final misconfiguration",
    ),
]


@pytest.mark.parametrize(("status", "kind", "retryable", "blame"), STATUS_ROWS)
def test_one_status_table_gives_one_answer_for_a_status_line_and_a_payload(
    status, kind, retryable, blame
):
    assert classify.http_status_meaning(status).kind is kind
    line = classify.classify(HttpFailure(status), now=NOW)
    assert line.code == f"HTTP_{status}"
    # An error payload that only has the status means the same (a 3xx is no
    # error payload status: only the status line names it).
    if 400 <= status <= 599:
        payload = classify.classify(ProviderErrorPayload("", status=status), now=NOW)
        assert payload.code == kind.value
        assert payload.retryable is retryable
        assert classify.blame_of(payload) is blame
    assert line.retryable is retryable
    assert classify.blame_of(line) is blame
    if 300 <= status <= 399:
        assert "redirect, which the gateway never follows" in line.message


def test_the_status_table_test_covers_every_status_the_code_names():
    tested = {row.values[0] for row in STATUS_ROWS}
    assert set(classify.HTTP_STATUSES) <= tested


@pytest.mark.parametrize("status", range(400, 600))
def test_every_error_status_means_the_same_as_a_line_and_as_a_payload(status):
    line = classify.classify_http_status(status)
    payload = classify.classify_provider_error("", status=status)
    assert (line.retryable, classify.blame_of(line)) == (
        payload.retryable,
        classify.blame_of(payload),
    )


def test_an_http_fault_message_does_not_repeat_its_code():
    # The client prints "code: message"; "HTTP_401: HTTP 401: …" said it twice.
    fault = classify.classify(HttpFailure(401), now=NOW)
    assert fault.code == "HTTP_401"
    assert "401" not in fault.message


def test_a_numeric_payload_code_means_what_its_status_means():
    # OpenRouter sends the status as the error code, also mid-stream.
    fault = classify.classify(
        ProviderErrorPayload("", code="400", message="max_tokens must be positive"), now=NOW
    )
    assert (fault.code, fault.retryable, classify.blame_of(fault)) == (
        "INVALID_REQUEST",
        False,
        CALLER,
    )


@pytest.mark.parametrize(
    ("fault", "overload"),
    [
        pytest.param(classify.classify_http_status(429), True, id="a 429 is an overload"),
        pytest.param(classify.classify_http_status(503), False, id="a 503 is a plain 5xx"),
        pytest.param(classify.classify_http_status(529), True, id="a 529 is an overload"),
        pytest.param(
            classify.classify_provider_error("overloaded_error"),
            True,
            id="an overloaded payload is an overload",
        ),
        pytest.param(classify.classify_http_status(500), False, id="a 500 is no overload"),
        pytest.param(classify.connection_reset(), False, id="a reset is no overload"),
    ],
)
def test_is_overload_reads_the_status_table(fault, overload):
    assert classify.is_overload(fault) is overload


# --- whose failure it is (issue 8, defect 9) --------------------------------------------------


def _engine(code: str, error_type: ErrorType = APPLICATION) -> Fault:
    """A fault as the engine makes it (stop_fault, breaker_open_fault, …)."""
    return Fault(type=error_type, code=code, message=code, retryable=False, suggested_action=ABORT)


def _payload(error_type: str, code: str = "", message: str = "") -> Fault:
    return classify.classify(ProviderErrorPayload(error_type, code, message), now=NOW)


def _transport(kind: TransportKind) -> Fault:
    return classify.classify(TransportFailure(kind), now=NOW)


BLAME_ROWS = [
    # the provider's failures: they count toward its breaker and health
    pytest.param(classify.classify_http_status(500), True, id="a 500 is the provider's failure"),
    pytest.param(classify.classify_http_status(503), True, id="a 503 is the provider's failure"),
    pytest.param(
        classify.classify_http_status(429), True, id="a 429 rate limit is the provider's state"
    ),
    pytest.param(
        classify.classify_http_status(529), True, id="a 529 overload is the provider's state"
    ),
    pytest.param(
        classify.classify_http_status(408), True, id="a 408 request timeout is the provider's"
    ),
    pytest.param(
        _payload("rate_limit_error"), True, id="a rate limit payload is the provider's state"
    ),
    pytest.param(
        _payload("overloaded_error"), True, id="an overloaded payload is the provider's state"
    ),
    pytest.param(
        _payload("api_error"), True, id="a provider error payload is the provider's failure"
    ),
    pytest.param(
        _payload("weird_new_error"),
        True,
        id="an unknown payload is taken for the provider's failure",
    ),
    *[
        pytest.param(_transport(kind), True, id=f"{kind.value} is the provider's failure")
        for kind in TransportKind
        if kind is not TransportKind.POOL_TIMEOUT
    ],
    pytest.param(
        classify.stall_timeout(5, first_token=True),
        True,
        id="no first token in time is the provider's",
    ),
    pytest.param(
        classify.stall_timeout(5, first_token=False), True, id="a stall is the provider's failure"
    ),
    pytest.param(
        classify.classify(WrongContentType(200, "text/html"), now=NOW),
        True,
        id="an HTML page instead of a stream is the provider's",
    ),
    pytest.param(classify.malformed_data("x"), True, id="malformed data is the provider's failure"),
    pytest.param(
        classify.unexpected_shape("x"), True, id="an event of the wrong shape is the provider's"
    ),
    pytest.param(
        classify.missing_finish(), True, id="a stream without a finish reason is the provider's"
    ),
    # the caller's: the provider rightly refused the request
    pytest.param(
        classify.classify_http_status(400), False, id="a 400 is the caller's and opens no breaker"
    ),
    pytest.param(
        classify.classify_http_status(401),
        False,
        id="a 401 is our key's problem, not the provider's health",
    ),
    pytest.param(
        classify.classify_http_status(403),
        False,
        id="a 403 is our key's problem, not the provider's health",
    ),
    pytest.param(
        classify.classify_http_status(404),
        False,
        id="a 404 unknown model is configuration, not health",
    ),
    pytest.param(
        classify.classify_http_status(413), False, id="a 413 too large request is the caller's"
    ),
    pytest.param(
        classify.classify_http_status(422), False, id="a 422 unprocessable request is the caller's"
    ),
    pytest.param(
        classify.classify(
            HttpFailure(
                429, body=_body({"type": "insufficient_quota", "code": "insufficient_quota"})
            ),
            now=NOW,
        ),
        False,
        id="a 429 saying the quota is spent is the account's, not the provider's",
    ),
    pytest.param(
        _payload("invalid_request_error", message="bad"),
        False,
        id="an invalid request payload is the caller's",
    ),
    pytest.param(
        _payload("authentication_error"), False, id="an authentication payload is our key's problem"
    ),
    pytest.param(
        _payload("permission_error"), False, id="a permission payload is our key's problem"
    ),
    pytest.param(
        _payload("not_found_error"), False, id="a model not found payload is configuration"
    ),
    pytest.param(_payload("billing_error"), False, id="a billing payload is the account's"),
    pytest.param(
        _payload("invalid_request_error", "context_length_exceeded"),
        False,
        id="a context length error is the caller's",
    ),
    pytest.param(
        _payload("request_too_large"), False, id="a request too large payload is the caller's"
    ),
    # the gateway's own: our caps, our pool, and every fault the engine makes
    pytest.param(
        classify.response_too_large(1024), False, id="passing our response size cap is ours"
    ),
    pytest.param(
        _transport(TransportKind.POOL_TIMEOUT),
        False,
        id="waiting for our own connection pool is ours",
    ),
    pytest.param(_engine("BREAKER_OPEN"), False, id="an open breaker does not feed itself"),
    pytest.param(_engine("CANCELLED"), False, id="a cancel is not the provider's failure"),
    pytest.param(
        _engine("CLIENT_GONE"), False, id="a client that left is not the provider's failure"
    ),
    pytest.param(
        _engine("DEADLINE_EXCEEDED", TIMEOUT),
        False,
        id="the caller's deadline is not the provider's failure",
    ),
    pytest.param(
        _engine("SERVER_SHUTDOWN"), False, id="our shutdown is not the provider's failure"
    ),
    pytest.param(
        _engine("OWNER_LOST"),
        False,
        id="a replica that lost its lease is not the provider's failure",
    ),
    pytest.param(_engine("INTERNAL"), False, id="our own bug is not the provider's failure"),
    pytest.param(
        _engine("MEMORY_LIMIT", RESOURCE),
        False,
        id="our memory limit is not the provider's failure",
    ),
    pytest.param(
        _engine("SOMETHING_NEW"), False, id="a code nobody classified does not open the breaker"
    ),
    # agent streams (issue 12)
    pytest.param(
        classify.invalid_tool_arguments(0, "not JSON"),
        False,
        id="a tool call whose arguments are not JSON does not open the breaker for everyone",
    ),
    pytest.param(
        classify.tool_call_interrupted(classify.connection_reset(), 0),
        False,
        id="ending a streamed tool call that broke is the caller's policy, not a second failure",
    ),
]


def test_a_tool_call_interrupted_keeps_what_the_cause_says_about_retrying():
    cause = classify.connection_reset(tokens_received=7).with_context(provider="p", attempt=2)
    fault = classify.tool_call_interrupted(cause, 1)
    assert (fault.code, fault.type, fault.retryable) == (
        "TOOL_CALL_INTERRUPTED",
        cause.type,
        True,
    )
    assert fault.suggested_action is SuggestedAction.RETRY
    assert (fault.provider, fault.attempt, fault.tokens_received) == ("p", 2, 7)
    assert "ECONNRESET" in fault.message and "tool call 1" in fault.message


@pytest.mark.parametrize(("fault", "counts"), BLAME_ROWS)
def test_counts_against_provider(fault: Fault, counts: bool):
    assert classify.counts_against_provider(fault) is counts


def test_the_blame_table_test_covers_every_code_classification_can_make():
    tested = {row.values[0].code for row in BLAME_ROWS}
    named = (
        set(classify._BLAME_BY_CODE)
        | {kind.value for kind in TransportKind}
        | {kind.value for kind in ProviderErrorKind}
    )
    assert named <= tested, sorted(named - tested)


def test_blame_survives_the_stored_form_and_added_context():
    # The engine labels faults (provider, attempt) and the store round-trips
    # them; neither changes whose failure it is.
    for row in BLAME_ROWS:
        fault, counts = row.values
        stored = Fault.from_json(fault.with_context(provider="p", attempt=3).to_json())
        assert classify.counts_against_provider(stored) is counts
