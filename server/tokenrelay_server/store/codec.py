"""JSON forms of log entries and stream metadata, shared by the stores that
serialize (Redis). Field names are short: they are stored once per chunk."""

from __future__ import annotations

import json
from typing import Any

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
    Usage,
)


def encode_entry(entry: LogEntry) -> str:
    if isinstance(entry, Chunk):
        return json.dumps(
            {
                "k": "c",
                "s": entry.seq,
                "t": entry.text,
                "p": entry.provider,
                "a": entry.attempt,
                "n": entry.tokens_so_far,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
    if isinstance(entry, Notice):
        return json.dumps({"k": "n", "s": entry.after_seq, "f": entry.fault.to_json()})
    return json.dumps(
        {
            "k": "e",
            "r": entry.finish_reason,
            "s": entry.total_seq,
            "h": entry.text_sha256,
            "u": [entry.usage.prompt_tokens, entry.usage.completion_tokens],
            "p": entry.partial,
            "f": None if entry.error is None else entry.error.to_json(),
        }
    )


def decode_entry(raw: str | bytes) -> LogEntry:
    data: dict[str, Any] = json.loads(raw)
    kind = data["k"]
    if kind == "c":
        return Chunk(
            seq=data["s"],
            text=data["t"],
            provider=data["p"],
            attempt=data["a"],
            tokens_so_far=data.get("n", data["s"]),
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
        )
    raise ValueError(f"unknown log entry kind {kind!r}")


def encode_request(request: StartRequest) -> dict[str, Any]:
    return {
        "model": request.model,
        "messages": [[m.role, m.content] for m in request.messages],
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
        },
        "metadata": [list(kv) for kv in request.metadata],
    }


def decode_request(data: dict[str, Any]) -> StartRequest:
    params = data["params"]
    return StartRequest(
        model=data["model"],
        messages=tuple(Message(role, content) for role, content in data["messages"]),
        params=GenerationParams(
            max_tokens=params["max_tokens"],
            temperature=params["temperature"],
            top_p=params["top_p"],
            stop=tuple(params["stop"]),
        ),
        idempotency_key=data["idempotency_key"],
        policy=RecoveryPolicy(**data["policy"]),
        metadata=tuple((k, v) for k, v in data["metadata"]),
    )


def encode_meta(meta: StreamMeta) -> str:
    return json.dumps(
        {
            "id": meta.stream_id,
            "model": meta.model,
            "created_at": meta.created_at,
            "checkpoint_interval": meta.checkpoint_interval,
            "request": None if meta.request is None else encode_request(meta.request),
            "idempotency_key": meta.idempotency_key,
            "extra": meta.extra,
        },
        ensure_ascii=False,
    )


def decode_meta(raw: str | bytes) -> StreamMeta:
    data = json.loads(raw)
    return StreamMeta(
        stream_id=data["id"],
        model=data["model"],
        created_at=data["created_at"],
        checkpoint_interval=data["checkpoint_interval"],
        request=None if data["request"] is None else decode_request(data["request"]),
        idempotency_key=data["idempotency_key"],
        extra=data["extra"],
    )
