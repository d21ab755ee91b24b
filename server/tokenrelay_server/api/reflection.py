"""gRPC server reflection, both protocols: `grpc.reflection.v1` and `v1alpha`.

grpcio-reflection (1.85) implements only `grpc.reflection.v1alpha`, but
current tools speak v1 first and some only v1 (`buf curl --reflect-protocol
grpc-v1`, grpcurl's newer releases, Postman). The two protocols have the same
messages with the same field numbers under another package name (v1 is the
v1alpha proto renamed: grpc/grpc src/proto/grpc/reflection/v1/), so they are
wire-identical. The v1 servicer here therefore re-reads each v1 request as
v1alpha, lets grpcio-reflection's own servicer answer it from the same
descriptor pool, and re-reads the answer as v1: one implementation of the
lookups, two protocols. tests/test_reflection.py checks the two descriptors
field by field, which is what makes the re-reading sound.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import cast

import grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection as reflection_v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc

from tokenrelay.vendor.grpc_reflection.v1 import reflection_pb2 as v1_pb2
from tokenrelay.vendor.grpc_reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc

V1_SERVICE_NAME: str = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1ALPHA_SERVICE_NAME: str = reflection_v1alpha.SERVICE_NAME
REFLECTION_SERVICES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


class ReflectionV1Servicer(v1_pb2_grpc.ServerReflectionServicer):
    """`grpc.reflection.v1.ServerReflection`, answered by grpcio-reflection's
    v1alpha servicer (see the module docstring)."""

    def __init__(
        self, service_names: Iterable[str], pool: descriptor_pool.DescriptorPool | None = None
    ) -> None:
        self._v1alpha = reflection_v1alpha.aio.ReflectionServicer(service_names, pool=pool)

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterator[v1_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[
            v1_pb2.ServerReflectionRequest, v1_pb2.ServerReflectionResponse
        ],
    ) -> AsyncIterator[v1_pb2.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha_pb2.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha_pb2.ServerReflectionRequest.FromString(request.SerializeToString())

        # cast: types-grpcio-reflection declares this method `async def ... ->
        # AsyncIterable`, which reads as a coroutine; it is an async generator
        # (grpc_reflection/v1alpha/_async.py), so the call is the iterable itself.
        responses = cast(
            "AsyncIterable[v1alpha_pb2.ServerReflectionResponse]",
            self._v1alpha.ServerReflectionInfo(as_v1alpha(), context),
        )
        async for response in responses:
            yield v1_pb2.ServerReflectionResponse.FromString(response.SerializeToString())


def enable_server_reflection(
    service_names: Iterable[str],
    server: grpc.aio.Server,
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Serve reflection v1 and v1alpha on `server`. Both list `service_names`
    plus the two reflection services themselves."""
    names = tuple(dict.fromkeys((*service_names, *REFLECTION_SERVICES)))
    # types-grpcio-reflection leaves this generated function unannotated.
    v1alpha_pb2_grpc.add_ServerReflectionServicer_to_server(  # type: ignore[no-untyped-call]
        reflection_v1alpha.aio.ReflectionServicer(names, pool=pool), server
    )
    v1_pb2_grpc.add_ServerReflectionServicer_to_server(ReflectionV1Servicer(names, pool), server)
