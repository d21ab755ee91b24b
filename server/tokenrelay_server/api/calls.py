"""Ending a call's helper tasks without waiting on grpc (issue 9, defect 5).

A call's request reader sits in `anext(request_iterator)`. Under load a
cancelled read can stay "cancelling" inside grpc for a long time; a handler
that awaited it would hold its call open after the stream's End, with no
status. `cancel_within` cancels the task and waits for it only so long; a
task still running then is left to finish by itself (its result is
collected, so nothing is logged as never retrieved), and the call ends now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

log = logging.getLogger(__name__)

# How long a call waits for its cancelled request reader: far above the
# normal (immediate) exit, far below a client's patience.
READER_EXIT_S = 2.0


def _collect(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.debug("request reader ended late: %r", task.exception())


async def cancel_within(task: asyncio.Task[None], within_s: float = READER_EXIT_S) -> bool:
    """Cancel `task` and wait up to `within_s` (loop time: this bounds real
    waiting, whatever clock the gateway runs on) for it to end. True when it
    ended in time; otherwise it is left to end by itself."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=within_s)
    if done:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
        return True
    task.add_done_callback(_collect)
    log.warning("a call's request reader did not stop within %g s; ending the call", within_s)
    return False
