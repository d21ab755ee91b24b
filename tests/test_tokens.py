"""Resume tokens: signed, bound to a stream, expiring."""

from __future__ import annotations

import pytest

from tokenrelay_server.api.tokens import ResumeTokens
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
