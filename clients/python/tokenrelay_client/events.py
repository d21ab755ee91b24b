"""What `RelayClient.stream` yields: typed, frozen, protobuf-free events.

Server events, in the order a stream produces them:

    Started      the call is attached (first event; again after each reconnect)
    Chunk        a piece of the answer: text, reasoning, or a piece of a tool call;
                 seq 1, 2, 3, … exactly once, no gaps, over every kind
    Checkpoint   everything up to seq is stored on the server; a fresh resume token
    Notice       a non-fatal StreamError: the gateway is recovering, the stream goes on
    End          the last event; the client has already checked the digest

Client-side events, only when the connection breaks or a start is refused:

    Reconnecting the call failed transiently; the client waits `delay_s` then reattaches
    Reconnected  reattached; the next chunk is `last_seq + 1`
    Throttled    the gateway refused the start (RESOURCE_EXHAUSTED) and said when to
                 try again; the client waits `delay_s`, then sends the same start
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True, slots=True)
class Started:
    stream_id: str
    resume_token: str
    # True when this call attached to an existing stream (a resume, or a
    # repeated idempotency key) rather than starting the generation.
    resumed: bool
    model: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call, as the server sent it. The pieces of one call
    share `index`; the first carries its `id` and `name`; joining `arguments`
    in seq order gives the arguments JSON. With policy tool_calls "whole"
    (the default) each call is one piece with all of it."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete tool call: assembled from its pieces (`Result.tool_calls`),
    or one to send back as an assistant message's call."""

    id: str
    name: str
    arguments: str  # the arguments, a JSON object as text

    def parsed_arguments(self) -> Any:
        """The arguments as Python values (json.loads)."""
        return json.loads(self.arguments)


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the model may call: its name, what it does, and the JSON
    Schema of its arguments (a dict; None: no arguments)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None


ChunkKind = Literal["text", "reasoning", "tool_call"]


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    # Answer text; "" for a reasoning chunk or a piece of a tool call, so code
    # that prints every chunk's text prints the answer and nothing else.
    text: str
    provider: str
    attempt: int
    reasoning: str = ""  # the model's reasoning ("thinking"), when that is the chunk
    tool_call: ToolCallDelta | None = None  # a piece of a tool call, when that is the chunk
    kind: ChunkKind = "text"  # which of the three the chunk is


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
    # Hex SHA-256 of every chunk (text, reasoning, tool calls); "" from a
    # server that does not send it.
    chunks_sha256: str = ""
    # True when the client checked chunks_sha256 against every chunk it got
    # (it saw them all from seq 1 and the server sent the digest).
    chunks_verified: bool = False


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


@dataclass(frozen=True, slots=True)
class Throttled:
    """The gateway refused the start for now (load shedding, a tenant's quota:
    RESOURCE_EXHAUSTED with google.rpc.RetryInfo or `retry-after-ms`); the
    client sleeps the advised `delay_s`, then sends the same start (same
    idempotency key: the refused start created nothing)."""

    attempt: int  # 1-based: the how-manieth retry of the start this wait precedes
    max_attempts: int  # RelayClient(start_retries=...)
    delay_s: float  # the wait the gateway advised
    cause: str  # e.g. "RESOURCE_EXHAUSTED: this replica is generating 8 streams ..."


Event = Started | Chunk | Checkpoint | Notice | End | Reconnecting | Reconnected | Throttled
