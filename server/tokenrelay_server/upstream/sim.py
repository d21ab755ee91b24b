"""The simulated provider: deterministic text, scripted faults, continuation.

The simulator is the embedded default (model `sim`) and the engine behind the
mock upstream's HTTP endpoints. Its core here is sans-IO: `SimAnswer` says
which tokens a conversation produces, `parse_fault_script` reads the fault
script, `plan_attempt` says what one attempt sends and how it fails. The
in-process `SimProvider` at the bottom plays a plan with asyncio pacing.

Text: an endless token sequence that is a pure function of the original
messages and `sim.seed`. An answer of n tokens is the first n of them, so a
clean run and a run broken and continued produce the same text.

Agent turns (issue 12):

- Reasoning: `sim.reasoning=N` streams N reasoning deltas (deterministic
  words of their own) before the answer, in every attempt (a model asked to
  continue thinks again).
- Tool calls: a request that offers tools (tool_choice not NONE) and ends
  with a user message is a tool turn: `sim.preamble` text tokens (default 3,
  within max_tokens), then `sim.tool_calls` calls (default 1; 0 answers with
  text), finish reason "tool_calls". Call i calls the tool tool_choice names,
  else tools[i mod len(tools)], with an id and arguments that are a pure
  function of the conversation: a JSON object with a value for each of the
  schema's first properties (by its type; strings are a few words, some of
  them not ASCII). Each call is one event with its id and name, then its
  arguments in fragments of `ARGUMENT_FRAGMENT_CHARS` characters.
- A conversation that ends with a tool result is answered with text (the
  final answer of the agent loop), whatever the tools.

Faults (`sim.faults`, comma separated, one item per successive attempt; after
the last item every attempt is `ok`). N counts events of every kind
(reasoning deltas, text deltas, a call's first event and its argument
fragments), so a fault can land inside the reasoning or inside a tool call's
arguments:

    ok          a clean answer
    reset@N     N events, then the connection is reset
    stall@N     N events, then nothing more (the stall timeout must notice)
    eof@N       N events, then the stream ends without a finish reason
    garbage@N   N events, then malformed data
    http:CODE   fails before the first event with HTTP status CODE

Continuation: when the conversation ends with the partial answer (an
assistant message, optionally followed by the continue instruction), the
simulator finds where that prefix stops in its text and carries on from
there, first repeating the last `sim.overlap` characters of the prefix (a
model that repeats itself, for the stitcher).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

from tokenrelay_server.core import classify
from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.errors import RequestError, excerpt, upstream_error
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

DEFAULT_MAX_TOKENS = 200
MAX_PACE_MS = 60_000
MAX_OVERLAP = 64
DEFAULT_RETRY_AFTER_S = 1.0
FULL_SPEED_BURST = 16  # tokens between yields to the event loop at pace 0
MAX_TOKENS_PER_CHUNK = 16
MAX_REASONING = 1_000
MAX_TOOL_CALLS = 8
MAX_PREAMBLE = 200
DEFAULT_PREAMBLE = 3
ARGUMENT_FRAGMENT_CHARS = 8
MAX_ARGUMENT_PROPERTIES = 4

# Numbers in sim.* metadata and fault scripts: ASCII digits only. str.isdigit()
# and int()/float() also take other scripts' digits ("٣" is 3) and isdigit()
# takes "²", which int() then refuses: what a client typed must mean one thing.
_COUNT = re.compile(r"[0-9]{1,9}")
_INTEGER = re.compile(r"[+-]?[0-9]{1,9}")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]{1,9}(?:\.[0-9]{0,9})?|\.[0-9]{1,9})")


def parse_count(text: str) -> int | None:
    """A whole number written in ASCII digits (at most 9), else None."""
    return int(text) if _COUNT.fullmatch(text) else None


_WORDS = (
    "the",
    "stream",
    "token",
    "relay",
    "gateway",
    "survives",
    "every",
    "failure",
    "and",
    "keeps",
    "its",
    "order",
    "a",
    "client",
    "resumes",
    "exactly",
    "where",
    "it",
    "stopped",
    "checkpoint",
    "provider",
    "retry",
    "backoff",
    "jitter",
    "circuit",
    "breaker",
    "falls",
    "back",
    "to",
    "another",
    "model",
    "while",
    "sequence",
    "numbers",
    "grow",
    "by",
    "one",
    "café",
    "naïve",
    "déjà",
    "vu",
    "über",
    "señor",
    "日本語",
    "データ",
    "🚀",
    "∑",
    "λ",
    "durable",
    "before",
    "visible",
    "replica",
    "lease",
    "continuation",
    "stitcher",
)


# --- text -------------------------------------------------------------------------


def _canonical_json(text: str) -> str:
    """The same JSON however it was spaced (Anthropic's tool_use input comes
    back as an object that the mock writes out again)."""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return text


def conversation_digest(messages: tuple[Message, ...], seed: str = "0", salt: str = "") -> bytes:
    """A hash of what the conversation says, the same in-process and over HTTP."""
    digest = hashlib.sha256(seed.encode())
    for message in messages:
        digest.update(b"\x00" + message.role.encode() + b"\x01" + message.content.encode())
        for call in message.tool_calls:
            digest.update(
                b"\x02"
                + call.id.encode()
                + b"\x03"
                + call.name.encode()
                + b"\x04"
                + _canonical_json(call.arguments_json).encode()
            )
        if message.tool_call_id:
            digest.update(b"\x05" + message.tool_call_id.encode())
    if salt:
        digest.update(b"\x06" + salt.encode())
    return digest.digest()


class SimAnswer:
    """The endless deterministic token sequence of one conversation."""

    def __init__(self, messages: tuple[Message, ...], seed: str = "0", salt: str = "") -> None:
        self._rng = random.Random(conversation_digest(messages, seed, salt))
        self._tokens: list[str] = []

    def token(self, index: int) -> str:
        while len(self._tokens) <= index:
            self._tokens.append(self._next_token(len(self._tokens)))
        return self._tokens[index]

    def text(self, n_tokens: int) -> str:
        return "".join(self.token(i) for i in range(n_tokens))

    def _next_token(self, index: int) -> str:
        word = self._rng.choice(_WORDS)
        roll = self._rng.random()
        if index == 0:
            return word.capitalize()
        previous = self._tokens[-1]
        if previous in (".", ",", "\n\n"):
            return (" " if previous != "\n\n" else "") + (
                word if previous == "," else word.capitalize()
            )
        if roll < 0.06:
            return "."
        if roll < 0.10:
            return ","
        if roll < 0.12:
            return "\n\n"
        return " " + word

    def locate(self, prefix: str, limit_tokens: int = 1_000_000) -> tuple[int, int] | None:
        """(token index, characters of that token) where `prefix` stops, or None
        when `prefix` is not a prefix of this answer."""
        position = 0
        index = 0
        while position < len(prefix):
            if index >= limit_tokens:
                return None
            token = self.token(index)
            remaining = prefix[position:]
            if remaining.startswith(token):
                position += len(token)
                index += 1
                continue
            if token.startswith(remaining):
                return index, len(remaining)
            return None
        return index, 0


def split_continuation(messages: tuple[Message, ...]) -> tuple[tuple[Message, ...], str]:
    """(original messages, partial answer) of a continuation request; the
    partial answer is "" for a fresh request."""
    # An assistant message with tool calls is a turn of the conversation, not
    # a partial answer.
    if len(messages) >= 2 and messages[-1].role == "user":
        if (
            messages[-1].content == CONTINUE_INSTRUCTION
            and messages[-2].role == "assistant"
            and not messages[-2].tool_calls
        ):
            return messages[:-2], messages[-2].content
    if len(messages) >= 2 and messages[-1].role == "assistant" and not messages[-1].tool_calls:
        return messages[:-1], messages[-1].content
    return messages, ""


def is_tool_turn(
    originals: tuple[Message, ...],
    tools: tuple[Tool, ...],
    tool_choice: ToolChoice | None,
    settings: SimSettings,
) -> bool:
    """Whether the simulator answers with tool calls (module doc)."""
    if not tools or settings.tool_calls == 0 or not originals:
        return False
    if tool_choice is not None and tool_choice.mode == "none" and not tool_choice.tool_name:
        return False
    return originals[-1].role not in ("tool", "assistant")


# --- faults -------------------------------------------------------------------------

FaultKind = Literal["ok", "reset", "stall", "eof", "garbage", "http"]


@dataclass(frozen=True, slots=True)
class FaultStep:
    kind: FaultKind
    n: int = 0  # tokens before the fault, or the HTTP status for "http"


def parse_fault_script(script: str, field: str = 'metadata["sim.faults"]') -> tuple[FaultStep, ...]:
    """Parse `reset@25,ok`; a bad item raises RequestError naming the field."""
    steps: list[FaultStep] = []
    if not script.strip():
        return ()
    for position, raw in enumerate(script.split(","), start=1):
        item = raw.strip()
        if item == "ok":
            steps.append(FaultStep("ok"))
            continue
        if item.startswith("http:"):
            code = parse_count(item[5:])
            if code is None or not 400 <= code <= 599:
                raise RequestError(
                    f"{field}: item {position} {excerpt(item)} needs an HTTP error status 400-599"
                )
            steps.append(FaultStep("http", code))
            continue
        kind, at, raw_count = item.partition("@")
        count = parse_count(raw_count)
        match kind:
            case "reset" | "stall" | "eof" | "garbage" if at and count is not None:
                steps.append(FaultStep(kind, count))
                continue
        raise RequestError(
            f"{field}: item {position} {excerpt(item)} is not one of ok, reset@N, stall@N, "
            "eof@N, garbage@N, http:CODE (N in ASCII digits)"
        )
    return tuple(steps)


def fault_for_attempt(steps: tuple[FaultStep, ...], attempt: int) -> FaultStep:
    return steps[attempt - 1] if 0 < attempt <= len(steps) else FaultStep("ok")


# --- one attempt -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimSettings:
    """The simulator's knobs, read from request metadata (validated)."""

    seed: str = "0"
    pace_ms: float = 0.0
    overlap: int = 0
    faults: tuple[FaultStep, ...] = ()
    retry_after_s: float = DEFAULT_RETRY_AFTER_S
    # Tokens per delta: real providers often put several tokens in one
    # delta, so chunks (deltas) and tokens (usage) differ.
    tokens_per_chunk: int = 1
    reasoning: int = 0  # reasoning deltas before the answer
    tool_calls: int | None = None  # calls in a tool turn; None: 1
    preamble: int = DEFAULT_PREAMBLE  # text tokens before the calls of a tool turn

    @classmethod
    def from_metadata(
        cls, metadata: tuple[tuple[str, str], ...], default_pace_ms: float = 0.0
    ) -> SimSettings:
        values = dict(metadata)
        return cls(
            seed=values.get("sim.seed", "0"),
            pace_ms=_number(values, "sim.pace_ms", default_pace_ms, 0, MAX_PACE_MS),
            overlap=int(_number(values, "sim.overlap", 0, 0, MAX_OVERLAP, integer=True)),
            faults=parse_fault_script(values.get("sim.faults", "")),
            retry_after_s=_number(values, "sim.retry_after_s", DEFAULT_RETRY_AFTER_S, 0, 3600),
            tokens_per_chunk=int(
                _number(values, "sim.tokens_per_chunk", 1, 1, MAX_TOKENS_PER_CHUNK, integer=True)
            ),
            reasoning=int(_number(values, "sim.reasoning", 0, 0, MAX_REASONING, integer=True)),
            tool_calls=(
                int(_number(values, "sim.tool_calls", 1, 0, MAX_TOOL_CALLS, integer=True))
                if "sim.tool_calls" in values
                else None
            ),
            preamble=int(
                _number(values, "sim.preamble", DEFAULT_PREAMBLE, 0, MAX_PREAMBLE, integer=True)
            ),
        )


def _number(
    values: dict[str, str],
    key: str,
    default: float,
    low: float,
    high: float,
    *,
    integer: bool = False,
) -> float:
    raw = values.get(key)
    if raw is None:
        return default
    pattern = _INTEGER if integer else _DECIMAL
    if not pattern.fullmatch(raw.strip()):
        kind = "an integer" if integer else "a number"
        raise RequestError(
            f'metadata["{key}"]={excerpt(raw)} is not {kind} (ASCII digits, e.g. "20")'
        )
    value = int(raw) if integer else float(raw)
    if not low <= value <= high:
        raise RequestError(f'metadata["{key}"]={excerpt(raw)} is out of range {low:g}..{high:g}')
    return value


SimEventKind = Literal["text", "reasoning", "tool_call"]


# Not frozen: made per token on the hot path (see model.Chunk).
@dataclass(slots=True)
class SimEvent:
    """One event of an attempt: a text or reasoning delta, or a piece of a
    tool call (its first piece has the id and name and no arguments)."""

    kind: SimEventKind
    text: str = ""  # the text, the reasoning, or an argument fragment
    index: int = 0  # the tool call's place in the turn
    id: str = ""
    name: str = ""
    tokens: int = 1


class PlanEvents(Sequence[SimEvent]):
    """The events of a plan, in order. A text delta of one token is kept as
    its string: a long answer's plan holds one str per token, not an object
    (an idle stream of 200 tokens held 16 KiB of SimEvents)."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[str | SimEvent] = ()) -> None:
        self._items: tuple[str | SimEvent, ...] = tuple(items)

    @property
    def raw(self) -> tuple[str | SimEvent, ...]:
        """The events as stored: a str is SimEvent("text", it)."""
        return self._items

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> SimEvent: ...

    @overload
    def __getitem__(self, index: slice) -> PlanEvents: ...

    def __getitem__(self, index: int | slice) -> SimEvent | PlanEvents:
        if isinstance(index, slice):
            return PlanEvents(self._items[index])
        item = self._items[index]
        return SimEvent("text", item) if isinstance(item, str) else item

    def __iter__(self) -> Iterator[SimEvent]:
        for item in self._items:
            yield SimEvent("text", item) if isinstance(item, str) else item

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PlanEvents):
            return self._items == other._items
        if isinstance(other, tuple | list):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"PlanEvents({list(self)!r})"


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """What one simulated attempt sends: `events`, then `fault` (which, for
    "ok", means a clean finish with `finish_reason`)."""

    events: PlanEvents
    fault: FaultStep
    finish_reason: str
    usage: Usage

    @property
    def pieces(self) -> tuple[str, ...]:
        """The text deltas."""
        return tuple(e.text for e in self.events if e.kind == "text")


def _argument_value(schema: object, rng: random.Random) -> object:
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(schema, dict) and isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if kind == "integer":
        return rng.randint(1, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 1)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return [" ".join(rng.choice(_WORDS) for _ in range(2))]
    if kind == "object":
        return {}
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))


def sim_arguments(tool: Tool, rng: random.Random) -> str:
    """Arguments for a call of `tool`: a value per property of its schema."""
    try:
        schema = json.loads(tool.parameters_json) if tool.parameters_json.strip() else {}
    except ValueError:
        schema = {}
    properties = schema.get("properties") if isinstance(schema, dict) else None
    arguments: dict[str, Any] = {}
    if isinstance(properties, dict):
        for name, spec in list(properties.items())[:MAX_ARGUMENT_PROPERTIES]:
            arguments[str(name)] = _argument_value(spec, rng)
    return json.dumps(arguments, ensure_ascii=False)


def tool_call_events(
    originals: tuple[Message, ...],
    tools: tuple[Tool, ...],
    tool_choice: ToolChoice | None,
    settings: SimSettings,
) -> list[SimEvent]:
    """The calls of a tool turn, each as its first event and its fragments."""
    by_name = {tool.name: tool for tool in tools}
    events: list[SimEvent] = []
    for index in range(1 if settings.tool_calls is None else settings.tool_calls):
        if tool_choice is not None and tool_choice.tool_name in by_name:
            tool = by_name[tool_choice.tool_name]
        else:
            tool = tools[index % len(tools)]
        digest = conversation_digest(originals, settings.seed, f"tool call {index}")
        call_id = "call_" + digest.hex()[:24]
        arguments = sim_arguments(tool, random.Random(digest))
        events.append(SimEvent("tool_call", "", index, call_id, tool.name))
        events += [
            SimEvent("tool_call", arguments[at : at + ARGUMENT_FRAGMENT_CHARS], index)
            for at in range(0, len(arguments), ARGUMENT_FRAGMENT_CHARS)
        ]
    return events


def plan_attempt(
    messages: tuple[Message, ...],
    *,
    max_tokens: int | None,
    attempt: int,
    settings: SimSettings,
    continuation: str | None = None,
    tools: tuple[Tool, ...] = (),
    tool_choice: ToolChoice | None = None,
) -> AttemptPlan:
    """The deterministic script of one attempt.

    `continuation` overrides the partial answer found in `messages` (the
    in-process provider passes it directly; HTTP requests carry it in the
    messages)."""
    originals, found_prefix = split_continuation(messages)
    prefix = found_prefix if continuation is None else continuation
    if continuation is not None:
        originals = messages
    answer = SimAnswer(originals, settings.seed)
    tool_turn = is_tool_turn(originals, tools, tool_choice, settings)
    budget = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    index, offset = 0, 0
    if prefix:
        start = answer.locate(prefix, limit_tokens=len(prefix) + 1)
        if start is None:
            index, offset = len(prefix.split()), 0
        else:
            index, offset = start
        if max_tokens is None:
            # The default length is the whole answer's, so a continuation
            # without max_tokens still ends where a clean run would.
            budget = max(DEFAULT_MAX_TOKENS - index, 0)
    end = index + budget
    if tool_turn:
        end = min(end, max(settings.preamble, index + (1 if offset else 0)))
    pieces: list[str] = []
    if offset and index < end:
        pieces.append(answer.token(index)[offset:])
        index += 1
    token = answer.token
    pieces += [token(i) for i in range(index, end)]
    if prefix and settings.overlap and pieces:
        pieces[0] = prefix[-settings.overlap :] + pieces[0]
    # Deltas of `tokens_per_chunk` tokens each.
    size = settings.tokens_per_chunk
    events: list[str | SimEvent] = [
        SimEvent("reasoning", token, tokens=1)
        for token in (
            SimAnswer(originals, settings.seed, "reasoning").token(i)
            for i in range(settings.reasoning)
        )
    ]
    if size == 1:
        events += pieces  # a one-token text delta is its string (PlanEvents)
    else:
        events += [
            SimEvent("text", "".join(pieces[i : i + size]), tokens=len(pieces[i : i + size]))
            for i in range(0, len(pieces), size)
        ]
    if tool_turn:
        events += tool_call_events(originals, tools, tool_choice, settings)
    # Faults count events of every kind.
    fault = fault_for_attempt(settings.faults, attempt)
    if fault.kind in ("reset", "stall", "eof", "garbage"):
        events = events[: fault.n]
    elif fault.kind == "http":
        events = []
    prompt_tokens = sum(len(m.content.split()) for m in messages)
    return AttemptPlan(
        events=PlanEvents(events),
        fault=fault,
        finish_reason="tool_calls" if tool_turn else "stop",
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=sum([1 if isinstance(e, str) else e.tokens for e in events]),
        ),
    )


# --- the in-process provider ----------------------------------------------------------------

SimState = Literal["answering", "waiting", "stalled"]


@dataclass(frozen=True, slots=True)
class SimInFlight:
    """One attempt the simulator is playing, as `SimProvider.in_flight()`
    shows it: "answering" (what it does next does not wait on time),
    "waiting" (on the clock: the pace) or "stalled" (`stall@N`: nothing more
    until the caller gives up). Every delta it yielded before waiting or
    stalling has been taken by the caller: it is a generator."""

    attempt: int
    state: SimState


@dataclass(eq=False)
class _Playing:
    attempt: int
    state: SimState = "answering"


class SimProvider:
    """Model `sim`, played in-process with pacing on the injected clock."""

    def __init__(
        self, name: str = "sim", *, default_pace_ms: float = 0.0, clock: Clock | None = None
    ) -> None:
        self._name = name
        self._default_pace_ms = default_pace_ms
        self._clock = clock or SystemClock()
        self._playing: set[_Playing] = set()

    @property
    def name(self) -> str:
        return self._name

    def validate(self, metadata: tuple[tuple[str, str], ...]) -> None:
        """Raise RequestError naming the bad `sim.*` metadata key, if any."""
        SimSettings.from_metadata(metadata, self._default_pace_ms)

    def in_flight(self) -> tuple[SimInFlight, ...]:
        """What each attempt being played is doing now (for a time keeper)."""
        return tuple(SimInFlight(playing.attempt, playing.state) for playing in self._playing)

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Delta, None]:
        # One generator, not a wrapper around another: each layer of async
        # generator costs about a microsecond per delta.
        playing = _Playing(request.attempt)
        self._playing.add(playing)
        try:
            settings = SimSettings.from_metadata(request.metadata, self._default_pace_ms)
            plan = plan_attempt(
                request.messages,
                max_tokens=request.params.max_tokens,
                attempt=request.attempt,
                settings=settings,
                continuation=request.continuation,
                tools=request.tools,
                tool_choice=request.tool_choice,
            )
            fault = plan.fault
            if fault.kind == "http":
                retry_after = settings.retry_after_s if fault.n in (429, 503, 529) else None
                raise upstream_error(
                    classify.classify_http_status(fault.n, retry_after_s=retry_after).with_context(
                        provider=self._name, attempt=request.attempt
                    )
                )
            pace_s = settings.pace_ms / 1000.0
            sent_bytes = 0
            # An absolute schedule: token i is due at start + (i + 1) * pace, so
            # the rate holds however late each wake-up is (issue 10: sleeping the
            # full pace after each token drifted to ~47 tok/s at 50 tok/s).
            started = self._clock.monotonic()
            for index, event in enumerate(plan.events.raw):
                if pace_s:
                    delay = started + (index + 1) * pace_s - self._clock.monotonic()
                    if delay > 0:  # a token already due (a late wake-up) is not a wait
                        playing.state = "waiting"
                    await self._clock.sleep(delay)
                    playing.state = "answering"
                elif index % FULL_SPEED_BURST == 0:
                    # At full speed, hand the loop back now and then, as a socket
                    # read that returns several tokens at once would.
                    await asyncio.sleep(0)
                if isinstance(event, str):  # a one-token text delta (PlanEvents)
                    sent_bytes += len(event.encode())
                    yield TextDelta(event)
                else:
                    sent_bytes += len(event.text.encode())
                    yield _delta(event)
            context = {
                "tokens_received": len(plan.events),
                "bytes_received": sent_bytes,
            }
            if fault.kind == "reset":
                raise upstream_error(
                    classify.connection_reset(**context).with_context(
                        provider=self._name, attempt=request.attempt
                    )
                )
            if fault.kind == "garbage":
                raise upstream_error(
                    classify.malformed_data("invalid JSON in a data line", **context).with_context(
                        provider=self._name, attempt=request.attempt
                    )
                )
            if fault.kind == "stall":
                playing.state = "stalled"
                await asyncio.Event().wait()  # hangs until the caller's stall timeout cancels us
            if fault.kind == "eof":
                return  # no Finish: the caller reports NO_FINISH_REASON
            yield UsageReport(plan.usage)
            yield Finish(plan.finish_reason, plan.usage, bytes_received=sent_bytes)
        finally:
            self._playing.discard(playing)

    async def aclose(self) -> None:
        return None


def _delta(event: SimEvent) -> Delta:
    if event.kind == "reasoning":
        return ReasoningDelta(event.text)
    if event.kind == "tool_call":
        return ToolCallDelta(event.index, event.id, event.name, event.text)
    return TextDelta(event.text)
