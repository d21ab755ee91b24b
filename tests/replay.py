"""Recorded upstream bodies served through `httpx.MockTransport`, for adapter
unit tests (the integration tests use the mock upstream over real sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx


class Replay(httpx.AsyncByteStream):
    """Recorded body bytes, optionally followed by a transport error."""

    def __init__(self, chunks: list[bytes], error: Exception | None = None) -> None:
        self.chunks = chunks
        self.error = error
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for data in self.chunks:
            yield data
        if self.error is not None:
            raise self.error

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """A MockTransport handler that records requests and the bodies it served."""

    def __init__(self, respond: Callable[[httpx.Request], httpx.Response]) -> None:
        self.respond = respond
        self.requests: list[httpx.Request] = []
        self.bodies: list[Replay] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.respond(request)
        if isinstance(response.stream, Replay):
            self.bodies.append(response.stream)
        return response

    def all_closed(self) -> bool:
        return all(body.closed for body in self.bodies)


def sse(chunks: list[bytes], error: Exception | None = None, status: int = 200) -> httpx.Response:
    return httpx.Response(
        status, headers={"content-type": "text/event-stream"}, stream=Replay(chunks, error)
    )
