"""`tokenrelay mock-upstream`: the simulator over real HTTP, with faults.

An aiohttp server that answers

    POST /v1/chat/completions   OpenAI Chat Completions streaming (see providers/openai.py)
    POST /v1/messages           Anthropic Messages streaming (see providers/anthropic.py)

in the providers' exact wire formats, with the text of the deterministic
simulator: each request goes through `sim.plan_attempt`, so an HTTP attempt
and an in-process `SimProvider` attempt with the same messages, settings and
attempt number produce the same text. Point a provider's `base_url` at
`http://HOST:PORT/v1`. Requests without `"stream": true` get the whole
answer as one JSON body.

Agent turns (issue 12), as the simulator makes them (see upstream/sim.py):
a request that offers tools gets tool calls (OpenAI `tool_calls` deltas
with `finish_reason: "tool_calls"`; Anthropic `tool_use` blocks with
`input_json_delta`s and `stop_reason: "tool_use"`), a conversation that
ends with tool results (role `tool`; Anthropic `tool_result` blocks) gets
the final text, and `x-sim-reasoning: N` streams N reasoning deltas first
(OpenAI `reasoning_content`; an Anthropic `thinking` block). The request's
tools, tool choice, assistant tool calls and tool results are read back
from each provider's own shape.

Per-request controls (headers; every one optional)

    x-sim-attempt: N          the gateway's attempt number (1-based), sent by the
                              adapters of a provider with `forward_sim_headers = true`,
                              like every x-sim-* header. Without it each request is
                              attempt 1: a script's first item applies to every
                              attempt (so a model suffix, the way to inject faults
                              through a provider that does not forward, is best one
                              item long: "sim#http:503").
    x-sim-faults: SCRIPT      the fault script below. When absent, a model-name suffix
                              is used instead: "model": "sim#reset@10,ok".
    x-sim-seed, x-sim-pace-ms, x-sim-overlap, x-sim-retry-after-s
                              the simulator's settings (metadata sim.seed, sim.pace_ms,
                              sim.overlap, sim.retry_after_s): any `x-sim-NAME-PARTS`
                              header becomes `sim.NAME_PARTS`.

The fault script: comma-separated items, item i for attempt i; attempts past
the last item are clean. An item is one or more parts joined with `+`. N
counts content events of every kind: reasoning and text deltas, a tool
call's first event and each fragment of its arguments (so `reset@N` can
land inside a tool call's arguments):

    simulator faults (at most one per item; the simulator parses these):
    ok                  a clean answer
    reset@N             N events, then a TCP reset (RST)               → ECONNRESET
    stall@N             N events, then silence until the client leaves
    eof@N               N events, then the body ends cleanly with no
                        finish reason and no end marker                → NO_FINISH_REASON
    garbage@N           N events, then a data line of broken JSON      → MALFORMED_DATA
    http:CODE           status CODE with the provider's JSON error body, and
                        Retry-After for 429, 503 and 529               → HTTP_CODE

    HTTP-only faults (any number per item):
    reset_bytes@N       a TCP reset after exactly N bytes of the body  → ECONNRESET
    drop@N              N events, then the connection is closed (FIN) in the
                        middle of the chunked body                     → UNEXPECTED_EOF
    slow_first_byte@MS  wait MS milliseconds before the status line
    html                200 with an HTML error page                    → WRONG_CONTENT_TYPE
    html:CODE           status CODE with an HTML error page            → HTTP_CODE
    json_error:KIND     200 application/json with an error object      → application error
    error@N:KIND        N events, then an error event in the provider's format
                        (OpenAI `data: {"error": …}`, Anthropic `event: error`)
    shape@N             N events, then an event of the wrong shape      → UNEXPECTED_SHAPE
    split_utf8          every event is written in two writes split inside its first
                        multi-byte UTF-8 character
    random_chunks       every event is written in random pieces of 1-16 bytes
                        (seeded by x-sim-seed and the attempt)
    thinking            one more reasoning delta before everything (not counted in N):
                        an Anthropic thinking block, or OpenAI-style
                        `reasoning_content`
    retry_after:seconds|date|ms
                        how http:CODE says when to retry: `Retry-After: <seconds>`
                        (default), `Retry-After: <HTTP-date>`, or `retry-after-ms`

    KIND: rate_limit, overloaded, server_error, invalid_request, authentication,
    context_length

Example: `x-sim-faults: reset@5+split_utf8,http:429+retry_after:date,ok` resets
the first attempt after 5 events written with split characters, answers the
second with 429 and a Retry-After date, and lets the third succeed.

Time: the pace (`x-sim-pace-ms`) and `slow_first_byte` wait on the mock's
injected clock, so a test or the chaos run that gives it a `ManualClock`
decides when they are over. `in_flight()` shows what each request being
answered is doing (still writing, waiting on the clock, or stalled for good)
and how many body bytes it sent: a time keeper (tokenrelay_devtools.timekeeper)
moves a manual clock only when every request it cares about waits on time.

A bad header or body gets a 400 in the provider's error format naming it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import json
import math
import random
import re
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from aiohttp import web

from tokenrelay_devtools.netfault import reset_transport
from tokenrelay_server.core import classify
from tokenrelay_server.core.classify import ProviderErrorKind
from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.errors import RequestError, excerpt
from tokenrelay_server.core.model import Message, Role, Tool, ToolCall, ToolChoice, Usage
from tokenrelay_server.upstream.sim import (
    AttemptPlan,
    SimEvent,
    SimSettings,
    parse_count,
    parse_fault_script,
    plan_attempt,
)

FAULTS_HEADER = "x-sim-faults"
ATTEMPT_HEADER = "x-sim-attempt"
SIM_HEADER_PREFIX = "x-sim-"
MODEL_FAULT_SEPARATOR = "#"

ErrorKind = Literal[
    "rate_limit",
    "overloaded",
    "server_error",
    "invalid_request",
    "authentication",
    "context_length",
]
ERROR_KINDS: tuple[ErrorKind, ...] = get_args(ErrorKind)
RetryAfterStyle = Literal["seconds", "date", "ms"]
RETRY_AFTER_STYLES: tuple[RetryAfterStyle, ...] = get_args(RetryAfterStyle)
_SIM_FAULTS = ("ok", "reset", "stall", "eof", "garbage", "http")
_RETRY_AFTER_STATUSES = frozenset({429, 503, 529})
THINKING_TOKENS = 1  # the `thinking` item's one reasoning delta
# What that delta says, in each format.
THINKING_TEXT = {"openai": "Let me think about that.", "anthropic": "Let me think."}


# --- the fault script ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpFaults:
    """The HTTP-only faults of one attempt."""

    reset_bytes: int | None = None
    drop_at: int | None = None
    slow_first_byte_ms: float = 0.0
    html_status: int | None = None
    json_error: ErrorKind | None = None
    error_at: int | None = None
    error_kind: ErrorKind = "server_error"
    shape_at: int | None = None
    split_utf8: bool = False
    random_chunks: bool = False
    thinking: bool = False
    retry_after: RetryAfterStyle = "seconds"

    @property
    def cut_at(self) -> int | None:
        """Content events to send before an event-level HTTP fault, if any."""
        points = [n for n in (self.drop_at, self.error_at, self.shape_at) if n is not None]
        return min(points) if points else None


@dataclass(frozen=True, slots=True)
class MockFaultItem:
    sim: str  # the simulator part ("ok" when none)
    http: HttpFaults


def _count(text: str, what: str, field: str, position: int) -> int:
    count = parse_count(text)
    if count is None:
        raise RequestError(
            f"{field}: item {position}: {what} needs a whole number, got {excerpt(text)}"
        )
    return count


def _status(text: str, field: str, position: int) -> int:
    status = parse_count(text)
    if status is None or not 100 <= status <= 599:
        raise RequestError(f"{field}: item {position}: {excerpt(text)} is not an HTTP status")
    return status


def _error_kind(text: str, field: str, position: int) -> ErrorKind:
    if text not in ERROR_KINDS:
        raise RequestError(
            f"{field}: item {position}: error kind {excerpt(text)} is not one of "
            f"{', '.join(ERROR_KINDS)}"
        )
    return text


def _apply_http_fault(faults: HttpFaults, part: str, field: str, position: int) -> HttpFaults:
    name, at, argument = part.partition("@")
    if at:
        if name == "reset_bytes":
            return replace(faults, reset_bytes=_count(argument, name, field, position))
        if name == "drop":
            return replace(faults, drop_at=_count(argument, name, field, position))
        if name == "slow_first_byte":
            return replace(faults, slow_first_byte_ms=_count(argument, name, field, position))
        if name == "shape":
            return replace(faults, shape_at=_count(argument, name, field, position))
        if name == "error":
            count, colon, kind = argument.partition(":")
            return replace(
                faults,
                error_at=_count(count, name, field, position),
                error_kind=_error_kind(kind, field, position) if colon else "server_error",
            )
    name, colon, argument = part.partition(":")
    if name == "html":
        return replace(faults, html_status=_status(argument, field, position) if colon else 200)
    if name == "json_error" and colon:
        return replace(faults, json_error=_error_kind(argument, field, position))
    if name == "retry_after" and argument in RETRY_AFTER_STYLES:
        return replace(faults, retry_after=argument)
    if part == "split_utf8":
        return replace(faults, split_utf8=True)
    if part == "random_chunks":
        return replace(faults, random_chunks=True)
    if part == "thinking":
        return replace(faults, thinking=True)
    raise RequestError(
        f"{field}: item {position}: {excerpt(part)} is not a fault (see the mock upstream's "
        "documentation: ok, reset@N, stall@N, eof@N, garbage@N, http:CODE, reset_bytes@N, "
        "drop@N, slow_first_byte@MS, html[:CODE], json_error:KIND, error@N[:KIND], shape@N, "
        "split_utf8, random_chunks, thinking, retry_after:seconds|date|ms)"
    )


def parse_mock_faults(script: str, field: str = FAULTS_HEADER) -> tuple[MockFaultItem, ...]:
    """Parse the fault script; raises RequestError naming `field` and the item."""
    if not script.strip():
        return ()
    items: list[MockFaultItem] = []
    for position, raw in enumerate(script.split(","), start=1):
        sim_part = ""
        http = HttpFaults()
        for part in (piece.strip() for piece in raw.split("+")):
            head = part.split("@", 1)[0].split(":", 1)[0]
            if head in _SIM_FAULTS:
                if sim_part:
                    raise RequestError(
                        f"{field}: item {position} has two simulator faults "
                        f"({excerpt(sim_part)} and {excerpt(part)})"
                    )
                sim_part = part
            else:
                http = _apply_http_fault(http, part, field, position)
        items.append(MockFaultItem(sim=sim_part or "ok", http=http))
    # The simulator validates its own part of every item.
    parse_fault_script(",".join(item.sim for item in items), field=field)
    return tuple(items)


# --- wire formats -------------------------------------------------------------------------------


def _json(value: object) -> str:
    # ensure_ascii=False: characters go out as UTF-8 bytes, which split_utf8 can split.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


_OPENAI_ERRORS: dict[str, tuple[str, str | None, str]] = {
    "rate_limit": ("requests", "rate_limit_exceeded", "Rate limit reached for requests"),
    "overloaded": ("server_error", "server_overloaded", "The server is overloaded"),
    "server_error": ("server_error", None, "The server had an error processing your request"),
    "invalid_request": ("invalid_request_error", None, "Invalid request"),
    "authentication": ("invalid_request_error", "invalid_api_key", "Incorrect API key provided"),
    "context_length": (
        "invalid_request_error",
        "context_length_exceeded",
        "This model's maximum context length is 128000 tokens.",
    ),
}

_ANTHROPIC_ERRORS: dict[str, tuple[str, str]] = {
    "rate_limit": ("rate_limit_error", "Number of requests has exceeded your rate limit"),
    "overloaded": ("overloaded_error", "Overloaded"),
    "server_error": ("api_error", "Internal server error"),
    "invalid_request": ("invalid_request_error", "Invalid request"),
    "authentication": ("authentication_error", "invalid x-api-key"),
    "context_length": (
        "invalid_request_error",
        "prompt is too long: 210000 tokens > 200000 maximum",
    ),
}

_ANTHROPIC_STATUS_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


# The body `http:CODE` sends is the one the gateway's status table says the
# status means (classify.HTTP_STATUSES), so a status and its body never
# disagree; kinds with no body of their own send `invalid_request`.
_BODY_FOR_KIND: dict[ProviderErrorKind, ErrorKind] = {
    ProviderErrorKind.RATE_LIMITED: "rate_limit",
    ProviderErrorKind.OVERLOADED: "overloaded",
    ProviderErrorKind.SERVER_ERROR: "server_error",
    ProviderErrorKind.AUTHENTICATION: "authentication",
    ProviderErrorKind.CONTEXT_LENGTH: "context_length",
}


def _kind_for_status(status: int) -> ErrorKind:
    return _BODY_FOR_KIND.get(classify.http_status_meaning(status).kind, "invalid_request")


class _OpenAIWire:
    """Chat Completions chunks (https://platform.openai.com/docs/api-reference/chat/streaming)."""

    def __init__(self, model: str, include_usage: bool, created: int) -> None:
        self._model = model
        self._include_usage = include_usage
        self._created = created

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk = {
            "id": "chatcmpl-sim",
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        return f"data: {_json(chunk)}\n\n".encode()

    def preamble(self, plan: AttemptPlan, thinking: bool) -> list[bytes]:
        events = [self._chunk({"role": "assistant", "content": ""})]
        if thinking:
            events.append(self._chunk({"reasoning_content": THINKING_TEXT["openai"]}))
        return events

    def event(self, event: SimEvent) -> list[bytes]:
        if event.kind == "reasoning":
            return [self._chunk({"reasoning_content": event.text})]
        if event.kind == "tool_call":
            piece: dict[str, Any] = {"index": event.index, "function": {"arguments": event.text}}
            if event.id:
                piece = {
                    "index": event.index,
                    "id": event.id,
                    "type": "function",
                    "function": {"name": event.name, "arguments": event.text},
                }
            return [self._chunk({"tool_calls": [piece]})]
        return [self._chunk({"content": event.text})]

    def finish(self, plan: AttemptPlan) -> list[bytes]:
        events = [self._chunk({}, plan.finish_reason)]
        if self._include_usage:
            usage = {
                "prompt_tokens": plan.usage.prompt_tokens,
                "completion_tokens": plan.usage.completion_tokens,
                "total_tokens": plan.usage.prompt_tokens + plan.usage.completion_tokens,
            }
            chunk = {
                "id": "chatcmpl-sim",
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": usage,
            }
            events.append(f"data: {_json(chunk)}\n\n".encode())
        events.append(b"data: [DONE]\n\n")
        return events

    def garbage(self) -> bytes:
        return b'data: {"choices": [{"index": 0, "delta": {"content": "oops\n\n'

    def wrong_shape(self) -> bytes:
        return b'data: {"choices": {"index": 0, "delta": "not an object"}}\n\n'

    def error_object(self, kind: str) -> dict[str, Any]:
        error_type, code, message = _OPENAI_ERRORS[kind]
        return {"error": {"message": message, "type": error_type, "param": None, "code": code}}

    def status_error(self, status: int, message: str = "") -> dict[str, Any]:
        body = self.error_object(_kind_for_status(status))
        if message:
            body["error"]["message"] = message
        return body

    def error_event(self, kind: str) -> bytes:
        return f"data: {_json(self.error_object(kind))}\n\n".encode()

    def whole(self, plan: AttemptPlan) -> dict[str, Any]:
        return {
            "id": "chatcmpl-sim",
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": 0,
                    "message": _openai_whole_message(plan),
                    "finish_reason": plan.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": plan.usage.prompt_tokens,
                "completion_tokens": plan.usage.completion_tokens,
                "total_tokens": plan.usage.prompt_tokens + plan.usage.completion_tokens,
            },
        }


class _AnthropicWire:
    """Messages events (https://docs.anthropic.com/en/docs/build-with-claude/streaming)."""

    STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}

    def __init__(self, model: str) -> None:
        self._model = model
        self._text_index = 0  # the index of the open (or next) content block
        # The open block: ("text" | "reasoning", 0) or ("tool_call", call index).
        self._open: tuple[str, int] | None = None

    @staticmethod
    def _event(name: str, data: dict[str, Any]) -> bytes:
        return f"event: {name}\ndata: {_json({'type': name, **data})}\n\n".encode()

    def preamble(self, plan: AttemptPlan, thinking: bool) -> list[bytes]:
        message: dict[str, Any] = {
            "id": "msg_sim",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self._model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": plan.usage.prompt_tokens, "output_tokens": 1},
        }
        events = [self._event("message_start", {"message": message})]
        if thinking:
            events += [
                self._event(
                    "content_block_start",
                    {"index": 0, "content_block": {"type": "thinking", "thinking": ""}},
                ),
                self._event(
                    "content_block_delta",
                    {
                        "index": 0,
                        "delta": {"type": "thinking_delta", "thinking": THINKING_TEXT["anthropic"]},
                    },
                ),
                self._event(
                    "content_block_delta",
                    {"index": 0, "delta": {"type": "signature_delta", "signature": "c2ln"}},
                ),
                self._event("content_block_stop", {"index": 0}),
            ]
            self._text_index = 1
        events.append(self._event("ping", {}))
        return events

    def _block_for(self, event: SimEvent) -> list[bytes]:
        """Close the open block and start the one `event` belongs in, if it
        is another (a text block, a thinking block, a call's tool_use)."""
        wanted = (event.kind, event.index if event.kind == "tool_call" else 0)
        if self._open == wanted:
            return []
        out = self._close_block()
        if event.kind == "reasoning":
            block: dict[str, Any] = {"type": "thinking", "thinking": ""}
        elif event.kind == "tool_call":
            block = {"type": "tool_use", "id": event.id, "name": event.name, "input": {}}
        else:
            block = {"type": "text", "text": ""}
        out.append(
            self._event("content_block_start", {"index": self._text_index, "content_block": block})
        )
        self._open = wanted
        return out

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        stop = [self._event("content_block_stop", {"index": self._text_index})]
        if self._open[0] == "reasoning":
            stop.insert(
                0,
                self._event(
                    "content_block_delta",
                    {
                        "index": self._text_index,
                        "delta": {"type": "signature_delta", "signature": "c2ln"},
                    },
                ),
            )
        self._open = None
        self._text_index += 1
        return stop

    def event(self, event: SimEvent) -> list[bytes]:
        out = self._block_for(event)
        if event.kind == "reasoning":
            delta: dict[str, Any] = {"type": "thinking_delta", "thinking": event.text}
        elif event.kind == "tool_call":
            if not event.text:
                return out  # the call's first event is its content_block_start
            delta = {"type": "input_json_delta", "partial_json": event.text}
        else:
            delta = {"type": "text_delta", "text": event.text}
        out.append(self._event("content_block_delta", {"index": self._text_index, "delta": delta}))
        return out

    def finish(self, plan: AttemptPlan) -> list[bytes]:
        stop_reason = self.STOP_REASONS.get(plan.finish_reason, plan.finish_reason)
        # An empty answer still has its (empty) text block.
        opened = self._block_for(SimEvent("text")) if self._open is None else []
        return [
            *opened,
            *self._close_block(),
            self._event(
                "message_delta",
                {
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": plan.usage.completion_tokens},
                },
            ),
            self._event("message_stop", {}),
        ]

    def garbage(self) -> bytes:
        return (
            b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "de\n\n'
        )

    def wrong_shape(self) -> bytes:
        return self._event(
            "content_block_delta",
            {"index": self._text_index, "delta": {"type": "text_delta", "text": 42}},
        )

    def error_object(self, kind: str) -> dict[str, Any]:
        error_type, message = _ANTHROPIC_ERRORS[kind]
        return {"type": "error", "error": {"type": error_type, "message": message}}

    def status_error(self, status: int, message: str = "") -> dict[str, Any]:
        error_type = _ANTHROPIC_STATUS_TYPES.get(status)
        if error_type is None:
            return self.error_object(_kind_for_status(status))
        default_message = dict(_ANTHROPIC_ERRORS.values()).get(error_type, f"HTTP {status}")
        return {
            "type": "error",
            "error": {"type": error_type, "message": message or default_message},
        }

    def error_event(self, kind: str) -> bytes:
        return f"event: error\ndata: {_json(self.error_object(kind))}\n\n".encode()

    def whole(self, plan: AttemptPlan) -> dict[str, Any]:
        return {
            "id": "msg_sim",
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": _anthropic_whole_content(plan),
            "stop_reason": self.STOP_REASONS.get(plan.finish_reason, plan.finish_reason),
            "stop_sequence": None,
            "usage": {
                "input_tokens": plan.usage.prompt_tokens,
                "output_tokens": plan.usage.completion_tokens,
            },
        }


_Wire = _OpenAIWire | _AnthropicWire


def _calls_of(plan: AttemptPlan) -> list[tuple[str, str, str]]:
    """(id, name, arguments) of each tool call of a plan, assembled."""
    calls: dict[int, list[str]] = {}
    for event in plan.events:
        if event.kind != "tool_call":
            continue
        if event.id:
            calls[event.index] = [event.id, event.name, ""]
        else:
            calls[event.index][2] += event.text
    return [(call[0], call[1], call[2]) for _, call in sorted(calls.items())]


def _openai_whole_message(plan: AttemptPlan) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": "".join(plan.pieces)}
    calls = _calls_of(plan)
    if calls:
        message["tool_calls"] = [
            {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}
            for id_, name, arguments in calls
        ]
    return message


def _anthropic_whole_content(plan: AttemptPlan) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if plan.pieces or not plan.events:
        content.append({"type": "text", "text": "".join(plan.pieces)})
    content += [
        {"type": "tool_use", "id": id_, "name": name, "input": json.loads(arguments)}
        for id_, name, arguments in _calls_of(plan)
    ]
    return content


_HTML_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>{status} {reason}</title></head>\n"
    "<body><center><h1>{status} {reason}</h1></center><hr><center>nginx</center></body></html>\n"
)


# --- request bodies ------------------------------------------------------------


class _BadRequest(Exception):
    """A request the mock rejects with 400; the message names the field."""


def _text_of(content: object, where: str) -> str:
    if content is None:
        return ""  # an OpenAI assistant message with only tool calls
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                parts.append(block["text"])
        return "".join(parts)
    raise _BadRequest(f"{where} must be a string or a list of text blocks")


_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _BadRequest(f"{where} must be a string")
    return value


def _messages(raw: object, field: str) -> list[Message]:
    """Chat Completions messages (the Messages API's are read by
    `_anthropic_messages`), with tool calls and tool results."""
    if not isinstance(raw, list) or not raw:
        raise _BadRequest(f"{field} must be a non-empty list")
    messages = []
    for index, item in enumerate(raw):
        where = f"{field}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise _BadRequest(f"{where} must be an object with a role")
        role = _ROLES.get(item["role"], "user")
        content = _text_of(item.get("content", ""), f"{where}.content")
        calls: list[ToolCall] = []
        raw_calls = item.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise _BadRequest(f"{where}.tool_calls must be a list")
        for position, call in enumerate(raw_calls):
            at = f"{where}.tool_calls[{position}]"
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(call, dict) or not isinstance(function, dict):
                raise _BadRequest(f"{at} must be an object with a function")
            calls.append(
                ToolCall(
                    _string(call.get("id"), f"{at}.id"),
                    _string(function.get("name"), f"{at}.function.name"),
                    _string(function.get("arguments"), f"{at}.function.arguments"),
                )
            )
        tool_call_id = ""
        if role == "tool":
            tool_call_id = _string(item.get("tool_call_id"), f"{where}.tool_call_id")
        messages.append(Message(role, content, tool_calls=tuple(calls), tool_call_id=tool_call_id))
    return messages


def _anthropic_messages(raw: object, field: str) -> list[Message]:
    """Messages API turns: tool_use blocks are the assistant's tool calls,
    each tool_result block a "tool" message (the text after them, a user
    message)."""
    if not isinstance(raw, list) or not raw:
        raise _BadRequest(f"{field} must be a non-empty list")
    messages: list[Message] = []
    for index, item in enumerate(raw):
        where = f"{field}[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("role"), str):
            raise _BadRequest(f"{where} must be an object with a role")
        role = _ROLES.get(item["role"], "user")
        content = item.get("content", "")
        if not isinstance(content, list):
            messages.append(Message(role, _text_of(content, f"{where}.content")))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        for position, block in enumerate(content):
            at = f"{where}.content[{position}]"
            if not isinstance(block, dict):
                raise _BadRequest(f"{at} must be a content block object")
            kind = block.get("type")
            if kind == "tool_result":
                messages.append(
                    Message(
                        "tool",
                        _text_of(block.get("content", ""), f"{at}.content"),
                        tool_call_id=_string(block.get("tool_use_id"), f"{at}.tool_use_id"),
                    )
                )
            elif kind == "tool_use":
                tool_input = block.get("input", {})
                if not isinstance(tool_input, dict):
                    raise _BadRequest(f"{at}.input must be an object")
                calls.append(
                    ToolCall(
                        _string(block.get("id"), f"{at}.id"),
                        _string(block.get("name"), f"{at}.name"),
                        json.dumps(tool_input, ensure_ascii=False),
                    )
                )
            elif isinstance(block.get("text"), str):
                texts.append(block["text"])
        if texts or calls or not any(b.get("type") == "tool_result" for b in content):
            messages.append(Message(role, "".join(texts), tool_calls=tuple(calls)))
    return messages


def _openai_tools(body: dict[str, Any]) -> tuple[tuple[Tool, ...], ToolChoice | None]:
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise _BadRequest("tools must be a list")
    tools = []
    for index, entry in enumerate(raw):
        function = entry.get("function") if isinstance(entry, dict) else None
        if not isinstance(function, dict):
            raise _BadRequest(f"tools[{index}] must be an object with a function")
        parameters = function.get("parameters")
        tools.append(
            Tool(
                _string(function.get("name"), f"tools[{index}].function.name"),
                str(function.get("description", "")),
                "" if parameters is None else json.dumps(parameters),
            )
        )
    choice = body.get("tool_choice")
    if choice is None:
        return tuple(tools), None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return tuple(tools), ToolChoice(tool_name=_string(name, "tool_choice.function.name"))
    if choice not in ("auto", "none", "required"):
        raise _BadRequest("tool_choice must be auto, none, required or a function")
    return tuple(tools), ToolChoice(mode=choice)


_ANTHROPIC_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def _anthropic_tools(body: dict[str, Any]) -> tuple[tuple[Tool, ...], ToolChoice | None]:
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise _BadRequest("tools must be a list")
    tools = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("input_schema"), dict):
            raise _BadRequest(f"tools[{index}] must be an object with an input_schema")
        tools.append(
            Tool(
                _string(entry.get("name"), f"tools[{index}].name"),
                str(entry.get("description", "")),
                json.dumps(entry["input_schema"]),
            )
        )
    choice = body.get("tool_choice")
    if choice is None:
        return tuple(tools), None
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        return tuple(tools), ToolChoice(tool_name=_string(choice.get("name"), "tool_choice.name"))
    if kind not in _ANTHROPIC_CHOICES:
        raise _BadRequest("tool_choice.type must be auto, any, none or tool")
    return tuple(tools), ToolChoice(mode=_ANTHROPIC_CHOICES[kind])  # type: ignore[arg-type]


def _max_tokens(body: dict[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _BadRequest(f"{key} must be a positive integer")
        return value
    return None


# --- the server ----------------------------------------------------------------


_METADATA_KEY = re.compile(r'metadata\["sim\.([a-z_]+)"\]')


def _as_header_names(message: str) -> str:
    """The simulator names `metadata["sim.pace_ms"]`; here it came as a header."""
    return _METADATA_KEY.sub(
        lambda match: SIM_HEADER_PREFIX + match.group(1).replace("_", "-"), message
    )


@dataclass(frozen=True, slots=True)
class _Parsed:
    """What a request body asks the simulator for."""

    wire: _Wire
    messages: list[Message]
    max_tokens: int | None
    stream: bool
    tools: tuple[Tool, ...]
    tool_choice: ToolChoice | None


class _ConnectionCut(Exception):
    """The mock cut the connection on purpose; the handler just ends."""


# --- what the requests being answered are doing --------------------------------

AnswerState = Literal["answering", "waiting", "stalled"]


@dataclass(eq=False)
class _Answer:
    """The mock's own record of one request it is answering."""

    attempt: int
    state: AnswerState = "answering"
    body: _BodyWriter | None = None  # once the streamed body started


@dataclass(frozen=True, slots=True)
class InFlight:
    """One request being answered, as `MockUpstream.in_flight()` shows it.

    `state`: "answering" (reading the request, writing, cutting: what it does
    next does not wait on time), "waiting" (sleeping on the mock's clock: the
    pace or a slow first byte) or "stalled" (`stall@N`: nothing more until the
    client leaves). `bytes_sent`: of the streamed body so far (a reader that
    has taken in as many has everything the mock wrote)."""

    attempt: int
    state: AnswerState
    bytes_sent: int


class _BodyWriter:
    """Writes SSE bytes with the attempt's write-level faults."""

    def __init__(
        self, request: web.Request, response: web.StreamResponse, faults: HttpFaults, seed: str
    ) -> None:
        self._request = request
        self._response = response
        self._faults = faults
        self._rng = random.Random(seed)
        self.sent = 0

    async def write(self, data: bytes) -> None:
        limit = self._faults.reset_bytes
        if limit is not None and self.sent + len(data) >= limit:
            await self._send(data[: limit - self.sent])
            await self.cut(reset=True)
        await self._send(data)

    async def _send(self, data: bytes) -> None:
        if not data:
            return
        pieces = [data]
        if self._faults.split_utf8:
            pieces = _split_inside_character(data)
        if self._faults.random_chunks:
            pieces = [part for piece in pieces for part in self._random_split(piece)]
        for index, piece in enumerate(pieces):
            if index:
                # Let the event loop run so the reader can see the pieces apart.
                await asyncio.sleep(0)
            await self._response.write(piece)
            self.sent += len(piece)

    def _random_split(self, data: bytes) -> list[bytes]:
        pieces = []
        position = 0
        while position < len(data):
            size = self._rng.randint(1, 16)
            pieces.append(data[position : position + size])
            position += size
        return pieces

    async def cut(self, *, reset: bool) -> None:
        """Flush what was written, then RST (reset) or FIN mid-body (drop)."""
        transport = self._request.transport
        if transport is not None:
            # Bounded: the peer may have stopped reading.
            for _ in range(1000):
                if transport.get_write_buffer_size() == 0:
                    break
                await asyncio.sleep(0.001)
            if reset:
                reset_transport(transport)
            else:
                transport.close()
        raise _ConnectionCut


def _split_inside_character(data: bytes) -> list[bytes]:
    for index, byte in enumerate(data):
        if byte >= 0xC0:  # the lead byte of a multi-byte UTF-8 character
            return [data[: index + 1], data[index + 1 :]]
    middle = len(data) // 2
    return [data[:middle], data[middle:]]


class MockUpstream:
    """The mock upstream server. `await start()`, use `base_url`, `await stop()`."""

    def __init__(self, *, clock: Clock | None = None, access_log: bool = False) -> None:
        self._clock = clock or SystemClock()
        self._access_log = access_log
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.host = ""
        self.port = 0
        self.active_requests = 0
        self.requests_served = 0
        self._answers: set[_Answer] = set()
        # The x-sim-* headers of the latest requests (names lower-cased), so a
        # test can see what an adapter forwards; bounded for a long-lived mock.
        self.sim_headers_received: collections.deque[dict[str, str]] = collections.deque(
            maxlen=1000
        )

    @property
    def base_url(self) -> str:
        """The `base_url` for either provider kind."""
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"http://{host}:{self.port}/v1"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen (port 0 picks a free port); returns the actual port."""
        options: dict[str, Any] = {} if self._access_log else {"access_log": None}
        runner = web.AppRunner(
            self.build_app(),
            handler_cancellation=True,  # a client that leaves cancels its handler
            shutdown_timeout=2.0,
            **options,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.host = host
        self.port = runner.addresses[0][1]  # port 0: the one the OS picked
        return self.port

    def in_flight(self) -> tuple[InFlight, ...]:
        """What each request being answered is doing now (its body read and
        its controls parsed; a request still being read is not shown)."""
        return tuple(
            InFlight(
                attempt=answer.attempt,
                state=answer.state,
                bytes_sent=0 if answer.body is None else answer.body.sent,
            )
            for answer in self._answers
        )

    async def wait_idle(self) -> None:
        """Return once no request is being handled (bound it with a timeout)."""
        await self._idle.wait()

    async def stop(self) -> None:
        """Stop listening, end stalled answers and close every connection."""
        self._stopping.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> MockUpstream:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- handlers ---------------------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._openai_request)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, self._anthropic_request)

    async def _handle(
        self,
        request: web.Request,
        read: Callable[[web.Request, dict[str, Any]], Awaitable[_Parsed]],
    ) -> web.StreamResponse:
        self.active_requests += 1
        self._idle.clear()
        self.sim_headers_received.append(
            {
                name.lower(): value
                for name, value in request.headers.items()
                if name.lower().startswith(SIM_HEADER_PREFIX)
            }
        )
        try:
            anthropic = request.path.endswith("/messages")
            fallback_wire: _Wire = (
                _AnthropicWire("sim") if anthropic else _OpenAIWire("sim", False, 0)
            )
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise _BadRequest("the body must be a JSON object")
                parsed = await read(request, body)
                settings, attempt, faults = self._controls(request, str(body.get("model", "")))
            except (_BadRequest, RequestError, ValueError) as exc:
                message = _as_header_names(str(exc))
                return web.json_response(fallback_wire.status_error(400, message), status=400)
            plan = plan_attempt(
                tuple(parsed.messages),
                max_tokens=parsed.max_tokens,
                attempt=attempt,
                settings=settings,
                tools=parsed.tools,
                tool_choice=parsed.tool_choice,
            )
            answer = _Answer(attempt)
            self._answers.add(answer)
            try:
                return await self._respond(
                    request, parsed.wire, plan, settings, answer, faults, parsed.stream
                )
            finally:
                self._answers.discard(answer)
        finally:
            self.active_requests -= 1
            self.requests_served += 1
            if not self.active_requests:
                self._idle.set()

    async def _openai_request(self, request: web.Request, body: dict[str, Any]) -> _Parsed:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model must be a non-empty string")
        messages = _messages(body.get("messages"), "messages")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        wire = _OpenAIWire(
            model.split(MODEL_FAULT_SEPARATOR, 1)[0], include_usage, int(self._clock.wall())
        )
        max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
        tools, tool_choice = _openai_tools(body)
        return _Parsed(wire, messages, max_tokens, body.get("stream") is True, tools, tool_choice)

    async def _anthropic_request(self, request: web.Request, body: dict[str, Any]) -> _Parsed:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("model must be a non-empty string")
        max_tokens = _max_tokens(body, "max_tokens")
        if max_tokens is None:
            raise _BadRequest("max_tokens is required")
        messages = _anthropic_messages(body.get("messages"), "messages")
        system = body.get("system")
        if system:
            messages.insert(0, Message("system", _text_of(system, "system")))
        wire = _AnthropicWire(model.split(MODEL_FAULT_SEPARATOR, 1)[0])
        tools, tool_choice = _anthropic_tools(body)
        return _Parsed(wire, messages, max_tokens, body.get("stream") is True, tools, tool_choice)

    def _controls(self, request: web.Request, model: str) -> tuple[SimSettings, int, HttpFaults]:
        raw_attempt = request.headers.get(ATTEMPT_HEADER, "1")
        parsed_attempt = parse_count(raw_attempt)
        if parsed_attempt is None or parsed_attempt < 1:
            raise _BadRequest(
                f"{ATTEMPT_HEADER} must be a positive integer, got {excerpt(raw_attempt)}"
            )
        attempt = parsed_attempt
        _, has_suffix, suffix = model.partition(MODEL_FAULT_SEPARATOR)
        if FAULTS_HEADER in request.headers:
            items = parse_mock_faults(request.headers[FAULTS_HEADER], FAULTS_HEADER)
        elif has_suffix:
            items = parse_mock_faults(suffix, f"model suffix {MODEL_FAULT_SEPARATOR}{suffix}")
        else:
            items = ()
        metadata = [
            ("sim." + name[len(SIM_HEADER_PREFIX) :].replace("-", "_"), value)
            for name, value in ((name.lower(), value) for name, value in request.headers.items())
            if name.startswith(SIM_HEADER_PREFIX) and name not in (ATTEMPT_HEADER, FAULTS_HEADER)
        ]
        metadata.append(("sim.faults", ",".join(item.sim for item in items)))
        settings = SimSettings.from_metadata(tuple(metadata))
        faults = items[attempt - 1].http if attempt <= len(items) else HttpFaults()
        return settings, attempt, faults

    async def _respond(
        self,
        request: web.Request,
        wire: _Wire,
        plan: AttemptPlan,
        settings: SimSettings,
        answer: _Answer,
        faults: HttpFaults,
        stream: bool,
    ) -> web.StreamResponse:
        if faults.slow_first_byte_ms:
            await self._wait(answer, faults.slow_first_byte_ms / 1000.0)
        if faults.html_status is not None:
            reason = "OK" if faults.html_status == 200 else "Bad Gateway"
            page = _HTML_PAGE.format(status=faults.html_status, reason=reason)
            return web.Response(status=faults.html_status, text=page, content_type="text/html")
        if faults.json_error is not None:
            return web.json_response(wire.error_object(faults.json_error), status=200)
        if plan.fault.kind == "http":
            status = plan.fault.n
            headers = {}
            if status in _RETRY_AFTER_STATUSES:
                headers = self._retry_after_headers(settings.retry_after_s, faults.retry_after)
            return web.json_response(wire.status_error(status), status=status, headers=headers)
        if not stream:
            return web.json_response(wire.whole(plan))
        if faults.thinking:
            # The extra reasoning delta is output the model paid for, as a
            # real provider's usage counts reasoning tokens.
            usage = plan.usage
            plan = replace(
                plan, usage=Usage(usage.prompt_tokens, usage.completion_tokens + THINKING_TOKENS)
            )

        response = web.StreamResponse(
            status=200,
            headers={
                "content-type": "text/event-stream; charset=utf-8",
                "cache-control": "no-cache",
            },
        )
        await response.prepare(request)
        out = answer.body = _BodyWriter(
            request, response, faults, f"{settings.seed}:{answer.attempt}"
        )
        try:
            await self._write_stream(out, wire, plan, settings, faults, answer)
        except _ConnectionCut:
            pass
        return response

    async def _write_stream(
        self,
        out: _BodyWriter,
        wire: _Wire,
        plan: AttemptPlan,
        settings: SimSettings,
        faults: HttpFaults,
        answer: _Answer,
    ) -> None:
        for data in wire.preamble(plan, faults.thinking):
            await out.write(data)
        events = plan.events
        cut_at = faults.cut_at
        if cut_at is not None:
            events = events[:cut_at]
        pace_s = settings.pace_ms / 1000.0
        # An absolute schedule, as the in-process simulator's: event i is due
        # at start + (i + 1) * pace, so the rate holds however late each
        # wake-up and each write is (issue 10: sleeping the full pace after
        # each event drifted below the nominal rate).
        started = self._clock.monotonic()
        for index, event in enumerate(events):
            if pace_s:
                delay = started + (index + 1) * pace_s - self._clock.monotonic()
                if delay > 0:  # an event already due (a late wake-up) is not a wait
                    await self._wait(answer, delay)
            for data in wire.event(event):
                await out.write(data)
        if cut_at is not None:
            if cut_at == faults.drop_at:
                await out.cut(reset=False)
            elif cut_at == faults.error_at:
                await out.write(wire.error_event(faults.error_kind))
            else:
                await out.write(wire.wrong_shape())
            return
        kind = plan.fault.kind
        if kind == "reset":
            await out.cut(reset=True)
        elif kind == "stall":
            answer.state = "stalled"
            await self._stopping.wait()  # the client leaving cancels this handler
            answer.state = "answering"
            await out.cut(reset=False)
        elif kind == "garbage":
            await out.write(wire.garbage())
        elif kind == "ok":
            for data in wire.finish(plan):
                await out.write(data)
        # "eof": the body just ends

    async def _wait(self, answer: _Answer, seconds: float) -> None:
        """Wait on the mock's clock, showing it in `in_flight()`."""
        answer.state = "waiting"
        try:
            await self._clock.sleep(seconds)
        finally:
            answer.state = "answering"

    def _retry_after_headers(self, seconds: float, style: RetryAfterStyle) -> dict[str, str]:
        if style == "ms":
            return {"retry-after-ms": str(round(seconds * 1000))}
        if style == "date":
            when = datetime.fromtimestamp(math.ceil(self._clock.wall() + seconds), UTC)
            return {"retry-after": email.utils.format_datetime(when, usegmt=True)}
        return {"retry-after": str(math.ceil(seconds))}


async def start_mock_upstream(
    host: str = "127.0.0.1", port: int = 0, *, clock: Clock | None = None
) -> tuple[MockUpstream, int]:
    """Start a mock upstream; returns it (call `await stop()`) and its port."""
    upstream = MockUpstream(clock=clock)
    actual_port = await upstream.start(host, port)
    return upstream, actual_port


async def serve_mock_upstream(host: str, port: int) -> None:
    """Run until SIGINT/SIGTERM (or cancellation)."""
    upstream = MockUpstream(access_log=True)
    await upstream.start(host, port)
    print(
        f'mock upstream listening: base_url = "{upstream.base_url}" (kind "openai" or "anthropic")',
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on every platform
            loop.add_signal_handler(signal_number, stop.set)
    try:
        await stop.wait()
    finally:
        await upstream.stop()


def main(host: str = "127.0.0.1", port: int = 8081) -> None:
    """Entry point for `tokenrelay mock-upstream --host --port`."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_mock_upstream(host, port))
