"""The nemesis checker on synthetic histories (hypothesis): every history a
correct gateway can produce passes, and each kind of broken promise the
issue names (a gap, a duplicate, an End that disagrees with its log, a
client that got text the log does not hold, INTERNAL) is caught by name.

A history is built the way a round leaves one: a stored log (chunks with
notices between them, then an End, complete or a typed partial) and one to
three clients that each read it over several calls, dropping and resuming
after whatever seq they held, the last call reading to the End.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st

from tokenrelay_devtools.nemesis.checker import (
    check_clean_text,
    check_round,
    is_transport_failure,
    tally,
)
from tokenrelay_devtools.nemesis.history import (
    Call,
    ClientRecord,
    Leftovers,
    SeenChunk,
    SeenEnd,
    SeenStatus,
    StoredStream,
)
from tokenrelay_server.core.digest import ChunkDigests
from tokenrelay_server.core.errors import ErrorType, Fault, SuggestedAction
from tokenrelay_server.core.model import Chunk, End, LogEntry, Notice

STREAM = "5" * 32
TYPED_PARTIAL_CODES = ("OWNER_LOST", "SERVER_SHUTDOWN", "STORE_UNAVAILABLE", "ECONNRESET")


@dataclass
class History:
    records: list[ClientRecord]
    stored: dict[str, StoredStream]

    @property
    def entries(self) -> tuple[LogEntry, ...]:
        entries = self.stored[STREAM].entries
        assert entries is not None
        return entries

    def with_entries(self, entries: list[LogEntry]) -> History:
        return History(self.records, {STREAM: StoredStream(STREAM, tuple(entries))})

    def kinds(self) -> set[str]:
        return set(tally(check_round(self.records, self.stored)))


def fault(code: str, *, fatal: bool = True) -> Fault:
    return Fault(ErrorType.APPLICATION, code, "", True, SuggestedAction.RESUME, fatal=fatal)


def seen_end(end: End) -> SeenEnd:
    return SeenEnd(
        end.finish_reason,
        end.total_seq,
        end.text_sha256,
        end.chunks_sha256,
        end.partial,
        end.error.code if end.partial and end.error else "",
    )


words = st.text(alphabet="abcdeé ", min_size=1, max_size=4)


@st.composite
def histories(draw: st.DrawFn, min_chunks: int = 0) -> History:
    texts = draw(st.lists(words, min_size=min_chunks, max_size=25))
    chunks = [Chunk(i + 1, text, "sim", 1) for i, text in enumerate(texts)]
    partial = draw(st.booleans())
    rest = "".join(draw(st.lists(words, max_size=5))) if partial else ""
    expected = "".join(texts) + rest
    digests = ChunkDigests.of(chunks)
    end = End(
        "error" if partial else "stop",
        len(chunks),
        digests.text_sha256(),
        partial=partial,
        error=fault(draw(st.sampled_from(TYPED_PARTIAL_CODES))) if partial else None,
        chunks_sha256=digests.chunks_sha256(),
    )
    notice_after = set(draw(st.lists(st.integers(0, len(chunks)), max_size=3)))
    entries: list[LogEntry] = []
    for seq in range(len(chunks) + 1):
        if seq:
            entries.append(chunks[seq - 1])
        if seq in notice_after:
            entries.append(Notice(seq, fault("OWNER_LOST", fatal=False)))
    entries.append(end)
    records = []
    for index in range(draw(st.integers(1, 3))):
        stops = sorted(draw(st.lists(st.integers(0, len(chunks)), max_size=4)))
        record = ClientRecord(f"c{index}", expected_text=expected)
        held = 0
        for stop in [*stops, len(chunks)]:
            stop = max(stop, held)
            call = Call(
                replica=draw(st.integers(0, 2)),
                kind="start" if not record.calls else "resume",
                after_seq=held,
                stream_id=STREAM,
                chunks=[SeenChunk(c.seq, c.kind, c.text) for c in chunks[held:stop]],
                notices=["OWNER_LOST"] if draw(st.booleans()) else [],
            )
            record.calls.append(call)
            held = stop
        for call in record.calls[:-1]:
            call.outcome, call.status = draw(
                st.sampled_from(
                    [
                        ("dropped", None),
                        ("idle", None),
                        ("status", SeenStatus("UNAVAILABLE", "Socket closed")),
                        ("status", SeenStatus("CANCELLED", "")),
                        ("status", SeenStatus("INTERNAL", "Received RST_STREAM with error code 2")),
                    ]
                )
            )
        record.calls[-1].outcome = "end"
        record.calls[-1].end = seen_end(end)
        records.append(record)
    return History(records, {STREAM: StoredStream(STREAM, tuple(entries))})


@given(histories())
def test_a_history_a_correct_gateway_can_produce_has_no_violation(history: History) -> None:
    assert check_round(history.records, history.stored) == []


@given(histories(min_chunks=2), st.data())
def test_a_chunk_missing_from_the_log_is_a_gap(history: History, data: st.DataObject) -> None:
    chunks = [e for e in history.entries if isinstance(e, Chunk)]
    lost = data.draw(st.sampled_from(chunks[:-1]))
    assert "log-gap" in history.with_entries([e for e in history.entries if e is not lost]).kinds()


@given(histories(min_chunks=1), st.data())
def test_a_chunk_stored_twice_is_a_duplicate(history: History, data: st.DataObject) -> None:
    entries = list(history.entries)
    positions = [i for i, e in enumerate(entries) if isinstance(e, Chunk)]
    position = data.draw(st.sampled_from(positions))
    entries.insert(position + 1, entries[position])
    assert "log-dup" in history.with_entries(entries).kinds()


@given(histories())
def test_a_chunk_stored_that_the_end_does_not_count_is_caught(history: History) -> None:
    # Issue 9, defect 3: Redis holds a chunk no client saw, the End one fewer.
    entries = list(history.entries)
    end = entries[-1]
    assert isinstance(end, End)
    entries.insert(-1, Chunk(end.total_seq + 1, "unseen", "sim", 2))
    assert "end-total" in history.with_entries(entries).kinds()


@given(histories(), st.sampled_from(["total", "text", "chunks"]))
def test_an_end_that_disagrees_with_its_log_is_caught(history: History, field: str) -> None:
    entries = list(history.entries)
    end = entries[-1]
    assert isinstance(end, End)
    if field == "total":
        changed = dataclasses.replace(end, total_seq=end.total_seq + 1)
        expected = "end-total"
    elif field == "text":
        changed = dataclasses.replace(end, text_sha256="0" * 64)
        expected = "end-digest"
    else:
        changed = dataclasses.replace(end, chunks_sha256="0" * 64)
        expected = "end-digest"
    entries[-1] = changed
    kinds = history.with_entries(entries).kinds()
    assert expected in kinds
    assert "client-end" in kinds  # the clients were told the true End


@given(histories(), st.data())
def test_a_log_without_an_end_is_caught(history: History, data: st.DataObject) -> None:
    assert "no-end" in history.with_entries(list(history.entries[:-1])).kinds()


@given(histories(min_chunks=1), st.data())
def test_a_client_whose_text_is_not_the_logs_is_caught(
    history: History, data: st.DataObject
) -> None:
    calls = [c for r in history.records for c in r.calls if c.chunks]
    if not calls:
        calls = [history.records[0].calls[-1]]
        calls[0].chunks.append(SeenChunk(calls[0].after_seq + 1, "text", "x"))
    call = data.draw(st.sampled_from(calls))
    index = data.draw(st.integers(0, len(call.chunks) - 1))
    chunk = call.chunks[index]
    call.chunks[index] = SeenChunk(chunk.seq, chunk.kind, chunk.text + "!")
    assert "client-chunk" in history.kinds()


@given(histories(min_chunks=1), st.data())
def test_a_stored_answer_that_is_not_the_clean_one_is_an_anomaly(
    history: History, data: st.DataObject
) -> None:
    end = history.entries[-1]
    assert isinstance(end, End)
    assert check_clean_text(history.records, history.stored) == []
    for record in history.records:
        record.expected_text = "Z" + (record.expected_text or "")
    found = tally(check_clean_text(history.records, history.stored))
    assert set(found) == {"partial-not-prefix" if end.partial else "wrong-text"}
    assert history.kinds() == set()  # not one of the promises check_round keeps


@given(histories(min_chunks=1), st.booleans(), st.data())
def test_a_call_that_skips_or_repeats_a_seq_is_caught(
    history: History, skip: bool, data: st.DataObject
) -> None:
    calls = [c for r in history.records for c in r.calls if c.chunks]
    call = data.draw(st.sampled_from(calls))
    if skip:
        # Asked after `after_seq`, got the one after the next first.
        call.after_seq -= 1
        assert "client-gap" in history.kinds()
    else:
        index = data.draw(st.integers(0, len(call.chunks) - 1))
        call.chunks.insert(index, call.chunks[index])
        assert "client-dup" in history.kinds()


@given(histories())
def test_a_client_that_never_got_the_end_is_caught(history: History) -> None:
    history.records[0].calls[-1].end = None
    history.records[0].calls[-1].outcome = "deadline"
    assert "client-no-end" in history.kinds()


@given(histories())
def test_a_call_that_hangs_after_its_end_is_caught(history: History) -> None:
    history.records[0].calls[-1].hung_after_end = True
    assert history.kinds() == {"hung-after-end"}


@given(histories())
def test_a_client_told_an_end_other_than_the_stored_one_is_caught(history: History) -> None:
    call = history.records[0].calls[-1]
    assert call.end is not None
    call.end = dataclasses.replace(call.end, finish_reason="other", partial=not call.end.partial)
    assert "client-end" in history.kinds()


@given(
    histories(),
    st.sampled_from(
        [
            SeenStatus("INTERNAL", "internal error while streaming; incident 0123abcd"),
            SeenStatus("UNKNOWN", "Unexpected <class 'redis.exceptions.ConnectionError'>"),
        ]
    ),
)
def test_an_internal_or_unknown_status_from_the_gateway_is_caught(
    history: History, status: SeenStatus
) -> None:
    call = history.records[0].calls[0]
    history.records[0].calls.insert(0, Call(0, "start", 0, STREAM, status=status))
    assert call.kind == "start"
    assert history.kinds() == {"status-internal"}


@given(histories(), st.sampled_from(["NOT_FOUND", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"]))
def test_a_status_a_client_cannot_resume_after_is_caught(history: History, code: str) -> None:
    history.records[0].calls.insert(0, Call(1, "start", 0, STREAM, status=SeenStatus(code, "x")))
    assert history.kinds() == {"status-unexpected"}


@given(histories())
def test_an_end_or_notice_with_internal_is_caught(history: History) -> None:
    entries = list(history.entries)
    end = entries[-1]
    assert isinstance(end, End)
    entries[-1] = dataclasses.replace(end, partial=True, error=fault("INTERNAL"))
    assert "internal" in history.with_entries(entries).kinds()
    history.records[0].calls[0].notices.append("INTERNAL")
    assert "internal" in history.kinds()


@given(histories())
def test_streams_two_clients_disagree_on_are_a_split(history: History) -> None:
    other = Call(0, "start", 0, "6" * 32, status=SeenStatus("UNAVAILABLE", ""))
    history.records[0].calls.insert(0, other)
    assert "stream-split" in history.kinds()


def test_a_stream_the_store_does_not_know_is_caught() -> None:
    record = ClientRecord("c0", calls=[Call(0, "start", 0, STREAM, outcome="dropped")])
    kinds = tally(check_round([record], {STREAM: StoredStream(STREAM, None)}))
    assert set(kinds) == {"log-missing", "client-no-end"}


@given(histories())
def test_a_stream_no_client_was_told_of_is_an_orphan(history: History) -> None:
    orphan = "7" * 32
    history.stored[orphan] = StoredStream(orphan, (Chunk(1, "x", "sim", 1),))
    assert history.kinds() == {"orphan-stream"}  # an orphan has no one to wait for its End


def test_anything_left_running_or_leased_is_caught() -> None:
    leftovers = Leftovers(running=((1, STREAM, "running"),), leased=((STREAM, "replica-a"),))
    assert tally(check_round([], {}, leftovers)) == {"left-running": 1, "left-leased": 1}


def test_a_broken_transport_is_not_a_gateway_bug() -> None:
    assert is_transport_failure(SeenStatus("INTERNAL", "Received RST_STREAM with error code 2"))
    assert is_transport_failure(SeenStatus("UNKNOWN", "Stream removed"))
    assert not is_transport_failure(
        SeenStatus("INTERNAL", "internal error while streaming; the server logged it as incident x")
    )
