"""What the engine tells observers: metrics, traces, logs and error
statistics are observers, never code inside the engine (the way stamina's
retry hooks keep instrumentation out of the retry loop).

An observer is any callable that takes one `EngineEvent`. The engine calls
every observer of the hub, in order, synchronously, at the moment the thing
happened; an observer must be quick and must not raise (one that raises is
logged and the engine goes on: an observer can never break a stream).

    StreamStarted    a new generation began on this replica
    AttemptStarted   an upstream call begins (attempt n of the stream)
    AttemptEnded     it finished, failed, was refused by a breaker, or was stopped
    RecoveryAction   the decision: retry, resume by continuation, fall back
    ChunkStored      a chunk was stored and shown (the hot path: keep it cheap)
    StreamEnded      the End was written (complete or partial)
    ReaderAttached   a call attached to a stream (a start, a resume, a repeated key)
    TakenOver        this replica took a dead owner's stream over
    BreakerChanged   a circuit breaker changed state (from the breaker's listeners)

Events carry ids and bounded labels (model alias, provider, codes); never
keys or tokens. Two fields carry content, for `--log-content` alone (the
log observer, obs/logs.py; every other observer leaves them alone):
StreamStarted.prompt and ChunkStored.text.

ChunkStored is the one event per chunk: an observer that has no use for it
says so with a class attribute `observes_chunks = False`, and when no
observer wants it the engine does not even build it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenrelay_server.core.breaker import BreakerChange
from tokenrelay_server.core.errors import Fault
from tokenrelay_server.core.model import End

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamStarted:
    stream_id: str
    model: str  # the alias the client asked for
    at: float  # the clock's monotonic time
    prompt: str = ""  # the last message's content (for --log-content only)


@dataclass(frozen=True, slots=True)
class AttemptStarted:
    stream_id: str
    model: str
    provider: str
    upstream_model: str
    attempt: int  # 1-based, across every provider of the stream
    continuation: bool  # continues a partial answer (a resume or a fallback after tokens)
    at: float


@dataclass(frozen=True, slots=True)
class AttemptEnded:
    stream_id: str
    model: str
    provider: str
    upstream_model: str
    attempt: int
    # "success", "failure" (the provider's fault or the caller's), "refused"
    # (an open breaker: no call was made) or "stopped" (cancel, deadline, …).
    outcome: str
    fault: Fault | None
    deltas: int  # text deltas received
    completion_tokens: int  # as reported, 0 when the provider did not say
    bytes_received: int  # of the response, where the provider counts them (else 0)
    first_token_s: float | None
    duration_s: float
    at: float


@dataclass(frozen=True, slots=True)
class RecoveryAction:
    stream_id: str
    model: str
    step: str  # "retry" | "resume" | "fallback"
    fault: Fault  # what failed
    from_provider: str
    to_provider: str
    delay_s: float
    at_seq: int  # chunks delivered when it was decided
    at: float


# Not frozen: made per token on the hot path (see model.Chunk).
@dataclass(slots=True)
class ChunkStored:
    stream_id: str
    model: str
    provider: str
    seq: int
    tokens_so_far: int
    at: float
    kind: str = "text"  # "text", "reasoning" or "tool_call"
    text: str = ""  # the chunk's text (for --log-content only)


@dataclass(frozen=True, slots=True)
class StreamEnded:
    stream_id: str
    model: str
    end: End
    attempts: int
    duration_s: float
    at: float


@dataclass(frozen=True, slots=True)
class ReaderAttached:
    stream_id: str
    model: str
    resumed: bool  # a resume (or a repeated idempotency key), not the call that started it
    after_seq: int
    at: float


@dataclass(frozen=True, slots=True)
class TakenOver:
    stream_id: str
    model: str
    at_seq: int
    at: float


@dataclass(frozen=True, slots=True)
class BreakerChanged:
    change: BreakerChange
    at: float


EngineEvent = (
    StreamStarted
    | AttemptStarted
    | AttemptEnded
    | RecoveryAction
    | ChunkStored
    | StreamEnded
    | ReaderAttached
    | TakenOver
    | BreakerChanged
)

Observer = Callable[[EngineEvent], None]


class Observers:
    """Every observer of a hub, called in order; one that raises is logged
    once per kind of event and skipped, never propagated."""

    def __init__(self, observers: Sequence[Observer] = ()) -> None:
        self._observers: tuple[Observer, ...] = ()
        self._chunk_observers: tuple[Observer, ...] = ()
        self.chunks = False
        self._reported: set[tuple[int, type[EngineEvent]]] = set()
        for observer in observers:
            self.add(observer)

    def __bool__(self) -> bool:
        return bool(self._observers)

    def add(self, observer: Observer) -> None:
        self._observers = (*self._observers, observer)
        if getattr(observer, "observes_chunks", True):
            self._chunk_observers = (*self._chunk_observers, observer)
        # Whether any observer wants ChunkStored events (read per token: an
        # attribute, not a property).
        self.chunks = bool(self._chunk_observers)

    def __call__(self, event: EngineEvent) -> None:
        observers = self._chunk_observers if isinstance(event, ChunkStored) else self._observers
        for observer in observers:
            try:
                observer(event)
            except Exception:
                key = (id(observer), type(event))
                if key not in self._reported:
                    self._reported.add(key)
                    log.exception("observer %r failed on %s", observer, type(event).__name__)
