"""The SSE decoder against the WHATWG event-stream rules (HTML §9.2.5, §9.2.6),
with byte strings only: no sockets, no event loop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay_server.upstream.sse import (
    NEED_DATA,
    STREAM_END,
    ServerSentEvent,
    SSEDecoder,
)


def decode(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.feed(b"")
    return events


def event(data: str, name: str = "message", id: str = "", retry: int | None = None):
    return ServerSentEvent(event=name, data=data, id=id, retry=retry)


CASES = [
    pytest.param(
        b"data: hello\n\n", [event("hello")], id="a data line and a blank line make one event"
    ),
    pytest.param(b"data: hello\r\n\r\n", [event("hello")], id="CRLF ends lines"),
    pytest.param(b"data: hello\r\r", [event("hello")], id="a lone CR ends lines"),
    pytest.param(
        b"data: a\rdata: b\r\ndata: c\n\n",
        [event("a\nb\nc")],
        id="line endings may be mixed within one event",
    ),
    pytest.param(b"data:hello\n\n", [event("hello")], id="the space after the colon is optional"),
    pytest.param(
        b"data:  two spaces\n\n",
        [event(" two spaces")],
        id="only one space after the colon is dropped",
    ),
    pytest.param(
        b"data: first\ndata: second\n\n",
        [event("first\nsecond")],
        id="several data lines are joined with a newline",
    ),
    pytest.param(
        b"data: a\ndata:\n\n",
        [event("a\n")],
        id="only the final newline of the data buffer is removed",
    ),
    pytest.param(b": keep-alive\ndata: x\n\n", [event("x")], id="comment lines are ignored"),
    pytest.param(b": just a comment\n\n", [], id="a block of comments dispatches nothing"),
    pytest.param(b"data\n\n", [event("")], id="a field with no colon has an empty value"),
    pytest.param(b"event: ping\n\n", [], id="an event with no data is not dispatched"),
    pytest.param(
        b"event: ping\n\ndata: x\n\n",
        [event("x")],
        id="the type of an undispatched event does not leak into the next one",
    ),
    pytest.param(
        b"event: add\ndata: 1\n\n", [event("1", name="add")], id="the event field names the type"
    ),
    pytest.param(
        b"event:\ndata: 1\n\n", [event("1")], id="an empty event field means the type message"
    ),
    pytest.param(
        b"id: 7\ndata: a\n\ndata: b\n\n",
        [event("a", id="7"), event("b", id="7")],
        id="the last event id carries over to later events",
    ),
    pytest.param(
        b"id: 7\ndata: a\n\nid\ndata: b\n\n",
        [event("a", id="7"), event("b", id="")],
        id="an empty id field resets the last event id",
    ),
    pytest.param(
        b"id: 7\ndata: a\n\nid: 8\x009\ndata: b\n\n",
        [event("a", id="7"), event("b", id="7")],
        id="an id containing NULL is ignored",
    ),
    pytest.param(
        b"retry: 3000\ndata: a\n\ndata: b\n\n",
        [event("a", retry=3000), event("b")],
        id="retry with digits only is reported with its event",
    ),
    pytest.param(
        b"retry: 3s\ndata: a\n\n", [event("a")], id="retry with anything but digits is ignored"
    ),
    pytest.param(b"foo: bar\ndata: a\n\n", [event("a")], id="unknown fields are ignored"),
    pytest.param(b"DATA: a\ndata: b\n\n", [event("b")], id="field names are case sensitive"),
    pytest.param(b"\xef\xbb\xbfdata: a\n\n", [event("a")], id="a leading BOM is dropped"),
    pytest.param(
        b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n",
        [],
        id="only one BOM is dropped so a second one spoils the first field name",
    ),
    pytest.param(
        b"data: a\n\ndata: unfinished\n",
        [event("a")],
        id="an event not closed by a blank line at the end is dropped",
    ),
    pytest.param(
        b"data: caf\xc3\xa9 \xff!\n\n",
        [event("café \ufffd!")],
        id="bytes that are not UTF-8 become the replacement character",
    ),
    pytest.param(
        b"data: a:b: c\n\n", [event("a:b: c")], id="only the first colon separates name and value"
    ),
    pytest.param(b"data: [DONE]\n\n", [event("[DONE]")], id="the OpenAI end marker is plain data"),
]


@pytest.mark.parametrize(("stream", "expected"), CASES)
def test_decoder_follows_the_event_stream_rules(stream: bytes, expected: list[ServerSentEvent]):
    assert decode(stream) == expected


@pytest.mark.parametrize(("stream", "expected"), CASES)
def test_decoder_gives_the_same_events_byte_by_byte(stream: bytes, expected: list[ServerSentEvent]):
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == expected


def test_utf8_character_split_across_reads_is_kept_whole():
    encoded = "data: 日本語 🚀\n\n".encode()
    cut = encoded.index("🚀".encode()) + 2
    assert decode(encoded[:cut], encoded[cut:]) == [event("日本語 🚀")]


def test_crlf_split_across_reads_is_one_line_break():
    # Were the LF a line of its own, the blank line would dispatch early.
    assert decode(b"data: a\r", b"\ndata: b\r", b"\n\r\n") == [event("a\nb")]


def test_cr_at_the_end_of_a_read_dispatches_without_waiting_for_more():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == [event("a")]


def test_bom_split_across_reads_is_dropped():
    assert decode(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == [event("a")]


def test_truncated_reports_a_dropped_event():
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\ndata: b")
    decoder.feed(b"")
    assert decoder.truncated


def test_truncated_is_false_after_a_clean_end():
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n\n")
    decoder.feed(b"")
    assert not decoder.truncated


def test_incomplete_utf8_at_the_end_of_the_stream_does_not_raise():
    decoder = SSEDecoder()
    decoder.feed(b"data: \xe6\x97")
    assert decoder.feed(b"") == []
    assert decoder.truncated


def test_next_event_returns_need_data_then_events_then_stream_end():
    decoder = SSEDecoder()
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"data: a\n\ndata: b\n\n")
    assert decoder.next_event() == event("a")
    assert decoder.next_event() == event("b")
    assert decoder.next_event() is NEED_DATA
    decoder.receive_data(b"")
    assert decoder.next_event() is STREAM_END


def test_receiving_data_after_the_end_is_an_error():
    decoder = SSEDecoder()
    decoder.receive_data(b"")
    with pytest.raises(RuntimeError):
        decoder.receive_data(b"data: late\n\n")


def test_reconnection_time_is_kept_even_without_an_event():
    decoder = SSEDecoder()
    decoder.feed(b"retry: 1500\n\n")
    assert decoder.reconnection_time_ms == 1500


def test_last_event_id_is_readable_for_reconnection():
    decoder = SSEDecoder()
    decoder.feed(b"id: abc\ndata: x\n\n")
    assert decoder.last_event_id == "abc"


def test_bytes_received_counts_every_byte_fed():
    decoder = SSEDecoder()
    decoder.feed(b"data: a\n")
    decoder.feed(b"\n")
    assert decoder.bytes_received == 9


# --- any re-chunking gives the same events ---------------------------------------------------

_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=12,
)
_line_ending = st.sampled_from([b"\n", b"\r\n", b"\r"])
_field_line = st.one_of(
    st.builds(lambda v: b"data: " + v.encode(), _text),
    st.builds(lambda v: b"data:" + v.encode(), _text),
    st.just(b"data"),
    st.builds(lambda v: b"event: " + v.encode(), _text),
    st.builds(lambda v: b"id: " + v.encode(), _text),
    st.builds(lambda n: b"retry: " + str(n).encode(), st.integers(0, 10**6)),
    st.builds(lambda v: b":" + v.encode(), _text),
    st.builds(lambda v: b"x-unknown: " + v.encode(), _text),
)
_block = st.tuples(st.lists(st.tuples(_field_line, _line_ending), max_size=5), _line_ending)
_streams = st.builds(
    lambda bom, blocks, tail: (
        (b"\xef\xbb\xbf" if bom else b"")
        + b"".join(b"".join(line + end for line, end in lines) + blank for lines, blank in blocks)
        + tail
    ),
    st.booleans(),
    st.lists(_block, max_size=6),
    st.one_of(st.just(b""), st.builds(lambda v: b"data: " + v.encode(), _text)),
)


def _rechunk(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(stream)) for cut in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(stream[start:point])
        start = point
    chunks.append(stream[start:])
    return [chunk for chunk in chunks if chunk]


@settings(max_examples=300, deadline=None)
@given(stream=_streams, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=30))
def test_any_rechunking_of_an_event_stream_gives_the_same_events(stream: bytes, cuts: list[int]):
    assert decode(*_rechunk(stream, cuts)) == decode(stream)


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=30))
def test_any_rechunking_of_arbitrary_bytes_gives_the_same_events(stream: bytes, cuts: list[int]):
    # Invalid UTF-8, stray CRs and NULs included: chunking never changes the result.
    assert decode(*_rechunk(stream, cuts)) == decode(stream)


@settings(max_examples=100, deadline=None)
@given(datas=st.lists(_text, min_size=1, max_size=8), ending=_line_ending)
def test_every_data_event_written_comes_back_in_order(datas: list[str], ending: bytes):
    stream = b"".join(b"data: " + d.encode() + ending + ending for d in datas)
    assert [e.data for e in decode(stream)] == datas
