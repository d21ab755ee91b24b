"""Typed values that cross module boundaries.

Protobuf stays in the servicer; these frozen dataclasses are what the rest of
the gateway passes around and what the stream log stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokenrelay_server.core.errors import Fault

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


def metadata_value(metadata: tuple[tuple[str, str], ...], key: str, default: str = "") -> str:
    """The value of `key` in a request's metadata pairs, or `default`."""
    for k, v in metadata:
        if k == key:
            return v
    return default


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class RecoveryPolicy:
    """Per-call overrides; None means "use the gateway's configuration"."""

    max_retries: int | None = None
    allow_fallback: bool | None = None
    allow_partial: bool | None = None
    checkpoint_interval: int | None = None


@dataclass(frozen=True, slots=True)
class StartRequest:
    """A validated `StartGeneration`."""

    model: str
    messages: tuple[Message, ...]
    params: GenerationParams = GenerationParams()
    idempotency_key: str = ""
    policy: RecoveryPolicy = RecoveryPolicy()
    metadata: tuple[tuple[str, str], ...] = ()

    def meta(self, key: str, default: str = "") -> str:
        return metadata_value(self.metadata, key, default)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


# --- what the stream log holds -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of the answer: one provider delta. seq is 1, 2, 3, … within a
    stream; seq counts chunks, `tokens_so_far` counts tokens."""

    seq: int
    text: str
    provider: str
    attempt: int
    # Completion tokens the upstream had produced for this stream when this
    # chunk arrived: the reported usage of earlier attempts plus this
    # attempt's count so far (its deltas until the provider reports usage).
    tokens_so_far: int = 0


@dataclass(frozen=True, slots=True)
class Notice:
    """A non-fatal error: the gateway is recovering. Sits after chunk `after_seq`."""

    after_seq: int
    fault: Fault


@dataclass(frozen=True, slots=True)
class End:
    """The last entry of a stream."""

    finish_reason: str
    total_seq: int
    text_sha256: str
    usage: Usage = Usage()
    partial: bool = False
    error: Fault | None = None


LogEntry = Chunk | Notice | End


@dataclass(frozen=True, slots=True)
class StreamMeta:
    """What the store keeps about a stream besides its log."""

    stream_id: str
    model: str
    created_at: float
    checkpoint_interval: int
    request: StartRequest | None = None
    idempotency_key: str = ""
    extra: dict[str, str] = field(default_factory=dict)
