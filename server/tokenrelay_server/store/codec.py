"""JSON forms of log entries and stream metadata, shared by the stores that
serialize (Redis). Field names are short: they are stored once per chunk.
orjson writes and reads them (compact, UTF-8 as is; it reads what the
standard library's json wrote before, too).

A chunk of text has no kind field (entries stored before issue 12 are text);
a reasoning chunk has `"y": "r"`; a tool-call piece `"y": "c"` with its
index in `"i"`, its id and name in `"d"` and `"m"` when set, and its
arguments fragment in `"t"`.
"""

from __future__ import annotations

from typing import Any

import orjson

from tokenrelay_server.core.errors import Fault
from tokenrelay_server.core.model import (
    Chunk,
    End,
    GenerationParams,
    LogEntry,
    Message,
    Notice,
    RecoveryPolicy,
    StartRequest,
    StreamMeta,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)


def encode_entry(entry: LogEntry) -> str:
    return entry_json(entry).decode()


def entry_json(entry: LogEntry) -> bytes:
    """`encode_entry` as the UTF-8 bytes orjson writes (what a sealer takes)."""
    if isinstance(entry, Chunk):
        data: dict[str, Any] = {
            "k": "c",
            "s": entry.seq,
            "t": entry.text,
            "p": entry.provider,
            "a": entry.attempt,
            "n": entry.tokens_so_far,
        }
        if entry.kind == "reasoning":
            data["y"] = "r"
        elif entry.tool_call is not None:
            call = entry.tool_call
            data["y"] = "c"
            data["t"] = call.arguments
            data["i"] = call.index
            if call.id:
                data["d"] = call.id
            if call.name:
                data["m"] = call.name
        return orjson.dumps(data)
    if isinstance(entry, Notice):
        return orjson.dumps({"k": "n", "s": entry.after_seq, "f": entry.fault.to_json()})
    return orjson.dumps(
        {
            "k": "e",
            "r": entry.finish_reason,
            "s": entry.total_seq,
            "h": entry.text_sha256,
            "u": [entry.usage.prompt_tokens, entry.usage.completion_tokens],
            "p": entry.partial,
            "f": None if entry.error is None else entry.error.to_json(),
            "x": entry.chunks_sha256,
        }
    )


def decode_entry(raw: str | bytes) -> LogEntry:
    data: dict[str, Any] = orjson.loads(raw)
    kind = data["k"]
    if kind == "c":
        chunk_kind = data.get("y")
        if chunk_kind == "c":
            return Chunk(
                seq=data["s"],
                text="",
                provider=data["p"],
                attempt=data["a"],
                tokens_so_far=data.get("n", data["s"]),
                kind="tool_call",
                tool_call=ToolCallDelta(
                    index=data["i"],
                    id=data.get("d", ""),
                    name=data.get("m", ""),
                    arguments=data["t"],
                ),
            )
        return Chunk(
            seq=data["s"],
            text=data["t"],
            provider=data["p"],
            attempt=data["a"],
            tokens_so_far=data.get("n", data["s"]),
            kind="reasoning" if chunk_kind == "r" else "text",
        )
    if kind == "n":
        return Notice(after_seq=data["s"], fault=Fault.from_json(data["f"]))
    if kind == "e":
        return End(
            finish_reason=data["r"],
            total_seq=data["s"],
            text_sha256=data["h"],
            usage=Usage(*data["u"]),
            partial=data["p"],
            error=None if data["f"] is None else Fault.from_json(data["f"]),
            chunks_sha256=data.get("x", ""),
        )
    raise ValueError(f"unknown log entry kind {kind!r}")


def _encode_message(message: Message) -> list[Any]:
    # [role, content] as before issue 12; a message with tool calls or a
    # tool_call_id adds them.
    if not message.tool_calls and not message.tool_call_id:
        return [message.role, message.content]
    calls = [[c.id, c.name, c.arguments_json] for c in message.tool_calls]
    return [message.role, message.content, calls, message.tool_call_id]


def _decode_message(raw: list[Any]) -> Message:
    if len(raw) == 2:
        return Message(raw[0], raw[1])
    role, content, calls, tool_call_id = raw
    return Message(
        role,
        content,
        tool_calls=tuple(ToolCall(*call) for call in calls),
        tool_call_id=tool_call_id,
    )


def encode_request(request: StartRequest) -> dict[str, Any]:
    data: dict[str, Any] = {
        "model": request.model,
        "messages": [_encode_message(m) for m in request.messages],
        "params": {
            "max_tokens": request.params.max_tokens,
            "temperature": request.params.temperature,
            "top_p": request.params.top_p,
            "stop": list(request.params.stop),
        },
        "idempotency_key": request.idempotency_key,
        "policy": {
            "max_retries": request.policy.max_retries,
            "allow_fallback": request.policy.allow_fallback,
            "allow_partial": request.policy.allow_partial,
            "checkpoint_interval": request.policy.checkpoint_interval,
            "tool_calls": request.policy.tool_calls,
        },
        "metadata": [list(kv) for kv in request.metadata],
    }
    if request.tools:
        data["tools"] = [[t.name, t.description, t.parameters_json] for t in request.tools]
    if request.tool_choice is not None:
        data["tool_choice"] = [request.tool_choice.mode, request.tool_choice.tool_name]
    return data


def decode_request(data: dict[str, Any]) -> StartRequest:
    params = data["params"]
    choice = data.get("tool_choice")
    return StartRequest(
        model=data["model"],
        messages=tuple(_decode_message(m) for m in data["messages"]),
        params=GenerationParams(
            max_tokens=params["max_tokens"],
            temperature=params["temperature"],
            top_p=params["top_p"],
            stop=tuple(params["stop"]),
        ),
        idempotency_key=data["idempotency_key"],
        policy=RecoveryPolicy(**data["policy"]),
        metadata=tuple((k, v) for k, v in data["metadata"]),
        tools=tuple(Tool(*tool) for tool in data.get("tools", ())),
        tool_choice=None if choice is None else ToolChoice(*choice),
    )


def encode_meta(meta: StreamMeta) -> str:
    return orjson.dumps(
        {
            "id": meta.stream_id,
            "model": meta.model,
            "created_at": meta.created_at,
            "checkpoint_interval": meta.checkpoint_interval,
            "request": None if meta.request is None else encode_request(meta.request),
            "idempotency_key": meta.idempotency_key,
            "extra": meta.extra,
        }
    ).decode()


def decode_meta(raw: str | bytes) -> StreamMeta:
    data = orjson.loads(raw)
    return StreamMeta(
        stream_id=data["id"],
        model=data["model"],
        created_at=data["created_at"],
        checkpoint_interval=data["checkpoint_interval"],
        request=None if data["request"] is None else decode_request(data["request"]),
        idempotency_key=data["idempotency_key"],
        extra=data["extra"],
    )
