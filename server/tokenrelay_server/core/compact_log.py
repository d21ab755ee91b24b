"""One stream's log entries, held compactly.

A long answer is millions of chunks; an object per chunk costs ~150 bytes
beyond its text and is held for the whole retention period (issue 8: one
stream of 1,000,000 tokens took RSS from 100 to 364 MB). Here the chunk
texts live in one UTF-8 `bytearray` with an array of end offsets, the
cumulative token counts in a second array, and (provider, attempt) as runs
that change once per upstream attempt; the rare notices and the End sit on
the side. `Chunk` objects are made only when read.

Chunk kinds (issue 12) cost a text chunk nothing: the bytes of a reasoning
chunk or of a tool-call piece's arguments sit in the same `bytearray`, and
the kind is kept as runs (first seq, kind, tool-call index) that change
where the kind or the call changes: none at all for a stream of text, one
for its reasoning, one per tool call. A tool-call piece's id and name (on
the first piece of a call) sit in a dict by seq.

Log order (the rule every store keeps, store/base.py): chunk s, then the
notices that followed it, then chunk s+1, …, and the End last. A `Cursor`
walks that order from any point with O(1) work per entry.
"""

from __future__ import annotations

import bisect
import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from tokenrelay_server.core.digest import U32 as _U32
from tokenrelay_server.core.digest import chunk_record
from tokenrelay_server.core.model import Chunk, ChunkKind, End, LogEntry, Notice, ToolCallDelta

# Chunks kept as objects for readers that keep up (module doc), and how many
# chunks go into the digests at a time.
_RECENT_MAX = 128
_DIGEST_BATCH = 256


@dataclass(frozen=True, slots=True)
class _Run:
    first_seq: int
    provider: str
    attempt: int


@dataclass(frozen=True, slots=True)
class _KindRun:
    first_seq: int
    kind: ChunkKind
    index: int  # the tool call's index (kind "tool_call"), else 0


class CompactLog:
    """The entries of one stream, in log order. `check` then `add`: a batch
    that breaks the order is refused whole (ValueError) before anything of
    it is kept."""

    __slots__ = (
        "_chunk_digest",
        "_digested",
        "_ends",
        "_kind_runs",
        "_kind_starts",
        "_notice_seqs",
        "_notices",
        "_recent",
        "_recent_first",
        "_run_starts",
        "_runs",
        "_text",
        "_text_digest",
        "_tokens",
        "_tool_names",
        "end",
        "last_seq",
        "text_bytes",
    )

    def __init__(self) -> None:
        self._text = bytearray()
        self._ends = array("Q")  # byte offset where chunk s ends, at [s - 1]
        self._tokens = array("Q")  # tokens_so_far of chunk s, at [s - 1]
        self._runs: list[_Run] = []
        self._run_starts: list[int] = []  # first_seq of each run, for bisect
        self._notices: list[Notice] = []
        self._notice_seqs: list[int] = []  # after_seq of each notice, for bisect
        # Kind runs; none while every chunk is text (chunks before the first
        # run are text).
        self._kind_runs: list[_KindRun] = []
        self._kind_starts: list[int] = []
        self._tool_names: dict[int, tuple[str, str]] = {}  # seq → (id, name), when set
        self.end: End | None = None
        self.last_seq = 0  # the seq of the last chunk (the count of chunks)
        self.text_bytes = 0  # UTF-8 bytes of every chunk's content (text, reasoning, arguments)
        # The last chunks as the writer made them: a reader that keeps up
        # takes these objects instead of rebuilding them from the buffer.
        # At most _RECENT_MAX, dropped by `drop_recent` once the End is in
        # and nobody reads live any more (a finished stream is held for the
        # retention period, compactly). Not at the End itself: a flood's
        # readers are still taking the last chunks when it comes, and
        # rebuilt them all from the buffer (92 % of a flood's chunks).
        self._recent: list[Chunk] = []
        self._recent_first = 1  # the seq of _recent[0]
        # Both End digests, brought up to date in batches of chunks from the
        # buffer (one hash update for a run of text, not one call per chunk).
        self._text_digest = hashlib.sha256()
        self._chunk_digest = hashlib.sha256()
        self._digested = 0  # chunks 1.._digested are in both digests

    # -- what it holds -------------------------------------------------------------

    def text(self) -> str:
        """The answer: the text of the text chunks, in seq order (reasoning
        and tool calls are not in it)."""
        if not self._kind_runs:
            return self._text.decode()
        parts: list[str] = []
        runs = self._kind_runs
        if runs[0].first_seq > 1:  # text before the first run
            parts.append(self._slice(1, runs[0].first_seq - 1))
        for position, run in enumerate(runs):
            if run.kind != "text":
                continue
            last = runs[position + 1].first_seq - 1 if position + 1 < len(runs) else self.last_seq
            parts.append(self._slice(run.first_seq, last))
        return "".join(parts)

    def _slice(self, first_seq: int, last_seq: int) -> str:
        start = self._ends[first_seq - 2] if first_seq > 1 else 0
        return self._text[start : self._ends[last_seq - 1]].decode()

    def _kind_at(self, seq: int) -> _KindRun | None:
        position = bisect.bisect_right(self._kind_starts, seq) - 1
        return self._kind_runs[position] if position >= 0 else None

    def tokens_so_far(self) -> int:
        return self._tokens[-1] if self._tokens else 0

    def chunk(self, seq: int) -> Chunk:
        offset = seq - self._recent_first
        if 0 <= offset < len(self._recent):
            return self._recent[offset]
        index = seq - 1
        if not 0 <= index < len(self._ends):
            raise IndexError(f"no chunk {seq} (last is {self.last_seq})")
        start = self._ends[index - 1] if index else 0
        run = self._runs[bisect.bisect_right(self._run_starts, seq) - 1]
        content = self._text[start : self._ends[index]].decode()
        kind_run = self._kind_at(seq) if self._kind_runs else None
        if kind_run is None or kind_run.kind == "text":
            kind: ChunkKind = "text"
            text, tool_call = content, None
        elif kind_run.kind == "reasoning":
            kind, text, tool_call = "reasoning", content, None
        else:
            call_id, name = self._tool_names.get(seq, ("", ""))
            kind, text = "tool_call", ""
            tool_call = ToolCallDelta(kind_run.index, call_id, name, content)
        return Chunk(
            seq=seq,
            text=text,
            provider=run.provider,
            attempt=run.attempt,
            tokens_so_far=self._tokens[index],
            kind=kind,
            tool_call=tool_call,
        )

    # -- writing -------------------------------------------------------------------

    def check(self, entries: Sequence[LogEntry]) -> None:
        """Raise ValueError if `entries` cannot follow what is held."""
        if len(entries) == 1:  # the per-token case: one chunk
            entry = entries[0]
            if (
                type(entry) is Chunk
                and self.end is None
                and entry.seq == self.last_seq + 1
                and (entry.tool_call is None) == (entry.kind != "tool_call")
            ):
                return
        last_seq, ended = self.last_seq, self.end is not None
        for entry in entries:
            if ended:
                raise ValueError("the stream has ended; nothing can follow its End")
            if isinstance(entry, Chunk):
                if entry.seq != last_seq + 1:
                    raise ValueError(f"chunk seq {entry.seq} does not follow {last_seq}")
                if (entry.kind == "tool_call") != (entry.tool_call is not None):
                    raise ValueError(
                        f"chunk {entry.seq} of kind {entry.kind} must carry a tool call "
                        "exactly when it is one"
                    )
                last_seq = entry.seq
            elif not isinstance(entry, Notice):
                # An End closes exactly the log it follows (issue 9).
                if entry.total_seq != last_seq:
                    raise ValueError(
                        f"the End says total_seq {entry.total_seq} but the log holds "
                        f"{last_seq} chunks"
                    )
                ended = True

    def append(self, entries: Sequence[LogEntry]) -> None:
        """`check`, then `add`: the one call a store makes per append."""
        if len(entries) == 1:  # the per-token case: one chunk that follows
            entry = entries[0]
            if (
                type(entry) is Chunk
                and self.end is None
                and entry.seq == self.last_seq + 1
                and (entry.tool_call is None) == (entry.kind != "tool_call")
            ):
                self._add_chunk(entry)
                return
        self.check(entries)
        self.add(entries)

    def add(self, entries: Sequence[LogEntry]) -> None:
        """Append `entries` (call `check` first: this one trusts them)."""
        for entry in entries:
            if isinstance(entry, Chunk):
                self._add_chunk(entry)
            elif isinstance(entry, Notice):
                # A notice sits after the chunk that was last when it was written.
                notice = (
                    entry
                    if entry.after_seq == self.last_seq
                    else Notice(self.last_seq, entry.fault)
                )
                self._notices.append(notice)
                self._notice_seqs.append(notice.after_seq)
            else:
                self.end = entry

    def drop_recent(self) -> None:
        """Let go of the chunk objects kept for live readers (readers after
        this rebuild chunks from the buffer, as any read of an old chunk)."""
        self._recent = []
        self._recent_first = self.last_seq + 1

    def _add_chunk(self, chunk: Chunk) -> None:
        call = chunk.tool_call
        if self._kind_runs or chunk.kind != "text":
            self._add_kind(chunk)
        text = self._text
        text += (chunk.text if call is None else call.arguments).encode()
        self.text_bytes = size = len(text)
        self._ends.append(size)
        self._tokens.append(chunk.tokens_so_far if chunk.tokens_so_far > 0 else 0)
        seq = self.last_seq = chunk.seq
        runs = self._runs
        if not runs or runs[-1].attempt != chunk.attempt or runs[-1].provider != chunk.provider:
            runs.append(_Run(seq, chunk.provider, chunk.attempt))
            self._run_starts.append(seq)
        recent = self._recent
        recent.append(chunk)
        if len(recent) > _RECENT_MAX:
            del recent[: _RECENT_MAX // 2]
            self._recent_first = seq - len(recent) + 1
        if seq - self._digested >= _DIGEST_BATCH:
            self._digest_up_to(seq)

    def _add_kind(self, chunk: Chunk) -> None:
        call = chunk.tool_call if chunk.kind == "tool_call" else None
        index = call.index if call is not None else 0
        current = self._kind_runs[-1] if self._kind_runs else None
        same = (
            (current.kind, current.index) == (chunk.kind, index)
            if current is not None
            else chunk.kind == "text"
        )
        if not same:
            self._kind_runs.append(_KindRun(chunk.seq, chunk.kind, index))
            self._kind_starts.append(chunk.seq)
        if call is not None and (call.id or call.name):
            self._tool_names[chunk.seq] = (call.id, call.name)

    # -- digests -------------------------------------------------------------------

    def text_sha256(self) -> str:
        """Hex SHA-256 of the answer text (the text chunks) so far."""
        self._digest_up_to(self.last_seq)
        return self._text_digest.hexdigest()

    def chunks_sha256(self) -> str:
        """Hex SHA-256 of every chunk so far, as relay.proto's records (digest.py)."""
        self._digest_up_to(self.last_seq)
        return self._chunk_digest.hexdigest()

    def _digest_up_to(self, last_seq: int) -> None:
        first = self._digested + 1
        if first > last_seq:
            return
        if not self._kind_runs:
            # All text: the answer's digest takes the buffer's bytes in one
            # update, and the records are built from the offsets.
            ends, text = self._ends, self._text
            start = ends[first - 2] if first > 1 else 0
            view = memoryview(text)
            self._text_digest.update(view[start : ends[last_seq - 1]])
            records = bytearray()
            pack = _U32.pack
            for index in range(first - 1, last_seq):
                end = ends[index]
                records += b"T"
                records += pack(end - start)
                records += view[start:end]
                start = end
            view.release()
            self._chunk_digest.update(records)
        else:
            for seq in range(first, last_seq + 1):
                chunk = self.chunk(seq)
                if chunk.kind == "text":
                    self._text_digest.update(chunk.text.encode())
                self._chunk_digest.update(chunk_record(chunk))
        self._digested = last_seq

    # -- reading -------------------------------------------------------------------

    def cursor(self, after_seq: int) -> Cursor:
        """A reader positioned after chunk `after_seq` (before the notices that
        followed it: a read after chunk S starts with them)."""
        after_seq = max(after_seq, 0)
        cursor = Cursor(self, after_seq + 1, bisect.bisect_left(self._notice_seqs, after_seq))
        # The End sits at position last_seq + 1, so a read after that sees nothing.
        cursor.done = self.end is not None and after_seq > self.last_seq
        return cursor

    def read(self, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        return self.cursor(after_seq).take(limit)


class Cursor:
    """Where one reader stands in a `CompactLog`: the next chunk seq and the
    next notice. `take` returns what was added since, in log order."""

    __slots__ = ("_log", "_next_notice", "done", "next_seq")

    def __init__(self, log: CompactLog, next_seq: int, next_notice: int) -> None:
        self._log = log
        self.next_seq = next_seq
        self._next_notice = next_notice
        self.done = False  # the End was taken

    def take(self, limit: int = 1_000_000) -> list[LogEntry]:
        log = self._log
        notices = log._notices
        last_seq = log.last_seq
        next_seq = self.next_seq
        if self.done or (
            next_seq > last_seq and log.end is None and self._next_notice >= len(notices)
        ):
            return []
        recent = log._recent
        offset = next_seq - log._recent_first
        if 0 <= offset and self._next_notice >= len(notices) and last_seq - next_seq < limit:
            # The live tail, no notice in it (the per-token case): the chunk
            # objects as they were stored.
            out: list[LogEntry] = list(recent[offset:])
            self.next_seq = last_seq + 1
            if log.end is not None:
                out.append(log.end)
                self.done = True
            return out
        out = []
        while len(out) < limit and not self.done:
            if (
                self._next_notice < len(notices)
                and notices[self._next_notice].after_seq < self.next_seq
            ):
                out.append(notices[self._next_notice])
                self._next_notice += 1
            elif self.next_seq <= last_seq:
                out.append(log.chunk(self.next_seq))
                self.next_seq += 1
            elif log.end is not None:
                out.append(log.end)
                self.done = True
            else:
                break
        return out

    @property
    def seq(self) -> int:
        """The last chunk taken (or the start point)."""
        return self.next_seq - 1
