"""CompactLog: the same reads as a plain list of entries, at a fraction of
the memory (issue 8, defect 11)."""

from __future__ import annotations

import bisect
import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenrelay_server.core.compact_log import CompactLog
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction
from tokenrelay_server.core.model import Chunk, End, LogEntry, Notice, ToolCallDelta

FAULT = Fault(ErrorType.NETWORK, "ECONNRESET", "reset", True, SuggestedAction.RESUME)


def reference_read(entries: list[LogEntry], after_seq: int, limit: int) -> list[LogEntry]:
    """The old memory store's read: every entry positioned after (after_seq, 0)."""
    positions: list[tuple[int, int]] = []
    last, notices = 0, 0
    for entry in entries:
        if isinstance(entry, Chunk):
            last, notices = entry.seq, 0
            positions.append((last, 0))
        elif isinstance(entry, Notice):
            notices += 1
            positions.append((last, notices))
        else:
            positions.append((last + 1, 0))
    start = bisect.bisect_right(positions, (after_seq, 0))
    return entries[start : start + limit]


@st.composite
def logs(draw: st.DrawFn) -> list[LogEntry]:
    entries: list[LogEntry] = []
    seq, attempt = 0, 1
    for kind in draw(st.lists(st.sampled_from("ccccrtnna"), max_size=40)):
        if kind == "c":
            seq += 1
            text = draw(st.text(max_size=4))
            entries.append(Chunk(seq, text, f"p{attempt % 2}", attempt, tokens_so_far=seq * 2))
        elif kind == "r":
            seq += 1
            text = draw(st.text(max_size=4))
            entries.append(Chunk(seq, text, "p", attempt, tokens_so_far=seq, kind="reasoning"))
        elif kind == "t":
            seq += 1
            call = ToolCallDelta(
                index=draw(st.integers(0, 2)),
                id=draw(st.sampled_from(["", "call_1"])),
                name=draw(st.sampled_from(["", "get_weather"])),
                arguments=draw(st.text(max_size=4)),
            )
            entries.append(
                Chunk(seq, "", "p", attempt, tokens_so_far=seq, kind="tool_call", tool_call=call)
            )
        elif kind == "n":
            entries.append(Notice(seq, FAULT))
        else:
            attempt += 1
    if draw(st.booleans()):
        entries.append(End("stop", seq, "h"))
    return entries


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.integers(-1, 45), st.integers(1, 50))
def test_reads_match_a_plain_list_from_any_point(
    entries: list[LogEntry], after_seq: int, limit: int
) -> None:
    log = CompactLog()
    log.check(entries)
    log.add(entries)
    assert log.read(after_seq, limit) == reference_read(entries, max(after_seq, 0), limit)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(logs(), st.integers(0, 45))
def test_a_cursor_sees_appends_in_log_order_whatever_the_batches(
    entries: list[LogEntry], split: int
) -> None:
    log = CompactLog()
    cursor = log.cursor(0)
    seen: list[LogEntry] = []
    for batch in (entries[:split], entries[split:]):
        log.add(batch)
        seen += cursor.take()
    assert seen == entries
    assert cursor.done == any(isinstance(e, End) for e in entries)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(logs())
def test_the_text_is_the_answer_text_chunks_only(entries: list[LogEntry]) -> None:
    log = CompactLog()
    log.add(entries)
    chunks = [e for e in entries if isinstance(e, Chunk)]
    assert log.text() == "".join(c.text for c in chunks if c.kind == "text")
    assert log.text_bytes == sum(c.content_bytes for c in chunks) - sum(
        len(c.tool_call.id.encode()) + len(c.tool_call.name.encode())
        for c in chunks
        if c.tool_call is not None
    )


def test_a_tool_call_chunk_without_its_call_is_refused() -> None:
    log = CompactLog()
    for bad in (
        Chunk(1, "", "p", 1, kind="tool_call"),
        Chunk(1, "", "p", 1, tool_call=ToolCallDelta(0)),
    ):
        try:
            log.check([bad])
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted {bad}")


def test_a_batch_that_breaks_the_order_is_refused_whole() -> None:
    log = CompactLog()
    log.add([Chunk(1, "a", "p", 1)])
    for bad in (
        [Chunk(2, "b", "p", 1), Chunk(4, "d", "p", 1)],
        [End("stop", 1, ""), Notice(1, FAULT)],
    ):
        try:
            log.check(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted {bad}")
    assert log.last_seq == 1 and log.end is None


def test_a_long_stream_costs_its_text_plus_a_few_bytes_per_chunk() -> None:
    count = 200_000
    chunks = [Chunk(seq, " token", "sim", 1, tokens_so_far=seq) for seq in range(1, count + 1)]
    log = CompactLog()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, count, 1000):
            log.add(chunks[start : start + 1000])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    overhead = (held - log.text_bytes) / count
    # Two 8-byte numbers a chunk and the arrays' spare room; a Chunk object
    # per chunk, as before, cost over a hundred bytes each.
    assert overhead < 24, f"{overhead:.1f} bytes a chunk beyond the text"
    assert log.chunk(count) == chunks[-1]


def test_reasoning_and_a_streamed_tool_call_cost_a_run_each_not_a_field_per_chunk() -> None:
    count = 100_000
    chunks = [Chunk(seq, " think", "sim", 1, kind="reasoning") for seq in range(1, count + 1)]
    chunks += [
        Chunk(
            seq,
            "",
            "sim",
            1,
            kind="tool_call",
            tool_call=ToolCallDelta(0, "call_1" if seq == count + 1 else "", "", ' "a"'),
        )
        for seq in range(count + 1, 2 * count + 1)
    ]
    log = CompactLog()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(chunks), 1000):
            log.add(chunks[start : start + 1000])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    overhead = (held - log.text_bytes) / len(chunks)
    assert overhead < 24, f"{overhead:.1f} bytes a chunk beyond the content"
    assert log.chunk(1) == chunks[0]
    assert log.chunk(count + 1) == chunks[count]
    assert log.chunk(2 * count) == chunks[-1]


def test_a_reader_still_taking_the_last_chunks_at_the_end_gets_the_writers_objects() -> None:
    # A flood: the End comes while the reader is still behind. The chunk
    # objects stay until `drop_recent` (the live log calls it once nobody
    # reads), so the reader takes the writer's objects, not rebuilt ones.
    log = CompactLog()
    written = [Chunk(seq=s, text=f"t{s} ", provider="p", attempt=1) for s in range(1, 51)]
    log.append(written)
    reader = log.cursor(0)
    log.append([End(finish_reason="stop", total_seq=50, text_sha256=log.text_sha256())])
    taken = reader.take()
    assert all(a is b for a, b in zip(taken[:50], written, strict=True))
    log.drop_recent()
    rebuilt = log.cursor(0).take()
    assert rebuilt[:50] == written and rebuilt[0] is not written[0]
    assert isinstance(rebuilt[-1], End)
