"""The tokenrelay Python client: one generation as an async iterator of events
that survives a broken connection.

    async with RelayClient("localhost:50051") as client:
        async for event in client.stream("sim", [("user", "hello")]):
            if isinstance(event, Chunk):
                print(event.text, end="", flush=True)

What the client does for you:

* Reconnects. When the call fails transiently (`is_transient`: UNAVAILABLE,
  or a connection-level CANCELLED/INTERNAL/UNKNOWN such as a reset) it waits
  `backoff_delay(attempt)`, or the wait the failure advised (RetryInfo) when
  it is longer (`reconnect_wait`), and reattaches: with `resume` (latest
  resume token, last seq it holds) once the server has said StreamStarted, otherwise by
  sending the same `start` again with the same idempotency key, so the server
  attaches to the generation it may already have begun instead of starting a
  second one.
* Bounds each attempt: StreamStarted must arrive within `connect_timeout_s`.
  A reconnect attempt spends that window waiting for the channel to connect
  (grpc `wait_for_ready`), so grpc's own reconnect backoff after a refused
  connection cannot make an attempt fail while the gateway is back.
* Counts reconnect attempts per round: `max_reconnects` consecutive failed
  attempts without progress raise `ReconnectsExhausted`. Progress means a new
  chunk (seq > last seq); a StreamStarted alone is not progress, so a server
  that accepts every resume and drops it at once still exhausts the budget.
  A long stream may therefore survive many separate breaks, each with a full
  budget, but never loops forever without receiving text.
* Honours a refused start's advice: a start refused with RESOURCE_EXHAUSTED
  (load shedding, a tenant's quota) whose status says when to try again
  (google.rpc.RetryInfo in grpc-status-details-bin, or `retry-after-ms`
  trailing metadata) is sent again after that wait, `start_retries` times at
  most (`start_retry_wait`); then `StreamFailed` carries the advised
  `retry_after_s`. A refusal without advice, or with a wait longer than
  `max_start_retry_wait_s`, raises at once.
* Delivers every seq exactly once: chunks at or below the last seq (replayed
  after a resume) are dropped and counted; a gap raises `ProtocolViolation`.
* Verifies the end: the text it assembled must hash to `StreamEnd.text_sha256`
  and its last seq must equal `total_seq`, and, when the server sends
  `chunks_sha256`, every chunk it received (text, reasoning, tool calls) must
  hash to it; otherwise `DigestMismatch` is raised.
* Assembles agent turns: `text` (answer text), `reasoning`, and `tool_calls`
  (each call's pieces joined by index), on the stream and in `Result`;
  `Result.assistant_message()` and `tool_result()` make the messages that
  send an agent loop's results back.

Other statuses that a reconnect cannot fix (INVALID_ARGUMENT, PERMISSION_DENIED,
NOT_FOUND, RESOURCE_EXHAUSTED, …) raise `StreamFailed` / `ResumeRejected` at
once. A status whose rich details (grpc-status-details-bin) carry a
`tokenrelay.v1.StreamError` is the end of a stream that refused partial
answers: it raises `GenerationFailed` with that error, whatever its code
(an UNAVAILABLE among them is not a broken connection, and a resume would
only end the same way). Protobuf and grpc exceptions stay inside this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import struct
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar, cast

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenrelay.v1 import relay_pb2, relay_pb2_grpc

from .credentials import PathLike, merged_metadata, tls_credentials
from .errors import (
    DigestMismatch,
    GenerationFailed,
    PartialAnswer,
    PartialStream,
    ProtocolViolation,
    ReconnectsExhausted,
    ResumeRejected,
    StreamFailed,
    TokenRelayClientError,
)
from .events import (
    Checkpoint,
    Chunk,
    End,
    ErrorDetail,
    Event,
    Notice,
    Reconnected,
    Reconnecting,
    Started,
    Throttled,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
)

Sleep = Callable[[float], Awaitable[None]]
# `deadline(seconds)`: a block that raises TimeoutError once `seconds` have
# passed (asyncio.timeout, or a manual clock's `deadline` in tests).
Deadline = Callable[[float], contextlib.AbstractAsyncContextManager[object]]
# (role, content), or {"role", "content", "tool_calls": [ToolCall | {"id",
# "name", "arguments"}], "tool_call_id"}.
MessageLike = tuple[str, str] | Mapping[str, Any]
ToolLike = Tool | Mapping[str, Any]
ToolChoiceLike = str | Mapping[str, str]
ChannelOptions = Sequence[tuple[str, Any]]
_Call: TypeAlias = "grpc.aio.StreamStreamCall[relay_pb2.StreamRequest, relay_pb2.StreamEvent]"

# gRPC's own reconnect backoff starts at 1 s and grows to 120 s. Our backoff
# decides when to try again; the channel's must not make an attempt fail fast
# because the subchannel is still backing off from the previous refusal.
_DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)

# How long a finished call may take to report its status after StreamEnd
# before the client cancels it (only matters for a misbehaving server).
_CLOSE_TIMEOUT_S = 1.0


# --- decisions (pure) -------------------------------------------------------------


def backoff_delay(
    attempt: int,
    *,
    base_s: float,
    cap_s: float,
    jitter: float,
    rng: Callable[[], float],
) -> float:
    """Seconds to wait before reconnect attempt `attempt` (1-based).

    base_s · 2^(attempt-1), capped at cap_s, then spread by ±jitter (a fraction:
    0.1 is ±10 %) with `rng()` in [0, 1): 0.5 gives the exact exponential
    value. The result is never negative and never above cap_s.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, got {attempt}")
    exponential = min(cap_s, base_s * 2.0 ** (attempt - 1))
    spread = exponential * jitter * (2.0 * rng() - 1.0)
    return max(0.0, min(cap_s, exponential + spread))


def reconnect_wait(backoff_s: float, advised_s: float | None, *, cap_s: float) -> float:
    """Seconds to wait before a reconnect: the backoff, or the wait the
    failure advised when it is longer (a replica with no room to take a
    stream over says when it may have some: RetryInfo on its UNAVAILABLE),
    but never past cap_s (or the backoff, when that is longer)."""
    if advised_s is None or advised_s <= backoff_s:
        return backoff_s
    return min(advised_s, max(cap_s, backoff_s))


def start_retry_wait(
    code: grpc.StatusCode,
    retry_after_s: float | None,
    *,
    retries_done: int,
    max_retries: int,
    max_wait_s: float,
) -> float | None:
    """Seconds to wait before sending a refused start again, or None: give up
    (raise the refusal).

    Only RESOURCE_EXHAUSTED that says how long to wait is worth it (the
    gateway sheds load or a tenant is over quota, for now); at most
    `max_retries` times per stream; a wait longer than `max_wait_s` is the
    caller's to decide on, so it is raised rather than slept. A negative
    advice (a broken server) waits nothing.
    """
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED or retry_after_s is None:
        return None
    if retries_done >= max_retries or retry_after_s > max_wait_s:
        return None
    return max(0.0, retry_after_s)


# Connection-level failures that grpc reports with a status other than
# UNAVAILABLE, depending on where in the call the connection broke.
CONNECTION_FAILURE_HINTS = (
    "socket closed",
    "connection reset",
    "connection refused",
    "connection closed",
    "broken pipe",
    "rst_stream",
    "goaway",
    "stream removed",
    "failed to connect",
    "keepalive",
    "transport closed",
    "end of tcp stream",
)


def is_transient(code: grpc.StatusCode, details: str) -> bool:
    """Whether a call that ended with (code, details) is worth a reconnect.

    UNAVAILABLE: the server is draining or unreachable (the contract says:
    resume elsewhere). CANCELLED: we never cancel a call we still read from
    (a local cancel surfaces as asyncio.CancelledError, not a status), so it
    was the network or a server shutting down; a resume tells the truth
    either way. INTERNAL and UNKNOWN: only when grpc says the transport broke
    ("Stream removed", "RST_STREAM", "Socket closed"); otherwise it is a
    server bug that a retry would repeat. Everything else (INVALID_ARGUMENT,
    PERMISSION_DENIED, NOT_FOUND, RESOURCE_EXHAUSTED, …) is final.
    """
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        lowered = details.lower()
        return any(hint in lowered for hint in CONNECTION_FAILURE_HINTS)
    return False


def text_sha256(text: str) -> str:
    """The digest the server puts in StreamEnd: hex SHA-256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_U32 = struct.Struct(">I")


def _sized(value: str) -> bytes:
    data = value.encode("utf-8")
    return _U32.pack(len(data)) + data


def chunk_record(chunk: Chunk) -> bytes:
    """The bytes StreamEnd.chunks_sha256 takes for one chunk (relay.proto):
    "T" or "R", then the length and UTF-8 of the text or reasoning; for a
    tool call "C", its index, then the length and UTF-8 of its id, name and
    arguments (index and lengths as 4-byte big-endian unsigned integers)."""
    call = chunk.tool_call
    if call is not None:
        return (
            b"C"
            + _U32.pack(call.index)
            + _sized(call.id)
            + _sized(call.name)
            + _sized(call.arguments)
        )
    if chunk.kind == "reasoning":
        return b"R" + _sized(chunk.reasoning)
    return b"T" + _sized(chunk.text)


def assemble_tool_calls(pieces: Iterable[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """Tool calls from their pieces in seq order: by index, the first id and
    name given, the arguments joined."""
    calls: dict[int, list[str]] = {}
    for piece in pieces:
        call = calls.setdefault(piece.index, ["", "", ""])
        call[0] = call[0] or piece.id
        call[1] = call[1] or piece.name
        call[2] += piece.arguments
    return tuple(ToolCall(c[0], c[1], c[2]) for _, c in sorted(calls.items()))


def tool_result(tool_call_id: str, content: str) -> dict[str, str]:
    """The message that answers a tool call (role "tool")."""
    return {"role": "tool", "content": content, "tool_call_id": tool_call_id}


def verify_assembly(text: str, last_seq: int, *, total_seq: int, expected_sha256: str) -> None:
    """Raise DigestMismatch unless (text, last_seq) is what StreamEnd describes."""
    actual = text_sha256(text)
    problems = []
    if last_seq != total_seq:
        problems.append(f"the client holds chunks 1..{last_seq}, the server sent 1..{total_seq}")
    if actual != expected_sha256.lower():
        problems.append(
            f"sha256 of the assembled text is {actual}, the server says "
            f"{expected_sha256 or '(none)'}"
        )
    if problems:
        raise DigestMismatch(
            "the assembled text does not match the stream: " + "; ".join(problems),
            expected_sha256=expected_sha256,
            actual_sha256=actual,
            expected_total_seq=total_seq,
            actual_last_seq=last_seq,
        )


# --- results ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    """A whole generation, as `RelayClient.generate` collects it."""

    text: str
    end: End
    stream_id: str
    chunks: int
    reconnects: int
    duplicates_dropped: int
    notices: tuple[Notice, ...]
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()

    @property
    def partial(self) -> bool:
        """True when the gateway gave up: `text` is all there is, `end.error` says why."""
        return self.end.partial

    def assistant_message(self) -> dict[str, Any]:
        """This answer as the assistant message of the conversation's next
        request: its text and its tool calls (answer each with `tool_result`)."""
        return {"role": "assistant", "content": self.text, "tool_calls": list(self.tool_calls)}


class _Transient(Exception):
    """A call failed in a way a reconnect may fix; `cause` says how, and
    `retry_after_s` how long the server advised to wait (None: no advice)."""

    def __init__(self, cause: str, retry_after_s: float | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.retry_after_s = retry_after_s


# --- the client --------------------------------------------------------------------


class RelayClient:
    """A connection to a tokenrelay gateway (one gRPC channel, many streams).

    target: "host:port" (any grpc target, e.g. "dns:///relay:50051").
    max_reconnects: consecutive failed reconnect attempts allowed without a
        new chunk arriving (see the module docstring for the exact rule).
    backoff_base_s, backoff_cap_s, jitter, rng: `backoff_delay`'s knobs; rng
        is a random.Random (seed it for reproducible delays).
    sleep: how to wait between attempts (tests pass a fake that returns at once).
    connect_timeout_s: how long one attempt may take to get StreamStarted; a
        reconnect attempt spends it waiting for the channel to connect, so a
        gateway that comes back during the window is reached.
    deadline: how an attempt's connect_timeout_s is kept (asyncio.timeout);
        tests pass a manual clock's `deadline` and move that clock, so no
        test waits for the window on wall time.
    channel_options: extra grpc channel options, applied after our defaults.
    api_key: the tenant's API key, sent as `authorization: Bearer <key>` with
        every call; default: $TOKENRELAY_API_KEY (credentials.py).
    tls_ca, tls_client_cert, tls_client_key: PEM files: the CA that signed the
        gateway's certificate (turns TLS on), and the client's certificate and
        key for a gateway that requires them (mTLS).
    credentials: TLS credentials built by the caller (instead of the tls_*
        files); None and no tls_* file means a plaintext channel.
    start_retries: how many times a start refused with RESOURCE_EXHAUSTED and
        an advised wait (RetryInfo / retry-after-ms) is sent again, each time
        after that wait on `sleep`; 0 raises the first refusal.
    max_start_retry_wait_s: an advised wait longer than this is not slept:
        the refusal is raised at once (its `retry_after_s` says the wait).
    call_metadata: gRPC metadata sent with every call.
    interceptors: grpc.aio client interceptors of the channel, e.g.
        `tokenrelay_client.tracing.tracing_interceptors()` (OpenTelemetry: a
        CLIENT span per call and the W3C trace context in its metadata, so
        the gateway's spans join the caller's trace).
    """

    def __init__(
        self,
        target: str,
        *,
        max_reconnects: int = 3,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        jitter: float = 0.1,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        connect_timeout_s: float = 2.0,
        deadline: Deadline = asyncio.timeout,
        channel_options: ChannelOptions | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        call_metadata: Sequence[tuple[str, str]] | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
        api_key: str | None = None,
        tls_ca: PathLike | None = None,
        tls_client_cert: PathLike | None = None,
        tls_client_key: PathLike | None = None,
        start_retries: int = 3,
        max_start_retry_wait_s: float = 60.0,
    ) -> None:
        if max_reconnects < 0:
            raise ValueError("max_reconnects must be 0 or more")
        if start_retries < 0:
            raise ValueError("start_retries must be 0 or more")
        if max_start_retry_wait_s < 0:
            raise ValueError("max_start_retry_wait_s must be 0 or more")
        if backoff_base_s < 0 or backoff_cap_s < 0:
            raise ValueError("backoff_base_s and backoff_cap_s must be 0 or more")
        if connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s must be positive")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError("jitter must be between 0 and 1")
        self.target = target
        self.max_reconnects = max_reconnects
        self.start_retries = start_retries
        self.max_start_retry_wait_s = max_start_retry_wait_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self.connect_timeout_s = connect_timeout_s
        self._deadline = deadline
        self._channel_options = (*_DEFAULT_CHANNEL_OPTIONS, *(channel_options or ()))
        files = tls_credentials(tls_ca, tls_client_cert, tls_client_key)
        if files is not None and credentials is not None:
            raise ValueError("give either credentials or the tls_* files, not both")
        self._credentials = credentials or files
        self._client_cert = tls_client_cert is not None
        self._call_metadata = merged_metadata(api_key, call_metadata)
        self._interceptors = list(interceptors or ())
        self._channel: grpc.aio.Channel | None = None
        self._stub: relay_pb2_grpc.RelayAsyncStub | None = None

    async def __aenter__(self) -> RelayClient:
        self._ensure_channel()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel; streams still open on it fail."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    def stream(
        self,
        model: str,
        messages: Iterable[MessageLike],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        idempotency_key: str | None = None,
        policy: Mapping[str, int | bool | str] | None = None,
        metadata: Mapping[str, str] | None = None,
        tools: Sequence[ToolLike] = (),
        tool_choice: ToolChoiceLike | None = None,
    ) -> RelayStream:
        """Start a generation; iterate the result for its events.

        messages: (role, content) tuples or dicts {"role", "content"} (an
            assistant's may have "tool_calls": ToolCall or {"id", "name",
            "arguments"} items; a "tool" message has "tool_call_id": see
            `Result.assistant_message` and `tool_result`).
        policy: overrides of the recovery policy, keys as in the proto's
            RecoveryPolicy (max_retries, allow_fallback, allow_partial,
            checkpoint_interval, tool_calls: "whole" or "stream").
        metadata: StartGeneration.metadata (e.g. {"sim.pace_ms": "20"}).
        tools: Tool or {"name", "description", "parameters"} items.
        tool_choice: "auto", "none", "required", or {"name": TOOL} for one tool.
        idempotency_key: generated (uuid4) when not given; a retried start
            reuses it, so the server never runs the generation twice.
        """
        key = idempotency_key or str(uuid.uuid4())
        start = relay_pb2.StartGeneration(
            model=model,
            messages=[_to_message(message) for message in messages],
            params=_to_params(max_tokens, temperature, top_p, stop),
            idempotency_key=key,
            metadata=dict(metadata or {}),
            tools=[_to_tool(tool) for tool in tools],
        )
        if tool_choice is not None:
            start.tool_choice.CopyFrom(_to_tool_choice(tool_choice))
        if policy:
            start.policy.CopyFrom(_to_policy(policy))
        return RelayStream(self, start=start)

    def resume(
        self,
        resume_token: str,
        last_seq: int,
        *,
        text_so_far: str | None = None,
    ) -> RelayStream:
        """Reattach to a stream (e.g. from `ReconnectsExhausted.partial`).

        Yields what follows `last_seq`. Pass the text of chunks 1..last_seq as
        `text_so_far` to have the final digest verified over the whole text;
        without it (and last_seq > 0) End.verified is False.
        """
        if last_seq < 0:
            raise ValueError("last_seq must be 0 or more")
        return RelayStream(
            self,
            resume_token=resume_token,
            last_seq=last_seq,
            text_so_far=text_so_far if text_so_far is not None else ("" if last_seq == 0 else None),
        )

    async def generate(
        self,
        model: str,
        messages: Iterable[MessageLike],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        idempotency_key: str | None = None,
        policy: Mapping[str, int | bool | str] | None = None,
        metadata: Mapping[str, str] | None = None,
        strict: bool = False,
        tools: Sequence[ToolLike] = (),
        tool_choice: ToolChoiceLike | None = None,
    ) -> Result:
        """Run a whole generation and return its verified text, reasoning and
        tool calls. A partial answer is a `Result` with `partial` true, or,
        with `strict=True`, a `PartialAnswer` exception carrying that result."""
        relay_stream = self.stream(
            model,
            messages,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            idempotency_key=idempotency_key,
            policy=policy,
            metadata=metadata,
            tools=tools,
            tool_choice=tool_choice,
        )
        result = await relay_stream.collect()
        if strict and result.partial:
            error = result.end.error
            reason = f"{error.code}: {error.message}" if error is not None else "no reason given"
            raise PartialAnswer(
                f"the gateway returned a partial answer ({result.chunks} chunks): {reason}",
                result=result,
                partial=relay_stream.partial(),
            )
        return result

    # -- used by RelayStream ---------------------------------------------------

    def _ensure_channel(self) -> relay_pb2_grpc.RelayAsyncStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(
                    self.target,
                    options=self._channel_options,
                    interceptors=self._interceptors or None,
                )
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target,
                    self._credentials,
                    options=self._channel_options,
                    interceptors=self._interceptors or None,
                )
            self._stub = relay_pb2_grpc.RelayStub(self._channel)
        return self._stub

    def _open_call(self, *, reconnecting: bool) -> _Call:
        stub = self._ensure_channel()
        # A reconnect waits (up to connect_timeout_s) for the channel to
        # connect rather than failing at once while grpc is still backing off
        # from the last refused connection: the attempt then reflects whether
        # the gateway is reachable now, not a minute-old channel state.
        call: _Call = stub.Stream(metadata=self._call_metadata or None, wait_for_ready=reconnecting)
        return call

    def _tls_hint(self, cause: str) -> str:
        return _tls_hint(cause, tls=self._credentials is not None, client_cert=self._client_cert)

    def _channel_ready(self) -> bool:
        channel = self._channel
        return (
            channel is not None
            and channel.get_state(try_to_connect=False) is grpc.ChannelConnectivity.READY
        )

    def _delay(self, attempt: int) -> float:
        return backoff_delay(
            attempt,
            base_s=self.backoff_base_s,
            cap_s=self.backoff_cap_s,
            jitter=self.jitter,
            rng=self._rng.random,
        )


class RelayStream:
    """One generation: iterate it once for its events (see `events`).

    While (and after) iterating, `stream_id`, `last_seq`, `resume_token`,
    `text`, `reconnects` and `duplicates_dropped` describe what arrived.
    Leaving early (break, exception) closes the call; the server keeps the
    generation running for its grace period, so `client.resume(...)` with
    `partial()` can pick it up. `cancel()` stops the generation itself.
    """

    def __init__(
        self,
        client: RelayClient,
        *,
        start: relay_pb2.StartGeneration | None = None,
        resume_token: str = "",
        last_seq: int = 0,
        text_so_far: str | None = "",
    ) -> None:
        self._client = client
        self._start = start
        self.stream_id = ""
        self.resume_token = resume_token
        self.last_seq = last_seq
        self.reconnects = 0
        self.duplicates_dropped = 0
        self.notices: list[Notice] = []
        self.end: End | None = None
        # None: we resumed mid-stream without the earlier text, so the final
        # digest cannot be checked.
        self._verifiable = text_so_far is not None
        self._pieces: list[str] = [text_so_far] if text_so_far else []
        self._reasoning: list[str] = []
        self._tool_pieces: list[ToolCallDelta] = []
        # chunks_sha256 can be checked only over every chunk from seq 1.
        self._chunks_digest = hashlib.sha256()
        self._chunks_verifiable = last_seq == 0
        self._last_checkpoint_seq = last_seq
        # Notices received since the last new chunk: a resume from last_seq
        # replays them, and the caller has already seen them.
        self._notices_since_chunk: list[Notice] = []
        self._call: _Call | None = None
        # The last failure to reach the gateway (the channel was not connected).
        self._connect_failure = ""
        self._pending_cancel: str | None = None
        self._iterator: AsyncGenerator[Event, None] | None = None

    # -- public ------------------------------------------------------------------

    @property
    def idempotency_key(self) -> str:
        return self._start.idempotency_key if self._start is not None else ""

    @property
    def text(self) -> str:
        """The answer text assembled so far (chunks 1..last_seq, when known)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def reasoning(self) -> str:
        """The reasoning received on this stream object, joined."""
        return "".join(self._reasoning)

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls received on this stream object, each assembled from
        its pieces (a call still being streamed may be incomplete)."""
        return assemble_tool_calls(self._tool_pieces)

    def partial(self) -> PartialStream:
        return PartialStream(
            stream_id=self.stream_id,
            resume_token=self.resume_token,
            last_seq=self.last_seq,
            text=self.text,
            reasoning=self.reasoning,
            tool_calls=self.tool_calls,
        )

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._iterator is not None:
            raise RuntimeError("a RelayStream can be iterated only once")
        self._iterator = self._events()
        return self._iterator

    async def __aenter__(self) -> RelayStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop iterating and close the call (the generation keeps running)."""
        if self._iterator is not None:
            await self._iterator.aclose()
        elif self._call is not None:
            self._call.cancel()

    async def cancel(self, reason: str = "") -> None:
        """Ask the server to stop the generation; it ends with finish "cancelled".
        Keep iterating to receive that End."""
        self._pending_cancel = reason
        if self._call is not None and not self._call.done():
            try:
                await self._call.write(_cancel_request(reason))
                self._pending_cancel = None
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                pass  # sent on the next attach instead

    async def collect(self) -> Result:
        """Iterate to the end and return the result."""
        async for _ in self:
            pass
        if self.end is None:  # pragma: no cover - _events always ends with End or raises
            raise ProtocolViolation("the stream ended without StreamEnd", partial=self.partial())
        return Result(
            text=self.text,
            end=self.end,
            stream_id=self.stream_id,
            chunks=self.last_seq,
            reconnects=self.reconnects,
            duplicates_dropped=self.duplicates_dropped,
            notices=tuple(self.notices),
            reasoning=self.reasoning,
            tool_calls=self.tool_calls,
        )

    # -- the reconnect loop ----------------------------------------------------------

    async def _events(self) -> AsyncGenerator[Event, None]:
        client = self._client
        attempt = 0  # failed attempts in the current round (reset by a new chunk)
        round_cause = ""
        delay_s = 0.0
        start_retries = 0  # refused starts sent again (RelayClient.start_retries)
        while True:
            seq_before = self.last_seq
            call = client._open_call(reconnecting=attempt > 0)
            self._call = call
            resuming = bool(self.resume_token)
            refused: StreamFailed | None = None
            wait_s: float | None = None
            advised_s: float | None = None  # the wait a transient failure advised
            try:
                async with contextlib.aclosing(
                    self._attach_and_read(call, resuming=resuming)
                ) as call_events:
                    async for event in call_events:
                        if isinstance(event, Started) and attempt > 0:
                            self.reconnects += 1
                            yield Reconnected(
                                attempt=attempt,
                                last_seq=self.last_seq,
                                delay_s=delay_s,
                                cause=round_cause,
                            )
                        yield event
                        if isinstance(event, End):
                            await _finish_call(call)
                            return
            except _Transient as failure:
                cause = failure.cause
                advised_s = failure.retry_after_s
            except GenerationFailed as error:
                error.partial = self.partial()
                self._check_failed_delivery(error)
                raise
            except StreamFailed as error:
                if not resuming:  # a refused start: shed load, a quota (until it passes)
                    wait_s = start_retry_wait(
                        error.code,
                        error.retry_after_s,
                        retries_done=start_retries,
                        max_retries=client.start_retries,
                        max_wait_s=client.max_start_retry_wait_s,
                    )
                if wait_s is None:
                    if error.partial is None:
                        error.partial = self.partial()
                    raise
                refused = error
            except TokenRelayClientError as error:
                if error.partial is None:
                    error.partial = self.partial()
                raise
            finally:
                self._call = None
                if not call.done():
                    call.cancel()
            if refused is not None and wait_s is not None:
                # Not a broken connection: the reconnect budget is untouched.
                start_retries += 1
                yield Throttled(
                    attempt=start_retries,
                    max_attempts=client.start_retries,
                    delay_s=wait_s,
                    cause=str(refused),
                )
                await client._sleep(wait_s)
                continue
            if self.last_seq > seq_before or attempt == 0:
                # Progress since the last failure (or the first failure): a new round.
                attempt = 0
                round_cause = cause
            if attempt >= client.max_reconnects:
                raise ReconnectsExhausted(
                    f"gave up after {attempt} reconnect attempt(s) without progress; "
                    f"last failure: {cause}{client._tls_hint(cause)}",
                    attempts=attempt,
                    cause=cause,
                    partial=self.partial(),
                )
            attempt += 1
            delay_s = reconnect_wait(client._delay(attempt), advised_s, cap_s=client.backoff_cap_s)
            yield Reconnecting(
                attempt=attempt,
                max_attempts=client.max_reconnects,
                last_seq=self.last_seq,
                delay_s=delay_s,
                cause=cause,
            )
            await client._sleep(delay_s)

    async def _attach_and_read(
        self,
        call: _Call,
        *,
        resuming: bool,
    ) -> AsyncGenerator[Event, None]:
        """Send the first request on `call` and yield its new events.

        Raises _Transient when a reconnect may help, a TokenRelayClientError
        otherwise. Returns after yielding End.
        """
        if resuming:
            first = relay_pb2.StreamRequest(
                resume=relay_pb2.ResumeStream(
                    resume_token=self.resume_token, last_seq=self.last_seq
                )
            )
        else:
            assert self._start is not None
            first = relay_pb2.StreamRequest(start=self._start)
        timeout_s = self._client.connect_timeout_s
        try:
            # StreamStarted is the server's first answer and comes at once; a
            # call without it in time is as good as a broken connection.
            async with self._client._deadline(timeout_s):
                await _write(call, first, resuming=resuming)
                message: relay_pb2.StreamEvent | None = await _read(call, resuming=resuming)
        except TimeoutError:
            raise _Transient(self._why_no_start(timeout_s)) from None
        except _Transient as failure:
            if not self._client._channel_ready():
                # grpc's own words for it ("... Connection refused"): a
                # reconnect that waits for the channel only sees time run out.
                self._connect_failure = failure.cause
            raise
        self._connect_failure = ""  # the gateway answered: any old refusal is history
        if self._pending_cancel is not None:
            await _write(call, _cancel_request(self._pending_cancel), resuming=resuming)
            self._pending_cancel = None

        started = False
        replayed_notices = list(self._notices_since_chunk)
        while True:
            if started:
                message = await _read(call, resuming=resuming)
            if message is None:
                # The call ended OK without StreamEnd: the contract says End is
                # always last, so the connection was cut short; resume.
                raise _Transient("the call ended without StreamEnd")
            kind = message.WhichOneof("kind")
            if not started:
                if kind != "started":
                    raise ProtocolViolation(f"the first event was {kind!r}, not 'started'")
                started = True
                yield self._on_started(message.started)
                continue
            if kind == "chunk":
                chunk = self._on_chunk(message.chunk)
                if chunk is not None:
                    replayed_notices.clear()
                    yield chunk
            elif kind == "checkpoint":
                checkpoint = self._on_checkpoint(message.checkpoint)
                if checkpoint is not None:
                    yield checkpoint
            elif kind == "error":
                detail = _to_error_detail(message.error)
                notice = Notice(detail)
                if notice in replayed_notices:
                    replayed_notices.remove(notice)
                    continue
                if detail.fatal:
                    # A fatal error is followed by End(partial=true), which
                    # carries it; record it but do not present it as a notice.
                    continue
                self.notices.append(notice)
                self._notices_since_chunk.append(notice)
                yield notice
            elif kind == "end":
                yield self._on_end(message.end)
                return
            # An unknown kind comes from a newer server: skip it.

    def _why_no_start(self, timeout_s: float) -> str:
        """Why an attempt got no StreamStarted in time. When the channel never
        connected, the connection error as grpc reported it (issue 8: a dead
        address said "no StreamStarted within 2 s" instead of the refusal)."""
        if self._client._channel_ready():
            return f"no StreamStarted within {timeout_s:g} s"
        if self._connect_failure:
            return f"{self._connect_failure} (still no connection after {timeout_s:g} s)"
        return f"no connection to {self._client.target} within {timeout_s:g} s"

    # -- event handlers ----------------------------------------------------------------

    def _on_started(self, started: relay_pb2.StreamStarted) -> Started:
        if self.stream_id and started.stream_id != self.stream_id:
            raise ProtocolViolation(
                f"reattached to stream {started.stream_id!r}, expected {self.stream_id!r}"
            )
        self.stream_id = started.stream_id
        if started.resume_token:
            self.resume_token = started.resume_token
        return Started(
            stream_id=started.stream_id,
            resume_token=started.resume_token,
            resumed=started.resumed,
            model=started.model,
        )

    def _on_chunk(self, chunk: relay_pb2.TokenChunk) -> Chunk | None:
        if chunk.seq <= self.last_seq:
            self.duplicates_dropped += 1
            return None
        if chunk.seq != self.last_seq + 1:
            raise ProtocolViolation(
                f"chunk seq {chunk.seq} arrived after seq {self.last_seq}: "
                f"{chunk.seq - self.last_seq - 1} chunk(s) missing"
            )
        self.last_seq = chunk.seq
        self._notices_since_chunk.clear()
        content = chunk.WhichOneof("content")
        if content == "tool_call":
            call = chunk.tool_call
            delta = ToolCallDelta(call.index, call.id, call.name, call.arguments)
            self._tool_pieces.append(delta)
            event = Chunk(
                chunk.seq, "", chunk.provider, chunk.attempt, tool_call=delta, kind="tool_call"
            )
        elif content == "reasoning":
            self._reasoning.append(chunk.reasoning)
            event = Chunk(
                chunk.seq,
                "",
                chunk.provider,
                chunk.attempt,
                reasoning=chunk.reasoning,
                kind="reasoning",
            )
        else:  # text (or a server from before the oneof: text is all there was)
            self._pieces.append(chunk.text)
            event = Chunk(chunk.seq, chunk.text, chunk.provider, chunk.attempt)
        self._chunks_digest.update(chunk_record(event))
        return event

    def _on_checkpoint(self, checkpoint: relay_pb2.Checkpoint) -> Checkpoint | None:
        if checkpoint.resume_token:
            self.resume_token = checkpoint.resume_token
        if checkpoint.seq <= self._last_checkpoint_seq:
            return None  # replayed after a resume
        self._last_checkpoint_seq = checkpoint.seq
        return Checkpoint(
            seq=checkpoint.seq,
            token_count=checkpoint.token_count,
            resume_token=checkpoint.resume_token,
        )

    def _check_failed_delivery(self, failure: GenerationFailed) -> None:
        """What the server says it delivered before giving up must be what we
        hold, as for an End (DigestMismatch otherwise)."""
        if failure.total_seq is None:
            return
        self._check_assembly(
            failure.total_seq,
            failure.text_sha256,
            verify=self._verifiable and bool(failure.text_sha256),
            partial=self.partial(),
            chunks_sha256=failure.chunks_sha256,
        )

    def _check_assembly(
        self,
        total_seq: int,
        text_sha256: str,
        *,
        verify: bool,
        partial: PartialStream | None = None,
        chunks_sha256: str = "",
    ) -> None:
        """The chunks we hold are the server's 1..total_seq: by digest when we
        saw them all (`verify`), else at least by count; and every chunk by
        chunks_sha256 when the server sent it and we saw them all."""
        if verify:
            verify_assembly(
                self.text, self.last_seq, total_seq=total_seq, expected_sha256=text_sha256
            )
        if self._checks_chunks(chunks_sha256):
            actual = self._chunks_digest.hexdigest()
            if actual != chunks_sha256.lower():
                raise DigestMismatch(
                    f"the chunks do not match the stream: sha256 of the {self.last_seq} chunk(s) "
                    f"received is {actual}, the server says {chunks_sha256}",
                    expected_sha256=text_sha256,
                    actual_sha256="",
                    expected_total_seq=total_seq,
                    actual_last_seq=self.last_seq,
                    partial=partial,
                    expected_chunks_sha256=chunks_sha256,
                    actual_chunks_sha256=actual,
                )
        if not verify and total_seq != self.last_seq:
            raise DigestMismatch(
                f"the client holds chunks up to {self.last_seq}, the server sent 1..{total_seq}",
                expected_sha256=text_sha256,
                actual_sha256="",
                expected_total_seq=total_seq,
                actual_last_seq=self.last_seq,
                partial=partial,
            )

    def _checks_chunks(self, chunks_sha256: str) -> bool:
        return bool(chunks_sha256) and self._chunks_verifiable

    def _on_end(self, end: relay_pb2.StreamEnd) -> End:
        self._check_assembly(
            end.total_seq,
            end.text_sha256,
            verify=self._verifiable,
            chunks_sha256=end.chunks_sha256,
        )
        self.end = End(
            finish_reason=end.finish_reason,
            partial=end.partial,
            error=_to_error_detail(end.error) if end.HasField("error") else None,
            usage=Usage(
                prompt_tokens=end.usage.prompt_tokens,
                completion_tokens=end.usage.completion_tokens,
            ),
            total_seq=end.total_seq,
            text_sha256=end.text_sha256,
            verified=self._verifiable,
            chunks_sha256=end.chunks_sha256,
            chunks_verified=self._checks_chunks(end.chunks_sha256),
        )
        return self.end


# --- grpc boundary -------------------------------------------------------------------

_RESUME_REFUSALS = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    }
)


def _tls_hint(cause: str, *, tls: bool, client_cert: bool) -> str:
    """What a connection failure probably means when TLS is on one side only,
    or mTLS refused the client (grpc itself only says the socket closed, or
    the handshake failed)."""
    if not tls:
        if "Socket closed" in cause:
            return (
                " (this client speaks plaintext: if the gateway serves TLS, pass tls_ca, "
                "or --tls-ca to the CLI)"
            )
        return ""
    if "Socket closed" in cause:
        if not client_cert:
            return (
                " (the gateway closed the connection during TLS setup: if it requires client "
                "certificates (mTLS), pass tls_client_cert and tls_client_key)"
            )
        return (
            " (the gateway closed the connection during TLS setup: is the client certificate "
            "one its client CA signed?)"
        )
    if "handshake" in cause.lower() or "ssl" in cause.lower():
        return (
            " (the TLS handshake failed: does the gateway serve TLS, with a certificate the "
            "tls_ca signed for this address?)"
        )
    return ""


def _translate_status(
    code: grpc.StatusCode,
    details: str,
    *,
    resuming: bool,
    rich: status_pb2.Status | None = None,
    trailing: Iterable[tuple[str, str | bytes]] = (),
) -> Exception:
    """The one place grpc statuses become client errors (or a reconnect).
    `rich` is the call's google.rpc.Status (grpc-status-details-bin), if any;
    `trailing` its trailing metadata."""
    failed = _generation_failed(code, details, rich)
    if failed is not None:
        return failed
    if is_transient(code, details):
        return _Transient(f"{code.name}: {details}", advised_wait(rich, trailing))
    if resuming and code in _RESUME_REFUSALS:
        return ResumeRejected(code, details)
    return StreamFailed(code, details, retry_after_s=advised_wait(rich, trailing))


RETRY_AFTER_MS = "retry-after-ms"


def advised_wait(
    rich: status_pb2.Status | None, trailing: Iterable[tuple[str, str | bytes]] = ()
) -> float | None:
    """The wait a refusal advises, in seconds: its google.rpc.RetryInfo, else
    its `retry-after-ms` trailing metadata (whole milliseconds); None when it
    says nothing (or nothing readable)."""
    for detail in rich.details if rich is not None else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToNanoseconds() / 1e9
    for name, value in trailing:
        if name.lower() == RETRY_AFTER_MS and isinstance(value, str):
            text = value.strip()
            if text.isascii() and text.isdigit():
                return int(text) / 1000
    return None


def _generation_failed(
    code: grpc.StatusCode, details: str, rich: status_pb2.Status | None
) -> GenerationFailed | None:
    """A GenerationFailed when the status details carry a StreamError: the
    server ended a stream that refused partial answers."""
    if rich is None:
        return None
    error: relay_pb2.StreamError | None = None
    info: error_details_pb2.ErrorInfo | None = None
    for detail in rich.details:
        if detail.Is(relay_pb2.StreamError.DESCRIPTOR):
            error = relay_pb2.StreamError()
            detail.Unpack(error)
        else:
            # Unpack checks the type itself and says whether it matched. (The
            # googleapis stubs type ErrorInfo.DESCRIPTOR as Message's, which
            # types-protobuf's Any.Is does not accept.)
            candidate = error_details_pb2.ErrorInfo()
            if detail.Unpack(candidate):
                info = candidate
    if error is None:
        return None
    total_seq: int | None = None
    text_sha256 = chunks_sha256 = ""
    if info is not None:
        raw_total = info.metadata.get("total_seq", "")
        total_seq = int(raw_total) if raw_total.isascii() and raw_total.isdigit() else None
        text_sha256 = info.metadata.get("text_sha256", "")
        chunks_sha256 = info.metadata.get("chunks_sha256", "")
    return GenerationFailed(
        code,
        details,
        error=_to_error_detail(error),
        total_seq=total_seq,
        text_sha256=text_sha256,
        chunks_sha256=chunks_sha256,
    )


def _rich_status(exc: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    try:
        # cast: from_call reads only code(), details() and trailing_metadata(),
        # which AioRpcError has with grpc.Call's synchronous signatures; the
        # stubs (types-grpcio-status) accept only grpc.Call.
        status: status_pb2.Status | None = rpc_status.from_call(cast("grpc.Call", exc))
    except ValueError:  # details that contradict the status: ignore them
        return None
    return status


def _translate_rpc_error(exc: grpc.aio.AioRpcError, *, resuming: bool) -> Exception:
    return _translate_status(
        exc.code(),
        exc.details() or "",
        resuming=resuming,
        rich=_rich_status(exc),
        trailing=tuple(exc.trailing_metadata() or ()),
    )


async def _write(
    call: _Call,
    request: relay_pb2.StreamRequest,
    *,
    resuming: bool,
) -> None:
    try:
        await call.write(request)
    except grpc.aio.AioRpcError as exc:
        raise _translate_rpc_error(exc, resuming=resuming) from None
    except asyncio.InvalidStateError:
        # The call already finished; its status says why.
        code = await call.code()
        details = await call.details()
        if code == grpc.StatusCode.OK:
            raise _Transient("the call ended before the request was sent") from None
        rich: status_pb2.Status | None
        try:
            rich = await rpc_status.aio.from_call(call)
        except ValueError:
            rich = None
        trailing = tuple(await call.trailing_metadata() or ())
        raise _translate_status(
            code, details or "", resuming=resuming, rich=rich, trailing=trailing
        ) from None


async def _read(
    call: _Call,
    *,
    resuming: bool,
) -> relay_pb2.StreamEvent | None:
    try:
        message = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise _translate_rpc_error(exc, resuming=resuming) from None
    if message is grpc.aio.EOF:
        return None
    assert isinstance(message, relay_pb2.StreamEvent)
    return message


async def _finish_call(
    call: _Call,
) -> None:
    """Half-close after StreamEnd and let the server finish the call cleanly."""
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT_S):
            await call.done_writing()
            while await call.read() is not grpc.aio.EOF:
                pass
    except (TimeoutError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
        pass  # the answer is complete and verified; how the call closes is moot
    finally:
        if not call.done():
            call.cancel()


# --- conversions ---------------------------------------------------------------------


def _to_message(message: MessageLike) -> relay_pb2.Message:
    if isinstance(message, tuple):
        if len(message) != 2:
            raise TypeError(f"a message tuple must be (role, content), got {message!r}")
        role, content = message
        return relay_pb2.Message(role=role, content=content)
    if isinstance(message, Mapping):
        return relay_pb2.Message(
            role=message["role"],
            content=message.get("content") or "",
            tool_calls=[_to_tool_call(call) for call in message.get("tool_calls") or ()],
            tool_call_id=message.get("tool_call_id") or "",
        )
    raise TypeError(
        f"a message must be a (role, content) tuple or a dict, got {type(message).__name__}"
    )


def _to_tool_call(call: ToolCall | Mapping[str, str]) -> relay_pb2.ToolCall:
    if isinstance(call, ToolCall):
        return relay_pb2.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments)
    if isinstance(call, Mapping):
        return relay_pb2.ToolCall(
            id=call["id"], name=call["name"], arguments_json=call.get("arguments") or "{}"
        )
    raise TypeError(f"a tool call must be a ToolCall or a dict, got {type(call).__name__}")


def _to_tool(tool: ToolLike) -> relay_pb2.Tool:
    if isinstance(tool, Mapping):
        tool = Tool(tool["name"], tool.get("description") or "", tool.get("parameters"))
    if not isinstance(tool, Tool):
        raise TypeError(f"a tool must be a Tool or a dict, got {type(tool).__name__}")
    return relay_pb2.Tool(
        name=tool.name,
        description=tool.description,
        parameters_json="" if tool.parameters is None else json.dumps(tool.parameters),
    )


_TOOL_CHOICE_MODES = {
    "auto": relay_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": relay_pb2.TOOL_CHOICE_MODE_NONE,
    "required": relay_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


def _to_tool_choice(choice: ToolChoiceLike) -> relay_pb2.ToolChoice:
    if isinstance(choice, Mapping):
        return relay_pb2.ToolChoice(tool_name=choice["name"])
    if choice not in _TOOL_CHOICE_MODES:
        raise ValueError(
            f"tool_choice {choice!r} is not one of {sorted(_TOOL_CHOICE_MODES)}; "
            'name one tool with {"name": TOOL}'
        )
    return relay_pb2.ToolChoice(mode=_TOOL_CHOICE_MODES[choice])


def _to_params(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    stop: Sequence[str],
) -> relay_pb2.GenerationParams:
    if isinstance(stop, str):
        stop = (stop,)
    params = relay_pb2.GenerationParams(stop=list(stop))
    if max_tokens is not None:
        params.max_tokens = max_tokens
    if temperature is not None:
        params.temperature = temperature
    if top_p is not None:
        params.top_p = top_p
    return params


_POLICY_FIELDS = (
    "max_retries",
    "allow_fallback",
    "allow_partial",
    "checkpoint_interval",
    "tool_calls",
)
_TOOL_CALL_MODES = {
    "whole": relay_pb2.TOOL_CALL_MODE_WHOLE,
    "stream": relay_pb2.TOOL_CALL_MODE_STREAM,
}


def _to_policy(policy: Mapping[str, int | bool | str]) -> relay_pb2.RecoveryPolicy:
    unknown = set(policy) - set(_POLICY_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown recovery policy field(s) {sorted(unknown)}; known: {list(_POLICY_FIELDS)}"
        )
    fields = dict(policy)
    if "tool_calls" in fields:
        mode = fields["tool_calls"]
        if mode not in _TOOL_CALL_MODES:
            raise ValueError(f'policy tool_calls {mode!r} is not "whole" or "stream"')
        fields["tool_calls"] = _TOOL_CALL_MODES[str(mode)]
    # The keys were checked just above; protobuf checks each value at run time
    # (a TypeError naming the field). mypy cannot match a mapping's keys to
    # the constructor's keywords, and bool, int and enum values share one mapping.
    return relay_pb2.RecoveryPolicy(**fields)  # type: ignore[arg-type]


_V = TypeVar("_V", bound=int)
_V_contra = TypeVar("_V_contra", bound=int, contravariant=True)


class _ProtoEnum(Protocol[_V_contra]):
    """A generated proto enum (relay_pb2.ErrorType, ...): its Name lookup."""

    def Name(self, number: _V_contra, /) -> str: ...


def _enum_name(value: _V, prefix: str, enum: _ProtoEnum[_V]) -> str:
    if value == 0:
        return ""
    try:
        name = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _to_error_detail(error: relay_pb2.StreamError) -> ErrorDetail:
    retry_after: float | None = None
    if error.HasField("retry_after"):
        retry_after = error.retry_after.seconds + error.retry_after.nanos / 1e9
    return ErrorDetail(
        type=_enum_name(error.type, "ERROR_TYPE_", relay_pb2.ErrorType),
        code=error.code,
        message=error.message,
        retryable=error.retryable,
        suggested_action=_enum_name(
            error.suggested_action, "SUGGESTED_ACTION_", relay_pb2.SuggestedAction
        ),
        fatal=error.fatal,
        bytes_received=error.bytes_received,
        tokens_received=error.tokens_received,
        provider=error.provider,
        attempt=error.attempt,
        retry_after_s=retry_after,
    )


def _cancel_request(reason: str) -> relay_pb2.StreamRequest:
    return relay_pb2.StreamRequest(cancel=relay_pb2.Cancel(reason=reason))


__all__ = [
    "RelayClient",
    "RelayStream",
    "Result",
    "advised_wait",
    "assemble_tool_calls",
    "backoff_delay",
    "chunk_record",
    "is_transient",
    "reconnect_wait",
    "start_retry_wait",
    "text_sha256",
    "tool_result",
    "verify_assembly",
]
