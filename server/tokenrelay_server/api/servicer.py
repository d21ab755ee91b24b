"""The `tokenrelay.v1.Relay` servicer: protobuf in, protobuf out.

Everything protobuf stays here. Requests are validated into `StartRequest`
before the hub sees them; hub entries become `StreamEvent`s; our exceptions
become gRPC statuses through one table (`STATUS_FOR`). An exception that is
not ours is logged and reported as INTERNAL with an incident id: a client
never sees a bare UNKNOWN.

Input the servicer guards before anything else sees it:
- a request frame that does not decode as a StreamRequest (grpc's
  deserializer raises DecodeError out of the request iterator):
  INVALID_ARGUMENT, for the first message and for later ones (`Requests`);
- a call that sends no first message: DEADLINE_EXCEEDED after
  `first_message_timeout_s` on the injected clock;
- free text that comes back to clients (the cancel reason in the End other
  readers get) is cut to `MAX_CANCEL_REASON_CHARS`.

`policy.allow_partial = false` (per call, stored with the stream, so it
holds for every reader, resumes included; unset: the gateway's
`allow_partial`): when the gateway gives up, the call fails with a status
from `status_for_fault` whose rich details (grpc-status-details-bin, a
google.rpc.Status) carry the StreamError, an ErrorInfo with the stream id,
total_seq and text_sha256, and RetryInfo when the provider said how long to
wait, instead of ending with `end.partial = true`. Chunks already delivered
stay delivered; only the ending differs. A client's own `cancel` still ends
with `end` (finish_reason "cancelled"): it is what the caller asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenrelay.v1 import relay_pb2, relay_pb2_grpc
from tokenrelay_server.api.auth import Authenticator, Identity
from tokenrelay_server.api.calls import cancel_within
from tokenrelay_server.api.requests import parse_start
from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.config.tenants import AuthConfig
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import (
    AuthUnavailable,
    Draining,
    ErrorType,
    Fault,
    FirstMessageTimeout,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    QuotaUnavailable,
    RequestError,
    ResumeDenied,
    StreamNotFound,
    TakeoverRefused,
    TokenRelayError,
    Unauthenticated,
    truncate,
)
from tokenrelay_server.core.limits import RequestLimits
from tokenrelay_server.core.model import Chunk, End, LogEntry, Notice
from tokenrelay_server.engine.hub import Session, StreamHub, tenant_of
from tokenrelay_server.store.errors import StoreError

log = logging.getLogger(__name__)

# Our errors → gRPC status. Most specific class first.
STATUS_FOR: tuple[tuple[type[TokenRelayError], grpc.StatusCode], ...] = (
    (FirstMessageTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (ResumeDenied, grpc.StatusCode.PERMISSION_DENIED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StreamNotFound, grpc.StatusCode.NOT_FOUND),
    (QuotaExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # A takeover this replica has no room for: the stream is intact; resume
    # it elsewhere (clients reconnect on UNAVAILABLE), or here later.
    (TakeoverRefused, grpc.StatusCode.UNAVAILABLE),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining, grpc.StatusCode.UNAVAILABLE),
    # The store is unreachable, or another replica took the stream over
    # (store/errors.py): resume, here later or on another replica.
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (AuthUnavailable, grpc.StatusCode.UNAVAILABLE),
    (QuotaUnavailable, grpc.StatusCode.UNAVAILABLE),
)

# A cancel reason is repeated in the End every reader of the stream gets.
MAX_CANCEL_REASON_CHARS = 512
# google.rpc.ErrorInfo.domain of the details of a refused partial.
ERROR_DOMAIN = "tokenrelay.v1"
REQUEST_TYPE = relay_pb2.StreamRequest.DESCRIPTOR.full_name


def status_for(error: TokenRelayError) -> grpc.StatusCode:
    for error_class, code in STATUS_FOR:
        if isinstance(error, error_class):
            return code
    return grpc.StatusCode.INTERNAL


def _packed(*details: Any) -> list[any_pb2.Any]:
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return packed


def error_status(error: TokenRelayError) -> grpc.Status | None:
    """The rich status (google.rpc.Status details) of an error that has more
    to say than its message: a spent quota (ErrorInfo naming the tenant and
    the limit, RetryInfo), a refused resume token (ErrorInfo with the reason),
    load shed (`overloaded_status`). None: a plain status will do."""
    if isinstance(error, Overloaded):
        return overloaded_status(error)
    code = status_for(error)
    details: list[Message]
    if isinstance(error, QuotaExceeded):
        details = [
            error_details_pb2.ErrorInfo(
                reason="QUOTA_EXCEEDED",
                domain=ERROR_DOMAIN,
                metadata={"tenant": error.tenant, "limit": error.limit},
            ),
            retry_info(error.retry_after_s),
        ]
    elif isinstance(error, ResumeDenied):
        details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)]
    else:
        return None
    return status_with(code, str(error), details)


def status_for_fault(fault: Fault) -> grpc.StatusCode:
    """The status of a call that refused partial answers, from the StreamError
    the gateway gave up with. Never UNKNOWN or INTERNAL: an upstream failure
    is not a gateway bug."""
    if fault.code == "DEADLINE_EXCEEDED":  # the caller's own gRPC deadline
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if fault.type is ErrorType.RESOURCE:  # a size cap, the memory limit
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if fault.retryable:  # resets, timeouts, 429/5xx, shutdown, owner lost, breakers
        return grpc.StatusCode.UNAVAILABLE
    # Not recoverable as things are (the provider refused the request or its
    # credentials, sent garbage): retrying the same call would fail the same way.
    return grpc.StatusCode.FAILED_PRECONDITION


def refuses_partial(end: End, allow_partial: bool) -> bool:
    """Whether this End becomes a failed call: the gateway gave up on a stream
    whose caller refused partials. A client's cancel is not giving up."""
    return (
        end.partial
        and not allow_partial
        and end.error is not None
        and end.error.code != "CANCELLED"
    )


def refused_partial_status(stream_id: str, end: End) -> grpc.Status:
    """The rich status (google.rpc.Status in grpc-status-details-bin) that
    replaces a partial End for a caller with policy.allow_partial = false."""
    fault = end.error
    assert fault is not None
    code = status_for_fault(fault)
    info = error_details_pb2.ErrorInfo(
        reason=fault.code,
        domain=ERROR_DOMAIN,
        metadata={
            "stream_id": stream_id,
            "total_seq": str(end.total_seq),
            "text_sha256": end.text_sha256,
            "chunks_sha256": end.chunks_sha256,
        },
    )
    details: list[Message] = [fault_to_proto(fault), info]
    if fault.retry_after_s is not None:
        details.append(retry_info(fault.retry_after_s))
    message = (
        f"stream {stream_id} failed with {fault.code}: {fault.message} "
        f"(policy.allow_partial is false, so the call fails instead of ending with "
        f"end.partial = true; {end.total_seq} chunk(s) were delivered)"
    )
    return status_with(code, message, details)


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = Duration()
    delay.FromNanoseconds(int(seconds * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def status_with(code: grpc.StatusCode, message: str, details: Sequence[Message]) -> grpc.Status:
    """A status with rich details (google.rpc.Status in grpc-status-details-bin)."""
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=_packed(*details))
    )
    return status


# Trailing metadata of a refused start: how long to wait, in whole milliseconds
# (the header OpenAI's and Anthropic's clients read; our own gRPC clients read
# the RetryInfo, which says the same).
RETRY_AFTER_MS = "retry-after-ms"


def overloaded_status(error: Overloaded) -> grpc.Status:
    """The status of load shed (RESOURCE_EXHAUSTED for a refused start,
    UNAVAILABLE for a refused takeover), with a google.rpc.ErrorInfo naming
    the limit and, when the refusal says how long to wait, a
    google.rpc.RetryInfo and `retry-after-ms` trailing metadata."""
    code = status_for(error)
    details: list[Message] = []
    if error.reason:
        details.append(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    if error.retry_after_s is not None:
        details.append(retry_info(error.retry_after_s))
    status = status_with(code, str(error), details)
    if error.retry_after_s is None:
        return status
    retry_after_ms = str(max(round(error.retry_after_s * 1000), 0))
    return _Status(
        code, status.details, (*status.trailing_metadata, (RETRY_AFTER_MS, retry_after_ms))
    )


class _Status(grpc.Status):
    """A grpc.Status (grpc_status builds one the same way, privately)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        trailing_metadata: tuple[tuple[str, str | bytes], ...],
    ) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


# --- events -----------------------------------------------------------------------------


def fault_to_proto(fault: Fault) -> relay_pb2.StreamError:
    error = relay_pb2.StreamError(
        # The core enums' values are the proto's (errors.py); ValueType is int.
        type=relay_pb2.ErrorType.ValueType(fault.type),
        code=fault.code,
        message=fault.message,
        retryable=fault.retryable,
        suggested_action=relay_pb2.SuggestedAction.ValueType(fault.suggested_action),
        fatal=fault.fatal,
        bytes_received=fault.bytes_received,
        tokens_received=fault.tokens_received,
        provider=fault.provider,
        attempt=fault.attempt,
    )
    if fault.retry_after_s is not None:
        error.retry_after.CopyFrom(retry_info(fault.retry_after_s).retry_delay)
    return error


def chunk_event(chunk: Chunk) -> relay_pb2.StreamEvent:
    """The StreamEvent of a chunk. A text chunk (the per-token case) is
    written into the event's own submessage: half the cost of building a
    TokenChunk and copying it in (0.45 against 1.03 µs)."""
    if chunk.kind != "text":
        return relay_pb2.StreamEvent(chunk=chunk_to_proto(chunk))
    event = relay_pb2.StreamEvent()
    message = event.chunk
    message.seq = chunk.seq
    message.text = chunk.text  # (set even when empty: the `content` oneof says text)
    message.provider = chunk.provider
    message.attempt = chunk.attempt
    return event


def chunk_to_proto(chunk: Chunk) -> relay_pb2.TokenChunk:
    """A TokenChunk with exactly one of text, reasoning or tool_call set (the
    `content` oneof: an empty text is still set, so the kind is never lost)."""
    if chunk.kind == "text":  # the per-token case: one constructor call
        return relay_pb2.TokenChunk(
            seq=chunk.seq, text=chunk.text, provider=chunk.provider, attempt=chunk.attempt
        )
    message = relay_pb2.TokenChunk(seq=chunk.seq, provider=chunk.provider, attempt=chunk.attempt)
    if chunk.tool_call is not None:
        call = chunk.tool_call
        message.tool_call.CopyFrom(
            relay_pb2.ToolCallDelta(
                index=call.index, id=call.id, name=call.name, arguments=call.arguments
            )
        )
    elif chunk.kind == "reasoning":
        message.reasoning = chunk.text
    else:
        message.text = chunk.text
    return message


def end_to_proto(end: End) -> relay_pb2.StreamEnd:
    message = relay_pb2.StreamEnd(
        finish_reason=end.finish_reason,
        usage=relay_pb2.Usage(
            prompt_tokens=end.usage.prompt_tokens,
            completion_tokens=end.usage.completion_tokens,
        ),
        partial=end.partial,
        total_seq=end.total_seq,
        text_sha256=end.text_sha256,
        chunks_sha256=end.chunks_sha256,
    )
    if end.error is not None:
        message.error.CopyFrom(fault_to_proto(end.error))
    return message


# --- the servicer -------------------------------------------------------------------------


class TokenCache:
    """Fresh resume tokens for one call, signed again only when the expiry they
    carry (whole seconds) moves on: until then a new one would be identical."""

    def __init__(self, tokens: ResumeTokens, stream_id: str, tenant: str = "") -> None:
        self._tokens = tokens
        self._stream_id = stream_id
        self._tenant = tenant
        self._expiry = -1
        self._token = ""

    def current(self) -> str:
        expiry = self._tokens.expiry()
        if expiry != self._expiry:
            self._expiry = expiry
            self._token = self._tokens.issue(self._stream_id, expiry, tenant=self._tenant)
        return self._token


class Requests:
    """The requests of one call, decoded.

    grpc decodes each frame with StreamRequest.FromString while the servicer
    iterates, so a frame that is not a StreamRequest (a bad tag, a length past
    the end, invalid UTF-8 in a string, random bytes) comes out of the
    iterator as protobuf's DecodeError. Here it becomes a RequestError
    (INVALID_ARGUMENT) that says so."""

    def __init__(self, request_iterator: AsyncIterator[relay_pb2.StreamRequest]) -> None:
        self._iterator = aiter(request_iterator)

    async def next(self) -> relay_pb2.StreamRequest | None:
        """The next request; None when the client half-closed."""
        try:
            return await anext(self._iterator)
        except StopAsyncIteration:
            return None
        except DecodeError as error:
            # protobuf says "Error parsing message with type '…': <why>".
            why = str(error).rpartition(": ")[2] or "it does not parse"
            raise RequestError(
                f"the request frame is not a valid {REQUEST_TYPE} ({truncate(why, 200)}); "
                "send each message as a protobuf-encoded StreamRequest"
            ) from None


class _PartialRefused(Exception):
    """The stream ended partial and this call refused partials (internal to
    `Stream`: it becomes the call's status)."""

    def __init__(self, end: End) -> None:
        super().__init__(end.error.code if end.error is not None else "partial")
        self.end = end


class RelayServicer(relay_pb2_grpc.RelayServicer):
    def __init__(
        self,
        hub: StreamHub,
        tokens: ResumeTokens,
        *,
        max_prompt_bytes: int,
        limits: RequestLimits | None = None,
        clock: Clock,
        first_message_timeout_s: float = 10.0,
        allow_partial: bool = True,
        auth: Authenticator | None = None,
    ) -> None:
        self._hub = hub
        self._auth = auth or Authenticator(None, AuthConfig(), clock=clock)
        self._tokens = tokens
        self._max_prompt_bytes = max_prompt_bytes
        self._limits = limits or RequestLimits()
        self._clock = clock
        self._first_message_timeout_s = first_message_timeout_s
        self._allow_partial = allow_partial

    async def Stream(
        self,
        request_iterator: AsyncIterator[relay_pb2.StreamRequest],
        context: grpc.aio.ServicerContext[relay_pb2.StreamRequest, relay_pb2.StreamEvent],
    ) -> AsyncIterator[relay_pb2.StreamEvent]:
        requests = Requests(request_iterator)
        try:
            # The first message is read before anything is refused, the key
            # included: a client that is still sending it when the call is
            # refused would see grpc's "Internal error from Core", not the status.
            first = await self._first(requests)
            identity = await self._auth.authenticate(context.invocation_metadata())
            if identity.key_id:  # the key id, never the key
                log.debug("call with key %s (tenant %s)", identity.key_id, identity.tenant)
            session = await self._open(first, context.time_remaining(), identity)
        except TokenRelayError as error:
            await self._abort(context, error)
        except Exception:
            await self._abort_internal(context, "opening a stream")
        tenant = tenant_of(session.meta)
        # A resume token grants a read, nothing more (issue 13): a cancel
        # needs the tenant's credentials as well. With keys, a resumed call
        # carries a key of the token's tenant (the token is verified for the
        # key's tenant, so this holds by construction and is checked again
        # here). Open (no keys: loopback, or --allow-unauthenticated) every
        # caller is the one anonymous tenant, with no credential to ask for:
        # a resumed call may cancel as the starting call may, or a client
        # that reconnected could never cancel its own stream.
        may_cancel = identity.tenant == tenant
        reader = asyncio.create_task(self._read_rest(requests, session, may_cancel=may_cancel))
        allow_partial = self._allows_partial(session)
        try:
            yield relay_pb2.StreamEvent(
                started=relay_pb2.StreamStarted(
                    stream_id=session.stream_id,
                    resume_token=self._tokens.issue(session.stream_id, tenant=tenant),
                    resumed=session.resumed,
                    model=session.meta.model,
                )
            )
            interval = session.meta.checkpoint_interval
            tokens = TokenCache(self._tokens, session.stream_id, tenant)
            async with contextlib.aclosing(self._hub.follow(session)) as batches:
                async for batch in batches:
                    for entry in batch:
                        if type(entry) is Chunk:  # the per-token case first
                            yield chunk_event(entry)
                            if entry.seq % interval == 0:
                                yield relay_pb2.StreamEvent(
                                    checkpoint=relay_pb2.Checkpoint(
                                        seq=entry.seq,
                                        token_count=entry.tokens_so_far,
                                        resume_token=tokens.current(),
                                    )
                                )
                            continue
                        if isinstance(entry, End) and refuses_partial(entry, allow_partial):
                            raise _PartialRefused(entry)
                        yield self._event(entry)
        except _PartialRefused as refused:
            await context.abort_with_status(refused_partial_status(session.stream_id, refused.end))
        except TokenRelayError as error:
            await self._abort(context, error)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            await self._abort_internal(context, f"streaming {session.stream_id}")
        finally:
            self._hub.release(session)
            # Bounded: a read stuck in grpc must not keep the call open (issue 9).
            await cancel_within(reader)

    def _allows_partial(self, session: Session) -> bool:
        """The stream's own policy (stored with it: the same for every reader),
        else the gateway's setting."""
        request = session.meta.request
        if request is not None and request.policy.allow_partial is not None:
            return request.policy.allow_partial
        return self._allow_partial

    async def _abort(
        self,
        context: grpc.aio.ServicerContext[relay_pb2.StreamRequest, relay_pb2.StreamEvent],
        error: TokenRelayError,
    ) -> None:
        status = error_status(error)
        if status is not None:
            await context.abort_with_status(status)
        await context.abort(status_for(error), str(error))

    async def _first(self, requests: Requests) -> relay_pb2.StreamRequest:
        timeout_s = self._first_message_timeout_s
        try:
            # On the injected clock: a call that never speaks must not hold
            # its handler (and its reader) for ever.
            async with self._clock.deadline(timeout_s):
                first = await requests.next()
        except TimeoutError:
            raise FirstMessageTimeout(
                f"the first message (`start` or `resume`) did not arrive within {timeout_s:g} s "
                "of opening the call (the gateway's first_message_timeout_s); send it right "
                "after opening the call"
            ) from None
        if first is None:
            raise RequestError("the call ended before its first message (`start` or `resume`)")
        return first

    async def _open(
        self, first: relay_pb2.StreamRequest, deadline_s: float | None, identity: Identity
    ) -> Session:
        kind = first.WhichOneof("kind")
        if kind == "start":
            request = parse_start(
                first.start, max_prompt_bytes=self._max_prompt_bytes, limits=self._limits
            )
            identity.check_model(request.model)
            return await self._hub.start(request, deadline_s=deadline_s, caller=identity.caller)
        if kind == "resume":
            grant = self._tokens.verify(first.resume.resume_token, tenant=identity.tenant)
            return await self._hub.resume(
                grant.stream_id, first.resume.last_seq, tenant=identity.tenant
            )
        raise RequestError(
            f"the first message must be `start` or `resume`, not `{kind or 'an empty request'}`"
        )

    async def _read_rest(
        self, requests: Requests, session: Session, *, may_cancel: bool = True
    ) -> None:
        """Messages after the first: acks and cancels; anything else (another
        kind, an undecodable frame) ends the call with INVALID_ARGUMENT (the
        stream itself keeps running)."""
        try:
            while (request := await requests.next()) is not None:
                kind = request.WhichOneof("kind")
                if kind == "ack":
                    session.subscription.acked_seq = max(
                        session.subscription.acked_seq, request.ack.seq
                    )
                elif kind == "cancel" and not may_cancel:
                    session.subscription.fail(
                        PermissionDenied(
                            "a resume token grants a read of the stream, not a cancel: cancel "
                            "with the API key of the stream's tenant"
                        )
                    )
                    return
                elif kind == "cancel":
                    # Bounded before the hub sees it: the reason is repeated
                    # in the End (and the store) for every reader.
                    reason = truncate(request.cancel.reason, MAX_CANCEL_REASON_CHARS)
                    await self._hub.cancel(session, reason)
                else:
                    what = {"start": "a second `start`", "resume": "a `resume`"}.get(
                        kind or "", "an empty request"
                    )
                    session.subscription.fail(
                        RequestError(
                            f"{what} on a call that is already attached to stream "
                            f"{session.stream_id}; open a new call for it"
                        )
                    )
                    return
        except RequestError as error:  # an undecodable frame
            session.subscription.fail(error)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the call broke; the main loop sees it too
            log.debug("stream %s: request reader ended: %r", session.stream_id, error)

    def _event(self, entry: LogEntry) -> relay_pb2.StreamEvent:
        if isinstance(entry, Chunk):
            return chunk_event(entry)
        if isinstance(entry, Notice):
            return relay_pb2.StreamEvent(error=fault_to_proto(entry.fault))
        return relay_pb2.StreamEvent(end=end_to_proto(entry))

    async def _abort_internal(
        self,
        context: grpc.aio.ServicerContext[relay_pb2.StreamRequest, relay_pb2.StreamEvent],
        doing: str,
    ) -> None:
        incident = uuid.uuid4().hex[:12]
        log.exception("internal error while %s (incident %s)", doing, incident)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error while {doing}; the server logged it as incident {incident}",
        )
