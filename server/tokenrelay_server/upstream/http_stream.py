"""The HTTP side both adapters share: send, check, decode, classify.

This is the one boundary where httpx exceptions become our `UpstreamError`s
(STYLE anchor 3, like httpx's own `map_httpcore_exceptions`): nothing outside
`providers/` sees an httpx type. The wire formats stay sans-IO: an adapter
hands `stream_deltas()` an `httpx.Request` and a `WireParser` (SSE events in,
deltas out), and this module does the I/O around them:

1. send the request on the provider's pooled client (connect failures,
   DNS, TLS, connect timeout → network/timeout faults);
2. a non-2xx status → `HTTP_<status>` with `Retry-After` and the provider's
   error payload read from the first 64 KiB of the body; a 2xx that is not
   `text/event-stream` → `WRONG_CONTENT_TYPE`, or the provider's error when
   the body is an error object (`200 application/json {"error": …}`);
3. decode the body with `SSEDecoder`, counting bytes against the size cap
   (`RESPONSE_TOO_LARGE`), and feed events to the parser;
4. at the end marker (`[DONE]`, `message_stop`) read what is left of the body
   for a moment, so the connection goes back to the pool, then yield the
   parser's `Finish`. When the connection breaks after the finish reason but
   before the end marker the answer is whole: finish instead of failing;
5. close the response however the iteration ends (exhausted, error,
   `aclose()`, cancellation); `CancelledError` is never caught.

`HttpProvider.in_flight()` shows the attempts being streamed and the body
bytes each has taken in. Every delta of those bytes has been handed on by
the time the streaming task waits for more, so a time keeper that compares
them with what the upstream sent knows the gateway has seen all of it.

Every fault is labelled with the provider, the attempt, the bytes and the
text deltas received so far, and the API key is scrubbed from its message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Protocol

import httpx

from tokenrelay_server.core import classify
from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.errors import Fault, UpstreamError, upstream_error
from tokenrelay_server.upstream.base import Delta, Finish, ProviderRequest
from tokenrelay_server.upstream.sse import ServerSentEvent, SSEDecoder

if TYPE_CHECKING:
    from tokenrelay_server.config.upstream import ProviderConfig

ERROR_BODY_LIMIT = 64 * 1024
ERROR_BODY_WAIT_S = 5.0
# After the end marker: how long to wait for the rest of the body (normally
# just the chunked-encoding terminator) so the connection can be reused.
DRAIN_AFTER_END_S = 1.0
DRAIN_AFTER_END_BYTES = 64 * 1024

SIM_ATTEMPT_HEADER = "x-sim-attempt"


class WireParser(Protocol):
    """A provider's streaming format, sans-IO: SSE events in, deltas out.

    `on_event` and `on_end` raise `UpstreamError` (without bytes, provider or
    attempt: the driver adds them)."""

    tokens_received: int

    @property
    def ended(self) -> bool:
        """The end marker arrived; nothing after it matters."""
        ...

    @property
    def answer_complete(self) -> bool:
        """The finish reason is known: the text is whole."""
        ...

    def on_event(self, event: ServerSentEvent) -> list[Delta]: ...

    def on_end(self) -> list[Delta]:
        """At the end of the body: the final deltas (`Finish`), or raise."""
        ...


def sim_headers(request: ProviderRequest, *, forward: bool) -> dict[str, str]:
    """The mock upstream's controls, only for a provider configured with
    `forward_sim_headers = true` (issue 8: a real API never sees them):
    `x-sim-attempt` (the mock picks the attempt's fault by it) and the
    `sim.*` metadata as `x-sim-*` headers. Values that cannot be header
    values are not sent."""
    if not forward:
        return {}
    headers = {SIM_ATTEMPT_HEADER: str(request.attempt)}
    for key, value in request.metadata:
        if key.startswith("sim.") and len(key) > 4 and _header_safe(value):
            headers["x-sim-" + key[4:].replace("_", "-").replace(".", "-")] = value
    return headers


def _header_safe(value: str) -> bool:
    return value.isascii() and value.isprintable()


def token_count(value: object) -> int:
    """A token count from a provider's usage object: a non-negative int, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def is_event_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


class _Attempt:
    """Counters of one attempt and the labelling of its faults."""

    def __init__(self, provider: str, attempt: int, secrets: tuple[str, ...]) -> None:
        self.provider = provider
        self.attempt = attempt
        self.secrets = secrets
        self.bytes_received = 0

    def counted(self, delta: Delta) -> Delta:
        """A Finish carries the bytes received so far (for observers)."""
        if isinstance(delta, Finish):
            return replace(delta, bytes_received=self.bytes_received)
        return delta

    def error(self, fault: Fault, tokens_received: int) -> UpstreamError:
        message = fault.message
        for secret in self.secrets:
            if secret:
                message = message.replace(secret, "***")
        return upstream_error(
            fault.with_context(
                message=message,
                provider=self.provider,
                attempt=self.attempt,
                bytes_received=self.bytes_received,
                tokens_received=tokens_received,
                suggested_action=classify.next_step(fault.retryable, tokens_received),
            )
        )


@dataclass(frozen=True, slots=True)
class Receiving:
    """One attempt a provider is streaming, as `HttpProvider.in_flight()` shows it."""

    attempt: int
    bytes_received: int  # of the body (error bodies included), as decoded


def transport_evidence(exc: httpx.HTTPError, timeout: httpx.Timeout | None) -> classify.Evidence:
    """What an httpx exception means. The one place httpx errors are read."""
    kind_in_chain = classify.transport_kind_of(exc)
    detail = _describe(exc)
    kind: classify.TransportKind
    timeout_s: float | None = None
    if isinstance(exc, httpx.TimeoutException):
        if isinstance(exc, httpx.ConnectTimeout):
            kind, timeout_s = classify.TransportKind.CONNECT_TIMEOUT, _seconds(timeout, "connect")
        elif isinstance(exc, httpx.PoolTimeout):
            kind, timeout_s = classify.TransportKind.POOL_TIMEOUT, _seconds(timeout, "pool")
        elif isinstance(exc, httpx.WriteTimeout):
            kind, timeout_s = classify.TransportKind.WRITE_TIMEOUT, _seconds(timeout, "write")
        else:
            kind, timeout_s = classify.TransportKind.READ_TIMEOUT, _seconds(timeout, "read")
    elif isinstance(exc, httpx.RemoteProtocolError):
        # h11: "peer closed connection without sending complete message body",
        # "Server disconnected without sending a response": the body was cut.
        kind = kind_in_chain or classify.TransportKind.UNEXPECTED_EOF
    elif isinstance(exc, httpx.DecodingError):
        return classify.BadData("invalid_json", f"the body could not be decoded: {detail}")
    elif kind_in_chain is not None:
        kind = kind_in_chain
    else:
        kind = classify.TransportKind.NETWORK_ERROR
    return classify.TransportFailure(kind, detail, timeout_s)


def _describe(exc: BaseException) -> str:
    """The first non-empty message down the cause chain ("[Errno 104]
    Connection reset by peer" rather than an empty ReadError)."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            break
        if str(current):
            return str(current)
        current = current.__cause__ or current.__context__
    return type(exc).__name__


def _seconds(timeout: httpx.Timeout | None, which: str) -> float | None:
    if timeout is None:
        return None
    value = getattr(timeout, which, None)
    return value if isinstance(value, int | float) else None


async def _read_prefix(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) >= limit:
            break
    return bytes(body[:limit])


async def stream_deltas(
    client: httpx.AsyncClient,
    http_request: httpx.Request,
    parser: WireParser,
    *,
    provider: str,
    attempt: int,
    max_response_bytes: int,
    clock: Clock,
    secrets: tuple[str, ...] = (),
    in_flight: set[_Attempt] | None = None,
) -> AsyncGenerator[Delta, None]:
    """The deltas of one streaming request; raises only `UpstreamError`.
    `in_flight` holds the attempt's counters while it streams.

    One generator, not a wrapper around another: each layer of async
    generator costs about a microsecond per delta (issue 10)."""
    state = _Attempt(provider, attempt, secrets)
    if in_flight is not None:
        in_flight.add(state)
    try:
        timeout = client.timeout
        try:
            response = await client.send(http_request, stream=True)
        except httpx.HTTPError as exc:
            fault = classify.classify(transport_evidence(exc, timeout), now=clock.wall())
            raise state.error(fault, 0) from exc
        # We ask for `accept-encoding: identity`; a body sent that way is read
        # raw, without httpx's decoder and re-chunker (a layer of generator and
        # two calls per read, issue 10). A server that compresses anyway is still
        # decoded, and a body already in memory (a transport that read it whole)
        # is read from there.
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        raw = encoding in ("identity", "") and not response.is_stream_consumed
        chunks = response.aiter_raw() if raw else response.aiter_bytes()
        try:
            headers = tuple(response.headers.multi_items())
            status = response.status_code
            if not 200 <= status < 300:
                body = await _read_body_prefix(chunks, state)
                evidence: classify.Evidence = classify.HttpFailure(status, headers, body)
                raise state.error(classify.classify(evidence, now=clock.wall()), 0)
            content_type = response.headers.get("content-type", "")
            # A missing content type is tolerated (some small servers omit it);
            # a wrong one is not.
            if content_type and not is_event_stream(content_type):
                body = await _read_body_prefix(chunks, state)
                evidence = classify.WrongContentType(status, content_type, body, headers)
                raise state.error(classify.classify(evidence, now=clock.wall()), 0)

            decoder = SSEDecoder()
            try:
                async for chunk in chunks:
                    if not chunk:
                        continue  # b"" would tell the decoder the stream ended
                    state.bytes_received += len(chunk)
                    if state.bytes_received > max_response_bytes:
                        fault = classify.classify(
                            classify.ResponseTooLarge(max_response_bytes), now=clock.wall()
                        )
                        raise state.error(fault, parser.tokens_received)
                    for event in decoder.feed(chunk):
                        try:
                            deltas = parser.on_event(event)
                        except UpstreamError as exc:
                            raise state.error(exc.fault, parser.tokens_received) from None
                        for delta in deltas:
                            yield state.counted(delta)
                        if parser.ended:
                            break
                    if parser.ended:
                        break
            except httpx.HTTPError as exc:
                if not parser.answer_complete:
                    fault = classify.classify(transport_evidence(exc, timeout), now=clock.wall())
                    raise state.error(fault, parser.tokens_received) from exc
                # The finish reason arrived; only the end marker (or the usage
                # chunk) was lost with the connection. The answer is whole.
            else:
                if parser.ended:
                    await _drain(chunks)
                else:
                    decoder.feed(b"")  # §9.2.6: an unterminated event is dropped
            try:
                final = parser.on_end()
            except UpstreamError as exc:
                raise state.error(exc.fault, parser.tokens_received) from None
            for delta in final:
                yield state.counted(delta)
        finally:
            with contextlib.suppress(httpx.HTTPError):  # never hide the error being raised
                await response.aclose()
            await _unwind(chunks)
    finally:
        if in_flight is not None:
            in_flight.discard(state)


async def _read_body_prefix(chunks: AsyncIterator[bytes], state: _Attempt) -> bytes:
    """The start of an error body, or b"" when it is broken or slow to come:
    the status says enough without it."""
    try:
        async with asyncio.timeout(ERROR_BODY_WAIT_S):
            body = await _read_prefix(chunks, ERROR_BODY_LIMIT)
    except (httpx.HTTPError, TimeoutError):
        return b""
    state.bytes_received += len(body)
    return body


async def _unwind(chunks: AsyncIterator[bytes]) -> None:
    """Finish httpx's body iterator after the response was closed.

    httpx reads the body through a chain of async generators (Response →
    client stream → transport stream → httpcore pool → connection). Closing
    only the outermost one leaves the inner ones suspended, and the garbage
    collector then finalizes each in a task nobody owns. Resuming the chain
    instead makes its innermost read fail (HTTP/1.1: the connection is
    closed) or wait (HTTP/2: the connection is shared), and the zero
    timeout cancels any wait at once; either way the failure unwinds every
    generator of the chain in place. Data still buffered is ignored.
    A chain that already finished is left as it is.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(0):
            async for _ in chunks:
                pass


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read the rest of the body, briefly and boundedly, ignoring it."""
    drained = 0
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(DRAIN_AFTER_END_S):
            async for chunk in chunks:
                drained += len(chunk)
                if drained > DRAIN_AFTER_END_BYTES:
                    return


class HttpProvider:
    """What the HTTP adapters share: one pooled client per provider, its URL,
    its key, and the streaming loop above. A subclass names its `path`, builds
    its request body and brings its wire parser."""

    path: ClassVar[str]

    def __init__(
        self,
        name: str,
        config: ProviderConfig,
        client: httpx.AsyncClient,
        *,
        api_key: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._name = name
        self._config = config
        self._client = client
        self._api_key = api_key
        self._clock = clock or SystemClock()
        self._url = f"{config.base_url.rstrip('/')}/{self.path}"
        self._in_flight: set[_Attempt] = set()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, url={self._url!r})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> ProviderConfig:
        return self._config

    def in_flight(self) -> tuple[Receiving, ...]:
        """The attempts streaming now and the body bytes each has taken in."""
        return tuple(Receiving(state.attempt, state.bytes_received) for state in self._in_flight)

    def build_request(self, request: ProviderRequest) -> httpx.Request:
        raise NotImplementedError

    def parser(self) -> WireParser:
        raise NotImplementedError

    def stream(self, request: ProviderRequest) -> AsyncGenerator[Delta, None]:
        return stream_deltas(
            self._client,
            self.build_request(request),
            self.parser(),
            provider=self._name,
            attempt=request.attempt,
            max_response_bytes=self._config.max_response_bytes,
            clock=self._clock,
            secrets=(self._api_key,) if self._api_key else (),
            in_flight=self._in_flight,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
