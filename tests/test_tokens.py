"""Resume tokens: signed, bound to a stream, expiring."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay_server.api.tokens import MAX_TOKEN_LENGTH, ResumeTokens
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.errors import RequestError, ResumeDenied

SECRET = b"4c1f0f2a8e9b7d6c5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"
S1 = "5e1" + "0" * 29
S2 = "5e2" + "0" * 29


def test_an_issued_token_grants_its_stream() -> None:
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=ManualClock())
    assert tokens.verify(tokens.issue(S1)).stream_id == S1


def test_replicas_sharing_the_secret_accept_each_others_tokens() -> None:
    clock = ManualClock()
    token = ResumeTokens(SECRET, ttl_s=60, clock=clock).issue(S1)
    assert ResumeTokens(SECRET, ttl_s=60, clock=clock).verify(token).stream_id == S1


def test_a_token_expires_after_its_ttl() -> None:
    clock = ManualClock()
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=clock)
    token = tokens.issue(S1)
    clock.advance(61)
    with pytest.raises(ResumeDenied, match="expired") as denied:
        tokens.verify(token)
    assert denied.value.reason == "TOKEN_EXPIRED"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t.replace(S1, S2),
        lambda t: t[:-2] + ("xx" if not t.endswith("xx") else "yy"),
        lambda t: t.rsplit(".", 2)[0] + ".9999999999." + t.rsplit(".", 1)[1],
        lambda t: "v3" + t[2:],
        lambda t: "garbage",
        lambda t: t.replace(".-.", ".acme.", 1),
    ],
    ids=[
        "another stream id",
        "edited signature",
        "extended expiry",
        "unknown version",
        "not a token at all",
        "another tenant written in",
    ],
)
def test_an_edited_token_is_denied(mutate) -> None:  # type: ignore[no-untyped-def]
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=ManualClock())
    with pytest.raises(ResumeDenied):
        tokens.verify(mutate(tokens.issue(S1)))


def test_a_token_signed_with_another_secret_is_denied() -> None:
    clock = ManualClock()
    foreign = ResumeTokens(b"some-other-secret-value", ttl_s=60, clock=clock).issue(S1)
    with pytest.raises(ResumeDenied, match="signature"):
        ResumeTokens(SECRET, ttl_s=60, clock=clock).verify(foreign)


def test_an_empty_token_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="resume_token is empty"):
        ResumeTokens(SECRET, ttl_s=60, clock=ManualClock()).verify("")


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
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
    [
        f"v2.k0.-.{S1}.1700000000.1700000060." + "é" * 43,
        f"v2.k0.-.{S1}.1700000000.17000000\uff160." + "A" * 43,
        f"v2.k0.-.{S1}.1700000000.²." + "A" * 43,
        f"v2.k0.-.{S1}.٣.1700000060." + "A" * 43,
    ],
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


# --- issue 13: tenants, key ids, rotation, distinct reasons ------------------------------

NEW = b"9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b"


def test_a_token_names_its_tenant_and_is_refused_to_another() -> None:
    tokens = ResumeTokens(SECRET, ttl_s=60, clock=ManualClock())
    token = tokens.issue(S1, tenant="acme")
    grant = tokens.verify(token, tenant="acme")
    assert (grant.tenant, grant.stream_id, grant.kid) == ("acme", S1, "k0")
    with pytest.raises(ResumeDenied, match="another tenant") as denied:
        tokens.verify(token, tenant="globex")
    assert denied.value.reason == "TOKEN_OTHER_TENANT"
    with pytest.raises(ResumeDenied, match="another tenant"):
        tokens.verify(token)  # the open gateway's anonymous caller


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("v2.k0.-", "TOKEN_MALFORMED"),
        (f"v2.k9.-.{S1}.1.9999999999." + "A" * 43, "TOKEN_UNKNOWN_KID"),
        (f"v2.k0.-.{S1}.1.9999999999." + "A" * 43, "TOKEN_BAD_MAC"),
    ],
    ids=["a bad format", "an unknown key id", "a bad MAC"],
)
def test_each_refusal_says_which_check_failed(token: str, reason: str) -> None:
    with pytest.raises(ResumeDenied) as denied:
        ResumeTokens(SECRET, ttl_s=60, clock=ManualClock()).verify(token)
    assert denied.value.reason == reason


def test_rotation_old_kid_accepted_while_listed_refused_after() -> None:
    clock = ManualClock()
    before = ResumeTokens([("k1", SECRET)], ttl_s=60, clock=clock)
    old_token = before.issue(S1, tenant="acme")
    # Rotated: k2 signs, k1 still verifies.
    during = ResumeTokens([("k2", NEW), ("k1", SECRET)], ttl_s=60, clock=clock)
    assert during.verify(old_token, tenant="acme").kid == "k1"
    new_token = during.issue(S1, tenant="acme")
    assert new_token.startswith("v2.k2.")
    # k1 retired: its tokens are refused, naming the kid; k2's still work.
    after = ResumeTokens([("k2", NEW)], ttl_s=60, clock=clock)
    with pytest.raises(ResumeDenied, match="key id k1") as denied:
        after.verify(old_token, tenant="acme")
    assert denied.value.reason == "TOKEN_UNKNOWN_KID"
    assert after.verify(new_token, tenant="acme").kid == "k2"


def test_a_token_signed_with_a_listed_kid_but_another_secret_is_a_bad_mac() -> None:
    clock = ManualClock()
    forged = ResumeTokens([("k0", NEW)], ttl_s=60, clock=clock).issue(S1, tenant="acme")
    with pytest.raises(ResumeDenied) as denied:
        ResumeTokens(SECRET, ttl_s=60, clock=clock).verify(forged, tenant="acme")
    assert denied.value.reason == "TOKEN_BAD_MAC"


def test_ten_thousand_tampered_or_foreign_tokens_none_accepted() -> None:
    """The issue's figure: 10,000 tampered or foreign tokens, 0 accepted."""
    import random

    rng = random.Random(13)
    clock = ManualClock()
    tokens = ResumeTokens([("k2", NEW), ("k1", SECRET)], ttl_s=60, clock=clock)
    foreign_signer = ResumeTokens([("k1", b"f" * 32), ("k2", b"e" * 32)], ttl_s=60, clock=clock)
    genuine = tokens.issue(S1, tenant="acme")
    alphabet = "0123456789abcdefABCDEF-_.k"
    accepted = 0
    tried = 0
    reasons: dict[str, int] = {}
    for i in range(10_000):
        kind = i % 4
        if kind == 0:  # one character changed
            at = rng.randrange(len(genuine))
            ch = rng.choice(alphabet.replace(genuine[at], ""))
            candidate = genuine[:at] + ch + genuine[at + 1 :]
            tenant = "acme"
        elif kind == 1:  # signed by another deployment with the same kids
            candidate = foreign_signer.issue(f"{rng.getrandbits(128):032x}", tenant="acme")
            tenant = "acme"
        elif kind == 2:  # a genuine token of another tenant
            candidate = tokens.issue(f"{rng.getrandbits(128):032x}", tenant="globex")
            tenant = "acme"
        else:  # random MACs on a well-formed payload
            mac = "".join(rng.choice(alphabet[:-2]) for _ in range(43))
            candidate = genuine.rsplit(".", 1)[0] + "." + mac
            tenant = "acme"
        tried += 1
        try:
            tokens.verify(candidate, tenant=tenant)
        except ResumeDenied as error:
            reasons[error.reason] = reasons.get(error.reason, 0) + 1
            continue
        accepted += 1
    assert tried == 10_000
    assert accepted == 0, accepted
    assert set(reasons) >= {"TOKEN_BAD_MAC", "TOKEN_OTHER_TENANT", "TOKEN_MALFORMED"}
