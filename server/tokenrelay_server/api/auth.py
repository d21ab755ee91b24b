"""Who is calling (issue 13): the tenant API key of every `Relay` call.

A call carries `authorization: Bearer <key>`. The key is hashed (SHA-256)
and looked up in the key store (the config file's [[auth.keys]], or Redis
shared by every replica); only the hash is ever stored or compared, and
neither the key nor its hash appears in an error or a log line (the key id
does). A missing, malformed, unknown or revoked key is UNAUTHENTICATED.

Lookups are cached for `cache_s` (2 s) on the injected clock, so a revoked
key is refused by every replica within that time (the issue asks for 5 s),
and a burst of calls costs one Redis round trip per key per 2 s. The cache
holds at most `MAX_CACHED` hashes (unknown ones too, so a flood of garbage
keys cannot turn into a flood of lookups); past that it starts over.

With no key store (no key configured) the gateway is open: every call is
the anonymous tenant "" with no quota; `serve` allows that only on a loopback
host unless `--allow-unauthenticated` (api/server.py).

SIGHUP re-reads the config file (cli.py): `reload` takes its [tenants.*]
limits and, when the keys come from the file, its [[auth.keys]], and drops
the cache, so a key revoked in the file is refused from the next call on. A
reload never opens a gateway that needs keys: a file with no key left
refuses every call; keys added to an open gateway's file turn keys on.

Health and reflection are other services and need no key; Admin has its own
token (api/admin.py).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tokenrelay_server.config.tenants import AuthConfig, TenantLimits
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import AuthUnavailable, PermissionDenied, Unauthenticated
from tokenrelay_server.engine.hub import ANONYMOUS, Caller
from tokenrelay_server.store.keys import FileKeys, KeyRecord, KeyStore
from tokenrelay_server.store.quota import QuotaLimits

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 256
MAX_CACHED = 10_000
_KEY = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces
_BEARER = re.compile(r"bearer\s+(\S.*)", re.IGNORECASE | re.DOTALL)

Metadata = Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated call: its key's id, its tenant and what the tenant may do."""

    key_id: str
    caller: Caller
    limits: TenantLimits

    @property
    def tenant(self) -> str:
        return self.caller.tenant

    def check_model(self, model: str) -> None:
        if not self.limits.allows(model):
            allowed = ", ".join(self.limits.models or ())
            raise PermissionDenied(
                f"tenant {self.tenant} may not use model {model!r} "
                f"(its models: {allowed or 'none'})"
            )


OPEN = Identity(key_id="", caller=ANONYMOUS, limits=TenantLimits())


class Authenticator:
    def __init__(
        self,
        keys: KeyStore | None,
        auth: AuthConfig,
        *,
        clock: Clock,
        cache_s: float = 2.0,
    ) -> None:
        self._keys = keys
        self._auth = auth
        self._clock = clock
        self._cache_s = cache_s
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}

    @property
    def required(self) -> bool:
        """Whether calls need a key (False: the gateway is open)."""
        return self._keys is not None

    async def authenticate(self, metadata: Metadata | None) -> Identity:
        if self._keys is None:
            return OPEN
        key = bearer_key(metadata)
        record = await self._lookup(hashlib.sha256(key.encode()).hexdigest())
        if record is None:
            raise Unauthenticated(
                "the API key is not known to this gateway (never issued, or revoked); "
                "use a key from `tokenrelay keys add`"
            )
        limits = self._auth.limits(record.tenant)
        caller = Caller(
            tenant=record.tenant,
            limits=QuotaLimits(
                max_concurrent_streams=limits.max_concurrent_streams,
                tokens_per_minute=limits.tokens_per_minute,
            ),
            default_max_tokens=limits.default_max_tokens,
        )
        return Identity(key_id=record.id, caller=caller, limits=limits)

    def reload(self, auth: AuthConfig) -> str:
        """Take a re-read config file's tenants and, unless the keys live
        elsewhere (Redis), its keys; says what changed (ids, never hashes)."""
        previous = self._auth
        self._auth = auth
        tenants = f"{len(auth.tenants)} tenant(s)"
        if self._keys is not None and not isinstance(self._keys, FileKeys):
            self.forget()
            return f"{tenants}; the keys live in the key store, not the file"
        records = [
            KeyRecord(id=entry.id, tenant=entry.tenant, sha256=entry.sha256) for entry in auth.keys
        ]
        if self._keys is None:
            if not records:
                return f"{tenants}; no key configured: still open"
            self._keys = FileKeys(records)
        else:
            self._keys.replace(records)
        self.forget()
        before = {entry.id: entry.sha256 for entry in previous.keys}
        after = {entry.id: entry.sha256 for entry in auth.keys}
        changed = ", ".join(
            [f"+{key_id}" for key_id in sorted(after.keys() - before.keys())]
            + [f"-{key_id}" for key_id in sorted(before.keys() - after.keys())]
            + [
                f"~{key_id}"
                for key_id in sorted(after)
                if before.get(key_id, after[key_id]) != after[key_id]
            ]
        )
        summary = f"{len(records)} key(s) ({changed or 'no key added or removed'}), {tenants}"
        if not records:
            summary += "; no key left: every call is refused until one is added"
        return summary

    def forget(self) -> None:
        """Drop the cache (tests; a reload)."""
        self._cache.clear()

    async def _lookup(self, sha256: str) -> KeyRecord | None:
        assert self._keys is not None
        now = self._clock.monotonic()
        cached = self._cache.get(sha256)
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            record = await self._keys.lookup(sha256)
        except Exception as error:
            log.warning("API key lookup failed: %s", type(error).__name__)
            raise AuthUnavailable(
                "the gateway cannot check API keys right now (its key store is unreachable); "
                "retry with backoff"
            ) from None
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()
        self._cache[sha256] = (record, now + self._cache_s)
        return record


def bearer_key(metadata: Metadata | None) -> str:
    """The key of `authorization: Bearer <key>`, or Unauthenticated saying
    what is wrong (never echoing what was sent)."""
    values = [value for name, value in metadata or () if name.lower() == "authorization"]
    if not values:
        raise Unauthenticated(
            "the call has no API key: send metadata `authorization: Bearer <key>`"
        )
    if len(values) > 1:
        raise Unauthenticated("the call has more than one `authorization` metadata entry")
    value = values[0]
    if isinstance(value, bytes):
        raise Unauthenticated("the `authorization` metadata must be text: `Bearer <key>`")
    match = _BEARER.fullmatch(value.strip())
    if match is None:
        raise Unauthenticated("the `authorization` metadata must be `Bearer <key>`")
    key = match.group(1).strip()
    if not _KEY.fullmatch(key):
        raise Unauthenticated(
            f"the API key is malformed (it must be 1-{MAX_KEY_LENGTH} printable ASCII "
            "characters without spaces)"
        )
    return key
