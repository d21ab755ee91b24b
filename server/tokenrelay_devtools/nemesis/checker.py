"""The nemesis checker: a pure function from what the clients saw and what
the store holds to the promises that were broken (issue 9, "A nemesis
test").

Per stream:

1. The log holds chunks with seq 1..n, no gap, no duplicate, then exactly
   one End and nothing after it (`log-gap`, `log-dup`, `log-after-end`,
   `no-end`, `log-missing`).
2. The End agrees with the log: `total_seq` = n and both digests are those
   of the logged chunks (`end-total`, `end-digest`, core/digest.py).
3. No End and no notice, in the log or on the wire, carries INTERNAL or
   UNKNOWN (`internal`).
4. Every client got exactly the logged text: each call's chunks run on
   from its `after_seq` with no gap or repeat (`client-gap`, `client-dup`),
   every chunk it saw is the logged chunk of that seq (`client-chunk`), and
   the End it got is the stored End, after all n chunks (`client-end`).
   A client that never got an End is `client-no-end` (it was patient: the
   stream never finished, or no replica would serve it); what it got is
   still checked against the log, so it holds a prefix. All of a client's
   calls name one stream (`stream-split`), and no stream of the round is
   one no client was told of (`orphan-stream`).
5. No call ended with INTERNAL or UNKNOWN (`status-internal`), unless grpc
   itself reported a broken transport with it (the words the Python client
   also looks for); nor with a status a client cannot act on
   (`status-unexpected`: anything but UNAVAILABLE, CANCELLED or
   DEADLINE_EXCEEDED, which mean "reconnect and resume"); and every call
   that sent an End closed soon after it (`hung-after-end`, defect 5).

`check_clean_text` compares each stored answer with the clean one the
simulator gives (a complete End: equal; a partial: a prefix); the runner
reports what it finds apart, as anomalies (see its docstring).

After the round (`Leftovers`): nothing is left running or detached on any
replica (`left-running`) and no stream is still leased (`left-leased`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from tokenrelay_client.client import CONNECTION_FAILURE_HINTS
from tokenrelay_devtools.nemesis.history import (
    ClientRecord,
    Leftovers,
    SeenEnd,
    SeenStatus,
    StoredStream,
    Violation,
)
from tokenrelay_server.core.digest import ChunkDigests
from tokenrelay_server.core.model import Chunk, End, Notice

# Codes that mean a bug, wherever they appear (a status, an End, a notice).
BUG_CODES = frozenset({"INTERNAL", "UNKNOWN"})
# Statuses that tell a client "reconnect and resume" (README: What each error means).
RESUMABLE_STATUSES = frozenset({"UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"})
# grpc's words for a broken connection, reported as INTERNAL/UNKNOWN depending
# on where in the call it broke: the client's own list.
TRANSPORT_HINTS = CONNECTION_FAILURE_HINTS

VIOLATION_KINDS = (
    "log-missing",
    "log-gap",
    "log-dup",
    "log-after-end",
    "no-end",
    "end-total",
    "end-digest",
    "internal",
    "client-gap",
    "client-dup",
    "client-chunk",
    "client-end",
    "client-no-end",
    "stream-split",
    "orphan-stream",
    "status-internal",
    "status-unexpected",
    "hung-after-end",
    "left-running",
    "left-leased",
)


def is_transport_failure(status: SeenStatus) -> bool:
    """INTERNAL/UNKNOWN that grpc made up for a broken connection, not one
    the gateway sent (the gateway's INTERNAL names an incident)."""
    lowered = status.details.lower()
    return any(hint in lowered for hint in TRANSPORT_HINTS)


def check_round(
    records: Sequence[ClientRecord],
    stored: Mapping[str, StoredStream],
    leftovers: Leftovers | None = None,
) -> list[Violation]:
    """Every broken promise of one round. `stored` maps stream ids to what
    the store holds for them: every stream id any client was told, and any
    other stream of the round found in the store (an orphan: no client was
    told of it, so a start made a second stream; its log is checked too,
    except for an End, which nobody was there to wait for)."""
    violations: list[Violation] = []
    checked_logs: set[str] = set()
    for record in records:
        violations += _check_client(record, stored, checked_logs)
    for stream_id, stream in stored.items():
        if stream_id not in checked_logs:
            chunks = sum(isinstance(e, Chunk) for e in stream.entries or ())
            violations.append(
                Violation(
                    "orphan-stream",
                    stream_id[:12],
                    f"in the store with {chunks} chunks, and no client was told of it",
                )
            )
            violations += [v for v in _check_log(stream) if v.kind != "no-end"]
    violations += _check_leftovers(leftovers or Leftovers())
    return violations


def check_clean_text(
    records: Sequence[ClientRecord], stored: Mapping[str, StoredStream]
) -> list[Violation]:
    """Each stored answer against the clean one (`ClientRecord.expected_text`):
    a complete End's text must be it (`wrong-text`), a partial End's a
    prefix of it (`partial-not-prefix`).

    Not one of issue 9's promises (those are about the log and what clients
    were told), so the runner reports these apart: a continuation's
    stitcher (core/stitch.py) drops a repeat it cannot tell from a model
    repeating itself, so an answer that really repeats a word at the break
    loses it (seen in the nemesis: "日本語 日本語" continued as "日本語")."""
    out: list[Violation] = []
    for record in records:
        stream = stored.get(record.stream_id)
        if record.expected_text is None or stream is None or stream.entries is None:
            continue
        ends = [e for e in stream.entries if isinstance(e, End)]
        if not ends:
            continue
        end, expected = ends[0], record.expected_text
        text = "".join(e.text for e in stream.entries if isinstance(e, Chunk) and e.kind == "text")
        label = f"{record.stream_id[:12]}({record.name})"
        if not end.partial and text != expected:
            out.append(
                Violation("wrong-text", label, f"complete End, text {_diff(text, expected)}")
            )
        elif end.partial and not expected.startswith(text):
            code = end.error.code if end.error is not None else ""
            out.append(
                Violation(
                    "partial-not-prefix",
                    label,
                    f"partial End ({code}), text {_diff(text, expected)}",
                )
            )
    return out


def tally(violations: Iterable[Violation]) -> Counter[str]:
    return Counter(v.kind for v in violations)


# --- one client and its stream -------------------------------------------------------


def _check_client(
    record: ClientRecord, stored: Mapping[str, StoredStream], checked_logs: set[str]
) -> list[Violation]:
    name = record.name
    out: list[Violation] = []
    ids = {call.stream_id for call in record.calls if call.stream_id}
    if len(ids) > 1:
        out.append(Violation("stream-split", name, f"one client was told of streams {sorted(ids)}"))
    out += _check_statuses(record)
    stream_id = record.stream_id
    if not stream_id:
        # Never started: the client saw no StreamStarted at all.
        if not any(call.outcome == "end" for call in record.calls):
            out.append(Violation("client-no-end", name, "no call ever got StreamStarted"))
        return out
    label = f"{stream_id[:12]}({name})"
    stream = stored.get(stream_id, StoredStream(stream_id, None))
    if stream_id not in checked_logs:
        checked_logs.add(stream_id)
        out += _check_log(stream, label)
    entries = stream.entries or ()
    by_seq = {e.seq: e for e in entries if isinstance(e, Chunk)}
    ends = [e for e in entries if isinstance(e, End)]
    stored_end = ends[0] if ends else None
    got_end = False
    for index, call in enumerate(record.calls):
        where = f"call {index} ({call.kind} after {call.after_seq} on replica {call.replica})"
        expected_seq = call.after_seq + 1
        for seen in call.chunks:
            if seen.seq < expected_seq:
                out.append(
                    Violation(
                        "client-dup",
                        label,
                        f"{where}: seq {seen.seq} again after {expected_seq - 1}",
                    )
                )
            elif seen.seq > expected_seq:
                out.append(
                    Violation(
                        "client-gap", label, f"{where}: seq {seen.seq} after {expected_seq - 1}"
                    )
                )
            expected_seq = seen.seq + 1
            logged = by_seq.get(seen.seq)
            if stream.entries is None:
                pass  # log-missing says it
            elif logged is None:
                out.append(
                    Violation(
                        "client-chunk",
                        label,
                        f"{where}: got seq {seen.seq} {seen.text!r}, which the log does not hold",
                    )
                )
            elif (logged.kind, logged.text) != (seen.kind, seen.text):
                out.append(
                    Violation(
                        "client-chunk",
                        label,
                        f"{where}: seq {seen.seq} was {seen.text!r}, the log holds {logged.text!r}",
                    )
                )
        for code in call.notices:
            if code in BUG_CODES:
                out.append(Violation("internal", label, f"{where}: a notice with {code}"))
        if call.hung_after_end:
            out.append(Violation("hung-after-end", label, f"{where}: no status after its End"))
        if call.end is not None:
            got_end = True
            if call.end.partial and call.end.error_code in BUG_CODES:
                out.append(
                    Violation("internal", label, f"{where}: End partial with {call.end.error_code}")
                )
            if expected_seq - 1 != call.end.total_seq:
                out.append(
                    Violation(
                        "client-end",
                        label,
                        f"{where}: End total_seq {call.end.total_seq} after seq {expected_seq - 1}",
                    )
                )
            if stream.entries is None:
                pass
            elif stored_end is None:
                out.append(
                    Violation(
                        "client-end",
                        label,
                        f"{where}: got an End "
                        f"({_describe_seen_end(call.end)}) the log does not hold",
                    )
                )
            elif _seen(stored_end) != call.end:
                out.append(
                    Violation(
                        "client-end",
                        label,
                        f"{where}: got End "
                        f"{_describe_seen_end(call.end)}, the log holds "
                        f"{_describe_seen_end(_seen(stored_end))}",
                    )
                )
    if not got_end:
        seen_to = max((c.seq for call in record.calls for c in call.chunks), default=0)
        last = record.calls[-1] if record.calls else None
        how = (
            ""
            if last is None
            else f"; its last call ended {last.outcome}"
            + (f" {last.status.code}" if last.status else "")
        )
        out.append(
            Violation(
                "client-no-end",
                label,
                f"no End after {len(record.calls)} calls, up to seq {seen_to}{how}",
            )
        )
    return out


def _check_statuses(record: ClientRecord) -> list[Violation]:
    out: list[Violation] = []
    for index, call in enumerate(record.calls):
        status = call.status
        if status is None:
            continue
        where = f"call {index} ({call.kind} after {call.after_seq} on replica {call.replica})"
        stream_id = call.stream_id or record.stream_id
        label = f"{stream_id[:12]}({record.name})" if stream_id else record.name
        if status.code in BUG_CODES:
            if not is_transport_failure(status):
                out.append(
                    Violation(
                        "status-internal", label, f"{where}: {status.code} {status.details[:200]!r}"
                    )
                )
        elif status.code not in RESUMABLE_STATUSES:
            out.append(
                Violation(
                    "status-unexpected", label, f"{where}: {status.code} {status.details[:200]!r}"
                )
            )
    return out


# --- the log ---------------------------------------------------------------------------


def _check_log(stream: StoredStream, label: str | None = None) -> list[Violation]:
    label = label or stream.stream_id[:12]
    if stream.entries is None:
        return [Violation("log-missing", label, "the store does not know the stream")]
    out: list[Violation] = []
    chunks: list[Chunk] = []
    ends: list[End] = []
    last_seq = 0
    for position, entry in enumerate(stream.entries):
        if ends:
            out.append(
                Violation(
                    "log-after-end",
                    label,
                    f"entry {position} ({type(entry).__name__}) after the End",
                )
            )
            continue
        if isinstance(entry, Chunk):
            if entry.seq <= last_seq:
                out.append(Violation("log-dup", label, f"seq {entry.seq} after seq {last_seq}"))
                continue
            if entry.seq != last_seq + 1:
                out.append(Violation("log-gap", label, f"seq {entry.seq} after seq {last_seq}"))
            last_seq = entry.seq
            chunks.append(entry)
        elif isinstance(entry, Notice):
            if entry.fault.code in BUG_CODES:
                out.append(Violation("internal", label, f"a stored notice with {entry.fault.code}"))
        else:
            ends.append(entry)
    if not ends:
        out.append(Violation("no-end", label, f"the log holds {len(chunks)} chunks and no End"))
        return out
    end = ends[0]
    if end.total_seq != len(chunks) or end.total_seq != last_seq:
        out.append(
            Violation(
                "end-total",
                label,
                f"End total_seq {end.total_seq}, the log holds "
                f"{len(chunks)} chunks up to seq {last_seq}",
            )
        )
    digests = ChunkDigests.of(chunks)
    if end.text_sha256 != digests.text_sha256():
        out.append(Violation("end-digest", label, "End text_sha256 is not that of the logged text"))
    if end.chunks_sha256 and end.chunks_sha256 != digests.chunks_sha256():
        out.append(
            Violation("end-digest", label, "End chunks_sha256 is not that of the logged chunks")
        )
    code = end.error.code if end.error is not None else ""
    if end.partial and code in BUG_CODES:
        out.append(Violation("internal", label, f"the stored End is partial with {code}"))
    return out


def _check_leftovers(leftovers: Leftovers) -> list[Violation]:
    out = [
        Violation("left-running", stream_id[:12], f"replica {replica} still lists it: {state}")
        for replica, stream_id, state in leftovers.running
    ]
    out += [
        Violation("left-leased", stream_id[:12], f"still leased by {owner}")
        for stream_id, owner in leftovers.leased
    ]
    return out


# --- helpers -----------------------------------------------------------------------------


def _seen(end: End) -> SeenEnd:
    """A stored End as a client receives it."""
    return SeenEnd(
        finish_reason=end.finish_reason,
        total_seq=end.total_seq,
        text_sha256=end.text_sha256,
        chunks_sha256=end.chunks_sha256,
        partial=end.partial,
        error_code=end.error.code if end.partial and end.error is not None else "",
    )


def _describe_seen_end(end: SeenEnd) -> str:
    what = f"partial {end.error_code}" if end.partial else end.finish_reason
    return f"{what} total_seq={end.total_seq} text_sha256={end.text_sha256[:12]}"


def _diff(text: str, expected: str) -> str:
    """Where `text` leaves `expected`, in a few characters either side."""
    common = 0
    for a, b in zip(text, expected, strict=False):
        if a != b:
            break
        common += 1
    around = slice(max(0, common - 10), common + 20)
    return (
        f"of {len(text)} characters leaves the clean answer ({len(expected)}) at {common}: "
        f"{text[around]!r} vs {expected[around]!r}"
    )


__all__ = [
    "BUG_CODES",
    "RESUMABLE_STATUSES",
    "VIOLATION_KINDS",
    "check_clean_text",
    "check_round",
    "is_transport_failure",
    "tally",
]
