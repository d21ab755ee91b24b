"""What `RelayClient.stream` yields: typed, frozen, protobuf-free events.

Server events, in the order a stream produces them:

    Started      the call is attached (first event; again after each reconnect)
    Chunk        a piece of the answer; seq 1, 2, 3, … exactly once, no gaps
    Checkpoint   everything up to seq is stored on the server; a fresh resume token
    Notice       a non-fatal StreamError: the gateway is recovering, the stream goes on
    End          the last event; the client has already checked the digest

Client-side events, only when the connection breaks:

    Reconnecting the call failed transiently; the client waits `delay_s` then reattaches
    Reconnected  reattached; the next chunk is `last_seq + 1`
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Started:
    stream_id: str
    resume_token: str
    # True when this call attached to an existing stream (a resume, or a
    # repeated idempotency key) rather than starting the generation.
    resumed: bool
    model: str


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    text: str
    provider: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    token_count: int
    resume_token: str


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    """A `StreamError` as the server sent it. `type` and `suggested_action` are
    the lower-case enum names ("network", "resume"), "" when unspecified."""

    type: str
    code: str
    message: str
    retryable: bool
    suggested_action: str
    fatal: bool
    bytes_received: int = 0
    tokens_received: int = 0
    provider: str = ""
    attempt: int = 0
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Notice:
    """A non-fatal error: the gateway is recovering (retrying, falling back)."""

    error: ErrorDetail

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def message(self) -> str:
        return self.error.message


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class End:
    finish_reason: str
    # True when the gateway gave up: the text is all there is, `error` says why.
    partial: bool
    error: ErrorDetail | None
    usage: Usage
    total_seq: int
    text_sha256: str
    # True when the client checked text_sha256 against what it assembled.
    # False only for `RelayClient.resume(..., text_so_far=None)` from a seq > 0,
    # where the client never saw the beginning of the text.
    verified: bool


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection failed; the client sleeps `delay_s`, then reattaches."""

    attempt: int  # 1-based, within the current budget (see RelayClient)
    max_attempts: int
    last_seq: int  # the seq the client will resume from
    delay_s: float
    cause: str  # e.g. "UNAVAILABLE: Socket closed"


@dataclass(frozen=True, slots=True)
class Reconnected:
    """Reattached after a transient failure; chunks continue at last_seq + 1."""

    attempt: int
    last_seq: int
    delay_s: float  # the delay slept before the successful attempt
    cause: str  # the failure that started this round of reconnects


Event = Started | Chunk | Checkpoint | Notice | End | Reconnecting | Reconnected
