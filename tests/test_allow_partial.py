"""`policy.allow_partial = false`: when the gateway gives up, the call fails
with a status carrying the typed StreamError in its rich details, instead of
ending with `end.partial = true`. Over a real port, and through the client."""

from __future__ import annotations

import random

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    chunks_of,
    generation_of,
    produce,
    resume_request,
    run_to_end,
    sha256,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_client import GenerationFailed, RelayClient
from tokenrelay_server.api.servicer import status_for_fault
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction


def start(
    faults: str,
    *,
    allow_partial: bool | None,
    max_tokens: int = 30,
    metadata: dict[str, str] | None = None,
) -> pb.StreamRequest:
    policy = pb.RecoveryPolicy(max_retries=0)
    if allow_partial is not None:
        policy.allow_partial = allow_partial
    return pb.StreamRequest(
        start=pb.StartGeneration(
            model="sim",
            messages=[pb.Message(role="user", content="tell me about streams")],
            params=pb.GenerationParams(max_tokens=max_tokens),
            policy=policy,
            metadata={"sim.faults": faults, **(metadata or {})},
        )
    )


async def read_until_status(
    channel: grpc.aio.Channel, request: pb.StreamRequest
) -> tuple[list[pb.StreamEvent], grpc.aio.AioRpcError]:
    call = RawCall(channel, request)
    events: list[pb.StreamEvent] = []
    try:
        while True:
            events.append(await call.next_event())
    except grpc.aio.AioRpcError as error:
        return events, error
    except EOFError:
        pytest.fail(f"the call ended OK; the last event was {events[-1]}")
    finally:
        call.cancel()


def details_of(error: grpc.aio.AioRpcError) -> dict[str, object]:
    """The rich details (google.rpc.Status) of a failed call, unpacked by type."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no grpc-status-details-bin on the failed call"
    assert status.code == error.code().value[0] and status.message == error.details()
    found: dict[str, object] = {}
    for any_detail in status.details:
        for kind in (pb.StreamError, error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                found[kind.DESCRIPTOR.name] = message
    return found


# --- the status a refused partial gets (pure) ---------------------------------------------


def fault(code: str, error_type: ErrorType, *, retryable: bool) -> Fault:
    return Fault(
        type=error_type,
        code=code,
        message="m",
        retryable=retryable,
        suggested_action=SuggestedAction.RETRY if retryable else SuggestedAction.ABORT,
    )


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        pytest.param(
            fault("ECONNRESET", ErrorType.NETWORK, retryable=True),
            grpc.StatusCode.UNAVAILABLE,
            id="a reset that retries could not fix is unavailable",
        ),
        pytest.param(
            fault("HTTP_429", ErrorType.PROTOCOL, retryable=True),
            grpc.StatusCode.UNAVAILABLE,
            id="a rate limit is unavailable (with retry info)",
        ),
        pytest.param(
            fault("STALL_TIMEOUT", ErrorType.TIMEOUT, retryable=True),
            grpc.StatusCode.UNAVAILABLE,
            id="a stalled provider is unavailable",
        ),
        pytest.param(
            fault("SERVER_SHUTDOWN", ErrorType.APPLICATION, retryable=True),
            grpc.StatusCode.UNAVAILABLE,
            id="a replica shutting down is unavailable",
        ),
        pytest.param(
            fault("HTTP_401", ErrorType.PROTOCOL, retryable=False),
            grpc.StatusCode.FAILED_PRECONDITION,
            id="a provider refusing the credentials is a failed precondition",
        ),
        pytest.param(
            fault("MALFORMED_DATA", ErrorType.DATA, retryable=False),
            grpc.StatusCode.FAILED_PRECONDITION,
            id="garbage from the provider is a failed precondition",
        ),
        pytest.param(
            fault("RESPONSE_TOO_LARGE", ErrorType.RESOURCE, retryable=False),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            id="a size cap is resource exhausted",
        ),
        pytest.param(
            fault("MEMORY_LIMIT", ErrorType.RESOURCE, retryable=True),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            id="the memory limit is resource exhausted even though retryable",
        ),
        pytest.param(
            fault("DEADLINE_EXCEEDED", ErrorType.TIMEOUT, retryable=True),
            grpc.StatusCode.DEADLINE_EXCEEDED,
            id="the callers own deadline is deadline exceeded",
        ),
    ],
)
def test_status_for_a_refused_partial(final: Fault, expected: grpc.StatusCode) -> None:
    assert status_for_fault(final) == expected


# --- over a real port -----------------------------------------------------------------------


async def test_a_refused_partial_fails_the_call_with_the_stream_error_in_the_details(
    channel,
) -> None:
    events, error = await read_until_status(channel, start("reset@5", allow_partial=False))
    assert not [e for e in events if e.HasField("end")]
    # What was delivered stays delivered: the five chunks came before the status.
    assert [c.seq for c in chunks_of(events)] == [1, 2, 3, 4, 5]
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "ECONNRESET" in error.details() and "allow_partial" in error.details()
    details = details_of(error)
    stream_error = details["StreamError"]
    assert isinstance(stream_error, pb.StreamError)
    assert stream_error.code == "ECONNRESET" and stream_error.fatal
    assert stream_error.type == pb.ERROR_TYPE_NETWORK
    assert stream_error.tokens_received == 5
    info = details["ErrorInfo"]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert info.reason == "ECONNRESET"
    assert info.metadata["stream_id"] == events[0].started.stream_id
    assert info.metadata["total_seq"] == "5"
    assert info.metadata["text_sha256"] == sha256(text_of(events))
    assert "RetryInfo" not in details  # the provider did not say how long to wait


async def test_the_same_failure_with_partials_allowed_ends_with_a_partial_end(channel) -> None:
    events = await run_to_end(channel, start("reset@5", allow_partial=True))
    assert events[-1].end.partial and events[-1].end.error.code == "ECONNRESET"


async def test_a_rate_limit_carries_retry_info(channel) -> None:
    request = start("http:429", allow_partial=False, metadata={"sim.retry_after_s": "2"})
    events, error = await read_until_status(channel, request)
    assert chunks_of(events) == []
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    retry = details_of(error)["RetryInfo"]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToTimedelta().total_seconds() == 2.0


async def test_an_unrecoverable_provider_error_is_a_failed_precondition(channel) -> None:
    events, error = await read_until_status(channel, start("http:401", allow_partial=False))
    assert chunks_of(events) == []
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    stream_error = details_of(error)["StreamError"]
    assert isinstance(stream_error, pb.StreamError)
    assert (stream_error.code, stream_error.retryable) == ("HTTP_401", False)


async def test_a_resume_of_a_stream_that_refused_partials_fails_the_same_way(channel) -> None:
    events, first = await read_until_status(channel, start("reset@5", allow_partial=False))
    token = events[0].started.resume_token
    replayed, again = await read_until_status(channel, resume_request(token, 2))
    assert [c.seq for c in chunks_of(replayed)] == [3, 4, 5]
    assert again.code() == first.code() == grpc.StatusCode.UNAVAILABLE
    stream_error = details_of(again)["StreamError"]
    assert isinstance(stream_error, pb.StreamError) and stream_error.code == "ECONNRESET"


async def test_the_gateways_setting_applies_when_the_call_does_not_say(relay_factory) -> None:
    relay = await relay_factory(allow_partial=False)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        _, error = await read_until_status(channel, start("reset@5", allow_partial=None))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        # A call that allows partials overrides the gateway's setting.
        events = await run_to_end(channel, start("reset@5", allow_partial=True))
        assert events[-1].end.partial


async def test_a_cancel_still_ends_with_end_when_partials_are_refused(
    relay_factory: RelayFactory, clock: ManualClock
) -> None:
    # Paced on a manual clock: two chunks, then it waits for the third while
    # the cancel comes.
    relay = await relay_factory(clock=clock, **QUIET)
    request = start("", allow_partial=False, max_tokens=100_000, metadata=PACED)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, request)
        started = await call.next_event()
        await produce(clock, relay, generation_of(relay, started), 2)
        await call.events_until(lambda e: e.HasField("chunk") and e.chunk.seq == 2)
        call.send(pb.StreamRequest(cancel=pb.Cancel(reason="user pressed stop")))
        events = await call.events_until()
        call.cancel()
    end = events[-1].end
    assert end.total_seq == 2
    assert end.partial and end.finish_reason == "cancelled"
    assert end.error.code == "CANCELLED"


# --- the Python client ------------------------------------------------------------------------


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


async def test_the_client_raises_generation_failed_and_does_not_resume(relay) -> None:
    sleep = RecordingSleep()
    client = RelayClient(relay.address, sleep=sleep, rng=random.Random(1))
    async with client:
        relay_stream = client.stream(
            "sim",
            [("user", "tell me about streams")],
            max_tokens=30,
            policy={"allow_partial": False, "max_retries": 0},
            metadata={"sim.faults": "reset@5"},
        )
        with pytest.raises(GenerationFailed) as caught:
            await relay_stream.collect()
    failure = caught.value
    assert failure.code == grpc.StatusCode.UNAVAILABLE
    assert failure.error.code == "ECONNRESET" and failure.error.type == "network"
    assert failure.error.fatal and failure.error.retryable
    assert failure.partial is not None and failure.partial.last_seq == 5
    assert failure.total_seq == 5 and failure.text_sha256 == sha256(failure.partial.text)
    # A terminal failure, not a broken connection: no reconnect was tried.
    assert relay_stream.reconnects == 0 and sleep.delays == []


async def test_the_client_surfaces_retry_after_from_the_stream_error(relay) -> None:
    async with RelayClient(relay.address, sleep=RecordingSleep()) as client:
        with pytest.raises(GenerationFailed) as caught:
            await client.generate(
                "sim",
                [("user", "hi")],
                policy={"allow_partial": False, "max_retries": 0},
                metadata={"sim.faults": "http:503", "sim.retry_after_s": "3"},
            )
    assert caught.value.error.code == "HTTP_503"
    assert caught.value.error.retry_after_s == 3.0
