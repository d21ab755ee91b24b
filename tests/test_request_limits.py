"""Request limits (issue 13, the [limits] table) over real gRPC: a frame past
max_request_bytes is RESOURCE_EXHAUSTED from the transport; too many
messages, too long a message, too many tools or metadata entries are
INVALID_ARGUMENT naming the field and the limit's key. At the limit a
request is served; past it nothing starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from serverkit import RelayFactory, end_of, run_to_end, start_request
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_server.config.problems import ConfigError
from tokenrelay_server.config.settings import read_config_file
from tokenrelay_server.core.limits import RequestLimits

DEFAULTS = RequestLimits()


def with_messages(count: int, content: str = "hi") -> pb.StreamRequest:
    request = start_request(max_tokens=3)
    del request.start.messages[:]
    request.start.messages.extend(pb.Message(role="user", content=content) for _ in range(count))
    return request


def with_tools(count: int) -> pb.StreamRequest:
    request = start_request(max_tokens=3)
    request.start.tools.extend(pb.Tool(name=f"tool_{index}") for index in range(count))
    return request


def with_metadata(count: int) -> pb.StreamRequest:
    return start_request(max_tokens=3, metadata={f"note.{index}": "x" for index in range(count)})


async def refusal(channel: grpc.aio.Channel, request: pb.StreamRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run_to_end(channel, request)
    return caught.value


# (request at the limit, request one past it, what the refusal names)
DEFAULT_CASES = [
    pytest.param(
        with_messages(DEFAULTS.max_messages),
        with_messages(DEFAULTS.max_messages + 1),
        "start.messages has 257 messages; the limit is 256 (limits.max_messages)",
        id="257 messages are one too many",
    ),
    pytest.param(
        with_messages(1, "a" * DEFAULTS.max_content_chars),
        with_messages(1, "a" * (DEFAULTS.max_content_chars + 1)),
        "start.messages[0].content has 1000001 characters; the limit is 1000000 "
        "(limits.max_content_chars)",
        id="a message of 1,000,001 characters is too long",
    ),
    pytest.param(
        with_tools(DEFAULTS.max_tools),
        with_tools(DEFAULTS.max_tools + 1),
        "start.tools has 129 tools; the limit is 128 (limits.max_tools)",
        id="129 tools are one too many",
    ),
    pytest.param(
        with_metadata(DEFAULTS.max_metadata_entries - 1),  # start_request adds none
        with_metadata(DEFAULTS.max_metadata_entries + 1),
        "start.metadata has 33 entries; the limit is 32 (limits.max_metadata_entries)",
        id="33 metadata entries are one too many",
    ),
]


@pytest.mark.parametrize(("at_limit", "past_limit", "named"), DEFAULT_CASES)
async def test_the_default_limits_name_the_field_past_them(
    relay_factory: RelayFactory,
    at_limit: pb.StreamRequest,
    past_limit: pb.StreamRequest,
    named: str,
) -> None:
    relay = await relay_factory(max_prompt_bytes=4 << 20)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        error = await refusal(channel, past_limit)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.details() == named
        assert not end_of(await run_to_end(channel, at_limit)).partial
    assert relay.hub.running_generations == 0


@pytest.mark.parametrize(
    ("setting", "past_limit", "named"),
    [
        pytest.param(
            {"max_messages": 2},
            with_messages(3),
            "start.messages has 3 messages; the limit is 2",
            id="max_messages",
        ),
        pytest.param(
            {"max_content_chars": 10},
            with_messages(2, "x" * 11),
            "start.messages[0].content has 11 characters; the limit is 10",
            id="max_content_chars",
        ),
        pytest.param(
            {"max_tools": 0},
            with_tools(1),
            "start.tools has 1 tools; the limit is 0",
            id="max_tools",
        ),
        pytest.param(
            {"max_metadata_entries": 1},
            with_metadata(2),
            "start.metadata has 2 entries; the limit is 1",
            id="max_metadata_entries",
        ),
    ],
)
async def test_each_limit_is_a_setting(
    relay_factory: RelayFactory, setting: dict[str, int], past_limit: pb.StreamRequest, named: str
) -> None:
    relay = await relay_factory(**setting)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        error = await refusal(channel, past_limit)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(named)
    assert f"(limits.{next(iter(setting))})" in error.details()


async def test_a_frame_past_max_request_bytes_is_resource_exhausted(
    relay_factory: RelayFactory,
) -> None:
    relay = await relay_factory()
    # 5 MiB of prompt: past the 4 MiB transport limit; gRPC refuses the frame
    # before the servicer decodes it.
    big = with_messages(5, "b" * (1 << 20))
    assert big.ByteSize() > DEFAULTS.max_request_bytes
    async with grpc.aio.insecure_channel(relay.address) as channel:
        error = await refusal(channel, big)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(DEFAULTS.max_request_bytes) in error.details()
        # The gateway goes on serving.
        assert not end_of(await run_to_end(channel, start_request())).partial
    assert relay.hub.running_generations == 0


async def test_max_request_bytes_is_a_setting(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(max_request_bytes=64 << 10)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        error = await refusal(channel, with_messages(1, "c" * (100 << 10)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not end_of(await run_to_end(channel, with_messages(1, "c" * (60 << 10)))).partial


def test_the_limits_table_of_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        "[limits]\nmax_request_bytes = 1048576\nmax_messages = 8\nmax_content_chars = 100\n"
        "max_tools = 4\nmax_metadata_entries = 2\n"
    )
    values: dict[str, Any] = read_config_file(config)
    assert values == {
        "max_request_bytes": 1 << 20,
        "max_messages": 8,
        "max_content_chars": 100,
        "max_tools": 4,
        "max_metadata_entries": 2,
    }


def test_a_wrong_limit_is_named_with_its_line(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text("[limits]\nmax_messages = 0\nmax_tool = 3\n\n[server]\nmax_tools = 3\n")
    with pytest.raises(ConfigError) as caught:
        read_config_file(config)
    described = [problem.describe() for problem in caught.value.problems]
    assert described[0].startswith(f"{config}:2: limits.max_messages: ")
    assert (
        described[1] == f"{config}:3: limits.max_tool: is not a known key (did you mean max_tools?)"
    )
    assert (
        described[2]
        == f"{config}:6: server.max_tools: is not a [server] key; it belongs in [limits]"
    )
