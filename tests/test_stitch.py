"""The stitcher trims what a continuation repeats, however it is chunked."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay_server.core.model import Message
from tokenrelay_server.core.stitch import Stitcher, overlap_length
from tokenrelay_server.upstream.sim import SimAnswer


def stitch(delivered: str, pieces: list[str], **kwargs) -> str:
    stitcher = Stitcher(delivered, **kwargs)
    out = [piece for p in pieces for piece in stitcher.feed(p)] + stitcher.finish()
    assert all(out), "no empty pieces"
    return "".join(out)


def chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


def test_a_repeated_tail_is_trimmed() -> None:
    assert stitch("The quick brown", [" brown fox", " jumps"]) == " fox jumps"


def test_no_overlap_passes_through() -> None:
    assert stitch("The quick brown", [" fox", " jumps"]) == " fox jumps"


def test_overlaps_shorter_than_the_minimum_are_kept() -> None:
    assert stitch("abc the", [" the end"], min_overlap=5) == " the end"


def test_the_start_is_held_only_while_a_longer_overlap_is_possible() -> None:
    stitcher = Stitcher("hello world")
    assert stitcher.feed("wor") == []  # could be "world…"
    assert stitcher.feed("ld and more") == [" and more"]
    assert stitcher.trimmed == 5


def test_released_pieces_keep_the_delta_boundaries() -> None:
    stitcher = Stitcher("one two three four")
    assert stitcher.feed(" two") == []  # could be repeating " two three four"
    assert stitcher.feed(" five") == [" two", " five"]
    assert stitcher.feed(" six") == [" six"]


@settings(max_examples=150, deadline=None)
@given(
    total=st.integers(5, 80),
    cut=st.integers(1, 79),
    overlap=st.integers(4, 40),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_sim_text_resumed_with_any_overlap_and_chunking_is_seamless(
    total: int, cut: int, overlap: int, cuts: list[int]
) -> None:
    answer = SimAnswer((Message("user", "stitch me"),))
    clean = answer.text(total)
    cut = min(cut, len(clean) - 1)
    delivered, rest = clean[:cut], clean[cut:]
    overlap = min(overlap, len(delivered))
    continuation = delivered[len(delivered) - overlap :] + rest
    if overlap_length(delivered, continuation, window=256, min_overlap=4) != overlap:
        return  # the text itself repeats here: a longer overlap is genuinely ambiguous
    assert delivered + stitch(delivered, chunked(continuation, cuts)) == clean


@settings(max_examples=150, deadline=None)
@given(
    delivered=st.text(max_size=40),
    continuation=st.text(max_size=40),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_output_does_not_depend_on_chunking(
    delivered: str, continuation: str, cuts: list[int]
) -> None:
    whole = stitch(delivered, [continuation])
    assert stitch(delivered, chunked(continuation, cuts)) == whole
    k = overlap_length(delivered, continuation, window=256, min_overlap=4)
    assert whole == continuation[k:]
