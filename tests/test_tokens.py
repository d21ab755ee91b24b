"""Resume tokens: signed, bound to a stream, expiring."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay_server.api.tokens import MAX_TOKEN_LENGTH, ResumeTokens
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import RequestError, ResumeDenied, StreamNotFound

SECRET = b"0123456789abcdef-secret"


def test_an_issued_token_grants_its_stream() -> None:
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=ManualClock())
    assert tokens.verify(tokens.issue("abc123")).stream_id == "abc123"


def test_replicas_sharing_the_secret_accept_each_others_tokens() -> None:
    clock = ManualClock()
    token = ResumeTokens(SECRET, ttl_s=60, clock=clock).issue("s1")
    assert ResumeTokens(SECRET, ttl_s=60, clock=clock).verify(token).stream_id == "s1"


def test_a_token_expires_after_its_ttl() -> None:
    clock = ManualClock()
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=clock)
    token = tokens.issue("s1")
    clock.advance(61)
    with pytest.raises(StreamNotFound, match="expired"):
        tokens.verify(token)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace("s1", "s2"),
        lambda t: t[:-2] + ("xx" if not t.endswith("xx") else "yy"),
        lambda t: t.rsplit(".", 2)[0] + ".9999999999." + t.rsplit(".", 1)[1],
        lambda t: "v2" + t[2:],
        lambda t: "garbage",
    ],
    ids=[
        "another stream id",
        "edited signature",
        "extended expiry",
        "unknown version",
        "not a token at all",
    ],
)
def test_an_edited_token_is_denied(mutate) -> None:  # type: ignore[no-untyped-def]
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=ManualClock())
    with pytest.raises(ResumeDenied):
        tokens.verify(mutate(tokens.issue("s1")))


def test_a_token_signed_with_another_secret_is_denied() -> None:
    clock = ManualClock()
    foreign = ResumeTokens(b"some-other-secret-value", ttl_s=60, clock=clock).issue("s1")
    with pytest.raises(ResumeDenied, match="signature"):
        ResumeTokens(SECRET, ttl_s=60, clock=clock).verify(foreign)


def test_an_empty_token_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="resume_token is empty"):
        ResumeTokens(SECRET, ttl_s=60, clock=ManualClock()).verify("")


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        ResumeTokens(b"short", ttl_s=60, clock=ManualClock())


def _flip(token: str, index: int, bit: int) -> str:
    flipped = ord(token[index]) ^ (1 << bit)
    if 0xD800 <= flipped <= 0xDFFF:  # a lone surrogate cannot travel in a proto string
        flipped = 0xFFFD
    return token[:index] + chr(flipped) + token[index + 1 :]


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_every_bit_flip_of_a_token_is_denied(data: st.DataObject) -> None:
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=ManualClock())
    token = tokens.issue("0c5f0d4be6b64d0f9c1e6f2b8a3d9e11")
    index = data.draw(st.integers(0, len(token) - 1), label="index")
    bit = data.draw(st.integers(0, 20), label="bit")
    with pytest.raises(ResumeDenied, match=r"resume\.resume_token"):
        tokens.verify(_flip(token, index, bit))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.text(min_size=1, max_size=MAX_TOKEN_LENGTH))
def test_arbitrary_text_is_refused_with_an_error_naming_the_field(text: str) -> None:
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=ManualClock())
    with pytest.raises((ResumeDenied, RequestError), match=r"resume\.resume_token"):
        tokens.verify(text)


@pytest.mark.parametrize(
    "token",
    ["v1.s1.1700000060.é", "v1.s1.17000000\uff160.sig", "v1.s1.²." + "A" * 43, "v1.s1.٣.sig"],
    ids=[
        "a non-ascii signature",
        "a fullwidth digit in the expiry",
        "a superscript expiry",
        "an arabic-indic expiry",
    ],
)
def test_a_token_with_non_ascii_characters_is_denied(token: str) -> None:
    with pytest.raises(ResumeDenied, match="not a tokenrelay resume token"):
        ResumeTokens(SECRET, ttl_s=60, clock=ManualClock()).verify(token)
