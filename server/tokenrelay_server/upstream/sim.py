"""The simulated provider: deterministic text, scripted faults, continuation.

The simulator is the embedded default (model `sim`) and the engine behind the
mock upstream's HTTP endpoints. Its core here is sans-IO: `SimAnswer` says
which tokens a conversation produces, `parse_fault_script` reads the fault
script, `plan_attempt` says what one attempt sends and how it fails. The
in-process `SimProvider` at the bottom plays a plan with asyncio pacing.

Text: an endless token sequence that is a pure function of the original
messages and `sim.seed`. An answer of n tokens is the first n of them, so a
clean run and a run broken and continued produce the same text.

Faults (`sim.faults`, comma separated, one item per successive attempt; after
the last item every attempt is `ok`):

    ok          a clean answer
    reset@N     N tokens, then the connection is reset
    stall@N     N tokens, then nothing more (the stall timeout must notice)
    eof@N       N tokens, then the stream ends without a finish reason
    garbage@N   N tokens, then malformed data
    http:CODE   fails before the first token with HTTP status CODE

Continuation: when the conversation ends with the partial answer (an
assistant message, optionally followed by the continue instruction), the
simulator finds where that prefix stops in its text and carries on from
there, first repeating the last `sim.overlap` characters of the prefix (a
model that repeats itself, for the stitcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Literal

from tokenrelay_server.core import classify
from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.errors import RequestError, excerpt, upstream_error
from tokenrelay_server.core.model import Message, Usage
from tokenrelay_server.upstream.base import (
    CONTINUE_INSTRUCTION,
    Delta,
    Finish,
    ProviderRequest,
    TextDelta,
    UsageReport,
)

DEFAULT_MAX_TOKENS = 200
MAX_PACE_MS = 60_000
MAX_OVERLAP = 64
DEFAULT_RETRY_AFTER_S = 1.0
FULL_SPEED_BURST = 16  # tokens between yields to the event loop at pace 0
MAX_TOKENS_PER_CHUNK = 16

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


class SimAnswer:
    """The endless deterministic token sequence of one conversation."""

    def __init__(self, messages: tuple[Message, ...], seed: str = "0") -> None:
        digest = hashlib.sha256(seed.encode())
        for message in messages:
            digest.update(b"\x00" + message.role.encode() + b"\x01" + message.content.encode())
        self._rng = random.Random(digest.digest())
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
    if len(messages) >= 2 and messages[-1].role == "user":
        if messages[-1].content == CONTINUE_INSTRUCTION and messages[-2].role == "assistant":
            return messages[:-2], messages[-2].content
    if len(messages) >= 2 and messages[-1].role == "assistant":
        return messages[:-1], messages[-1].content
    return messages, ""


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
                _number(
                    values, "sim.tokens_per_chunk", 1, 1, MAX_TOKENS_PER_CHUNK, integer=True
                )
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


@dataclass(frozen=True, slots=True)
class AttemptPlan:
    """What one simulated attempt sends: `pieces` of text, then `fault`
    (which, for "ok", means a clean finish)."""

    pieces: tuple[str, ...]
    fault: FaultStep
    finish_reason: str
    usage: Usage


def plan_attempt(
    messages: tuple[Message, ...],
    *,
    max_tokens: int | None,
    attempt: int,
    settings: SimSettings,
    continuation: str | None = None,
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
    budget = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
    pieces: list[str] = []
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
        if offset:
            pieces.append(answer.token(index)[offset:])
            index += 1
        pieces.extend(answer.token(i) for i in range(index, index + budget - len(pieces)))
        if settings.overlap and pieces:
            pieces[0] = prefix[-settings.overlap :] + pieces[0]
    else:
        pieces.extend(answer.token(i) for i in range(budget))
    # Deltas of `tokens_per_chunk` tokens each; faults count deltas.
    size = settings.tokens_per_chunk
    tokens = [len(pieces[i : i + size]) for i in range(0, len(pieces), size)]
    pieces = ["".join(pieces[i : i + size]) for i in range(0, len(pieces), size)]
    fault = fault_for_attempt(settings.faults, attempt)
    if fault.kind in ("reset", "stall", "eof", "garbage"):
        pieces, tokens = pieces[: fault.n], tokens[: fault.n]
    elif fault.kind == "http":
        pieces, tokens = [], []
    prompt_tokens = sum(len(m.content.split()) for m in messages)
    return AttemptPlan(
        pieces=tuple(pieces),
        fault=fault,
        finish_reason="stop",
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(tokens)),
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
        playing = _Playing(request.attempt)
        self._playing.add(playing)
        try:
            async with contextlib.aclosing(self._play(request, playing)) as deltas:
                async for delta in deltas:
                    yield delta
        finally:
            self._playing.discard(playing)

    async def _play(
        self, request: ProviderRequest, playing: _Playing
    ) -> AsyncGenerator[Delta, None]:
        settings = SimSettings.from_metadata(request.metadata, self._default_pace_ms)
        plan = plan_attempt(
            request.messages,
            max_tokens=request.params.max_tokens,
            attempt=request.attempt,
            settings=settings,
            continuation=request.continuation,
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
        for index, piece in enumerate(plan.pieces):
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
            sent_bytes += len(piece.encode())
            yield TextDelta(piece)
        context = {
            "tokens_received": len(plan.pieces),
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

    async def aclose(self) -> None:
        return None
