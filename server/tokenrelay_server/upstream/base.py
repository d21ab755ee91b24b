"""What a provider is, for the rest of the gateway.

A provider adapter owns one upstream (the simulator, an OpenAI-compatible API,
Anthropic). The generation loop calls `stream()` once per upstream attempt and
iterates the deltas. The adapter:

- turns the provider's wire format into `TextDelta`, `ReasoningDelta`,
  `ToolCallDelta` (a piece of a tool call: index 0, 1, 2, … within the
  turn, the id and name on its first piece, a fragment of the arguments),
  `ToolCallDone` (the provider closed a call's block, where its format says
  so), `UsageReport` and one final `Finish` ("tool_calls" when the model
  stopped to call tools); a stream that ends without `Finish` is a
  `DataError`;
- sends the request's tools and tool choice, and the conversation's tool
  calls and tool results, in the provider's own shape;
- raises only `UpstreamError` subclasses (errors.py), with a classified
  `Fault`, never a transport exception;
- builds the continuation request itself when `request.continuation` is set
  (the answer text already delivered; reasoning and tool calls are not in
  it, see core/turn.py): the model must continue it without repeating it;
- closes its upstream response when the iteration is closed or cancelled.

Timeouts between deltas (first token, stall) are enforced by the caller, the
same way for every provider; connect timeouts belong to the adapter.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from tokenrelay_server.core.model import (
    GenerationParams,
    Message,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Usage,
    metadata_value,
)

__all__ = [
    "CONTINUE_INSTRUCTION",
    "Delta",
    "Finish",
    "Provider",
    "ProviderRequest",
    "ReasoningDelta",
    "TextDelta",
    "ToolCallDelta",
    "ToolCallDone",
    "UsageReport",
]

# The instruction appended when a provider cannot take an assistant prefill.
CONTINUE_INSTRUCTION = (
    "Continue your previous answer exactly where it stopped. Do not repeat any of "
    "it and do not add any preamble; start with the very next characters."
)


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One upstream attempt."""

    model: str  # the upstream model name (after alias routing)
    messages: tuple[Message, ...]
    params: GenerationParams
    attempt: int = 1  # 1-based, across every provider of the stream
    continuation: str = ""  # the partial answer to continue; "" for a fresh start
    metadata: tuple[tuple[str, str], ...] = ()
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None  # None: the provider's default

    def meta(self, key: str, default: str = "") -> str:
        return metadata_value(self.metadata, key, default)


# Not frozen: made per token on the hot path (see model.Chunk).
@dataclass(slots=True)
class TextDelta:
    """A piece of answer text (never a split UTF-8 character)."""

    text: str


# Not frozen: made per token on the hot path (see model.Chunk).
@dataclass(slots=True)
class ReasoningDelta:
    """A piece of the model's reasoning ("thinking"): not answer text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDone:
    """The provider closed tool call `index` (Anthropic: the tool_use block's
    content_block_stop). Formats without such an event end a call when the
    next one starts or at the finish."""

    index: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Token usage as the provider reported it."""

    usage: Usage


@dataclass(frozen=True, slots=True)
class Finish:
    """The provider finished the answer: "stop", "length", "content_filter", …"""

    reason: str
    usage: Usage | None = None
    # Bytes of the response the attempt received up to its finish, where the
    # adapter counts them (the HTTP adapters and the sim do): for observers.
    bytes_received: int = 0


Delta = TextDelta | ReasoningDelta | ToolCallDelta | ToolCallDone | UsageReport | Finish


class Provider(Protocol):
    """An upstream the gateway can stream from."""

    @property
    def name(self) -> str: ...

    def stream(self, request: ProviderRequest) -> AsyncGenerator[Delta, None]:
        """The deltas of one attempt. Raises `UpstreamError` subclasses.

        An async generator, not just an iterator: the caller closes it
        (`contextlib.aclosing`) so that the adapter closes its response."""
        ...

    async def aclose(self) -> None:
        """Release pooled connections."""
        ...
