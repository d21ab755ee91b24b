"""A local OTLP/gRPC trace receiver: the `TraceService/Export` of the
OpenTelemetry protocol (the `opentelemetry-proto` definitions) on a
grpc.aio server, keeping what it receives. The tracing tests point a
gateway's OTLP exporter at it (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); the
observability benchmark sends its spans to one.

    receiver = await TraceReceiver.start()          # 127.0.0.1, a free port
    ... OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint ...
    spans = receiver.spans()                        # flattened, ids as hex
    await receiver.stop()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

Value = str | int | float | bool | bytes | list["Value"] | dict[str, "Value"] | None


def any_value(value: common_pb2.AnyValue) -> Value:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes_of(value.kvlist_value.values)
    if kind is None:
        return None
    result: Value = getattr(value, kind)
    return result


def attributes_of(pairs: object) -> dict[str, Value]:
    return {pair.key: any_value(pair.value) for pair in pairs}  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # "" for a root span
    kind: str  # "SERVER", "CLIENT", "INTERNAL", …
    attributes: dict[str, Value]
    events: list[tuple[str, dict[str, Value]]]
    links: list[tuple[str, str, dict[str, Value]]]  # (trace id, span id, attributes)
    status_code: str  # "STATUS_CODE_UNSET", "STATUS_CODE_OK", "STATUS_CODE_ERROR"
    status_message: str
    resource: dict[str, Value] = field(default_factory=dict)
    scope: str = ""

    @classmethod
    def from_proto(
        cls, span: trace_pb2.Span, resource: dict[str, Value], scope: str
    ) -> ReceivedSpan:
        return cls(
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            kind=trace_pb2.Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
            attributes=attributes_of(span.attributes),
            events=[(event.name, attributes_of(event.attributes)) for event in span.events],
            links=[
                (link.trace_id.hex(), link.span_id.hex(), attributes_of(link.attributes))
                for link in span.links
            ],
            status_code=trace_pb2.Status.StatusCode.Name(span.status.code),
            status_message=span.status.message,
            resource=resource,
            scope=scope,
        )


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span (or, with keep=False, only counts them)."""

    def __init__(self, *, keep: bool = True) -> None:
        self.keep = keep
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.span_count = 0
        self.export_calls = 0
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (http: no TLS)."""
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    async def start(cls, *, keep: bool = True, host: str = "127.0.0.1") -> TraceReceiver:
        receiver = cls(keep=keep)
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
        receiver.port = server.add_insecure_port(f"{host}:0")
        await server.start()
        receiver._server = server
        return receiver

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.5)
            self._server = None

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[
            trace_service_pb2.ExportTraceServiceRequest,
            trace_service_pb2.ExportTraceServiceResponse,
        ],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.export_calls += 1
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.span_count += len(scope_spans.spans)
        if self.keep:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in the order they came."""
        found: list[ReceivedSpan] = []
        for request in self.requests:
            for resource_spans in request.resource_spans:
                resource = attributes_of(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(
                            ReceivedSpan.from_proto(span, resource, scope_spans.scope.name)
                        )
        return found
