"""Every error the tokenrelay client raises, in one tree.

    TokenRelayClientError
     ├── StreamFailed            a gRPC status that retrying cannot fix (code + details;
     │    │                      `retry_after_s` when the gateway said when to try again)
     │    ├── ResumeRejected     the server refused a resume (NOT_FOUND, PERMISSION_DENIED)
     │    └── GenerationFailed   the gateway gave up and the stream refused partials
     │                           (policy allow_partial = false): the typed StreamError
     ├── ReconnectsExhausted     transient failures outlasted the reconnect budget
     ├── DigestMismatch          the assembled text is not what the server says it sent
     └── ProtocolViolation       the server broke the contract (gap in seq, no StreamStarted)

Every error raised after the stream started carries a `PartialStream`: the
text assembled so far, the last seq and the latest resume token. With it a
caller can show what arrived, or resume later with `RelayClient.resume`.

gRPC exceptions never escape the client; they are translated here, at one
boundary (`client._translate_status`).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from .events import ErrorDetail, ToolCall


@dataclass(frozen=True, slots=True)
class PartialStream:
    """What a stream had delivered when it failed: the answer text, the
    reasoning and the tool calls (a call cut while streamed is incomplete)."""

    stream_id: str
    resume_token: str
    last_seq: int
    text: str
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()


class TokenRelayClientError(Exception):
    """Base of every client error. `partial` is what had arrived, if anything."""

    def __init__(self, message: str, *, partial: PartialStream | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class StreamFailed(TokenRelayClientError):
    """The server (or gRPC) ended the call with a status that a reconnect cannot
    fix: a bad request (INVALID_ARGUMENT names the field), credentials, quota.
    Fix the request or give up; do not retry the same call.

    `retry_after_s`: the wait the gateway advised (google.rpc.RetryInfo, or
    `retry-after-ms` trailing metadata), None when it gave none. A start
    refused with RESOURCE_EXHAUSTED (load shedding, a tenant's quota) that
    carries one has already been retried `start_retries` times, each after
    the advised wait (`RelayClient`); this is the last refusal: try again
    after `retry_after_s`, on another replica, or with fewer tokens."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        partial: PartialStream | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}", partial=partial)
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s


class ResumeRejected(StreamFailed):
    """The server refused to reattach: the stream expired or is unknown
    (NOT_FOUND), or the resume token is not valid here (PERMISSION_DENIED).
    The partial text is all there is; start a new stream for the rest."""


class GenerationFailed(StreamFailed):
    """The gateway gave up on the generation (every recovery option spent, a
    provider error that cannot be recovered, a limit) and the stream was
    started with `policy={"allow_partial": False}`, so the call failed instead
    of ending with a partial `End`. `error` is the typed StreamError (the one
    `End.error` would have carried); `code` is the gRPC status derived from it
    (UNAVAILABLE when `error.retryable`, FAILED_PRECONDITION when not,
    RESOURCE_EXHAUSTED for limits, DEADLINE_EXCEEDED for your deadline).
    `partial` holds the chunks delivered before (checked against the
    server's digest when the client saw the whole text).

    The client never resumes this: a resume would end the same way. When
    `error.retryable`, start again (after `error.retry_after_s`, when set)
    with a new idempotency key (the old key names this failed stream);
    otherwise fix the cause."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        error: ErrorDetail,
        total_seq: int | None = None,
        text_sha256: str = "",
        partial: PartialStream | None = None,
        chunks_sha256: str = "",
    ) -> None:
        super().__init__(code, details, partial=partial)
        self.error = error
        # What the server says it delivered (None when it did not say).
        self.total_seq = total_seq
        self.text_sha256 = text_sha256
        self.chunks_sha256 = chunks_sha256


class ReconnectsExhausted(TokenRelayClientError):
    """The connection kept failing (UNAVAILABLE, resets) and every reconnect
    attempt was spent without progress. `cause` is the last failure. The
    stream may still be alive on the server: resume later with
    `partial.resume_token` and `partial.last_seq`."""

    def __init__(
        self,
        message: str,
        *,
        attempts: int,
        cause: str,
        partial: PartialStream | None = None,
    ) -> None:
        super().__init__(message, partial=partial)
        self.attempts = attempts
        self.cause = cause


class DigestMismatch(TokenRelayClientError):
    """The text assembled from the chunks does not match the server's
    `text_sha256`, the chunks received do not match its `chunks_sha256`
    (then `expected_chunks_sha256` is set), or the chunk count differs from
    `total_seq`. Do not trust the answer; report the bug and start again."""

    def __init__(
        self,
        message: str,
        *,
        expected_sha256: str,
        actual_sha256: str,
        expected_total_seq: int,
        actual_last_seq: int,
        partial: PartialStream | None = None,
        expected_chunks_sha256: str = "",
        actual_chunks_sha256: str = "",
    ) -> None:
        super().__init__(message, partial=partial)
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        self.expected_total_seq = expected_total_seq
        self.actual_last_seq = actual_last_seq
        self.expected_chunks_sha256 = expected_chunks_sha256
        self.actual_chunks_sha256 = actual_chunks_sha256


class PartialAnswer(TokenRelayClientError):
    """Strict mode only (`generate(..., strict=True)`): the gateway gave up and
    returned a partial answer. `result` holds it, `result.end.error` says why.
    Without strict mode the same answer is a `Result` with `partial` true."""

    def __init__(self, message: str, *, result: object, partial: PartialStream) -> None:
        super().__init__(message, partial=partial)
        self.result = result


class ProtocolViolation(TokenRelayClientError):
    """The server sent something the contract forbids (a seq gap, a first event
    that is not StreamStarted). This is a server bug; report it. The partial
    text up to the violation is intact."""
