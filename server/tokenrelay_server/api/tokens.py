"""Resume tokens: HMAC-signed, bound to one stream, with an expiry.

Format: ``v1.<stream_id>.<expires_unix>.<signature>`` where the signature is
base64url(HMAC-SHA256(secret, "v1.<stream_id>.<expires_unix>")), unpadded.
Replicas that share the secret accept each other's tokens; a token signed with
another secret, or edited in any way, is refused. The token carries no data
beyond the stream id, so a leaked token grants at most a read of that stream.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass

from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import RequestError, ResumeDenied, StreamNotFound

_VERSION = "v1"
MAX_TOKEN_LENGTH = 512
# Whole seconds, ASCII digits only: str.isdigit() also accepts "²" and "٣",
# which int() then refuses (or, for "٣", reads as 3).
_EXPIRY = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True, slots=True)
class ResumeGrant:
    stream_id: str
    expires_at: int


class ResumeTokens:
    def __init__(self, secret: bytes, *, ttl_s: float, clock: Clock) -> None:
        if len(secret) < 16:
            raise ValueError("the resume secret must be at least 16 bytes")
        self._secret = secret
        self._ttl_s = ttl_s
        self._clock = clock

    def expiry(self) -> int:
        """The expiry a token issued now carries (whole seconds)."""
        return int(self._clock.wall() + self._ttl_s)

    def issue(self, stream_id: str, expires_at: int | None = None) -> str:
        if expires_at is None:
            expires_at = self.expiry()
        payload = f"{_VERSION}.{stream_id}.{expires_at}"
        return f"{payload}.{self._sign(payload)}"

    def verify(self, token: str) -> ResumeGrant:
        """The stream a token grants, or an error saying why not."""
        if not token:
            raise RequestError("resume.resume_token is empty")
        if len(token) > MAX_TOKEN_LENGTH:
            raise RequestError(f"resume.resume_token is longer than {MAX_TOKEN_LENGTH} characters")
        # Every token we issue is ASCII; anything else is not ours (and
        # hmac.compare_digest refuses non-ASCII str with a TypeError).
        parts = token.split(".") if token.isascii() else []
        if len(parts) != 4 or parts[0] != _VERSION or not _EXPIRY.fullmatch(parts[2]):
            raise ResumeDenied("resume.resume_token is not a tokenrelay resume token")
        payload, signature = ".".join(parts[:3]), parts[3]
        if not hmac.compare_digest(self._sign(payload).encode(), signature.encode()):
            raise ResumeDenied(
                "resume.resume_token has an invalid signature (tampered, or issued by a "
                "deployment with another resume secret)"
            )
        expires_at = int(parts[2])
        if expires_at <= self._clock.wall():
            raise StreamNotFound("resume.resume_token has expired; start a new stream")
        return ResumeGrant(stream_id=parts[1], expires_at=expires_at)

    def _sign(self, payload: str) -> str:
        mac = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
