"""Resume secrets: `KID:SECRET` entries, and whether a secret is strong enough.

Issue 13: a resume secret must carry at least 128 bits of entropy. We cannot
measure the entropy of one string, so we bound it from above three ways and
take the smallest bound:

- the bytes it decodes to (hex, else base64 / base64url): 8 bits a byte;
- the empirical Shannon entropy of its characters times its length (a secret
  made of few distinct characters, or of a repeated phrase, scores low);
- 8 bits a byte of its zlib-compressed form, less the stream's own overhead
  (a repeated chunk compresses away), and a whole repeated chunk counts once.

Anything that contains a common word or run (`changeme`, `secret`,
`password`, `123456`, …) is refused outright, however long: a dictionary
attack guesses those first (the issue's `changeme12345678` fell to a list of
14 guesses). `tokenrelay keys secret` prints a good one: 32 random bytes, hex.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import secrets
import zlib
from collections import Counter

MIN_ENTROPY_BITS = 128
# 128 bits are at least 32 hex digits or 22 base64 characters; 32 random
# bytes are 64 hex digits or 43 base64 characters.
MIN_LENGTH = 32
DEFAULT_KID = "k0"
KID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,32}")
# Lower-case fragments a guesser tries first. Random hex or base64 of 32
# bytes contains one of these with negligible probability (a 6-character
# run in 64 random hex digits: about 1 in 280,000).
DICTIONARY = (
    "changeme",
    "secret",
    "password",
    "passwd",
    "letmein",
    "qwerty",
    "admin",
    "test",
    "token",
    "relay",
    "default",
    "example",
    "123456",
    "abcdef",
    "000000",
    "aaaaaa",
)
# zlib's header and checksum, and the end of its last block.
_ZLIB_OVERHEAD_BYTES = 8


def new_secret() -> str:
    """A resume secret that passes `check_secret`: 32 random bytes, hex."""
    return secrets.token_hex(32)


def _decoded_bytes(secret: str) -> int:
    if re.fullmatch(r"[0-9a-fA-F]+", secret) and len(secret) % 2 == 0:
        return len(secret) // 2
    text = secret.rstrip("=")
    if re.fullmatch(r"[A-Za-z0-9+/]+|[A-Za-z0-9_-]+", text):
        padded = text + "=" * (-len(text) % 4)
        try:
            return len(base64.b64decode(padded.replace("-", "+").replace("_", "/")))
        except (binascii.Error, ValueError):
            return 0
    return 0


def _period(text: str) -> int:
    """The length of the shortest chunk that `text` repeats (its own length
    when it repeats nothing), by the KMP failure function."""
    failure = [0] * len(text)
    for i in range(1, len(text)):
        k = failure[i - 1]
        while k and text[i] != text[k]:
            k = failure[k - 1]
        failure[i] = k + (text[i] == text[k])
    period = len(text) - failure[-1]
    return period if len(text) % period == 0 else len(text)


def entropy_bound_bits(secret: str) -> float:
    """An upper bound of the secret's entropy in bits (see the module docstring)."""
    if not secret:
        return 0.0
    period = _period(secret)
    if period < len(secret):  # "k3y!k3y!k3y!": no more than one "k3y!"
        return entropy_bound_bits(secret[:period])
    decoded = 8.0 * _decoded_bytes(secret)
    counts = Counter(secret)
    shannon = -sum(n / len(secret) * math.log2(n / len(secret)) for n in counts.values())
    compressed = 8.0 * max(0, len(zlib.compress(secret.encode(), 9)) - _ZLIB_OVERHEAD_BYTES)
    return max(0.0, min(decoded, shannon * len(secret), compressed))


def check_secret(secret: str) -> None:
    """Raise ValueError saying why `secret` is too weak; the value is never echoed."""
    if len(secret) < MIN_LENGTH:
        raise ValueError(
            f"is too short (fewer than {MIN_LENGTH} characters); use 32 random bytes, hex or "
            "base64 (`tokenrelay keys secret` prints one)"
        )
    lowered = secret.lower()
    for word in DICTIONARY:
        if word in lowered:
            raise ValueError(
                "contains a dictionary word or a common run of characters; use 32 random "
                "bytes, hex or base64 (`tokenrelay keys secret` prints one)"
            )
    if _decoded_bytes(secret) == 0:
        raise ValueError(
            "is not hex or base64; use 32 random bytes, hex or base64 "
            "(`tokenrelay keys secret` prints one)"
        )
    bits = entropy_bound_bits(secret)
    if bits < MIN_ENTROPY_BITS:
        raise ValueError(
            f"carries at most {bits:.0f} bits of entropy, fewer than {MIN_ENTROPY_BITS}; "
            "use 32 random bytes, hex or base64 (`tokenrelay keys secret` prints one)"
        )


def parse_resume_secrets(value: str) -> list[tuple[str, str]]:
    """`KID:SECRET[,KID:SECRET…]` (a bare SECRET is kid `k0`) as (kid, secret)
    pairs in order: the first signs, all verify. Raises ValueError naming
    the entry (by position and kid, never by its secret)."""
    entries: list[tuple[str, str]] = []
    for position, item in enumerate(value.split(","), start=1):
        item = item.strip()
        if not item:
            raise ValueError(
                f"entry {position} is empty (give KID:SECRET entries, comma-separated)"
            )
        kid, sep, secret = item.partition(":")
        if not sep:
            kid, secret = DEFAULT_KID, item
        if not KID_PATTERN.fullmatch(kid):
            raise ValueError(
                f"entry {position}: the key id must be 1-32 letters, digits, '_' or '-'"
            )
        if any(kid == seen for seen, _ in entries):
            raise ValueError(f"entry {position}: key id {kid} is given twice")
        try:
            check_secret(secret)
        except ValueError as error:
            raise ValueError(f"entry {position} (kid {kid}): the secret {error}") from None
        entries.append((kid, secret))
    return entries
