"""Tracing (issue 11) over real parts: a gateway on a real port exports
OTLP/gRPC, as the standard OTEL_EXPORTER_OTLP_* variables say, to a real
receiver in this process (tokenrelay_devtools.otlp_receiver, the
`opentelemetry-proto` TraceService), and the tests read the span tree it got.

Spans are flushed with force_flush (from a thread: the receiver runs on this
event loop), never by waiting on wall time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from serverkit import (
    PACED,
    QUIET,
    RawCall,
    RelayFactory,
    end_of,
    eventually,
    generation_of,
    produce,
    resume_request,
    start_request,
    text_of,
)
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay.v1 import relay_pb2_grpc as pbg
from tokenrelay_client import Chunk, RelayClient
from tokenrelay_client.tracing import tracing_interceptors
from tokenrelay_devtools.otlp_receiver import ReceivedSpan, TraceReceiver
from tokenrelay_server.api.server import RelayServer
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.obs.logs import FIELDS, STREAM_LOGGER
from tokenrelay_server.obs.tracing import Tracing

CALL = "/tokenrelay.v1.Relay/Stream"
# sim: attempt 1 is refused with 503 (a retry), attempt 2 resets after 5
# tokens (a resume by continuation), attempt 3 finishes.
RETRIED_AND_CONTINUED = {"sim.faults": "http:503,reset@5,ok", "sim.retry_after_s": "0"}


@pytest.fixture
async def receiver() -> AsyncIterator[TraceReceiver]:
    receiver = await TraceReceiver.start()
    yield receiver
    await receiver.stop()


@pytest.fixture
def traced_relay(
    relay_factory: RelayFactory, receiver: TraceReceiver, monkeypatch: pytest.MonkeyPatch
) -> RelayFactory:
    """Starts gateways with --otel-exporter otlp, set up by the standard
    variables alone to export to `receiver`."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)

    async def start(**overrides: object) -> RelayServer:
        return await relay_factory(otel_exporter="otlp", backoff_base_s=0, **overrides)

    return start


def assert_attributes(span: ReceivedSpan, expected: dict[str, object]) -> None:
    """The span has these attributes (and maybe others)."""
    assert {key: span.attributes.get(key) for key in expected} == expected, span.name


async def exported(
    receiver: TraceReceiver,
    tracing: list[Tracing | TracerProvider],
    until: Callable[[list[ReceivedSpan]], bool],
) -> list[ReceivedSpan]:
    """Flush the exporters until the receiver holds what `until` wants. (A
    call's SERVER span ends just after its last message, so it may need a
    second flush.)"""

    async def flushed() -> bool:
        for source in tracing:
            await asyncio.to_thread(source.force_flush)
        return until(receiver.spans())

    await eventually(flushed, within_s=20)
    return receiver.spans()


def named(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


def one(spans: list[ReceivedSpan]) -> ReceivedSpan:
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan, name: str) -> list[ReceivedSpan]:
    return [s for s in named(spans, name) if s.parent_span_id == parent.span_id]


def count_of(name: str, wanted: int) -> Callable[[list[ReceivedSpan]], bool]:
    return lambda spans: len(named(spans, name)) >= wanted


async def test_a_retried_continued_and_client_resumed_stream_is_one_span_tree(
    traced_relay: RelayFactory,
    receiver: TraceReceiver,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=STREAM_LOGGER)
    # Paced on the manual clock: the client drops off and resumes while the
    # stream is still generating, whatever the machine's speed.
    relay = await traced_relay(clock=clock, **QUIET)
    assert relay.tracing is not None
    async with grpc.aio.insecure_channel(relay.address) as channel:
        first = RawCall(
            channel, start_request(max_tokens=30, metadata={**RETRIED_AND_CONTINUED, **PACED})
        )
        started = await first.next_event()
        generation = generation_of(relay, started)
        await produce(clock, relay, generation, 8)
        seen = [started, *await first.events_until(lambda e: e.chunk.seq == 8)]
        token = seen[0].started.resume_token
        first.cancel()  # the client drops off, then resumes with its token
        await eventually(lambda: relay.hub.attached_sessions == 0)
        resumed = RawCall(channel, resume_request(token, 8))
        rest = [await resumed.next_event()]
        assert generation.last_seq == 8  # resumed while it still generates
        await produce(clock, relay, generation, 22)
        rest += await resumed.events_until()
        resumed.cancel()
    assert end_of(rest).total_seq == 30 and not end_of(rest).partial
    stream_id = seen[0].started.stream_id

    spans = await exported(receiver, [relay.tracing], count_of(CALL, 2))
    [start_call] = [s for s in named(spans, CALL) if not s.attributes["tokenrelay.resumed"]]
    [resume_call] = [s for s in named(spans, CALL) if s.attributes["tokenrelay.resumed"]]
    assert start_call.kind == resume_call.kind == "SERVER"
    assert start_call.attributes["rpc.service"] == "tokenrelay.v1.Relay"
    assert start_call.attributes["tokenrelay.stream_id"] == stream_id
    assert start_call.resource["service.name"] == "tokenrelay"
    assert start_call.resource["service.instance.id"] == relay.hub.replica_id

    # The generation under the call that started it, the attempts and the
    # recovery actions under the generation, all in the call's trace.
    stream = one(children(spans, start_call, "tokenrelay.stream"))
    assert stream.trace_id == start_call.trace_id
    assert_attributes(
        stream,
        {
            "tokenrelay.stream_id": stream_id,
            "tokenrelay.model": "sim",
            "tokenrelay.finish_reason": "stop",
            "tokenrelay.partial": False,
            "tokenrelay.total_seq": 30,
            "tokenrelay.attempts": 3,
        },
    )
    attempts = sorted(
        children(spans, stream, "tokenrelay.attempt"),
        key=lambda s: s.attributes["tokenrelay.attempt"],  # type: ignore[arg-type, return-value]
    )
    assert [a.attributes["tokenrelay.attempt"] for a in attempts] == [1, 2, 3]
    refused, reset, finished = attempts
    for attempt in attempts:
        assert attempt.kind == "CLIENT" and attempt.trace_id == start_call.trace_id
        assert attempt.attributes["tokenrelay.provider"] == "sim"
        assert attempt.attributes["tokenrelay.upstream_model"] == "sim"
    assert_attributes(
        refused,
        {
            "tokenrelay.outcome": "failure",
            "tokenrelay.error.type": "protocol",
            "tokenrelay.error.code": "HTTP_503",
            "tokenrelay.tokens_received": 0,
            "tokenrelay.continuation": False,
        },
    )
    assert refused.status_code == "STATUS_CODE_ERROR" and refused.status_message == "HTTP_503"
    assert "tokenrelay.time_to_first_token_s" not in refused.attributes
    assert_attributes(
        reset,
        {
            "tokenrelay.outcome": "failure",
            "tokenrelay.error.type": "network",
            "tokenrelay.error.code": "ECONNRESET",
            "tokenrelay.tokens_received": 5,
        },
    )
    assert reset.attributes["tokenrelay.bytes_received"] > 0  # type: ignore[operator]
    assert reset.attributes["tokenrelay.time_to_first_token_s"] >= 0  # type: ignore[operator]
    assert_attributes(
        finished,
        {
            "tokenrelay.outcome": "success",
            "tokenrelay.continuation": True,
            "tokenrelay.tokens_received": 25,
        },
    )
    assert finished.status_code == "STATUS_CODE_UNSET"
    assert finished.attributes["tokenrelay.bytes_received"] > 0  # type: ignore[operator]
    assert "tokenrelay.error.code" not in finished.attributes

    recoveries = children(spans, stream, "tokenrelay.recovery")
    steps = {
        r.attributes["tokenrelay.recovery.step"]: r.attributes["tokenrelay.error.code"]
        for r in recoveries
    }
    assert steps == {"retry": "HTTP_503", "resume": "ECONNRESET"}
    [resume_action] = [
        r for r in recoveries if r.attributes["tokenrelay.recovery.step"] == "resume"
    ]
    assert resume_action.attributes["tokenrelay.at_seq"] == 5
    assert resume_action.attributes["tokenrelay.recovery.to_provider"] == "sim"

    # The client's resume: a call of its own, linked to the generation.
    assert_attributes(
        resume_call,
        {
            "tokenrelay.stream_id": stream_id,
            "tokenrelay.resumed": True,
            "tokenrelay.after_seq": 8,
        },
    )
    assert resume_call.links == [(stream.trace_id, stream.span_id, {"tokenrelay.link": "stream"})]

    # The generation task inherited the starting call's context: the log
    # lines it wrote (attempt failures, recovery actions) carry its trace id.
    lines = [getattr(r, FIELDS) for r in caplog.records if hasattr(r, FIELDS)]
    written_in_generation = [f for f in lines if f["event"] in ("attempt_failed", "recovery")]
    assert len(written_in_generation) == 4
    assert {f["trace_id"] for f in written_in_generation} == {start_call.trace_id}


async def test_a_traceparent_in_the_call_metadata_is_the_parent_of_the_call_span(
    traced_relay: RelayFactory, receiver: TraceReceiver
) -> None:
    relay = await traced_relay()
    assert relay.tracing is not None
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with grpc.aio.insecure_channel(relay.address) as channel:

        async def requests() -> AsyncIterator[pb.StreamRequest]:
            yield start_request(max_tokens=5)

        call = pbg.RelayStub(channel).Stream(
            requests(), metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),)
        )
        events = [event async for event in call]
    assert end_of(events).total_seq == 5

    spans = await exported(receiver, [relay.tracing], count_of(CALL, 1))
    server = one(named(spans, CALL))
    assert (server.trace_id, server.parent_span_id) == (trace_id, parent_id)
    assert {s.trace_id for s in spans} == {trace_id}
    assert {s.name for s in spans} == {CALL, "tokenrelay.stream", "tokenrelay.attempt"}


async def test_the_python_client_carries_its_trace_to_the_gateway(
    traced_relay: RelayFactory, receiver: TraceReceiver
) -> None:
    relay = await traced_relay()
    assert relay.tracing is not None
    client_provider = TracerProvider(shutdown_on_exit=False)
    client_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint, insecure=True))
    )
    tracer = client_provider.get_tracer("the caller")
    try:
        interceptors = tracing_interceptors(client_provider)
        async with RelayClient(relay.address, interceptors=interceptors) as client:
            with tracer.start_as_current_span("caller's request") as caller:
                chunks = [
                    event
                    async for event in client.stream("sim", [("user", "hi")], max_tokens=4)
                    if isinstance(event, Chunk)
                ]
        assert len(chunks) == 4
        spans = await exported(
            receiver, [relay.tracing, client_provider], count_of("caller's request", 1)
        )
    finally:
        await asyncio.to_thread(client_provider.shutdown)
    trace_id = format(caller.get_span_context().trace_id, "032x")
    client_call = one([s for s in named(spans, CALL) if s.kind == "CLIENT"])
    server_call = one([s for s in named(spans, CALL) if s.kind == "SERVER"])
    assert client_call.trace_id == server_call.trace_id == trace_id
    assert server_call.parent_span_id == client_call.span_id
    assert one(named(spans, "tokenrelay.stream")).parent_span_id == server_call.span_id


CANARY = "c4n4ry-7f3a9e"


async def test_no_span_holds_metadata_prompts_answers_keys_or_tokens(
    traced_relay: RelayFactory, receiver: TraceReceiver
) -> None:
    relay = await traced_relay()
    assert relay.tracing is not None
    prompt = f"{CANARY}-prompt: tell me a secret"
    secret_metadata = (
        ("authorization", f"Bearer {CANARY}-key"),
        ("x-api-key", f"{CANARY}-api-key"),
        ("x-note", f"{CANARY}-metadata"),
    )
    options = [("grpc.primary_user_agent", f"{CANARY}-agent")]
    async with grpc.aio.insecure_channel(relay.address, options=options) as channel:
        stub = pbg.RelayStub(channel)

        async def one_call(*requests: pb.StreamRequest) -> list[pb.StreamEvent]:
            async def send() -> AsyncIterator[pb.StreamRequest]:
                for request in requests:
                    yield request

            call = stub.Stream(send(), metadata=secret_metadata)
            events: list[pb.StreamEvent] = []
            try:
                async for event in call:
                    events.append(event)
            except grpc.aio.AioRpcError:
                pass
            return events

        started = await one_call(
            start_request(
                prompt=prompt,
                max_tokens=12,
                metadata={**RETRIED_AND_CONTINUED, "sim.faults": "reset@3,ok", "note": CANARY},
            )
        )
        token = started[0].started.resume_token
        answer = text_of(started)
        assert len(answer.split()) == 12
        resumed = await one_call(resume_request(token, 2))
        assert text_of(resumed)
        # A refused resume (a forged token) and a refused start, too. (A
        # refusal's message, the span's status, may quote a request field
        # such as the model name, as the client is told: none of the above.)
        await one_call(resume_request(token[:-4] + "AAAA", 0))
        await one_call(start_request(prompt=prompt, model="no-such-model"))

    spans = await exported(receiver, [relay.tracing], count_of(CALL, 4))
    texts: list[str] = []
    for span in spans:
        texts += [span.name, span.status_message, *map(str, span.attributes.values())]
        texts += map(str, span.resource.values())
        for name, attributes in span.events:
            texts += [name, *map(str, attributes.values())]
        for _, _, attributes in span.links:
            texts += map(str, attributes.values())
    leaked = [text for text in texts if CANARY in text or token in text or answer in text]
    assert not leaked
    # What is left of the answer: no run of three of its words.
    words = answer.split()
    runs = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    assert not [text for text in texts for run in runs if run in text]
    # The instrumentation's own attributes are there, minus the user agent.
    server_calls = named(spans, CALL)
    assert all("rpc.user_agent" not in s.attributes for s in server_calls)
    assert all(s.attributes["rpc.service"] == "tokenrelay.v1.Relay" for s in server_calls)


async def test_the_console_exporter_prints_the_spans_on_stdout(
    relay_factory: RelayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    relay = await relay_factory(otel_exporter="console")
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=3))
        assert end_of(await call.events_until()).total_seq == 3
        call.cancel()
    await relay.stop()  # ends the spans still open and flushes
    out = capsys.readouterr().out
    assert '"name": "tokenrelay.stream"' in out
    assert '"name": "tokenrelay.attempt"' in out


async def test_with_no_exporter_nothing_is_installed(
    relay_factory: RelayFactory, receiver: TraceReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    relay = await relay_factory()  # --otel-exporter none, the default
    assert relay.tracing is None
    async with grpc.aio.insecure_channel(relay.address) as channel:
        call = RawCall(channel, start_request(max_tokens=3))
        assert end_of(await call.events_until()).total_seq == 3
        call.cancel()
    await relay.stop()
    assert receiver.export_calls == 0
    # Nothing global was set either: the API's default provider is untouched.
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)


def test_the_exporter_is_a_flag_and_a_variable_and_a_wrong_one_is_named() -> None:
    from click.testing import CliRunner

    from tokenrelay_server.cli import main
    from tokenrelay_server.config.settings import load_settings

    shown = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--otel-exporter [none|console|otlp]" in shown and "TOKENRELAY_OTEL_EXPORTER" in shown
    flags = {"otel_exporter": None}
    assert load_settings(None, flags=flags, env={}).otel_exporter == "none"
    env = {"TOKENRELAY_OTEL_EXPORTER": "otlp"}
    assert load_settings(None, flags=flags, env=env).otel_exporter == "otlp"
    assert load_settings(None, flags={"otel_exporter": "console"}, env=env).otel_exporter == (
        "console"
    )
    refused = CliRunner().invoke(main, ["serve", "--otel-exporter", "jaeger"])
    assert refused.exit_code == 2
    assert refused.output.startswith("--otel-exporter: ") and "jaeger" not in refused.output
