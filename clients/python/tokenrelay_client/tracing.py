"""OpenTelemetry for the client, optional: interceptors that give each gRPC
call a CLIENT span and send the W3C trace context (`traceparent`) in its
metadata, so the gateway's spans of the call (its SERVER span, the stream,
the upstream attempts) join the caller's trace.

    from tokenrelay_client import RelayClient
    from tokenrelay_client.tracing import tracing_interceptors

    async with RelayClient(target, interceptors=tracing_interceptors()) as client:
        ...

Each reconnect of a stream is a call of its own; run the stream inside a
span of yours and every call (the start and each resume) is its child.

The OpenTelemetry packages (opentelemetry-instrumentation-grpc and the API)
are imported here only, and only when `tracing_interceptors` is called: the
rest of the client never needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


def tracing_interceptors(
    tracer_provider: TracerProvider | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """The instrumentation's grpc.aio client interceptors; spans go to
    `tracer_provider`, else to the global one (`opentelemetry.trace`)."""
    try:
        from opentelemetry.instrumentation.grpc import aio_client_interceptors
    except ImportError as error:
        raise ImportError(
            "tokenrelay_client.tracing needs the OpenTelemetry gRPC instrumentation: "
            "pip install opentelemetry-instrumentation-grpc opentelemetry-sdk"
        ) from error
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(  # type: ignore[no-untyped-call]
        tracer_provider=tracer_provider
    )
    return interceptors
