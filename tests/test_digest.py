"""The End's digests (core/digest.py): the record encoding the contract
spells out for chunks_sha256, and text_sha256 over answer text only."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenrelay_server.core.digest import ChunkDigests, chunk_record
from tokenrelay_server.core.model import Chunk, ToolCallDelta


def text(seq: int, value: str) -> Chunk:
    return Chunk(seq, value, "sim", 1)


def reasoning(seq: int, value: str) -> Chunk:
    return Chunk(seq, value, "sim", 1, kind="reasoning")


def call(seq: int, index: int, id_: str, name: str, arguments: str) -> Chunk:
    return Chunk(
        seq, "", "sim", 1, kind="tool_call", tool_call=ToolCallDelta(index, id_, name, arguments)
    )


@pytest.mark.parametrize(
    ("chunk", "record"),
    [
        pytest.param(
            text(1, "hé"), b"T\x00\x00\x00\x03h\xc3\xa9", id="text is T, its byte length, its UTF-8"
        ),
        pytest.param(
            reasoning(1, ""), b"R\x00\x00\x00\x00", id="empty reasoning is R and a zero length"
        ),
        pytest.param(
            call(1, 2, "c1", "f", "{}"),
            b"C\x00\x00\x00\x02"
            + b"\x00\x00\x00\x02c1"
            + b"\x00\x00\x00\x01f"
            + b"\x00\x00\x00\x02{}",
            id="a tool call is C, its index, then id, name and arguments each with its length",
        ),
        pytest.param(
            call(1, 0, "", "", '"a'),
            b"C\x00\x00\x00\x00" + b"\x00\x00\x00\x00" * 2 + b'\x00\x00\x00\x02"a',
            id="a later piece of a call has an empty id and name",
        ),
    ],
)
def test_each_kind_has_the_record_the_contract_spells_out(chunk: Chunk, record: bytes) -> None:
    assert chunk_record(chunk) == record


def test_text_sha256_covers_answer_text_only_and_chunks_sha256_every_chunk() -> None:
    chunks = [reasoning(1, "hmm"), text(2, "Hel"), text(3, "lo"), call(4, 0, "c", "f", "{}")]
    digests = ChunkDigests.of(chunks)
    assert digests.text_sha256() == hashlib.sha256(b"Hello").hexdigest()
    expected = hashlib.sha256(b"".join(chunk_record(c) for c in chunks)).hexdigest()
    assert digests.chunks_sha256() == expected


chunk_values = st.one_of(
    st.builds(lambda v: ("T", v), st.text(max_size=3)),
    st.builds(lambda v: ("R", v), st.text(max_size=3)),
    st.builds(lambda i, a: ("C", i, a), st.integers(0, 2), st.text(alphabet='{}"a', max_size=3)),
)


def as_chunks(values: list[tuple[object, ...]]) -> list[Chunk]:
    out = []
    for seq, value in enumerate(values, start=1):
        if value[0] == "T":
            out.append(text(seq, str(value[1])))
        elif value[0] == "R":
            out.append(reasoning(seq, str(value[1])))
        else:
            out.append(call(seq, int(value[1]), "", "", str(value[2])))  # type: ignore[call-overload]
    return out


@given(st.lists(chunk_values, max_size=5), st.lists(chunk_values, max_size=5))
def test_different_chunk_sequences_have_different_records(a: list, b: list) -> None:
    # The lengths make the encoding injective: "ab" as one chunk and "a", "b"
    # as two, or text and reasoning with the same characters, never collide.
    records_a = b"".join(chunk_record(c) for c in as_chunks(a))
    records_b = b"".join(chunk_record(c) for c in as_chunks(b))
    assert (records_a == records_b) == (a == b)
