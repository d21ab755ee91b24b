"""Store values sealed at rest (issue 13 leftovers): AES-256-GCM, with keys
derived from the resume secrets, so a Redis dump or a replica's disk holds
no prompt or answer in the clear, and a value cannot be moved to another
stream or edited without the open failing.

Pure: bytes in, bytes out; no I/O. A store that seals calls `seal` before a
write and `open` after a read (the wiring lives with the store, not here).

Keys. The resume secrets as `(kid, secret bytes)` pairs, in the order the
gateway lists them (`--resume-secret KID:SECRET`, repeatable; parsed and
checked in config/secrets.py, encoded as api/server.py hands them to
`ResumeTokens`): the first kid seals, every listed kid opens, so the
secrets rotate as resume tokens do (list the new one first, keep the old
one until nothing it sealed is still kept, then drop it). The AES key of
a kid is HKDF-SHA256 (RFC 5869) of its secret, with a fixed salt and an
`info` naming the purpose, the caller's `context` and the kid; a resume
token's HMAC key and a seal key are thus never the same bytes, and values
sealed for one `context` (one kind of value) never open as another.

Format, version 1:

    0x01 | len(kid) (1 byte, 1-64) | kid (ASCII [A-Za-z0-9_-]) | nonce (12 bytes)
         | ciphertext | GCM tag (16 bytes)

The nonce is random (96 bits, NIST SP 800-38D section 8.2.2): under one key
a repeat is expected only after about 2^48 values, and a kid's key changes
whenever its secret rotates. The GCM associated data is the header (version
and kid, so neither can be edited) followed by the caller's `aad`: the
stream id, which binds a value to its stream.

`sealed(value)` tells a sealed value from a plain one: the store's plain
values are JSON text, which never begins with the byte 0x01, so a store can
read values written before sealing was turned on.

Every failure to open is `SealBroken` (a StoreError) naming what failed and
the kid, never a key or a secret.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tokenrelay_server.store.errors import StoreError

VERSION = 0x01
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32  # AES-256
MIN_SECRET_BYTES = 16  # as ResumeTokens (config/secrets.py asks for 128 bits of entropy)
MAX_KID_BYTES = 64
_KID = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Fixed HKDF salt (RFC 5869 section 3.1: optional; a constant still domain-separates).
HKDF_SALT = b"tokenrelay/store-seal/v1"
_PURPOSE = b"tokenrelay store value seal v1"
# The shortest sealed value: version, kid length, a 1-byte kid, nonce, tag.
MIN_SEALED_BYTES = 2 + 1 + NONCE_BYTES + TAG_BYTES


class SealBroken(StoreError):
    """A sealed value did not open: it is not a sealed value (format), was
    sealed with a kid this gateway no longer lists (unknown kid), or its tag
    does not verify (edited, cut, or sealed for another stream or context).
    Never retry the same value: it will fail the same way. Treat the value
    as lost (the stream as unreadable), and check that every replica lists
    the same resume secrets, the retired ones included until nothing they
    sealed is kept."""

    def __init__(self, message: str, *, reason: str, kid: str = "") -> None:
        super().__init__(message)
        self.reason = reason  # "format", "unknown kid", "tag"
        self.kid = kid


def derive_key(secret: bytes, *, kid: str, context: bytes) -> bytes:
    """The AES-256 key of `kid` for values of `context`: HKDF-SHA256 of the
    secret (RFC 5869), `info` = purpose, then the length and bytes of the
    context, then the kid (lengths first, so no two (context, kid) pairs
    give the same info)."""
    kid_bytes = kid.encode("ascii")
    info = (
        _PURPOSE
        + len(context).to_bytes(2, "big")
        + context
        + len(kid_bytes).to_bytes(1, "big")
        + kid_bytes
    )
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=HKDF_SALT, info=info)
    return hkdf.derive(secret)


def _header(kid: str) -> bytes:
    kid_bytes = kid.encode("ascii")
    return bytes((VERSION, len(kid_bytes))) + kid_bytes


def _split(value: bytes) -> tuple[str, int] | None:
    """(kid, where the nonce starts) of a well-formed sealed value, else None."""
    if len(value) < MIN_SEALED_BYTES or value[0] != VERSION:
        return None
    kid_length = value[1]
    if not 1 <= kid_length <= MAX_KID_BYTES:
        return None
    body = 2 + kid_length
    if len(value) < body + NONCE_BYTES + TAG_BYTES:
        return None
    kid_bytes = value[2:body]
    if not kid_bytes.isascii():
        return None
    kid = kid_bytes.decode("ascii")
    if not _KID.fullmatch(kid):
        return None
    return kid, body


def sealed(value: bytes) -> bool:
    """Whether `value` has the form of a sealed value (version 1 header, room
    for a nonce and a tag). Plain store values (JSON text) never do."""
    return _split(value) is not None


class Sealer:
    """Seals and opens store values with the keys derived from `keys`
    (kid, secret bytes), the first of which seals; `context` names the kind
    of value (e.g. b"stream-log"), so one kind never opens as another."""

    def __init__(self, keys: Sequence[tuple[str, bytes]], *, context: bytes) -> None:
        if not keys:
            raise ValueError("a Sealer needs at least one (kid, secret) pair")
        if not context:
            raise ValueError("a Sealer needs a context naming the kind of value it seals")
        if len(context) > 0xFFFF:
            raise ValueError("the context must be at most 65535 bytes")
        ciphers: dict[str, AESGCM] = {}
        for position, (kid, secret) in enumerate(keys, start=1):
            if not _KID.fullmatch(kid) or not kid.isascii():
                raise ValueError(f"key {position}: the kid must be 1-64 of [A-Za-z0-9_-]")
            if kid in ciphers:
                raise ValueError(f"key {position}: kid {kid} is given twice")
            if len(secret) < MIN_SECRET_BYTES:
                raise ValueError(
                    f"key {position} (kid {kid}): the secret must be at least "
                    f"{MIN_SECRET_BYTES} bytes"
                )
            ciphers[kid] = AESGCM(derive_key(secret, kid=kid, context=context))
        self._ciphers = ciphers
        self._sealing_kid = keys[0][0]
        self._sealing_header = _header(self._sealing_kid)
        self._sealing_cipher = ciphers[self._sealing_kid]

    @property
    def kids(self) -> list[str]:
        """The kids this sealer opens, the sealing one first."""
        return list(self._ciphers)

    @property
    def sealing_kid(self) -> str:
        return self._sealing_kid

    def seal(self, plaintext: bytes, *, aad: bytes) -> bytes:
        """`plaintext` sealed with the first kid, bound to `aad` (the stream id)."""
        nonce = os.urandom(NONCE_BYTES)
        header = self._sealing_header
        return header + nonce + self._sealing_cipher.encrypt(nonce, plaintext, header + aad)

    def kid_of(self, value: bytes) -> str:
        """The kid a sealed value names (to re-seal values of a retiring kid);
        SealBroken when it is not a sealed value."""
        parts = _split(value)
        if parts is None:
            raise self._not_sealed(value)
        return parts[0]

    def open(self, value: bytes, *, aad: bytes) -> bytes:
        """The plaintext of a value `seal` made with the same `aad`, or
        SealBroken saying what failed."""
        parts = _split(value)
        if parts is None:
            raise self._not_sealed(value)
        kid, body = parts
        cipher = self._ciphers.get(kid)
        if cipher is None:
            listed = ", ".join(self._ciphers)
            raise SealBroken(
                f"the value is sealed with kid {kid}, which this gateway does not list "
                f"(it lists {listed}): list that resume secret again to read it",
                reason="unknown kid",
                kid=kid,
            )
        nonce = value[body : body + NONCE_BYTES]
        try:
            return cipher.decrypt(nonce, value[body + NONCE_BYTES :], value[:body] + aad)
        except InvalidTag:
            raise SealBroken(
                f"the value sealed with kid {kid} does not verify: it was edited or cut, or "
                "sealed for another stream or kind of value",
                reason="tag",
                kid=kid,
            ) from None

    @staticmethod
    def _not_sealed(value: bytes) -> SealBroken:
        if len(value) < MIN_SEALED_BYTES:
            why = f"{len(value)} bytes, shorter than any sealed value ({MIN_SEALED_BYTES})"
        elif value[0] != VERSION:
            why = f"its first byte is 0x{value[0]:02x}, not the version byte 0x{VERSION:02x}"
        else:
            why = "its kid or its length is not valid, or it is too short for a nonce and a tag"
        return SealBroken(f"the value is not a sealed value: {why}", reason="format")


__all__ = ["SealBroken", "Sealer", "derive_key", "sealed"]
