"""Typed values that cross module boundaries.

Protobuf stays in the servicer; these frozen dataclasses are what the rest of
the gateway passes around and what the stream log stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokenrelay_server.core.errors import Fault

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant", "tool")


def metadata_value(metadata: tuple[tuple[str, str], ...], key: str, default: str = "") -> str:
    """The value of `key` in a request's metadata pairs, or `default`."""
    for k, v in metadata:
        if k == key:
            return v
    return default


# --- agent turns: tools, tool calls (issue 12) -------------------------------------


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the model may call. `parameters_json` is a JSON Schema object as
    text ("" when the tool takes no arguments)."""

    name: str
    description: str = ""
    parameters_json: str = ""


ToolChoiceMode = Literal["auto", "none", "required"]


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether the model may (`auto`), must not (`none`) or must (`required`)
    call a tool; or, with `tool_name`, must call exactly that one."""

    mode: ToolChoiceMode = "auto"
    tool_name: str = ""


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A complete tool call in a conversation: `arguments_json` is a JSON
    object as text."""

    id: str
    name: str
    arguments_json: str


# How tool calls are relayed: held until whole (the default), or streamed as
# their deltas arrive (a failure inside one then ends the stream partial).
ToolCallMode = Literal["whole", "stream"]


@dataclass(frozen=True, slots=True)
class Message:
    role: Role
    content: str
    # role "assistant": the calls it made, answered by the "tool" messages after it.
    tool_calls: tuple[ToolCall, ...] = ()
    # role "tool": the id of the call this message is the result of.
    tool_call_id: str = ""


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
    tool_calls: ToolCallMode | None = None  # None: "whole"


@dataclass(frozen=True, slots=True)
class StartRequest:
    """A validated `StartGeneration`."""

    model: str
    messages: tuple[Message, ...]
    params: GenerationParams = GenerationParams()
    idempotency_key: str = ""
    policy: RecoveryPolicy = RecoveryPolicy()
    metadata: tuple[tuple[str, str], ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None  # None: the provider's default (auto)

    @property
    def tool_call_mode(self) -> ToolCallMode:
        return self.policy.tool_calls or "whole"

    def meta(self, key: str, default: str = "") -> str:
        return metadata_value(self.metadata, key, default)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


# --- what the stream log holds -------------------------------------------------


ChunkKind = Literal["text", "reasoning", "tool_call"]


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of a tool call (the contract's ToolCallDelta). The pieces of
    one call share `index` (0, 1, 2, … within the turn); the first carries
    its `id` and `name`; joining `arguments` in order gives the JSON. A whole
    call (policy.tool_calls WHOLE) is one piece with all of it."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


# Not frozen: a frozen dataclass's __init__ sets each field through
# object.__setattr__ and costs five times as much, and one Chunk is made per
# token on the hot path. Treat it as immutable all the same (nothing in the
# gateway changes a chunk once made); it is not hashable.
@dataclass(slots=True)
class Chunk:
    """A piece of the answer: one provider delta (or, for a tool call held
    whole, all of its deltas). seq is 1, 2, 3, … within a stream over every
    kind; seq counts chunks, `tokens_so_far` counts tokens.

    `kind` says what it holds: answer text (`text`), the model's reasoning
    (`text` holds it), or a piece of a tool call (`tool_call`; `text` is
    "")."""

    seq: int
    text: str
    provider: str
    attempt: int
    # Tokens of the answer (text and tool calls, not reasoning) the clients
    # had been shown when this chunk was stored: the reported usage of
    # earlier attempts plus this attempt's count so far.
    tokens_so_far: int = 0
    kind: ChunkKind = "text"
    tool_call: ToolCallDelta | None = None  # set when kind is "tool_call"

    @property
    def content_bytes(self) -> int:
        """UTF-8 bytes of what the chunk carries (text, reasoning, or the tool
        call's id, name and arguments)."""
        if self.tool_call is None:
            return len(self.text.encode())
        call = self.tool_call
        return len(call.id.encode()) + len(call.name.encode()) + len(call.arguments.encode())


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
    text_sha256: str  # of the answer-text chunks
    usage: Usage = Usage()
    partial: bool = False
    error: Fault | None = None
    chunks_sha256: str = ""  # of every chunk (core/digest.py); "" in Ends stored before it


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
