"""Where a reader of the stored log stands (a stream generated elsewhere,
or finished): after chunk `seq`, having seen `notices` of the notices that
follow it."""

from __future__ import annotations

from tokenrelay_server.core.model import Chunk, LogEntry, Notice


class LogCursor:
    """Where a reader of the stored log stands: after chunk `seq`, having seen
    `notices` of the notices that follow it. `take` drops what was already
    read (a read after chunk S repeats the notices after S)."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.notices = 0
        self.ended = False

    def take(self, entries: list[LogEntry]) -> list[LogEntry]:
        fresh: list[LogEntry] = []
        notices_here = 0
        for entry in entries:
            if isinstance(entry, Notice):
                if entry.after_seq == self.seq:
                    notices_here += 1
                    if notices_here <= self.notices:
                        continue
                    self.notices = notices_here
            elif isinstance(entry, Chunk):
                if entry.seq <= self.seq:
                    continue
                self.seq, self.notices, notices_here = entry.seq, 0, 0
            else:
                self.ended = True
            fresh.append(entry)
            if self.ended:
                break
        return fresh
