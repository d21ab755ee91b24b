"""Anthropic Messages streaming.

Wire format (https://docs.anthropic.com/en/docs/build-with-claude/streaming):
`POST {base_url}/messages` with `"stream": true`, headers `x-api-key` and
`anthropic-version`, answers named events whose data repeats the name in
`type`:

    event: message_start        {"message": {…, "usage": {"input_tokens": 25, …}}}
    event: content_block_start  {"index": 0, "content_block": {"type": "text", "text": ""}}
    event: ping
    event: content_block_delta  {"index": 0, "delta": {"type": "text_delta", "text": "Hello"}}
    event: content_block_stop   {"index": 0}
    event: message_delta        {"delta": {"stop_reason": "end_turn"},
                                 "usage": {"output_tokens": 15}}
    event: message_stop

- `text_delta` is answer text; `thinking_delta` (extended thinking) is
  reasoning; `signature_delta`, `citations_delta` and redacted thinking are
  not shown.
- A `tool_use` block is a tool call: its content_block_start carries the id
  and name (a `ToolCallDelta` numbered by the call's place in the turn,
  0, 1, 2, …, not by the block's index), each `input_json_delta` a
  fragment of the arguments (`partial_json`), its content_block_stop ends
  the call (`ToolCallDone`). A call with no `input_json_delta` has the
  block's `input` ("{}" when empty).
- `message_delta` carries the stop reason and the cumulative output tokens;
  stop reasons are mapped to the gateway's finish reasons: end_turn and
  stop_sequence → stop, max_tokens → length, tool_use → tool_calls,
  refusal → content_filter; others pass through.
- `event: error` can arrive mid-stream (`{"type": "error", "error": {"type":
  "overloaded_error", "message": "Overloaded"}}`) and is classified like an
  error body.
- Unknown event types are ignored, as Anthropic's versioning policy asks.
- The stream is complete at `message_stop`, or at the end of the body once
  the stop reason arrived. A body that ends with neither is NO_FINISH_REASON.

Requests carry the tools as `tools: [{name, description, input_schema}]`
(an empty schema is `{"type": "object", "properties": {}}`: the API
requires one) and `tool_choice` (`auto`, `any` for required, `none`, or
`{"type": "tool", "name": …}`), only with tools; an assistant message's
calls as `tool_use` content blocks after its text, and tool results as
`tool_result` blocks of the user turn that follows (consecutive results, and
a user message right after them, are one user turn, as the API asks).

Continuation: the partial answer goes last as an assistant message, which
Claude continues as a prefill (the API rejects a prefill that ends in
whitespace, so trailing whitespace is trimmed; the stitcher removes what the
model repeats). With `assistant_prefill = false` the OpenAI-style instruction
is used instead. System messages become the top-level `system` string.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

from tokenrelay_server.core import classify
from tokenrelay_server.core.errors import UpstreamError, upstream_error
from tokenrelay_server.core.model import Message, Tool, ToolChoice, Usage
from tokenrelay_server.upstream.base import (
    CONTINUE_INSTRUCTION,
    Delta,
    Finish,
    ProviderRequest,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallDone,
    UsageReport,
)
from tokenrelay_server.upstream.fastjson import parse_json
from tokenrelay_server.upstream.http_stream import HttpProvider, sim_headers, token_count
from tokenrelay_server.upstream.sse import ServerSentEvent

STOP_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


EMPTY_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}


def conversation(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """The non-system messages as Messages API turns."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system":
            continue
        if message.role == "tool":
            block = {
                "type": "tool_result",
                "tool_use_id": message.tool_call_id,
                "content": message.content,
            }
            if turns and turns[-1]["role"] == "user" and _has_tool_results(turns[-1]):
                turns[-1]["content"].append(block)
            else:
                turns.append({"role": "user", "content": [block]})
            continue
        if message.role == "user" and turns and _has_tool_results(turns[-1]):
            # Text after the tool results belongs to the same user turn.
            if message.content:
                turns[-1]["content"].append({"type": "text", "text": message.content})
            continue
        if message.tool_calls:
            blocks: list[dict[str, Any]] = []
            if message.content:
                blocks.append({"type": "text", "text": message.content})
            blocks += [
                {
                    "type": "tool_use",
                    "id": call.id,
                    "name": call.name,
                    # Validated as a JSON object at the edge (api/requests.py).
                    "input": json.loads(call.arguments_json),
                }
                for call in message.tool_calls
            ]
            turns.append({"role": "assistant", "content": blocks})
            continue
        turns.append({"role": message.role, "content": message.content})
    return turns


def _has_tool_results(turn: dict[str, Any]) -> bool:
    content = turn["content"]
    return isinstance(content, list) and any(
        block.get("type") == "tool_result" for block in content
    )


def anthropic_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        schema = json.loads(tool.parameters_json) if tool.parameters_json.strip() else EMPTY_SCHEMA
        entry: dict[str, Any] = {"name": tool.name, "input_schema": schema}
        if tool.description:
            entry["description"] = tool.description
        out.append(entry)
    return out


def anthropic_tool_choice(choice: ToolChoice) -> dict[str, Any]:
    if choice.tool_name:
        return {"type": "tool", "name": choice.tool_name}
    return {"type": {"auto": "auto", "required": "any", "none": "none"}[choice.mode]}


def messages_body(
    request: ProviderRequest, *, default_max_tokens: int, assistant_prefill: bool = True
) -> dict[str, Any]:
    """The JSON body of a streaming Messages request."""
    system = "\n\n".join(m.content for m in request.messages if m.role == "system")
    messages = conversation(request.messages)
    if request.continuation:
        prefill = request.continuation.rstrip()
        if assistant_prefill:
            if prefill:  # an all-whitespace prefill is rejected; the model starts over
                messages.append({"role": "assistant", "content": prefill})
        else:
            messages.append({"role": "assistant", "content": prefill or request.continuation})
            messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    params = request.params
    max_tokens = params.max_tokens if params.max_tokens is not None else default_max_tokens
    if assistant_prefill and request.continuation != request.continuation.rstrip():
        # The model writes the trimmed whitespace again (skip_repeated drops
        # it): give it the token that costs, so the answer still ends where
        # the caller's budget says.
        max_tokens += 1
    body: dict[str, Any] = {
        "model": request.model,
        "max_tokens": max_tokens,
        "messages": messages,
        "stream": True,
    }
    if system:
        body["system"] = system
    if request.tools:
        body["tools"] = anthropic_tools(request.tools)
        if request.tool_choice is not None:
            body["tool_choice"] = anthropic_tool_choice(request.tool_choice)
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop_sequences"] = list(params.stop)
    return body


class MessagesParser:
    """Anthropic Messages SSE events → deltas. Sans-IO; one per attempt."""

    def __init__(self) -> None:
        self.tokens_received = 0
        self.stop_reason: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._stopped = False
        # The tool_use blocks so far, by block index.
        self._tool_blocks: dict[int, _ToolBlock] = {}

    @property
    def ended(self) -> bool:
        return self._stopped

    @property
    def answer_complete(self) -> bool:
        return self.stop_reason is not None

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)

    def _shape(self, detail: str) -> UpstreamError:
        return upstream_error(
            classify.unexpected_shape(detail, tokens_received=self.tokens_received)
        )

    def on_event(self, event: ServerSentEvent) -> list[Delta]:
        if self._stopped or event.event == "ping":
            return []
        try:
            data = parse_json(event.data)
        except ValueError:
            raise upstream_error(
                classify.malformed_data(
                    f"invalid JSON in a {event.event} event: {event.data[:80]!r}",
                    tokens_received=self.tokens_received,
                )
            ) from None
        if not isinstance(data, dict):
            raise self._shape(f"the {event.event} event is not a JSON object")
        # The name is in both `event:` and `type`; a proxy that drops the
        # `event:` lines leaves the default "message".
        name = event.event if event.event != "message" else str(data.get("type", ""))
        if name == "error" or data.get("type") == "error":
            payload = classify.error_payload_fields(data) or classify.ErrorPayload(
                "", "", event.data[:200]
            )
            raise upstream_error(
                classify.classify_provider_error(
                    payload.type,
                    payload.code,
                    payload.message,
                    tokens_received=self.tokens_received,
                )
            )
        handler = _HANDLERS.get(name)
        return handler(self, data) if handler is not None else []

    def _message_start(self, data: dict[str, Any]) -> list[Delta]:
        message = data.get("message")
        if not isinstance(message, dict):
            raise self._shape("message_start without a message object")
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._read_usage(usage)
        return []

    def _content_block_start(self, data: dict[str, Any]) -> list[Delta]:
        block = data.get("content_block")
        if not isinstance(block, dict):
            raise self._shape("content_block_start without a content_block object")
        kind = block.get("type")
        if kind == "text":
            return self._text(block.get("text", ""))
        if kind == "thinking":
            return self._reasoning(block.get("thinking", ""))
        if kind == "tool_use":
            return self._tool_use_start(self._block_index(data), block)
        return []  # redacted_thinking, server tools, …

    def _block_index(self, data: dict[str, Any]) -> int:
        index = data.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise self._shape("a content block event without a whole-number index")
        return index

    def _tool_use_start(self, block_index: int, block: dict[str, Any]) -> list[Delta]:
        call_id, name, start_input = block.get("id"), block.get("name"), block.get("input", {})
        if not isinstance(call_id, str) or not isinstance(name, str) or not name:
            raise self._shape("a tool_use block without a string id and name")
        if not isinstance(start_input, dict):
            raise self._shape("a tool_use block whose input is not an object")
        ordinal = len(self._tool_blocks)
        self._tool_blocks[block_index] = _ToolBlock(
            ordinal, json.dumps(start_input, ensure_ascii=False) if start_input else ""
        )
        self.tokens_received += 1
        return [ToolCallDelta(ordinal, call_id, name, "")]

    def _content_block_stop(self, data: dict[str, Any]) -> list[Delta]:
        index = data.get("index")
        tool = self._tool_blocks.get(index) if isinstance(index, int) else None
        if tool is None or tool.done:
            return []  # the end of a text or thinking block
        tool.done = True
        out: list[Delta] = []
        if not tool.fragments:
            # No input_json_delta: the arguments are the block's input.
            out.append(ToolCallDelta(tool.ordinal, arguments=tool.start_input or "{}"))
        out.append(ToolCallDone(tool.ordinal))
        return out

    def _content_block_delta(self, data: dict[str, Any]) -> list[Delta]:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            raise self._shape("content_block_delta without a delta object")
        kind = delta.get("type")
        if kind == "text_delta":
            if "text" not in delta:
                raise self._shape("text_delta without text")
            return self._text(delta["text"])
        if kind == "thinking_delta":
            if "thinking" not in delta:
                raise self._shape("thinking_delta without thinking")
            return self._reasoning(delta["thinking"])
        if kind == "input_json_delta":
            tool = self._tool_blocks.get(self._block_index(data))
            if tool is None:
                raise self._shape("input_json_delta outside a tool_use block")
            fragment = delta.get("partial_json")
            if not isinstance(fragment, str):
                raise self._shape("input_json_delta without a partial_json string")
            if not fragment:
                return []
            tool.fragments += 1
            self.tokens_received += 1
            return [ToolCallDelta(tool.ordinal, arguments=fragment)]
        return []  # signature_delta, citations_delta, …

    def _reasoning(self, text: object) -> list[Delta]:
        if not isinstance(text, str):
            raise self._shape("thinking is not a string")
        if not text:
            return []
        self.tokens_received += 1
        return [ReasoningDelta(text)]

    def _text(self, text: object) -> list[Delta]:
        if not isinstance(text, str):
            raise self._shape("text is not a string")
        if not text:
            return []
        self.tokens_received += 1
        return [TextDelta(text)]

    def _message_delta(self, data: dict[str, Any]) -> list[Delta]:
        delta = data.get("delta")
        if not isinstance(delta, dict):
            raise self._shape("message_delta without a delta object")
        reason = delta.get("stop_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise self._shape("stop_reason is not a string")
            self.stop_reason = reason
        usage = data.get("usage")
        if usage is None:
            return []
        if not isinstance(usage, dict):
            raise self._shape("usage is not an object")
        self._read_usage(usage)
        return [UsageReport(self.usage)]

    def _message_stop(self, data: dict[str, Any]) -> list[Delta]:
        self._stopped = True
        return []

    def _read_usage(self, usage: dict[str, Any]) -> None:
        if "input_tokens" in usage:
            # Cached prompt tokens are prompt tokens too.
            self.prompt_tokens = (
                token_count(usage.get("input_tokens"))
                + token_count(usage.get("cache_creation_input_tokens"))
                + token_count(usage.get("cache_read_input_tokens"))
            )
        if "output_tokens" in usage:
            self.completion_tokens = token_count(usage.get("output_tokens"))  # cumulative

    def on_end(self) -> list[Delta]:
        if self.stop_reason is None and not self._stopped:
            raise upstream_error(classify.missing_finish(tokens_received=self.tokens_received))
        reason = self.stop_reason or "end_turn"
        return [Finish(STOP_REASONS.get(reason, reason), self.usage)]


@dataclass
class _ToolBlock:
    ordinal: int  # the call's place in the turn: ToolCallDelta.index
    start_input: str  # the content_block_start's input, as JSON ("" when empty)
    fragments: int = 0  # input_json_delta pieces received
    done: bool = False


_HANDLERS = {
    "message_start": MessagesParser._message_start,
    "content_block_start": MessagesParser._content_block_start,
    "content_block_delta": MessagesParser._content_block_delta,
    "content_block_stop": MessagesParser._content_block_stop,
    "message_delta": MessagesParser._message_delta,
    "message_stop": MessagesParser._message_stop,
}


class AnthropicProvider(HttpProvider):
    """An Anthropic Messages upstream."""

    path = "messages"

    def build_request(self, request: ProviderRequest) -> httpx.Request:
        headers = {
            "accept": "text/event-stream",
            "accept-encoding": "identity",
            "anthropic-version": self._config.anthropic_version,
            **sim_headers(request, forward=self._config.forward_sim_headers),
        }
        if self._api_key:
            headers["x-api-key"] = self._api_key
        body = messages_body(
            request,
            default_max_tokens=self._config.default_max_tokens,
            assistant_prefill=self._config.assistant_prefill,
        )
        return self._client.build_request("POST", self._url, json=body, headers=headers)

    def parser(self) -> MessagesParser:
        return MessagesParser()

    def stream(self, request: ProviderRequest) -> AsyncGenerator[Delta, None]:
        deltas = super().stream(request)
        continuation = request.continuation
        trimmed = continuation[len(continuation.rstrip()) :] if continuation else ""
        if trimmed and self._config.assistant_prefill:
            return skip_repeated(deltas, trimmed)
        return deltas


async def skip_repeated(
    deltas: AsyncGenerator[Delta, None], trimmed: str
) -> AsyncGenerator[Delta, None]:
    """The prefill lost its trailing whitespace (the API refuses it), so the
    model starts by writing it again: drop that much from the first text, which
    the client already has. Any other text passes through untouched."""
    pending = trimmed
    async with contextlib.aclosing(deltas):
        async for delta in deltas:
            if pending and isinstance(delta, TextDelta):
                text = delta.text
                same = _common_prefix_length(text, pending)
                pending = pending[same:] if same == len(text) else ""
                if same == len(text):
                    continue
                delta = TextDelta(text[same:])
            yield delta


def _common_prefix_length(a: str, b: str) -> int:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return min(len(a), len(b))
