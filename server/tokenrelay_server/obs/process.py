"""What this replica's process holds, for leak checks: asyncio tasks that are
not done, resident memory and open file descriptors.

The Admin overview carries them (api/admin.py), so a fuzzer or a soak run
against a gateway in another process (bench/fuzz.py, bench/soak.py) can tell
whether a call left something behind. Memory and descriptors are read from
/proc (Linux); elsewhere they are 0, "not known", rather than a guess.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

_STATM = Path("/proc/self/statm")
_FDS = Path("/proc/self/fd")


@dataclass(frozen=True, slots=True)
class ProcessCensus:
    asyncio_tasks: int
    rss_bytes: int
    open_fds: int


def rss_bytes() -> int:
    """Resident set size in bytes (statm's second field is in pages)."""
    try:
        resident_pages = int(_STATM.read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def open_fds() -> int:
    """Open file descriptors, the one that lists them not counted."""
    try:
        return max(len(os.listdir(_FDS)) - 1, 0)
    except OSError:
        return 0


def census() -> ProcessCensus:
    """Called on the event loop (all_tasks needs the running loop)."""
    tasks = sum(1 for task in asyncio.all_tasks() if not task.done())
    return ProcessCensus(asyncio_tasks=tasks, rss_bytes=rss_bytes(), open_fds=open_fds())
