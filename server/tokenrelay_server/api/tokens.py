"""Resume tokens: HMAC-signed, bound to one tenant and one stream, expiring,
signed with rotatable keys (issue 13).

Format: ``v2.<kid>.<tenant>.<stream_id>.<issued_unix>.<expires_unix>.<mac>``
where mac is base64url(HMAC-SHA256(secret of kid, everything before it)),
unpadded. The tenant is "-" for a stream started on an open gateway (no API
keys configured).

Keys: (kid, secret) pairs in order; the first signs, every one verifies, so a
secret rotates without breaking live streams: add the new one first, keep the
old one listed until the tokens it signed have expired, then drop it.

Verification says which check failed, each a `ResumeDenied`
(PERMISSION_DENIED): not a token (format), a key id this gateway does not
list, a MAC that does not match (compared in constant time with
`hmac.compare_digest`), an expired token, a token of another tenant. A token
grants a read of its stream and nothing more: a cancel also needs the
tenant's credentials (the servicer: with keys, the key of the token's
tenant, which a resume needs anyway; on an open gateway there are none, and
a resumed call may cancel).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import RequestError, ResumeDenied

_VERSION = "v2"
MAX_TOKEN_LENGTH = 512
OPEN_TENANT = "-"  # the tenant of every stream on a gateway with no API keys
# Whole seconds, ASCII digits only: str.isdigit() also accepts "²" and "٣".
_SECONDS = re.compile(r"[0-9]{1,12}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STREAM = re.compile(r"[0-9a-f]{16,64}")
_MAC = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclass(frozen=True, slots=True)
class ResumeGrant:
    tenant: str
    stream_id: str
    kid: str
    issued_at: int
    expires_at: int


class ResumeTokens:
    def __init__(
        self,
        keys: Sequence[tuple[str, bytes]] | bytes,
        *,
        ttl_s: float,
        clock: Clock,
    ) -> None:
        if isinstance(keys, bytes):  # one bare secret: kid k0, as before rotation
            keys = [("k0", keys)]
        if not keys:
            raise ValueError("at least one resume secret is needed")
        for kid, secret in keys:
            if not _NAME.fullmatch(kid):
                raise ValueError(f"resume secret key id {kid!r} is not 1-64 of [A-Za-z0-9_-]")
            if len(secret) < 16:
                raise ValueError(f"the resume secret of kid {kid} must be at least 16 bytes")
        self._signing_kid = keys[0][0]
        self._keys = dict(keys)
        self._ttl_s = ttl_s
        self._clock = clock

    @property
    def kids(self) -> list[str]:
        return list(self._keys)

    def expiry(self) -> int:
        """The expiry a token issued now carries (whole seconds)."""
        return int(self._clock.wall() + self._ttl_s)

    def issue(self, stream_id: str, expires_at: int | None = None, *, tenant: str = "") -> str:
        if expires_at is None:
            expires_at = self.expiry()
        issued_at = int(self._clock.wall())
        payload = (
            f"{_VERSION}.{self._signing_kid}.{tenant or OPEN_TENANT}.{stream_id}."
            f"{issued_at}.{expires_at}"
        )
        return f"{payload}.{self._sign(self._keys[self._signing_kid], payload)}"

    def verify(self, token: str, *, tenant: str = "") -> ResumeGrant:
        """The stream a token grants to `tenant` (the caller's, "" when the
        gateway is open), or an error saying why not."""
        if not token:
            raise RequestError("resume.resume_token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise RequestError(f"resume.resume_token is longer than {MAX_TOKEN_LENGTH} characters")
        # Every token we issue is ASCII; anything else is not ours (and
        # hmac.compare_digest refuses non-ASCII str with a TypeError).
        parts = token.split(".") if token.isascii() else []
        if not (
            len(parts) == 7
            and parts[0] == _VERSION
            and _NAME.fullmatch(parts[1])
            and (parts[2] == OPEN_TENANT or _NAME.fullmatch(parts[2]))
            and _STREAM.fullmatch(parts[3])
            and _SECONDS.fullmatch(parts[4])
            and _SECONDS.fullmatch(parts[5])
            and _MAC.fullmatch(parts[6])
        ):
            raise ResumeDenied(
                "resume.resume_token is not a tokenrelay resume token (bad format)",
                reason="TOKEN_MALFORMED",
            )
        kid = parts[1]
        secret = self._keys.get(kid)
        if secret is None:
            raise ResumeDenied(
                f"resume.resume_token is signed with key id {kid}, which this gateway does not "
                "list (retired, or another deployment's); start a new stream",
                reason="TOKEN_UNKNOWN_KID",
            )
        payload, mac = ".".join(parts[:6]), parts[6]
        if not hmac.compare_digest(self._sign(secret, payload).encode(), mac.encode()):
            raise ResumeDenied(
                "resume.resume_token has an invalid signature (tampered, or issued by a "
                "deployment with another resume secret)",
                reason="TOKEN_BAD_MAC",
            )
        expires_at = int(parts[5])
        if expires_at <= self._clock.wall():
            raise ResumeDenied(
                "resume.resume_token has expired; resume with a fresher token (every "
                "checkpoint carries one) or start a new stream",
                reason="TOKEN_EXPIRED",
            )
        token_tenant = "" if parts[2] == OPEN_TENANT else parts[2]
        if token_tenant != tenant:
            raise ResumeDenied(
                "resume.resume_token belongs to another tenant than the caller's API key",
                reason="TOKEN_OTHER_TENANT",
            )
        return ResumeGrant(
            tenant=token_tenant,
            stream_id=parts[3],
            kid=kid,
            issued_at=int(parts[4]),
            expires_at=expires_at,
        )

    @staticmethod
    def _sign(secret: bytes, payload: str) -> str:
        mac = hmac.new(secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
