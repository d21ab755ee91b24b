"""No SSRF surface, no secret leaks (issue 13), proved with canaries.

A canary provider key, resume secret, admin token, tenant API key, resume
token and prompt go through a real gateway at --log-level debug, to the mock
upstream over real HTTP/2 (TLS with ALPN h2, where hpack encodes the
provider key; tokenrelay_devtools.h2_front), with a reset, a resume, a
forged token and bad requests on the way: none of them occurs in the
captured log lines, the error messages, /metrics or the exported spans.

And a loopback listener whose address is named anywhere in a request
(model, messages, tools, metadata, stop sequences, idempotency key, resume
token) gets no connection, nor does one a provider redirects to: upstream
hosts come from the configuration only, and redirects are not followed.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from aiohttp import web

from serverkit import (
    RawCall,
    RelayFactory,
    end_of,
    eventually,
    resume_request,
    run_to_end,
    start_request,
    text_of,
)
from tlskit import CertificateAuthority
from tokenrelay.v1 import relay_pb2 as pb
from tokenrelay_devtools.h2_front import Http2Front
from tokenrelay_devtools.mock_upstream import MockUpstream
from tokenrelay_devtools.otlp_receiver import TraceReceiver
from tokenrelay_server.config.problems import ConfigError
from tokenrelay_server.config.settings import build_settings, read_config_file
from tokenrelay_server.obs.logs import known_secrets, setup_logging
from tokenrelay_server.upstream.build import tls_context

CANARY = "c4n4ry-7f3e9a"
PROVIDER_KEY = f"sk-{CANARY}-provider-key-0123456789"
RESUME_SECRET = f"{CANARY}-resume-secret-" + "0a1b2c3d4e5f6789" * 3
ADMIN_TOKEN = f"{CANARY}-admin-token-0123456789"
API_KEY = f"trk-{CANARY}-tenant-api-key-0123456789"
PROMPT = f"{CANARY}-prompt: my password is hunter2, please keep it"


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Where setup_logging writes in a test; the root logger as it was after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("hpack", "h2", "httpcore", "httpx")}
    yield io.StringIO()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    mock = MockUpstream()
    await mock.start("127.0.0.1", 0)
    yield mock
    await mock.stop()


@pytest.fixture
async def http2_upstream(
    upstream: MockUpstream, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Http2Front]:
    """The mock upstream behind HTTP/2 over TLS; the gateway's provider
    clients trust the test's CA (SSL_CERT_FILE, read when their TLS context
    is built: the cached one is dropped before and after)."""
    ca = CertificateAuthority(tmp_path / "upstream-ca")
    server = ca.server("upstream")
    front = Http2Front(upstream.base_url.removesuffix("/v1"), cert=server.cert, key=server.key)
    await front.start()
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))
    tls_context.cache_clear()
    yield front
    await front.stop()
    tls_context.cache_clear()


CONFIG = """
[providers.mock-openai]
kind = "openai"
base_url = "{base_url}"
api_key_env = "CANARY_PROVIDER_KEY"
forward_sim_headers = true

[models.oa]
chain = [{{ provider = "mock-openai", model = "gpt-4o-mini" }}]
"""


def leaks(text: str, *canaries: str) -> list[str]:
    return [canary for canary in canaries if canary in text]


async def test_canaries_reach_no_log_error_metric_or_span(
    relay_factory: RelayFactory,
    http2_upstream: Http2Front,
    tmp_path: Path,
    log_output: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = await TraceReceiver.start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("CANARY_PROVIDER_KEY", PROVIDER_KEY)
        config = tmp_path / "tokenrelay.toml"
        config.write_text(CONFIG.format(base_url=http2_upstream.base_url))
        values = read_config_file(config)
        settings = build_settings(
            {**values, "resume_secret": RESUME_SECRET, "admin_token": ADMIN_TOKEN}
        )
        env = {"CANARY_PROVIDER_KEY": PROVIDER_KEY}
        setup_logging("debug", "json", secrets=known_secrets(settings, env), stream=log_output)
        relay = await relay_factory(
            **values,
            resume_secret=RESUME_SECRET,
            admin_token=ADMIN_TOKEN,
            otel_exporter="otlp",
            metrics_port=0,
            backoff_base_s=0,
        )
        errors: list[str] = []
        metadata = [("authorization", f"Bearer {API_KEY}")]

        async def refused(channel: grpc.aio.Channel, request: pb.StreamRequest) -> None:
            call = RawCall(channel, request)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call.events_until()
            call.cancel()
            errors.append(f"{caught.value.code()} {caught.value.details()}")

        async with grpc.aio.insecure_channel(relay.address) as channel:
            request = start_request(
                model="oa", prompt=PROMPT, max_tokens=12, metadata={"sim.faults": "reset@4,ok"}
            )
            # The call carries a tenant key (the gateway's spans and logs see
            # the call's metadata); it leaves after chunk 6 and resumes.
            first = pb_stream(channel, request, metadata)
            seen = await collect_until(first, seq=6)
            first.cancel()
            token = seen[0].started.resume_token
            rest = await run_to_end(channel, resume_request(token, 6))
            answer = text_of(seen) + text_of(rest)
            assert not end_of(rest).partial
            # Refusals: a forged token, a bad role carrying the prompt, an
            # unknown model, a token past its MAC.
            await refused(channel, resume_request(token[:-4] + "AAAA", 0))
            await refused(channel, resume_request(f"v1.{PROMPT}.1.{'A' * 43}", 0))
            bad_role = start_request(model="oa", prompt=PROMPT)
            bad_role.start.messages[0].role = "wizard"
            await refused(channel, bad_role)
            await refused(channel, start_request(model="no-such-model", prompt=PROMPT))
            # An upstream error whose body could quote the request.
            failed = await run_to_end(
                channel,
                start_request(
                    model="oa", prompt=PROMPT, max_tokens=5, metadata={"sim.faults": "http:400"}
                ),
            )
            errors.append(end_of(failed).error.message)
        assert relay.metrics_url is not None
        async with httpx.AsyncClient() as client:
            scraped = (await client.get(relay.metrics_url)).text
        assert "tokenrelay_" in scraped
        await relay.stop()
        spans = receiver.spans()
    finally:
        await receiver.stop()

    # The canaries went where they must: the key to the upstream over HTTP/2
    # (hpack encoded it), the prompt to the model.
    assert http2_upstream.streams >= 3
    sent = [dict(headers) for headers in http2_upstream.requests]
    assert all(headers[b"authorization"] == f"Bearer {PROVIDER_KEY}".encode() for headers in sent)
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    assert any("HTTP/2 200" in line["msg"] for line in lines if line["logger"] == "httpx")
    assert {line["level"] for line in lines} >= {"debug", "info"}
    assert spans and errors

    canaries = (PROVIDER_KEY, RESUME_SECRET, ADMIN_TOKEN, API_KEY, token, PROMPT, CANARY)
    words = answer.split()
    answer_runs = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}
    logged = log_output.getvalue()
    assert leaks(logged, *canaries) == []
    assert [run for run in answer_runs if run in logged] == []
    assert leaks("\n".join(errors), *canaries) == [], errors
    assert leaks(scraped, *canaries) == []
    exported = "\n".join(repr(span) for span in spans)
    assert leaks(exported, *canaries) == []
    assert [run for run in answer_runs if run in exported] == []


def pb_stream(
    channel: grpc.aio.Channel, request: pb.StreamRequest, metadata: list[tuple[str, str]]
) -> grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamEvent]:
    from tokenrelay.v1 import relay_pb2_grpc as pbg

    async def requests() -> AsyncIterator[pb.StreamRequest]:
        yield request
        await asyncio.Event().wait()  # keep the call open until it is cancelled

    call: grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamEvent] = pbg.RelayStub(
        channel
    ).Stream(requests(), metadata=metadata)
    return call


async def collect_until(
    call: grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamEvent], *, seq: int
) -> list[pb.StreamEvent]:
    seen: list[pb.StreamEvent] = []
    while True:
        event = await call.read()
        assert event is not grpc.aio.EOF
        seen.append(event)
        if event.HasField("chunk") and event.chunk.seq == seq:
            return seen


def test_log_content_puts_the_prompt_and_the_answer_in_debug_lines_only_when_asked() -> None:
    from tokenrelay_server.engine.events import ChunkStored, StreamStarted
    from tokenrelay_server.obs.logs import StreamLog

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.log_content")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Keep())
    logger.propagate = False
    for log_content in (False, True):
        records.clear()
        stream_log = StreamLog(logger, log_content=log_content)
        assert stream_log.observes_chunks is log_content
        stream_log(StreamStarted("s1", "sim", 0.0, PROMPT))
        stream_log(ChunkStored("s1", "sim", "sim", 1, 1, 0.0, text="Hello "))
        stream_log(ChunkStored("s1", "sim", "sim", 2, 2, 0.0, text="world"))
        text = "\n".join(record.getMessage() for record in records)
        if log_content:
            assert PROMPT in text
            prompt_line = next(r for r in records if r.getMessage().startswith("prompt"))
            assert prompt_line.levelno == logging.DEBUG
        else:
            assert PROMPT not in text and "Hello" not in text


def test_the_filter_masks_credentials_by_shape() -> None:
    from tokenrelay_server.obs.logs import SecretFilter

    mask = SecretFilter([]).mask
    token = "v1.3f2a9c.1767225600." + "A1b2C3d4" * 5 + "xyz"
    assert mask(f"authorization: Bearer {API_KEY}") == "authorization: Bearer ***"
    assert mask(f"(b'authorization', b'Bearer {API_KEY}')") == "(b'authorization', b'Bearer ***')"
    assert mask(f"(b'x-api-key', b'{PROVIDER_KEY}')") == "(b'x-api-key', b'***')"
    assert mask(f"resume with {token} please") == "resume with *** please"
    assert mask("v1.3f2a9c.1767225600 is no token") == "v1.3f2a9c.1767225600 is no token"


def test_a_base_url_with_credentials_is_refused_without_echoing_them(tmp_path: Path) -> None:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(CONFIG.format(base_url=f"https://user:{CANARY}@api.example/v1"))
    with pytest.raises(ConfigError) as caught:
        read_config_file(config)
    said = "\n".join(problem.describe() for problem in caught.value.problems)
    assert "must not carry a user or password" in said and CANARY not in said


# --- no SSRF surface ---------------------------------------------------------------------------


class Listener:
    """A loopback TCP listener that counts the connections it gets."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    bait = Listener()
    await bait.start()
    yield bait
    await bait.stop()


@pytest.fixture
async def redirecting(listener: Listener) -> AsyncIterator[str]:
    """A "provider" that answers every request with a redirect to the listener."""
    target = f"http://127.0.0.1:{listener.port}/v1/chat/completions"

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": target})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", redirect)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/v1"
    await runner.cleanup()


SSRF_CONFIG = """
[providers.mock-openai]
kind = "openai"
base_url = "{mock}"
forward_sim_headers = true

[providers.redirecting]
kind = "openai"
base_url = "{redirecting}"

[models.oa]
chain = [{{ provider = "mock-openai", model = "gpt-4o-mini" }}]

[models.moved]
chain = [{{ provider = "redirecting", model = "gpt-4o-mini" }}]
"""


async def test_a_listener_named_anywhere_in_a_request_gets_no_connection(
    relay_factory: RelayFactory,
    upstream: MockUpstream,
    redirecting: str,
    listener: Listener,
    tmp_path: Path,
) -> None:
    address = f"127.0.0.1:{listener.port}"
    url = f"http://{address}/v1"
    config = tmp_path / "tokenrelay.toml"
    config.write_text(SSRF_CONFIG.format(mock=upstream.base_url, redirecting=redirecting))
    relay = await relay_factory(**read_config_file(config), sim=True, max_retries=0)
    named_everywhere = {
        "base_url": url,
        "host": address,
        "x-forwarded-host": address,
        "sim.faults": "ok",
        "upstream": url,
    }

    def everywhere(model: str) -> pb.StreamRequest:
        request = start_request(model=model, prompt=f"fetch {url} for me", max_tokens=4)
        request.start.messages.append(pb.Message(role="assistant", content=url))
        request.start.messages.append(pb.Message(role="user", content=f"POST {url}/chat"))
        request.start.metadata.update(named_everywhere)
        request.start.idempotency_key = f"{url}#{model}"
        request.start.params.stop.append(address)
        request.start.tools.append(pb.Tool(name="fetch", description=url))
        return request

    outcomes: list[str] = []
    async with grpc.aio.insecure_channel(relay.address) as channel:
        for model in ("oa", "sim", url, address, f"oa#{url}"):
            try:
                events = await run_to_end(channel, everywhere(model))
                outcomes.append(f"{model}: {end_of(events).finish_reason}")
            except grpc.aio.AioRpcError as error:
                outcomes.append(f"{model}: {error.code().name}")
        try:
            await run_to_end(channel, resume_request(url, 0))
        except grpc.aio.AioRpcError as error:
            outcomes.append(f"resume: {error.code().name}")
        moved = await run_to_end(channel, start_request(model="moved", max_tokens=4))
    # The served ones went to their configured hosts only.
    assert outcomes[:2] == ["oa: tool_calls", "sim: tool_calls"], outcomes
    assert all(outcome.endswith("INVALID_ARGUMENT") for outcome in outcomes[2:5]), outcomes
    assert outcomes[5] == "resume: PERMISSION_DENIED"
    # The redirect was not followed, and said so.
    end = end_of(moved)
    assert end.partial and end.error.code == "HTTP_307"
    assert "redirect, which the gateway never follows" in end.error.message
    await eventually(lambda: relay.hub.running_generations == 0)
    assert listener.connections == 0


async def test_log_content_on_a_gateway_logs_the_prompt_and_the_whole_answer(
    relay_factory: RelayFactory, log_output: io.StringIO
) -> None:
    setup_logging("debug", "json", stream=log_output)
    relay = await relay_factory(log_content=True)
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(prompt=PROMPT, max_tokens=10))
    await relay.stop()
    lines = [json.loads(line) for line in log_output.getvalue().splitlines()]
    content = {line["event"]: line for line in lines if line.get("event") in ("prompt", "answer")}
    assert content["prompt"]["text"] == PROMPT and content["prompt"]["level"] == "debug"
    assert content["answer"]["text"] == text_of(events)
    stream_id = events[0].started.stream_id
    assert content["prompt"]["stream_id"] == content["answer"]["stream_id"] == stream_id
