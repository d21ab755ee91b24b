"""What an attempt's deltas become for the client, and what the client was
shown of the turn's tool calls (issue 12).

Sans-IO. One `TurnShaper` per upstream attempt: the engine feeds it the
provider's deltas (text, reasoning, tool-call pieces, the end of a call's
block, the finish) and stores and shows each `Piece` it returns as one chunk.

Rules:
- Text goes through the continuation's `Stitcher` (the overlap a model
  repeats is dropped) and keeps the provider's delta boundaries.
- Reasoning is shown only by an attempt that starts the stream (nothing was
  shown before it). Providers cannot continue a thinking block, so a
  continuation asks again with the answer text as the prefill (reasoning is
  not in it); a model that thinks again would show the client a second,
  different start of its reasoning. An attempt after anything was shown
  therefore drops the reasoning it gets: what the client saw of the
  reasoning stays, none of it is repeated, and the answer text goes on where
  it stopped.
- Tool calls, policy.tool_calls WHOLE (the default): a call's pieces are
  held until the call is complete — the next call starts, the provider says
  the call's block stopped, other content follows, or the finish — and then
  released as one piece with its id, name and all of its arguments. A call
  the attempt failed inside was never shown: the next attempt makes it
  again, and nothing the client holds is corrupt. A complete call whose
  arguments are not a JSON object (or that has no name) is
  INVALID_TOOL_ARGUMENTS, retryable: the client saw none of it. Arguments
  that never came are "{}". The id and name are the first ones the provider
  sent for the call (some servers repeat them on every piece).
- Tool calls, STREAM: each piece goes out as it arrives (a piece with no id,
  name or arguments is dropped); the same events close the call. Nothing is
  checked: the client asked for the provider's pieces as they are.

`TurnState` (one per stream) is what the client was shown of tool calls:
how many calls are complete, and the call shown in part and not closed yet
(STREAM). The recovery decision (recovery.py) reads it: a failure while a
call is open ends the stream TOOL_CALL_INTERRUPTED, and after complete calls
the turn is over, so nothing is continued.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenrelay_server.core import classify
from tokenrelay_server.core.errors import upstream_error
from tokenrelay_server.core.model import Chunk, ChunkKind, ToolCallDelta, ToolCallMode
from tokenrelay_server.core.stitch import Stitcher


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def json_object_problem(text: str) -> str | None:
    """Why `text` is not a JSON object (RFC 8259: no NaN or Infinity), or
    None when it is one."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        return "it is nested too deeply"
    except ValueError as error:
        return f"it is not JSON ({error})"
    if not isinstance(value, dict):
        return f"it is JSON but not an object (it is {_json_kind(value)})"
    return None


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return "a number"


# Not frozen, for the same reason as model.Chunk: one is made per delta.
@dataclass(slots=True)
class Piece:
    """One chunk to store and show."""

    kind: ChunkKind
    text: str = ""  # answer text or reasoning
    tool_call: ToolCallDelta | None = None  # kind "tool_call"
    deltas: int = 1  # the provider deltas it stands for (a whole call: all of its pieces)

    @property
    def counts_toward_answer(self) -> bool:
        """Text and tool calls are the answer (the caller's max_tokens,
        Checkpoint.token_count); reasoning is not."""
        return self.kind != "reasoning"

    @classmethod
    def of(cls, chunk: Chunk) -> Piece:
        return cls(chunk.kind, chunk.text, chunk.tool_call)


@dataclass
class TurnState:
    """What the clients of one stream were shown of its tool calls."""

    mode: ToolCallMode = "whole"
    complete_calls: int = 0
    open_call: int | None = None  # STREAM: the call shown in part, not closed yet

    def shown(self, piece: Piece) -> None:
        """`piece` was stored and shown."""
        if piece.tool_call is None:
            self.close_call()  # other content after a call: the call is over
            return
        if self.mode == "whole":
            self.complete_calls += 1  # a whole call is complete by construction
            return
        if self.open_call is not None and self.open_call != piece.tool_call.index:
            self.complete_calls += 1
        self.open_call = piece.tool_call.index

    def close_call(self, index: int | None = None) -> None:
        """The open call (or, with `index`, that call if it is the open one)
        is complete."""
        if self.open_call is not None and index in (None, self.open_call):
            self.complete_calls += 1
            self.open_call = None

    @classmethod
    def restored(cls, mode: ToolCallMode, chunks: Sequence[Chunk]) -> TurnState:
        """The state a stored log shows (a takeover). In STREAM mode the log
        does not say whether the provider closed its last call: it is taken
        for complete when its arguments so far are a JSON object."""
        state = cls(mode)
        arguments: list[str] = []
        for chunk in chunks:
            before = state.open_call
            state.shown(Piece.of(chunk))
            if state.open_call != before:
                arguments = []
            if chunk.tool_call is not None:
                arguments.append(chunk.tool_call.arguments)
        if state.open_call is not None and json_object_problem("".join(arguments)) is None:
            state.close_call()
        return state


@dataclass
class _HeldCall:
    index: int
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    deltas: int = 0

    def add(self, delta: ToolCallDelta) -> None:
        self.id = self.id or delta.id
        self.name = self.name or delta.name
        if delta.arguments:
            self.arguments.append(delta.arguments)
        self.deltas += 1


class TurnShaper:
    """The deltas of one attempt in, the pieces to show out (module doc)."""

    def __init__(
        self, state: TurnState, *, show_reasoning: bool, stitcher: Stitcher | None = None
    ) -> None:
        self._state = state
        self._show_reasoning = show_reasoning
        self._stitcher = stitcher
        self._held: _HeldCall | None = None
        self.reasoning_dropped = 0  # reasoning deltas not shown (a continuation's)

    @property
    def passes_text_through(self) -> bool:
        """A text delta would come out as it is, one piece (no stitcher still
        deciding, no call held or open): the engine's fast path."""
        stitcher = self._stitcher
        if stitcher is not None and stitcher.decided:
            self._stitcher = stitcher = None  # it passes everything through now
        return stitcher is None and self._held is None and self._state.open_call is None

    @property
    def holding(self) -> bool:
        """A tool call is held (WHOLE): its pieces arrived, nothing was shown."""
        return self._held is not None

    def text(self, text: str) -> list[Piece]:
        out = self._end_call()
        pieces = self._stitcher.feed(text) if self._stitcher is not None else [text]
        return out + [Piece("text", piece) for piece in pieces if piece]

    def reasoning(self, text: str) -> list[Piece]:
        out = self._end_call()
        if not self._show_reasoning:
            self.reasoning_dropped += 1
            return out
        return out + self._flush_text() + [Piece("reasoning", text)]

    def tool_call(self, delta: ToolCallDelta) -> list[Piece]:
        out = self._flush_text()
        if self._state.mode == "stream":
            if delta.id or delta.name or delta.arguments:
                out.append(Piece("tool_call", tool_call=delta))
            return out
        if self._held is not None and self._held.index != delta.index:
            out += self._release()
        if self._held is None:
            self._held = _HeldCall(delta.index)
        self._held.add(delta)
        return out

    def tool_call_done(self, index: int) -> list[Piece]:
        """The provider closed call `index` (Anthropic content_block_stop)."""
        return self._end_call(index)

    def finish(self) -> list[Piece]:
        """The provider finished the answer: release what is still held."""
        return self._flush_text() + self._end_call()

    def _flush_text(self) -> list[Piece]:
        if self._stitcher is None:
            return []
        return [Piece("text", piece) for piece in self._stitcher.finish() if piece]

    def _end_call(self, index: int | None = None) -> list[Piece]:
        if self._state.mode == "stream":
            self._state.close_call(index)
            return []
        if self._held is not None and index in (None, self._held.index):
            return self._release()
        return []

    def _release(self) -> list[Piece]:
        held, self._held = self._held, None
        assert held is not None
        arguments = "".join(held.arguments) or "{}"
        if not held.name:
            problem: str | None = "the provider sent no tool name"
        else:
            problem = json_object_problem(arguments)
            if problem is not None:
                problem = f"its arguments are not a JSON object: {problem}"
        if problem is not None:
            raise upstream_error(classify.invalid_tool_arguments(held.index, problem))
        call = ToolCallDelta(held.index, held.id, held.name, arguments)
        return [Piece("tool_call", tool_call=call, deltas=held.deltas)]
