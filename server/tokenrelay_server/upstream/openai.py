"""OpenAI-compatible Chat Completions streaming (OpenAI, vLLM, Ollama,
llama.cpp server, OpenRouter, Together, …).

Wire format (https://platform.openai.com/docs/api-reference/chat/streaming):
`POST {base_url}/chat/completions` with `"stream": true` answers
`text/event-stream` whose events carry no `event:` name and whose data is a
`chat.completion.chunk` object, then the literal `data: [DONE]`:

    data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}
    data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}
    data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}
    data: {"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}
    data: [DONE]

- The first delta usually has only the role (and `content: ""`): no text.
- `finish_reason` is stop, length, content_filter, tool_calls (or the
  deprecated function_call); it is passed through as the `Finish` reason.
- With `stream_options.include_usage` the usage arrives in a last chunk with
  empty `choices`, after the finish reason and before `[DONE]`.
- An error mid-stream is a chunk with an `error` object
  (`data: {"error": {"message", "type", "code"}}`; OpenRouter also sets
  `finish_reason: "error"` beside it); `event: error` is read the same way.
- `reasoning_content` (DeepSeek, vLLM) or `reasoning` (OpenRouter, Ollama)
  in a delta is the model's thinking: a `ReasoningDelta`, not answer text.
- `tool_calls` in a delta are pieces of tool calls, each
  `{"index": i, "id": …, "type": "function", "function": {"name": …,
  "arguments": "<fragment>"}}`: the first piece of call i has its id and
  name, later ones only argument fragments; each is a `ToolCallDelta`. A
  server that leaves out `index` (some compatible servers do, with one call
  at a time) gets the previous call's index, or the next one when the piece
  brings a new id. The finish reason is then `tool_calls`.
- The stream is complete at `[DONE]`, or at the end of the body once a
  finish reason arrived (some servers omit `[DONE]`). A body that ends with
  neither is NO_FINISH_REASON.

Requests carry the tools as `tools: [{"type": "function", "function":
{name, description, parameters}}]` and `tool_choice` ("auto", "none",
"required" or `{"type": "function", "function": {"name": …}}`, sent only
with tools, which the API requires); an assistant message's calls as its
`tool_calls` (content null when it has no text) and a tool result as a
`{"role": "tool", "tool_call_id": …, "content": …}` message.

Continuation: the original messages, the partial answer as an assistant
message, then a user message with `CONTINUE_INSTRUCTION` (Chat Completions
has no assistant prefill).

`ChatCompletionsParser` and `chat_completions_body` are sans-IO; the
`OpenAIProvider` only wires them to `http_stream.stream_deltas`.
"""

from __future__ import annotations

import json
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
    UsageReport,
)
from tokenrelay_server.upstream.fastjson import parse_json
from tokenrelay_server.upstream.http_stream import HttpProvider, sim_headers, token_count
from tokenrelay_server.upstream.sse import ServerSentEvent

DONE_MARKER = "[DONE]"


def chat_message(message: Message) -> dict[str, Any]:
    """One message in Chat Completions' shape."""
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if message.tool_calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments_json},
                }
                for call in message.tool_calls
            ],
        }
    return {"role": message.role, "content": message.content}


def chat_tools(tools: tuple[Tool, ...]) -> list[dict[str, Any]]:
    out = []
    for tool in tools:
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        if tool.parameters_json.strip():
            # Validated as a JSON object at the edge (api/requests.py).
            function["parameters"] = json.loads(tool.parameters_json)
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.tool_name:
        return {"type": "function", "function": {"name": choice.tool_name}}
    return choice.mode


def chat_messages(request: ProviderRequest) -> list[dict[str, Any]]:
    """The conversation to send, with the continuation when there is one."""
    messages = [chat_message(m) for m in request.messages]
    if request.continuation:
        messages.append({"role": "assistant", "content": request.continuation})
        messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    return messages


def chat_completions_body(request: ProviderRequest, *, include_usage: bool) -> dict[str, Any]:
    """The JSON body of a streaming Chat Completions request."""
    body: dict[str, Any] = {
        "model": request.model,
        "messages": chat_messages(request),
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if request.tools:
        body["tools"] = chat_tools(request.tools)
        if request.tool_choice is not None:
            body["tool_choice"] = chat_tool_choice(request.tool_choice)
    params = request.params
    # `max_tokens` rather than `max_completion_tokens`: every compatible
    # server understands it.
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.temperature is not None:
        body["temperature"] = params.temperature
    if params.top_p is not None:
        body["top_p"] = params.top_p
    if params.stop:
        body["stop"] = list(params.stop)
    return body


def _shape_error(detail: str, tokens_received: int) -> UpstreamError:
    return upstream_error(classify.unexpected_shape(detail, tokens_received=tokens_received))


def parse_usage(raw: object, tokens_received: int) -> Usage:
    if not isinstance(raw, dict):
        raise _shape_error("usage is not an object", tokens_received)
    return Usage(
        prompt_tokens=token_count(raw.get("prompt_tokens")),
        completion_tokens=token_count(raw.get("completion_tokens")),
    )


_PLAIN_DELTA_KEYS = frozenset({"content", "role"})


def _plain_text(chunk: dict[str, Any]) -> str | None:
    """The text of a chunk that is only that: no error, no usage, one choice
    (index 0, no finish reason) whose delta has only `content` (a string)
    and perhaps `role`. None for any other chunk (the full rules read it)."""
    choices = chunk.get("choices")
    if type(choices) is not list or len(choices) != 1 or "error" in chunk:
        return None
    if chunk.get("usage") is not None:
        return None
    choice = choices[0]
    if type(choice) is not dict or choice.get("finish_reason") is not None:
        return None
    if choice.get("index", 0) != 0:
        return None
    delta = choice.get("delta")
    if type(delta) is not dict or not delta.keys() <= _PLAIN_DELTA_KEYS:
        return None
    content = delta.get("content")
    return content if type(content) is str else None


class ChatCompletionsParser:
    """Chat Completions SSE events → deltas. Sans-IO; one per attempt."""

    def __init__(self) -> None:
        self.tokens_received = 0
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self._done = False
        # The last tool call's (index, id), for servers that leave out `index`.
        self._last_call: tuple[int, str] | None = None

    @property
    def ended(self) -> bool:
        return self._done

    @property
    def answer_complete(self) -> bool:
        return self.finish_reason is not None

    def on_event(self, event: ServerSentEvent) -> list[Delta]:
        if self._done:
            return []
        data = event.data
        if data[:1] != "{" and data.strip() == DONE_MARKER:
            self._done = True
            return []
        try:
            chunk = parse_json(data)
        except ValueError:
            raise upstream_error(
                classify.malformed_data(
                    f"invalid JSON in a data event: {data[:80]!r}",
                    tokens_received=self.tokens_received,
                )
            ) from None
        if event.event == "error" and not isinstance(chunk, dict):
            chunk = {"error": str(chunk)}
        if not isinstance(chunk, dict):
            raise _shape_error("a data event is not a JSON object", self.tokens_received)
        text = _plain_text(chunk) if event.event != "error" else None
        if text is not None:  # the per-token case, as the rules below would read it
            if not text:
                return []
            self.tokens_received += 1
            return [TextDelta(text)]
        payload = classify.error_payload_fields(chunk) if "error" in chunk else None
        if payload is not None or event.event == "error":
            payload = payload or classify.ErrorPayload("", "", json.dumps(chunk)[:200])
            raise upstream_error(
                classify.classify_provider_error(
                    payload.type,
                    payload.code,
                    payload.message,
                    tokens_received=self.tokens_received,
                )
            )
        deltas: list[Delta] = []
        choices = chunk.get("choices")
        raw_usage = chunk.get("usage")
        if choices is None and raw_usage is None:
            raise _shape_error("a chunk with neither choices nor usage", self.tokens_received)
        if choices is not None:
            if not isinstance(choices, list):
                raise _shape_error("choices is not a list", self.tokens_received)
            for choice in choices:
                deltas.extend(self._choice(choice))
        if raw_usage is not None:
            self.usage = parse_usage(raw_usage, self.tokens_received)
            deltas.append(UsageReport(self.usage))
        return deltas

    def _choice(self, choice: object) -> list[Delta]:
        if not isinstance(choice, dict):
            raise _shape_error("a choice is not an object", self.tokens_received)
        if choice.get("index", 0) != 0:
            return []  # we ask for one choice; ignore any other
        deltas: list[Delta] = []
        delta = choice.get("delta")
        if delta is not None:
            if not isinstance(delta, dict):
                raise _shape_error("delta is not an object", self.tokens_received)
            deltas += self._reasoning(delta)
            content = delta.get("content")
            if content is not None and not isinstance(content, str):
                raise _shape_error("delta.content is not a string", self.tokens_received)
            if content:
                self.tokens_received += 1
                deltas.append(TextDelta(content))
            calls = delta.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise _shape_error("delta.tool_calls is not a list", self.tokens_received)
                deltas += [self._tool_call(call) for call in calls]
        reason = choice.get("finish_reason")
        if reason is not None:
            if not isinstance(reason, str):
                raise _shape_error("finish_reason is not a string", self.tokens_received)
            if reason == "error":  # OpenRouter, without an error object
                raise upstream_error(
                    classify.classify_provider_error(
                        "server_error",
                        message="the stream finished with finish_reason 'error'",
                        tokens_received=self.tokens_received,
                    )
                )
            if reason:
                self.finish_reason = reason
        return deltas

    def _reasoning(self, delta: dict[str, Any]) -> list[Delta]:
        for key in ("reasoning_content", "reasoning"):
            value = delta.get(key)
            if value is None:
                continue
            if not isinstance(value, str):
                raise _shape_error(f"delta.{key} is not a string", self.tokens_received)
            if value:
                self.tokens_received += 1
                return [ReasoningDelta(value)]
        return []

    def _tool_call(self, call: object) -> ToolCallDelta:
        if not isinstance(call, dict):
            raise _shape_error("a tool_calls entry is not an object", self.tokens_received)
        function = call.get("function", {})
        if not isinstance(function, dict):
            raise _shape_error("tool_calls[].function is not an object", self.tokens_received)
        call_id, name, arguments = call.get("id"), function.get("name"), function.get("arguments")
        for key, value in (
            ("id", call_id),
            ("function.name", name),
            ("function.arguments", arguments),
        ):
            if value is not None and not isinstance(value, str):
                raise _shape_error(f"tool_calls[].{key} is not a string", self.tokens_received)
        index = call.get("index")
        if index is None:
            if self._last_call is None:
                index = 0
            else:
                last_index, last_id = self._last_call
                index = last_index + 1 if call_id and call_id != last_id else last_index
        elif not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise _shape_error("tool_calls[].index is not a whole number", self.tokens_received)
        if self._last_call is None or self._last_call[0] != index:
            self._last_call = (index, call_id or "")
        elif call_id:
            self._last_call = (index, call_id)
        self.tokens_received += 1
        return ToolCallDelta(index, call_id or "", name or "", arguments or "")

    def on_end(self) -> list[Delta]:
        if self.finish_reason is None and not self._done:
            raise upstream_error(classify.missing_finish(tokens_received=self.tokens_received))
        # `[DONE]` with no finish reason: the server ended the answer normally.
        return [Finish(self.finish_reason or "stop", self.usage)]


class OpenAIProvider(HttpProvider):
    """An OpenAI-compatible Chat Completions upstream."""

    path = "chat/completions"

    def build_request(self, request: ProviderRequest) -> httpx.Request:
        headers = {
            "accept": "text/event-stream",
            "accept-encoding": "identity",  # gzip would hold tokens back in buffers
            **sim_headers(request, forward=self._config.forward_sim_headers),
        }
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        body = chat_completions_body(request, include_usage=self._config.include_usage)
        return self._client.build_request("POST", self._url, json=body, headers=headers)

    def parser(self) -> ChatCompletionsParser:
        return ChatCompletionsParser()
