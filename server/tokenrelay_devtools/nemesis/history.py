"""What a nemesis round leaves behind, as plain values: what every client
saw (one `ClientRecord` per stream, one `Call` per gRPC call it made) and
what the store holds afterwards (`StoredStream`). The checker
(checker.py) is a pure function of these; the clients (clients.py) and the
rig (rig.py, runner.py) fill them in.

Nothing here knows about gRPC or Redis: statuses are their names
(`"UNAVAILABLE"`), log entries are the store's own `Chunk`/`Notice`/`End`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from tokenrelay_server.core.model import LogEntry

# How a call ended, as the client saw it:
# - "end": it read a StreamEnd (and then the call closed);
# - "status": the call ended with a gRPC status before any End (`status`);
# - "dropped": the client itself cancelled it on purpose (a nemesis drop);
# - "idle": the client gave up waiting for the next event and cancelled it
#   (its replica was paused, or a takeover was slow);
# - "deadline": the stream's overall deadline passed during this call.
CallOutcome = Literal["end", "status", "dropped", "idle", "deadline"]
CallKind = Literal["start", "resume"]


@dataclass(frozen=True, slots=True)
class SeenChunk:
    """A chunk as a client received it."""

    seq: int
    kind: str  # "text", "reasoning", "tool_call"
    text: str


@dataclass(frozen=True, slots=True)
class SeenEnd:
    """A StreamEnd as a client received it."""

    finish_reason: str
    total_seq: int
    text_sha256: str
    chunks_sha256: str
    partial: bool
    error_code: str  # "" when not partial


@dataclass(frozen=True, slots=True)
class SeenStatus:
    """The gRPC status a call ended with (code name and details)."""

    code: str
    details: str


@dataclass(slots=True)
class Call:
    """One gRPC call of a client: a start, or a resume after `after_seq`."""

    replica: int
    kind: CallKind
    after_seq: int
    stream_id: str = ""  # from StreamStarted, "" when none arrived
    chunks: list[SeenChunk] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # codes of non-fatal errors
    end: SeenEnd | None = None
    status: SeenStatus | None = None
    outcome: CallOutcome = "status"
    # After its End the call did not close (with any status) within the
    # client's bound (issue 9, defect 5: calls that hang after their End).
    hung_after_end: bool = False


@dataclass(slots=True)
class ClientRecord:
    """Everything one client saw of its stream, over every call it made.

    `expected_text` is the answer a clean run gives (the simulator is
    deterministic and a continuation carries its text on), or None when the
    checker should not compare against one."""

    name: str  # the client's own label, also its idempotency key
    expected_text: str | None = None
    calls: list[Call] = field(default_factory=list)

    @property
    def stream_id(self) -> str:
        for call in self.calls:
            if call.stream_id:
                return call.stream_id
        return ""


@dataclass(frozen=True, slots=True)
class StoredStream:
    """A stream's log as the store holds it after the round (None: the store
    does not know the stream), and who still holds its lease."""

    stream_id: str
    entries: tuple[LogEntry, ...] | None
    lease_owner: str | None = None


@dataclass(frozen=True, slots=True)
class Leftovers:
    """What is still there after the round quiesced: generations each
    replica still lists as running or detached, and the streams still
    leased."""

    # (replica, stream id, what the replica says of it: state, phase, calls attached…)
    running: tuple[tuple[int, str, str], ...] = ()
    leased: tuple[tuple[str, str], ...] = ()  # (stream id, owner)


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken promise: its kind (a short fixed word), the stream and a
    sentence saying what was seen."""

    kind: str
    stream: str
    detail: str

    def describe(self) -> str:
        return f"{self.kind} stream={self.stream or '-'}: {self.detail}"
