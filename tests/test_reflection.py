"""Server reflection over a real port, in both protocols: grpc.reflection.v1
(what current tools speak, some of them only) and v1alpha."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tokenrelay.vendor.grpc_reflection.v1 import reflection_pb2 as v1_pb2
from tokenrelay.vendor.grpc_reflection.v1 import reflection_pb2_grpc as v1_pb2_grpc
from tokenrelay_server.api.server import RelayServer

PROTOCOLS = [
    pytest.param((v1_pb2, v1_pb2_grpc), id="v1"),
    pytest.param((v1alpha_pb2, v1alpha_pb2_grpc), id="v1alpha"),
]
EXPECTED_SERVICES = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "tokenrelay.v1.Relay",
]


async def ask(channel: grpc.aio.Channel, protocol: Any, **request: str) -> Any:
    messages, stubs = protocol

    async def requests() -> AsyncIterator[Any]:
        yield messages.ServerReflectionRequest(**request)

    responses = [
        r async for r in stubs.ServerReflectionStub(channel).ServerReflectionInfo(requests())
    ]
    assert len(responses) == 1
    return responses[0]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_list_services_names_every_service(relay: RelayServer, protocol: Any) -> None:
    async with grpc.aio.insecure_channel(relay.address) as channel:
        response = await ask(channel, protocol, list_services="")
    names = sorted(s.name for s in response.list_services_response.service)
    assert names == EXPECTED_SERVICES


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_file_containing_the_relay_describes_its_stream_method(
    relay: RelayServer, protocol: Any
) -> None:
    async with grpc.aio.insecure_channel(relay.address) as channel:
        response = await ask(channel, protocol, file_containing_symbol="tokenrelay.v1.Relay")
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    names = {f.name for f in files}
    assert {"tokenrelay/v1/relay.proto", "google/protobuf/duration.proto"} <= names
    # A pool built from nothing but the answer knows the method and its types.
    pool = descriptor_pool.DescriptorPool()
    for file in sorted(files, key=lambda f: f.name != "google/protobuf/duration.proto"):
        pool.Add(file)
    method = pool.FindServiceByName("tokenrelay.v1.Relay").FindMethodByName("Stream")
    assert method.client_streaming and method.server_streaming
    assert method.input_type.full_name == "tokenrelay.v1.StreamRequest"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_unknown_symbol_is_not_found(relay: RelayServer, protocol: Any) -> None:
    async with grpc.aio.insecure_channel(relay.address) as channel:
        response = await ask(channel, protocol, file_containing_symbol="no.such.Service")
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_grpc_reflections_own_client_resolves_the_relay(relay: RelayServer) -> None:
    # grpcio-reflection's descriptor database (a v1alpha client, run in a
    # thread because it is synchronous) builds the whole service from us.
    def resolve() -> list[str]:
        with grpc.insecure_channel(relay.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            pool = descriptor_pool.DescriptorPool(database)
            service = pool.FindServiceByName("tokenrelay.v1.Relay")
            return [m.name for m in service.methods]

    assert await asyncio.to_thread(resolve) == ["Stream"]


def _shape(message: Descriptor) -> list[tuple[object, ...]]:
    return [
        (
            f.name,
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.name if f.message_type else None,
            f.containing_oneof.name if f.containing_oneof else None,
        )
        for f in message.fields
    ]


def test_the_v1_messages_are_wire_identical_to_v1alpha() -> None:
    """The v1 servicer re-reads v1 requests as v1alpha and answers back: that
    is only sound while every message has the same fields and numbers."""
    v1, v1alpha = v1_pb2.DESCRIPTOR, v1alpha_pb2.DESCRIPTOR
    assert v1.package == "grpc.reflection.v1" and v1alpha.package == "grpc.reflection.v1alpha"
    assert sorted(v1.message_types_by_name) == sorted(v1alpha.message_types_by_name)
    for name, message in v1.message_types_by_name.items():
        assert _shape(message) == _shape(v1alpha.message_types_by_name[name]), name
    (v1_method,) = v1.services_by_name["ServerReflection"].methods
    (alpha_method,) = v1alpha.services_by_name["ServerReflection"].methods
    assert v1_method.name == alpha_method.name == "ServerReflectionInfo"
