"""`StartGeneration` → `StartRequest`: every field checked, a problem named.

A request the gateway cannot serve as sent is a `RequestError`
(INVALID_ARGUMENT) whose message names the field the way the proto spells
it (`start.tools[2].parameters_json: is not a JSON object`) and says what
would be accepted; nothing has started when it is raised. Text from the
request that comes back in a message goes through `excerpt`.

Limits: the [limits] table (`RequestLimits`, core/limits.py: messages,
content characters per message, tools, metadata entries; each refusal names
its field and the limit's key) and the constants here. The prompt's size
(`max_prompt_bytes`) counts the messages' content and tool-call arguments
and the tools' descriptions and schemas: all of it goes to the provider with
every attempt.

Agent turns (issue 12):
- tools: at most `limits.max_tools`, names of 1 to 64 characters of A-Z, a-z,
  0-9, "_" and "-" (what both providers accept), unique; parameters_json
  empty (no arguments) or a JSON object;
- tool_choice: a mode (AUTO, NONE, REQUIRED), or the name of one of the
  tools; REQUIRED and a name need tools;
- messages: role "tool" answers a tool call of an earlier assistant message
  by its tool_call_id; only "assistant" messages carry tool_calls, each with
  an id, a tool name and arguments that are a JSON object;
- policy.tool_calls: WHOLE, STREAM or unset (WHOLE).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from tokenrelay.v1 import relay_pb2
from tokenrelay_server.core.errors import RequestError, excerpt
from tokenrelay_server.core.limits import RequestLimits
from tokenrelay_server.core.model import (
    ROLES,
    GenerationParams,
    Message,
    RecoveryPolicy,
    StartRequest,
    Tool,
    ToolCall,
    ToolCallMode,
    ToolChoice,
    ToolChoiceMode,
)
from tokenrelay_server.core.turn import json_object_problem

DEFAULT_LIMITS = RequestLimits()
MAX_MODEL_CHARS = 256
MAX_IDEMPOTENCY_KEY_CHARS = 256
MAX_METADATA_KEY_CHARS = 128
MAX_METADATA_VALUE_CHARS = 4_096
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOKENS_LIMIT = 1_000_000
MAX_RETRIES_LIMIT = 100
MAX_TOOL_CALLS_PER_MESSAGE = 128
MAX_TOOL_CALL_ID_CHARS = 256
# OpenAI's and Anthropic's own rule for function and tool names.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_TOOL_CHOICE_MODES: dict[int, ToolChoiceMode] = {
    relay_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    relay_pb2.TOOL_CHOICE_MODE_NONE: "none",
    relay_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_TOOL_CALL_MODES: dict[int, ToolCallMode | None] = {
    relay_pb2.TOOL_CALL_MODE_UNSPECIFIED: None,
    relay_pb2.TOOL_CALL_MODE_WHOLE: "whole",
    relay_pb2.TOOL_CALL_MODE_STREAM: "stream",
}


class _PromptSize:
    """Bytes of the prompt so far, against the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0

    def add(self, text: str, field: str) -> None:
        self.total += len(text.encode())
        if self.total > self.limit:
            raise RequestError(
                f"{field} takes the prompt to {self.total} bytes; the limit is {self.limit}"
            )


def _check_tool_name(name: str, field: str) -> None:
    if not TOOL_NAME.fullmatch(name):
        raise RequestError(
            f"{field} is {excerpt(name)}; a tool name is 1 to 64 characters of A-Z, a-z, 0-9, "
            '"_" and "-"'
        )


def _check_json_object(text: str, field: str) -> None:
    problem = json_object_problem(text)
    if problem is not None:
        raise RequestError(f"{field}: is not a JSON object ({problem})")


def parse_tools(
    tools: Sequence[relay_pb2.Tool], size: _PromptSize, max_tools: int = DEFAULT_LIMITS.max_tools
) -> tuple[Tool, ...]:
    if len(tools) > max_tools:
        raise RequestError(
            f"start.tools has {len(tools)} tools; the limit is {max_tools} (limits.max_tools)"
        )
    seen: dict[str, int] = {}
    parsed: list[Tool] = []
    for index, tool in enumerate(tools):
        field = f"start.tools[{index}]"
        _check_tool_name(tool.name, f"{field}.name")
        if tool.name in seen:
            raise RequestError(
                f"{field}.name {tool.name!r} is also start.tools[{seen[tool.name]}].name; "
                "tool names are unique"
            )
        seen[tool.name] = index
        size.add(tool.description, f"{field}.description")
        size.add(tool.parameters_json, f"{field}.parameters_json")
        if tool.parameters_json.strip():
            _check_json_object(tool.parameters_json, f"{field}.parameters_json")
        parsed.append(Tool(tool.name, tool.description, tool.parameters_json))
    return tuple(parsed)


def parse_tool_choice(
    start: relay_pb2.StartGeneration, tools: tuple[Tool, ...]
) -> ToolChoice | None:
    if not start.HasField("tool_choice"):
        return None
    choice = start.tool_choice
    which = choice.WhichOneof("choice")
    if which == "tool_name":
        if not tools:
            raise RequestError(
                f"start.tool_choice.tool_name is {excerpt(choice.tool_name)} but start.tools is "
                "empty; declare the tool in start.tools"
            )
        names = [tool.name for tool in tools]
        if choice.tool_name not in names:
            raise RequestError(
                f"start.tool_choice.tool_name {excerpt(choice.tool_name)} is not one of "
                f"start.tools ({excerpt(', '.join(names), 200)})"
            )
        return ToolChoice(tool_name=choice.tool_name)
    if which is None:
        return None  # an empty ToolChoice: as if unset
    mode = _TOOL_CHOICE_MODES.get(choice.mode)
    if mode is None:
        raise RequestError(
            f"start.tool_choice.mode is {choice.mode}; use TOOL_CHOICE_MODE_AUTO, _NONE or "
            "_REQUIRED, or name a tool in start.tool_choice.tool_name"
        )
    if mode == "required" and not tools:
        raise RequestError(
            "start.tool_choice.mode is REQUIRED but start.tools is empty; declare the tools "
            "the model must choose from"
        )
    return ToolChoice(mode=mode)


def parse_messages(
    messages: Sequence[relay_pb2.Message],
    size: _PromptSize,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> tuple[Message, ...]:
    if not messages:
        raise RequestError("start.messages is empty; send at least one message")
    if len(messages) > limits.max_messages:
        raise RequestError(
            f"start.messages has {len(messages)} messages; the limit is {limits.max_messages} "
            "(limits.max_messages)"
        )
    parsed: list[Message] = []
    call_ids: set[str] = set()  # the tool calls of earlier assistant messages
    for index, message in enumerate(messages):
        field = f"start.messages[{index}]"
        role = message.role
        if role not in ROLES:
            raise RequestError(f"{field}.role is {excerpt(role)}; use one of {', '.join(ROLES)}")
        if len(message.content) > limits.max_content_chars:
            raise RequestError(
                f"{field}.content has {len(message.content)} characters; the limit is "
                f"{limits.max_content_chars} (limits.max_content_chars)"
            )
        size.add(message.content, f"{field}.content")
        if message.tool_calls and role != "assistant":
            raise RequestError(
                f"{field}.tool_calls is set on a {role!r} message; only an 'assistant' "
                "message carries tool calls"
            )
        if len(message.tool_calls) > MAX_TOOL_CALLS_PER_MESSAGE:
            raise RequestError(
                f"{field}.tool_calls has {len(message.tool_calls)} calls; the limit is "
                f"{MAX_TOOL_CALLS_PER_MESSAGE}"
            )
        calls: list[ToolCall] = []
        for position, call in enumerate(message.tool_calls):
            call_field = f"{field}.tool_calls[{position}]"
            if not call.id or len(call.id) > MAX_TOOL_CALL_ID_CHARS:
                raise RequestError(
                    f"{call_field}.id must be 1..{MAX_TOOL_CALL_ID_CHARS} characters "
                    "(the id the model gave the call)"
                )
            _check_tool_name(call.name, f"{call_field}.name")
            size.add(call.arguments_json, f"{call_field}.arguments_json")
            _check_json_object(call.arguments_json, f"{call_field}.arguments_json")
            calls.append(ToolCall(call.id, call.name, call.arguments_json))
            call_ids.add(call.id)
        if role == "tool":
            if not message.tool_call_id:
                raise RequestError(
                    f"{field}.tool_call_id is empty; a 'tool' message names the tool call it "
                    "answers"
                )
            if message.tool_call_id not in call_ids:
                raise RequestError(
                    f"{field}.tool_call_id {excerpt(message.tool_call_id)} answers no tool call "
                    "of an earlier 'assistant' message"
                )
        elif message.tool_call_id:
            raise RequestError(
                f"{field}.tool_call_id is set on a {role!r} message; only a 'tool' message "
                "answers a tool call"
            )
        parsed.append(
            Message(
                role,  # checked against ROLES above
                message.content,
                tool_calls=tuple(calls),
                tool_call_id=message.tool_call_id,
            )
        )
    return tuple(parsed)


def parse_params(params: relay_pb2.GenerationParams) -> GenerationParams:
    if params.HasField("max_tokens") and not 1 <= params.max_tokens <= MAX_TOKENS_LIMIT:
        raise RequestError(f"start.params.max_tokens must be 1..{MAX_TOKENS_LIMIT}")
    if params.HasField("temperature") and not (
        math.isfinite(params.temperature) and 0 <= params.temperature <= 2
    ):
        raise RequestError("start.params.temperature must be between 0 and 2")
    if params.HasField("top_p") and not (math.isfinite(params.top_p) and 0 < params.top_p <= 1):
        raise RequestError("start.params.top_p must be greater than 0 and at most 1")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise RequestError(f"start.params.stop has more than {MAX_STOP_SEQUENCES} sequences")
    for index, stop in enumerate(params.stop):
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise RequestError(f"start.params.stop[{index}] must be 1..{MAX_STOP_CHARS} characters")
    return GenerationParams(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else None,
        top_p=params.top_p if params.HasField("top_p") else None,
        stop=tuple(params.stop),
    )


def parse_policy(policy: relay_pb2.RecoveryPolicy) -> RecoveryPolicy:
    if policy.HasField("checkpoint_interval") and policy.checkpoint_interval < 1:
        raise RequestError("start.policy.checkpoint_interval must be at least 1")
    if policy.HasField("max_retries") and policy.max_retries > MAX_RETRIES_LIMIT:
        raise RequestError(f"start.policy.max_retries must be at most {MAX_RETRIES_LIMIT}")
    if policy.tool_calls not in _TOOL_CALL_MODES:
        raise RequestError(
            f"start.policy.tool_calls is {policy.tool_calls}; use TOOL_CALL_MODE_WHOLE or "
            "TOOL_CALL_MODE_STREAM (unset: WHOLE)"
        )
    return RecoveryPolicy(
        max_retries=policy.max_retries if policy.HasField("max_retries") else None,
        allow_fallback=policy.allow_fallback if policy.HasField("allow_fallback") else None,
        allow_partial=policy.allow_partial if policy.HasField("allow_partial") else None,
        checkpoint_interval=(
            policy.checkpoint_interval if policy.HasField("checkpoint_interval") else None
        ),
        tool_calls=_TOOL_CALL_MODES[policy.tool_calls],
    )


def parse_start(
    start: relay_pb2.StartGeneration,
    *,
    max_prompt_bytes: int,
    limits: RequestLimits = DEFAULT_LIMITS,
) -> StartRequest:
    """Validate a StartGeneration; a problem raises RequestError naming the field."""
    model = start.model.strip()
    if not model:
        raise RequestError("start.model is empty; name a model alias such as 'sim'")
    if len(model) > MAX_MODEL_CHARS:
        raise RequestError(f"start.model is longer than {MAX_MODEL_CHARS} characters")
    size = _PromptSize(max_prompt_bytes)
    messages = parse_messages(start.messages, size, limits)
    tools = parse_tools(start.tools, size, limits.max_tools)
    tool_choice = parse_tool_choice(start, tools)
    params = parse_params(start.params)
    policy = parse_policy(start.policy)
    if len(start.idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise RequestError(
            f"start.idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    if len(start.metadata) > limits.max_metadata_entries:
        raise RequestError(
            f"start.metadata has {len(start.metadata)} entries; the limit is "
            f"{limits.max_metadata_entries} (limits.max_metadata_entries)"
        )
    for key, value in start.metadata.items():
        if not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise RequestError(
                f"start.metadata key {excerpt(key)} must be 1..{MAX_METADATA_KEY_CHARS} characters"
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            # The key is at most MAX_METADATA_KEY_CHARS (checked just above).
            raise RequestError(
                f'start.metadata["{key}"] is longer than {MAX_METADATA_VALUE_CHARS} characters'
            )
    return StartRequest(
        model=model,
        messages=messages,
        params=params,
        idempotency_key=start.idempotency_key,
        policy=policy,
        metadata=tuple(sorted(start.metadata.items())),
        tools=tools,
        tool_choice=tool_choice,
    )
