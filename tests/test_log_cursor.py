"""LogCursor: a reader of the stored log never yields an entry twice."""

from __future__ import annotations

from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction
from tokenrelay_server.core.model import Chunk, End, Notice
from tokenrelay_server.engine.cursor import LogCursor
from tokenrelay_server.engine.takeover import orphan_end

FAULT = Fault(ErrorType.NETWORK, "ECONNRESET", "reset", True, SuggestedAction.RESUME, fatal=False)


def chunk(seq: int) -> Chunk:
    return Chunk(seq, f" t{seq}", "sim", 1)


def test_a_read_that_repeats_the_notices_after_the_cursor_yields_them_once() -> None:
    cursor = LogCursor(0)
    first = cursor.take([chunk(1), Notice(1, FAULT)])
    # The next read starts after chunk 1 and repeats its notice, then a new one.
    second = cursor.take([Notice(1, FAULT), Notice(1, FAULT), chunk(2)])
    assert first == [chunk(1), Notice(1, FAULT)]
    assert second == [Notice(1, FAULT), chunk(2)]
    assert cursor.seq == 2


def test_chunks_at_or_before_the_cursor_are_dropped() -> None:
    cursor = LogCursor(3)
    assert cursor.take([chunk(2), chunk(3), chunk(4)]) == [chunk(4)]


def test_the_end_stops_the_cursor() -> None:
    cursor = LogCursor(0)
    end = End("stop", 1, "h")
    assert cursor.take([chunk(1), end]) == [chunk(1), end]
    assert cursor.ended


def test_an_orphan_end_covers_what_was_produced() -> None:
    import hashlib

    end = orphan_end([chunk(1), Notice(1, FAULT), chunk(2)])
    assert (end.partial, end.total_seq, end.error and end.error.code) == (True, 2, "OWNER_LOST")
    assert end.text_sha256 == hashlib.sha256(b" t1 t2").hexdigest()
