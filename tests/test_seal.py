"""Store values sealed at rest (store/seal.py): AES-256-GCM under keys
derived (HKDF-SHA256) from the resume secrets. Properties with hypothesis:
a value opens to what was sealed, with its own aad only; any single byte
changed, or the value cut, fails typed; an old kid opens while it is
listed and is refused once it is not; a plain JSON value is never taken
for a sealed one. Errors name the kid and what failed, never a secret."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay_server.store.errors import StoreError
from tokenrelay_server.store.seal import (
    MIN_SEALED_BYTES,
    NONCE_BYTES,
    TAG_BYTES,
    SealBroken,
    Sealer,
    derive_key,
    sealed,
)

OLD = ("k1", bytes.fromhex("6f1d0c5e3a9b84f2c7d6e5a4b3c2d1e0f9e8d7c6b5a4938271605f4e3d2c1b0a"))
NEW = ("k2", bytes.fromhex("0a1b2c3d4e5f60718293a4b5c6d7e8f90f1e2d3c4b5a69788796a5b4c3d2e1f0"))
CONTEXT = b"stream-log"
STREAM = b"3591a1b95d6c16a770341f70aaaa605c"

plaintexts = st.binary(max_size=2048)
aads = st.binary(min_size=1, max_size=64)


def sealer(*keys: tuple[str, bytes], context: bytes = CONTEXT) -> Sealer:
    return Sealer(list(keys), context=context)


@given(plaintext=plaintexts, aad=aads)
def test_a_sealed_value_opens_to_its_plaintext(plaintext: bytes, aad: bytes) -> None:
    value = sealer(OLD).seal(plaintext, aad=aad)
    assert sealed(value)
    assert len(value) == 2 + 2 + NONCE_BYTES + len(plaintext) + TAG_BYTES
    assert value[2:4] == b"k1"
    # Another instance with the same secret (another replica) opens it too.
    assert sealer(OLD).open(value, aad=aad) == plaintext


@given(plaintext=plaintexts, aad=aads, data=st.data())
def test_any_single_byte_changed_fails_typed(
    plaintext: bytes, aad: bytes, data: st.DataObject
) -> None:
    seal = sealer(OLD)
    value = seal.seal(plaintext, aad=aad)
    index = data.draw(st.integers(0, len(value) - 1), label="index")
    delta = data.draw(st.integers(1, 255), label="delta")
    tampered = value[:index] + bytes((value[index] ^ delta,)) + value[index + 1 :]
    with pytest.raises(SealBroken) as caught:
        seal.open(tampered, aad=aad)
    assert caught.value.reason in {"format", "unknown kid", "tag"}
    assert isinstance(caught.value, StoreError)


@given(plaintext=plaintexts, aad=aads, data=st.data())
def test_a_cut_or_extended_value_fails_typed(
    plaintext: bytes, aad: bytes, data: st.DataObject
) -> None:
    seal = sealer(OLD)
    value = seal.seal(plaintext, aad=aad)
    cut = data.draw(st.integers(0, len(value) - 1), label="keep")
    with pytest.raises(SealBroken):
        seal.open(value[:cut], aad=aad)
    with pytest.raises(SealBroken):
        seal.open(value + data.draw(st.binary(min_size=1, max_size=8)), aad=aad)


@given(plaintext=plaintexts, aad=aads, other=aads)
def test_a_value_opens_only_with_its_own_aad(plaintext: bytes, aad: bytes, other: bytes) -> None:
    seal = sealer(OLD)
    value = seal.seal(plaintext, aad=aad)
    if other == aad:
        assert seal.open(value, aad=other) == plaintext
        return
    with pytest.raises(SealBroken) as caught:
        seal.open(value, aad=other)
    assert (caught.value.reason, caught.value.kid) == ("tag", "k1")
    assert "another stream" in str(caught.value)


@given(plaintext=plaintexts)
def test_rotation_an_old_kid_opens_while_listed_and_is_refused_after(plaintext: bytes) -> None:
    before = sealer(OLD)
    during = sealer(NEW, OLD)  # the new secret first: it seals; the old one still opens
    after = sealer(NEW)
    old_value = before.seal(plaintext, aad=STREAM)
    assert during.open(old_value, aad=STREAM) == plaintext
    new_value = during.seal(plaintext, aad=STREAM)
    assert during.kid_of(new_value) == "k2"
    assert before.kid_of(old_value) == "k1"
    assert after.open(new_value, aad=STREAM) == plaintext
    with pytest.raises(SealBroken) as caught:
        after.open(old_value, aad=STREAM)
    assert (caught.value.reason, caught.value.kid) == ("unknown kid", "k1")
    assert "kid k1" in str(caught.value) and "it lists k2" in str(caught.value)
    with pytest.raises(SealBroken) as caught:
        before.open(new_value, aad=STREAM)  # a replica that never got the new secret
    assert caught.value.reason == "unknown kid"


@given(plaintext=plaintexts)
def test_the_same_kid_with_another_secret_does_not_open(plaintext: bytes) -> None:
    value = sealer(OLD).seal(plaintext, aad=STREAM)
    impostor = sealer(("k1", NEW[1]))
    with pytest.raises(SealBroken) as caught:
        impostor.open(value, aad=STREAM)
    assert caught.value.reason == "tag"


@given(plaintext=plaintexts)
def test_a_value_of_one_context_never_opens_as_another(plaintext: bytes) -> None:
    value = sealer(OLD, context=b"stream-log").seal(plaintext, aad=STREAM)
    with pytest.raises(SealBroken):
        sealer(OLD, context=b"stream-meta").open(value, aad=STREAM)


@given(json_text=st.text(max_size=200))
def test_plain_json_values_are_never_taken_for_sealed_ones(json_text: str) -> None:
    # The stores' plain values are JSON objects; whitespace may lead JSON text.
    for plain in ("{" + json_text, " {" + json_text, "[" + json_text):
        assert not sealed(plain.encode())


@settings(max_examples=50)
@given(plaintext=plaintexts)
def test_two_seals_of_the_same_value_differ(plaintext: bytes) -> None:
    seal = sealer(OLD)
    assert seal.seal(plaintext, aad=STREAM) != seal.seal(plaintext, aad=STREAM)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        pytest.param(b"", "0 bytes, shorter than any sealed value", id="empty"),
        pytest.param(b"{" + b"x" * 40, "first byte is 0x7b", id="plain JSON"),
        pytest.param(
            b"\x02\x02k1" + b"\x00" * 28, "first byte is 0x02", id="a version from the future"
        ),
        pytest.param(b"\x01\x00" + b"\x00" * 40, "kid or its length", id="a kid of no bytes"),
        pytest.param(b"\x01\x02k!" + b"\x00" * 28, "kid or its length", id="a kid with a '!'"),
        pytest.param(b"\x01\x41" + b"k" * 65 + b"\x00" * 28, "kid or its length", id="kid of 65"),
        pytest.param(b"\x01\x02k1" + b"\x00" * 27, "kid or its length", id="one byte short"),
    ],
)
def test_what_is_not_a_sealed_value_is_refused_saying_why(value: bytes, says: str) -> None:
    with pytest.raises(SealBroken) as caught:
        sealer(OLD).open(value, aad=STREAM)
    assert caught.value.reason == "format"
    assert says in str(caught.value)
    assert not sealed(value)


def test_the_shortest_sealed_value_is_an_empty_plaintext_under_a_one_letter_kid() -> None:
    value = sealer(("k", OLD[1])).seal(b"", aad=STREAM)
    assert len(value) == MIN_SEALED_BYTES
    assert sealer(("k", OLD[1])).open(value, aad=STREAM) == b""


def test_no_error_names_a_secret_or_a_key() -> None:
    seal = sealer(NEW)
    value = sealer(OLD).seal(b"the answer", aad=STREAM)
    retired = sealer(OLD, NEW)
    messages = []
    for attempt in (
        lambda: seal.open(value, aad=STREAM),
        lambda: retired.open(value, aad=b"another stream"),
        lambda: seal.open(b"\x01\x02k1" + b"\x00" * 40, aad=STREAM),
    ):
        with pytest.raises(SealBroken) as caught:
            attempt()
        messages.append(str(caught.value))
    keys = [derive_key(secret, kid=kid, context=CONTEXT) for kid, secret in (OLD, NEW)]
    for message in messages:
        for secret in (OLD[1], NEW[1], *keys):
            assert secret.hex() not in message and repr(secret) not in message


@pytest.mark.parametrize(
    ("keys", "context", "says"),
    [
        pytest.param([], CONTEXT, "at least one", id="no key"),
        pytest.param([OLD], b"", "context", id="no context"),
        pytest.param([("k 1", OLD[1])], CONTEXT, "key 1: the kid", id="a kid with a space"),
        pytest.param([("ké", OLD[1])], CONTEXT, "key 1: the kid", id="a non-ASCII kid"),
        pytest.param([OLD, ("k1", NEW[1])], CONTEXT, "kid k1 is given twice", id="a kid twice"),
        pytest.param([("k1", b"short")], CONTEXT, "at least 16 bytes", id="a short secret"),
    ],
)
def test_a_sealer_refuses_bad_keys_naming_the_entry(
    keys: list[tuple[str, bytes]], context: bytes, says: str
) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        Sealer(keys, context=context)
    assert OLD[1].hex() not in str(caught.value)


def test_the_first_kid_seals_and_every_kid_is_listed() -> None:
    rotating = sealer(NEW, OLD)
    assert rotating.sealing_kid == "k2"
    assert rotating.kids == ["k2", "k1"]
    with pytest.raises(SealBroken):
        rotating.kid_of(b"{}")


def test_derived_keys_differ_by_kid_and_context_and_are_not_the_secret() -> None:
    secret = OLD[1]
    keys = {
        derive_key(secret, kid="k1", context=b"stream-log"),
        derive_key(secret, kid="k2", context=b"stream-log"),
        derive_key(secret, kid="k1", context=b"stream-meta"),
        # Lengths are in the info: ("ab", "c") and ("a", "bc") differ.
        derive_key(secret, kid="c", context=b"ab"),
        derive_key(secret, kid="bc", context=b"a"),
    }
    assert len(keys) == 5
    assert all(len(key) == 32 and key != secret for key in keys)
    assert derive_key(secret, kid="k1", context=b"stream-log") in keys  # deterministic
