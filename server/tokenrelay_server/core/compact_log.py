"""One stream's log entries, held compactly.

A long answer is millions of chunks; an object per chunk costs ~150 bytes
beyond its text and is held for the whole retention period (issue 8: one
stream of 1,000,000 tokens took RSS from 100 to 364 MB). Here the chunk
texts live in one UTF-8 `bytearray` with an array of end offsets, the
cumulative token counts in a second array, and (provider, attempt) as runs
that change once per upstream attempt; the rare notices and the End sit on
the side. `Chunk` objects are made only when read.

Log order (the rule every store keeps, store/base.py): chunk s, then the
notices that followed it, then chunk s+1, …, and the End last. A `Cursor`
walks that order from any point with O(1) work per entry.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from tokenrelay_server.core.model import Chunk, End, LogEntry, Notice


@dataclass(frozen=True, slots=True)
class _Run:
    first_seq: int
    provider: str
    attempt: int


class CompactLog:
    """The entries of one stream, in log order. `check` then `add`: a batch
    that breaks the order is refused whole (ValueError) before anything of
    it is kept."""

    __slots__ = (
        "_ends",
        "_notice_seqs",
        "_notices",
        "_run_starts",
        "_runs",
        "_text",
        "_tokens",
        "end",
    )

    def __init__(self) -> None:
        self._text = bytearray()
        self._ends = array("Q")  # byte offset where chunk s ends, at [s - 1]
        self._tokens = array("Q")  # tokens_so_far of chunk s, at [s - 1]
        self._runs: list[_Run] = []
        self._run_starts: list[int] = []  # first_seq of each run, for bisect
        self._notices: list[Notice] = []
        self._notice_seqs: list[int] = []  # after_seq of each notice, for bisect
        self.end: End | None = None

    # -- what it holds -------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return len(self._ends)

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of all chunk texts."""
        return len(self._text)

    def text(self) -> str:
        """The text of every chunk, in seq order."""
        return self._text.decode()

    def tokens_so_far(self) -> int:
        return self._tokens[-1] if self._tokens else 0

    def chunk(self, seq: int) -> Chunk:
        index = seq - 1
        if not 0 <= index < len(self._ends):
            raise IndexError(f"no chunk {seq} (last is {self.last_seq})")
        start = self._ends[index - 1] if index else 0
        run = self._runs[bisect.bisect_right(self._run_starts, seq) - 1]
        return Chunk(
            seq=seq,
            text=self._text[start : self._ends[index]].decode(),
            provider=run.provider,
            attempt=run.attempt,
            tokens_so_far=self._tokens[index],
        )

    # -- writing -------------------------------------------------------------------

    def check(self, entries: Sequence[LogEntry]) -> None:
        """Raise ValueError if `entries` cannot follow what is held."""
        last_seq, ended = self.last_seq, self.end is not None
        for entry in entries:
            if ended:
                raise ValueError("the stream has ended; nothing can follow its End")
            if isinstance(entry, Chunk):
                if entry.seq != last_seq + 1:
                    raise ValueError(f"chunk seq {entry.seq} does not follow {last_seq}")
                last_seq = entry.seq
            elif not isinstance(entry, Notice):
                ended = True

    def add(self, entries: Sequence[LogEntry]) -> None:
        """Append `entries` (call `check` first: this one trusts them)."""
        for entry in entries:
            if isinstance(entry, Chunk):
                self._text += entry.text.encode()
                self._ends.append(len(self._text))
                self._tokens.append(max(entry.tokens_so_far, 0))
                run = self._runs[-1] if self._runs else None
                if run is None or (run.provider, run.attempt) != (entry.provider, entry.attempt):
                    self._runs.append(_Run(entry.seq, entry.provider, entry.attempt))
                    self._run_starts.append(entry.seq)
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
        out: list[LogEntry] = []
        notices = log._notices
        last_seq = log.last_seq
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
