"""The `tokenrelay.v1.Relay` servicer: protobuf in, protobuf out.

Everything protobuf stays here. Requests are validated into `StartRequest`
before the hub sees them; hub entries become `StreamEvent`s; our exceptions
become gRPC statuses through one table (`STATUS_FOR`). An exception that is
not ours is logged and reported as INTERNAL with an incident id: a client
never sees a bare UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf.duration_pb2 import Duration

from tokenrelay.v1 import relay_pb2, relay_pb2_grpc
from tokenrelay_server.api.tokens import ResumeTokens
from tokenrelay_server.core.errors import (
    Draining,
    Fault,
    Overloaded,
    RequestError,
    ResumeDenied,
    StreamNotFound,
    TokenRelayError,
)
from tokenrelay_server.core.model import (
    ROLES,
    Chunk,
    End,
    GenerationParams,
    LogEntry,
    Message,
    Notice,
    RecoveryPolicy,
    StartRequest,
)
from tokenrelay_server.engine.hub import Session, StreamHub

log = logging.getLogger(__name__)

# Our errors → gRPC status. Most specific class first.
STATUS_FOR: tuple[tuple[type[TokenRelayError], grpc.StatusCode], ...] = (
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ResumeDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StreamNotFound, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Draining, grpc.StatusCode.UNAVAILABLE),
)

MAX_MODEL_CHARS = 256
MAX_MESSAGES = 1_000
MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 4_096
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOKENS_LIMIT = 1_000_000
MAX_RETRIES_LIMIT = 100


def status_for(error: TokenRelayError) -> grpc.StatusCode:
    for error_class, code in STATUS_FOR:
        if isinstance(error, error_class):
            return code
    return grpc.StatusCode.INTERNAL


# --- requests ---------------------------------------------------------------------------


def parse_start(start: relay_pb2.StartGeneration, *, max_prompt_bytes: int) -> StartRequest:
    """Validate a StartGeneration; a problem raises RequestError naming the field."""
    model = start.model.strip()
    if not model:
        raise RequestError("start.model is empty; name a model alias such as 'sim'")
    if len(model) > MAX_MODEL_CHARS:
        raise RequestError(f"start.model is longer than {MAX_MODEL_CHARS} characters")
    if not start.messages:
        raise RequestError("start.messages is empty; send at least one message")
    if len(start.messages) > MAX_MESSAGES:
        raise RequestError(
            f"start.messages has {len(start.messages)} messages; the limit is {MAX_MESSAGES}"
        )
    messages: list[Message] = []
    total_bytes = 0
    for index, message in enumerate(start.messages):
        if message.role not in ROLES:
            raise RequestError(
                f"start.messages[{index}].role is {message.role!r}; use one of {', '.join(ROLES)}"
            )
        size = len(message.content.encode())
        total_bytes += size
        if total_bytes > max_prompt_bytes:
            raise RequestError(
                f"start.messages[{index}].content takes the prompt to {total_bytes} bytes; "
                f"the limit is {max_prompt_bytes}"
            )
        messages.append(Message(message.role, message.content))  # type: ignore[arg-type]
    params = start.params
    if params.HasField("max_tokens") and not 1 <= params.max_tokens <= MAX_TOKENS_LIMIT:
        raise RequestError(f"start.params.max_tokens must be 1..{MAX_TOKENS_LIMIT}")
    if params.HasField("temperature") and not (
        math.isfinite(params.temperature) and 0 <= params.temperature <= 2
    ):
        raise RequestError("start.params.temperature must be between 0 and 2")
    if params.HasField("top_p") and not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise RequestError("start.params.top_p must be greater than 0 and at most 1")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"start.params.stop has more than {MAX_STOP_SEQUENCES} sequences")
    for index, stop in enumerate(params.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise RequestError(f"start.params.stop[{index}] must be 1..{MAX_STOP_CHARS} characters")
    policy = start.policy
    if policy.HasField("checkpoint_interval") and policy.checkpoint_interval < 1:
        raise RequestError("start.policy.checkpoint_interval must be at least 1")
    if policy.HasField("max_retries") and policy.max_retries > MAX_RETRIES_LIMIT:
        raise RequestError(f"start.policy.max_retries must be at most {MAX_RETRIES_LIMIT}")
    if len(start.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise RequestError(
            f"start.idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    if len(start.metadata) > MAX_METADATA_ENTRIES:
        raise RequestError(f"start.metadata has more than {MAX_METADATA_ENTRIES} entries")
    for key, value in start.metadata.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise RequestError(
                f"start.metadata key {key[:40]!r} must be 1..{MAX_METADATA_KEY_CHARS} characters"
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise RequestError(
                f'start.metadata["{key}"] is longer than {MAX_METADATA_VALUE_CHARS} characters'
            )
    return StartRequest(
        model=model,
        messages=tuple(messages),
        params=GenerationParams(
            max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
            temperature=params.temperature if params.HasField("temperature") else None,
            top_p=params.top_p if params.HasField("top_p") else None,
            stop=tuple(params.stop),
        ),
        idempotency_key=start.idempotency_key,
        policy=RecoveryPolicy(
            max_retries=policy.max_retries if policy.HasField("max_retries") else None,
            allow_fallback=policy.allow_fallback if policy.HasField("allow_fallback") else None,
            allow_partial=policy.allow_partial if policy.HasField("allow_partial") else None,
            checkpoint_interval=(
                policy.checkpoint_interval if policy.HasField("checkpoint_interval") else None
            ),
        ),
        metadata=tuple(sorted(start.metadata.items())),
    )


# --- events -----------------------------------------------------------------------------


def fault_to_proto(fault: Fault) -> relay_pb2.StreamError:
    error = relay_pb2.StreamError(
        type=int(fault.type),  # type: ignore[arg-type]
        code=fault.code,
        message=fault.message,
        retryable=fault.retryable,
        suggested_action=int(fault.suggested_action),  # type: ignore[arg-type]
        fatal=fault.fatal,
        bytes_received=fault.bytes_received,
        tokens_received=fault.tokens_received,
        provider=fault.provider,
        attempt=fault.attempt,
    )
    if fault.retry_after_s is not None:
        retry_after = Duration()
        retry_after.FromNanoseconds(int(fault.retry_after_s * 1e9))
        error.retry_after.CopyFrom(retry_after)
    return error


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
    )
    if end.error is not None:
        message.error.CopyFrom(fault_to_proto(end.error))
    return message


# --- the servicer -------------------------------------------------------------------------


class TokenCache:
    """Fresh resume tokens for one call, signed again only when the expiry they
    carry (whole seconds) moves on: until then a new one would be identical."""

    def __init__(self, tokens: ResumeTokens, stream_id: str) -> None:
        self._tokens = tokens
        self._stream_id = stream_id
        self._expiry = -1
        self._token = ""

    def current(self) -> str:
        expiry = self._tokens.expiry()
        if expiry != self._expiry:
            self._expiry = expiry
            self._token = self._tokens.issue(self._stream_id, expiry)
        return self._token


class RelayServicer(relay_pb2_grpc.RelayServicer):
    def __init__(self, hub: StreamHub, tokens: ResumeTokens, *, max_prompt_bytes: int) -> None:
        self._hub = hub
        self._tokens = tokens
        self._max_prompt_bytes = max_prompt_bytes

    async def Stream(
        self,
        request_iterator: AsyncIterator[relay_pb2.StreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[relay_pb2.StreamEvent]:
        try:
            session = await self._open(request_iterator, context.time_remaining())
        except TokenRelayError as error:
            await context.abort(status_for(error), str(error))
        except Exception:
            await self._abort_internal(context, "opening a stream")
        reader = asyncio.create_task(self._read_rest(request_iterator, session))
        try:
            yield relay_pb2.StreamEvent(
                started=relay_pb2.StreamStarted(
                    stream_id=session.stream_id,
                    resume_token=self._tokens.issue(session.stream_id),
                    resumed=session.resumed,
                    model=session.meta.model,
                )
            )
            interval = session.meta.checkpoint_interval
            tokens = TokenCache(self._tokens, session.stream_id)
            async with contextlib.aclosing(self._hub.follow(session)) as batches:
                async for batch in batches:
                    for entry in batch:
                        yield self._event(entry)
                        if isinstance(entry, Chunk) and entry.seq % interval == 0:
                            yield relay_pb2.StreamEvent(
                                checkpoint=relay_pb2.Checkpoint(
                                    seq=entry.seq,
                                    token_count=entry.tokens_so_far,
                                    resume_token=tokens.current(),
                                )
                            )
        except TokenRelayError as error:
            await context.abort(status_for(error), str(error))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            await self._abort_internal(context, f"streaming {session.stream_id}")
        finally:
            self._hub.release(session)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _open(
        self,
        request_iterator: AsyncIterator[relay_pb2.StreamRequest],
        deadline_s: float | None,
    ) -> Session:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            raise RequestError(
                "the call ended before its first message (`start` or `resume`)"
            ) from None
        kind = first.WhichOneof("kind")
        if kind == "start":
            return await self._hub.start(
                parse_start(first.start, max_prompt_bytes=self._max_prompt_bytes),
                deadline_s=deadline_s,
            )
        if kind == "resume":
            grant = self._tokens.verify(first.resume.resume_token)
            return await self._hub.resume(grant.stream_id, first.resume.last_seq)
        raise RequestError(
            f"the first message must be `start` or `resume`, not `{kind or 'an empty request'}`"
        )

    async def _read_rest(
        self, request_iterator: AsyncIterator[relay_pb2.StreamRequest], session: Session
    ) -> None:
        """Messages after the first: acks and cancels; anything else ends the
        call with INVALID_ARGUMENT (the stream itself keeps running)."""
        try:
            async for request in request_iterator:
                kind = request.WhichOneof("kind")
                if kind == "ack":
                    session.subscription.acked_seq = max(
                        session.subscription.acked_seq, request.ack.seq
                    )
                elif kind == "cancel":
                    await self._hub.cancel(session, request.cancel.reason)
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
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the call broke; the main loop sees it too
            log.debug("stream %s: request reader ended: %r", session.stream_id, error)

    def _event(self, entry: LogEntry) -> relay_pb2.StreamEvent:
        if isinstance(entry, Chunk):
            return relay_pb2.StreamEvent(
                chunk=relay_pb2.TokenChunk(
                    seq=entry.seq, text=entry.text, provider=entry.provider, attempt=entry.attempt
                )
            )
        if isinstance(entry, Notice):
            return relay_pb2.StreamEvent(error=fault_to_proto(entry.fault))
        return relay_pb2.StreamEvent(end=end_to_proto(entry))

    async def _abort_internal(self, context: grpc.aio.ServicerContext, doing: str) -> None:
        incident = uuid.uuid4().hex[:12]
        log.exception("internal error while %s (incident %s)", doing, incident)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"internal error while {doing}; the server logged it as incident {incident}",
        )
