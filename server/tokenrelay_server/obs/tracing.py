"""Traces (issue 11): OpenTelemetry spans of every call and of what the
engine does for it.

    /tokenrelay.v1.Relay/Stream   SERVER span of a call (opentelemetry-instrumentation-grpc);
     │                            a W3C `traceparent` in the call's metadata is its parent
     └─ tokenrelay.stream         one generation on this replica, StreamStarted (or
         │                        TakenOver) to StreamEnded; it outlives the call when the
         │                        client goes away (guarantee 4)
         ├─ tokenrelay.attempt    one upstream call, AttemptStarted to AttemptEnded; a call
         │                        an open breaker refused is an instant span, outcome "refused"
         └─ tokenrelay.recovery   a decision (retry, resume, fallback) from when it was made
                                  to the next attempt, so its length is the wait; a takeover
                                  is an instant one under the stream that was taken over
    /tokenrelay.v1.Relay/Stream   a resume: tokenrelay.stream_id and tokenrelay.after_seq, and
                                  a link to the stream's tokenrelay.stream span

The engine's events (engine/events.py) are the only input: `StreamTracer`
is an observer, called synchronously where the thing happens. A stream's
spans are parented explicitly on its tokenrelay.stream span (kept per
stream), not through the current context. That span's parent is the span
current when StreamStarted is told: the hub tells it from the start call's
handler, under the call's SERVER span (the interceptor's async generator
attaches it in the handler's task). The generation task, created there, also
inherits that context, so the log lines it writes carry the call's trace id
(obs/logs.py); tests/test_tracing.py checks both.

Links: a resume links to the tokenrelay.stream span of its stream when this
replica generated or took over that stream (a bounded map of span
contexts). A stream generated on another replica has no context here to link
to: the context is not stored with the stream.

Never an attribute, an event or a link: gRPC metadata (the instrumentation
would copy the call's user-agent header into `rpc.user_agent`;
`WithoutMetadata` drops it), prompts, answers, keys, resume tokens, and
provider error messages (they can quote the request): an error is its type
and code.

`--otel-exporter none` builds none of this: no interceptor, no observer,
nothing on the hot path.
"""

from __future__ import annotations

import asyncio
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Literal, TextIO

import grpc
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import Sampler, SamplingResult
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes, AttributeValue

from tokenrelay_server.core.errors import Fault
from tokenrelay_server.engine.events import (
    AttemptEnded,
    AttemptStarted,
    EngineEvent,
    ReaderAttached,
    RecoveryAction,
    StreamEnded,
    StreamStarted,
    TakenOver,
)

Exporter = Literal["none", "console", "otlp"]

# Span names.
STREAM_SPAN = "tokenrelay.stream"
ATTEMPT_SPAN = "tokenrelay.attempt"
RECOVERY_SPAN = "tokenrelay.recovery"

# Attribute names (README, "Tracing and logs").
STREAM_ID = "tokenrelay.stream_id"
MODEL = "tokenrelay.model"  # the alias the client asked for
PROVIDER = "tokenrelay.provider"
UPSTREAM_MODEL = "tokenrelay.upstream_model"
ATTEMPT = "tokenrelay.attempt"
CONTINUATION = "tokenrelay.continuation"
OUTCOME = "tokenrelay.outcome"
ERROR_TYPE = "tokenrelay.error.type"
ERROR_CODE = "tokenrelay.error.code"
ERROR_RETRYABLE = "tokenrelay.error.retryable"
TOKENS_RECEIVED = "tokenrelay.tokens_received"
BYTES_RECEIVED = "tokenrelay.bytes_received"
COMPLETION_TOKENS = "tokenrelay.completion_tokens"
PROMPT_TOKENS = "tokenrelay.prompt_tokens"
TIME_TO_FIRST_TOKEN_S = "tokenrelay.time_to_first_token_s"
STEP = "tokenrelay.recovery.step"
FROM_PROVIDER = "tokenrelay.recovery.from_provider"
TO_PROVIDER = "tokenrelay.recovery.to_provider"
DELAY_S = "tokenrelay.recovery.delay_s"
AT_SEQ = "tokenrelay.at_seq"
RESUMED = "tokenrelay.resumed"
AFTER_SEQ = "tokenrelay.after_seq"
FINISH_REASON = "tokenrelay.finish_reason"
PARTIAL = "tokenrelay.partial"
TOTAL_SEQ = "tokenrelay.total_seq"
ATTEMPTS = "tokenrelay.attempts"
TAKEN_OVER = "tokenrelay.taken_over"
UNFINISHED = "tokenrelay.unfinished"  # ended by the tracer (shutdown, eviction), not the engine
LINK_KIND = "tokenrelay.link"

# What the gRPC instrumentation copies from a call's metadata into attributes.
METADATA_ATTRIBUTES = frozenset({"rpc.user_agent"})
# Health probes come every few seconds from load balancers: noise, not traces.
UNTRACED_SERVICES = ("grpc.health.v1.Health",)

MAX_LIVE_STREAMS = 100_000
MAX_LINKABLE_STREAMS = 100_000


class WithoutMetadata(Sampler):
    """Another sampler's decision, for a span without the attributes the
    gRPC instrumentation takes from the call's metadata. (The SDK makes a
    span's initial attributes the ones its sampler returns, which is the one
    place they can be dropped before anything sees them.)"""

    def __init__(self, inner: Sampler) -> None:
        self._inner = inner

    def should_sample(
        self,
        parent_context: context_api.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if attributes and not METADATA_ATTRIBUTES.isdisjoint(attributes):
            attributes = {k: v for k, v in attributes.items() if k not in METADATA_ATTRIBUTES}
        return self._inner.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"WithoutMetadata{{{self._inner.get_description()}}}"


def span_exporter(kind: Exporter, *, console: TextIO | None = None) -> SpanExporter:
    """The exporter `--otel-exporter` names. `otlp` is OTLP over gRPC, set up
    by the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT or
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, _HEADERS, _INSECURE, _CERTIFICATE,
    _TIMEOUT, _COMPRESSION), read by the exporter itself."""
    if kind == "console":
        return ConsoleSpanExporter(out=console or sys.stdout)
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    raise ValueError(f"--otel-exporter {kind!r} exports nothing; build no Tracing for it")


def service_resource(replica_id: str) -> Resource:
    """service.name "tokenrelay" unless OTEL_SERVICE_NAME or
    OTEL_RESOURCE_ATTRIBUTES name one; the replica as service.instance.id."""
    attributes: dict[str, AttributeValue] = {"service.instance.id": replica_id}
    try:
        attributes["service.version"] = version("tokenrelay")
    except PackageNotFoundError:
        pass
    resource = Resource.create(attributes)
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "tokenrelay"}))
    return resource


class Tracing:
    """One replica's tracing: its TracerProvider (never the global one), the
    server interceptor, the engine observer, and their shutdown."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        replica_id: str,
        processor: SpanProcessor | None = None,
    ) -> None:
        self.provider = TracerProvider(
            resource=service_resource(replica_id), shutdown_on_exit=False
        )
        # Before any tracer exists: tracers take the provider's sampler when
        # they are made. The inner one is the SDK's choice (OTEL_TRACES_SAMPLER).
        self.provider.sampler = WithoutMetadata(self.provider.sampler)
        self.provider.add_span_processor(processor or BatchSpanProcessor(exporter))
        self.observer = StreamTracer(self.provider.get_tracer("tokenrelay"))
        self._closed = False

    def server_interceptor(self) -> grpc.aio.ServerInterceptor:
        untraced = filters.any_of(*(filters.service_name(name) for name in UNTRACED_SERVICES))
        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=self.provider, filter_=filters.negate(untraced)
        )
        return interceptor

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every ended span now (blocks: call it from a thread when
        the receiver runs on this event loop)."""
        return bool(self.provider.force_flush(timeout_millis))

    async def shutdown(self) -> None:
        """End what is still open, export it, stop the exporter's thread."""
        if self._closed:
            return
        self._closed = True
        self.observer.close()
        # The exporter sends from its own thread; waiting for it must not
        # block the event loop (a receiver may be running on it).
        await asyncio.to_thread(self.provider.shutdown)


@dataclass(eq=False, slots=True)
class _TracedStream:
    span: Span
    context: context_api.Context  # the span as a parent
    attempts: dict[int, Span] = field(default_factory=dict)
    waiting: Span | None = None  # a recovery span, until the next attempt


def _fault_attributes(fault: Fault) -> dict[str, AttributeValue]:
    return {
        ERROR_TYPE: fault.type.name.lower(),
        ERROR_CODE: fault.code,
        ERROR_RETRYABLE: fault.retryable,
    }


class StreamTracer:
    """The engine observer that makes the tokenrelay.* spans (module doc)."""

    observes_chunks = False  # nothing to trace per chunk

    def __init__(
        self,
        tracer: trace.Tracer,
        *,
        max_live_streams: int = MAX_LIVE_STREAMS,
        max_linkable_streams: int = MAX_LINKABLE_STREAMS,
    ) -> None:
        self._tracer = tracer
        self._live: dict[str, _TracedStream] = {}
        self._linkable: OrderedDict[str, SpanContext] = OrderedDict()
        self._max_live = max_live_streams
        self._max_linkable = max_linkable_streams

    def __call__(self, event: EngineEvent) -> None:
        match event:
            case AttemptStarted():
                self._attempt_started(event)
            case AttemptEnded():
                self._attempt_ended(event)
            case RecoveryAction():
                self._recovery_action(event)
            case StreamStarted():
                self._stream(event.stream_id, event.model, {})
            case StreamEnded():
                self._stream_ended(event)
            case ReaderAttached():
                self._reader_attached(event)
            case TakenOver():
                self._taken_over(event)
            case _:
                return

    def close(self) -> None:
        """End every span still open (the replica is stopping)."""
        while self._live:
            _, traced = self._live.popitem()
            self._end_all(traced)

    # -- streams -----------------------------------------------------------------------

    def _stream(
        self,
        stream_id: str,
        model: str,
        attributes: dict[str, AttributeValue],
        links: Sequence[Link] = (),
    ) -> _TracedStream:
        """Start a stream's span, under the current span (the call's)."""
        if len(self._live) >= self._max_live:
            # Only streams whose End never came (their task was cancelled
            # at a shutdown that could not wait) can pile up: end the oldest.
            self._end_all(self._live.pop(next(iter(self._live))))
        span = self._tracer.start_span(
            STREAM_SPAN,
            attributes={STREAM_ID: stream_id, MODEL: model, **attributes},
            links=links,
        )
        traced = _TracedStream(span, trace.set_span_in_context(span))
        self._live[stream_id] = traced
        self._linkable[stream_id] = span.get_span_context()
        self._linkable.move_to_end(stream_id)
        if len(self._linkable) > self._max_linkable:
            self._linkable.popitem(last=False)
        return traced

    def _traced(self, stream_id: str, model: str) -> _TracedStream:
        traced = self._live.get(stream_id)
        if traced is None:  # not seen starting here (an observer added late)
            traced = self._stream(stream_id, model, {})
        return traced

    def _end_wait(self, traced: _TracedStream) -> None:
        if traced.waiting is not None:
            traced.waiting.end()
            traced.waiting = None

    def _end_all(self, traced: _TracedStream) -> None:
        self._end_wait(traced)
        for span in traced.attempts.values():
            span.set_attribute(UNFINISHED, True)
            span.end()
        traced.attempts.clear()
        traced.span.set_attribute(UNFINISHED, True)
        traced.span.end()

    def _stream_ended(self, event: StreamEnded) -> None:
        traced = self._live.pop(event.stream_id, None)
        if traced is None:
            return
        self._end_wait(traced)
        for span in traced.attempts.values():  # none: every attempt ended first
            span.end()
        end = event.end
        span = traced.span
        span.set_attributes(
            {
                FINISH_REASON: end.finish_reason,
                PARTIAL: end.partial,
                TOTAL_SEQ: end.total_seq,
                ATTEMPTS: event.attempts,
                COMPLETION_TOKENS: end.usage.completion_tokens,
                PROMPT_TOKENS: end.usage.prompt_tokens,
            }
        )
        if end.error is not None:
            span.set_attributes(_fault_attributes(end.error))
            # A client's own cancel is what it asked for, not a failure.
            if end.partial and end.error.code != "CANCELLED":
                span.set_status(Status(StatusCode.ERROR, end.error.code))
        span.end()

    def _taken_over(self, event: TakenOver) -> None:
        """This replica continues a stream whose owner died: a new stream
        span under the call that noticed (a resume), linked to the stream's
        earlier span when this replica had one, and an instant recovery span."""
        previous = self._linkable.get(event.stream_id)
        links = [Link(previous, {LINK_KIND: "previous_owner"})] if previous is not None else []
        traced = self._live.get(event.stream_id)
        if traced is None:
            traced = self._stream(
                event.stream_id, event.model, {TAKEN_OVER: True, AT_SEQ: event.at_seq}, links
            )
        self._tracer.start_span(
            RECOVERY_SPAN,
            context=traced.context,
            attributes={STREAM_ID: event.stream_id, STEP: "takeover", AT_SEQ: event.at_seq},
        ).end()

    def _reader_attached(self, event: ReaderAttached) -> None:
        """The call that attached (the current span is its SERVER span):
        which stream it reads, and for a resume a link to the stream's span."""
        call = trace.get_current_span()
        if not call.is_recording():
            return
        call.set_attributes(
            {STREAM_ID: event.stream_id, RESUMED: event.resumed, AFTER_SEQ: event.after_seq}
        )
        if event.resumed:
            target = self._linkable.get(event.stream_id)
            if target is not None:
                call.add_link(target, {LINK_KIND: "stream"})

    # -- attempts and recovery ---------------------------------------------------------

    def _attempt_started(self, event: AttemptStarted) -> None:
        traced = self._traced(event.stream_id, event.model)
        self._end_wait(traced)
        span = self._attempt_span(traced, event)
        span.set_attribute(CONTINUATION, event.continuation)
        traced.attempts[event.attempt] = span

    def _attempt_ended(self, event: AttemptEnded) -> None:
        traced = self._traced(event.stream_id, event.model)
        self._end_wait(traced)
        # A refused attempt made no call and had no start: an instant span.
        span = traced.attempts.pop(event.attempt, None) if event.outcome != "refused" else None
        if span is None:
            span = self._attempt_span(traced, event)
        attributes: dict[str, AttributeValue] = {
            OUTCOME: event.outcome,
            TOKENS_RECEIVED: event.deltas,
            BYTES_RECEIVED: event.bytes_received,
        }
        if event.completion_tokens:
            attributes[COMPLETION_TOKENS] = event.completion_tokens
        if event.first_token_s is not None:
            attributes[TIME_TO_FIRST_TOKEN_S] = event.first_token_s
        if event.fault is not None:
            attributes.update(_fault_attributes(event.fault))
            span.set_status(Status(StatusCode.ERROR, event.fault.code))
        span.set_attributes(attributes)
        span.end()

    def _attempt_span(self, traced: _TracedStream, event: AttemptStarted | AttemptEnded) -> Span:
        return self._tracer.start_span(
            ATTEMPT_SPAN,
            context=traced.context,
            kind=SpanKind.CLIENT,
            attributes={
                STREAM_ID: event.stream_id,
                PROVIDER: event.provider,
                UPSTREAM_MODEL: event.upstream_model,
                ATTEMPT: event.attempt,
            },
        )

    def _recovery_action(self, event: RecoveryAction) -> None:
        traced = self._traced(event.stream_id, event.model)
        self._end_wait(traced)
        traced.waiting = self._tracer.start_span(
            RECOVERY_SPAN,
            context=traced.context,
            attributes={
                STREAM_ID: event.stream_id,
                STEP: event.step,
                FROM_PROVIDER: event.from_provider,
                TO_PROVIDER: event.to_provider,
                DELAY_S: event.delay_s,
                AT_SEQ: event.at_seq,
                **_fault_attributes(event.fault),
            },
        )
