"""Where API keys are looked up (issue 13): only their SHA-256 is stored.

`FileKeys` holds the [[auth.keys]] of the config file; `RedisKeys`
(store/tenants_redis.py) the keys `tokenrelay keys add` put in Redis, shared
by every replica.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One API key, as stored: its id, its tenant and the SHA-256 of the key."""

    id: str
    tenant: str
    sha256: str
    created_at: float = 0.0


class KeyStore(Protocol):
    async def lookup(self, sha256: str) -> KeyRecord | None:
        """The key whose SHA-256 hex is `sha256`, or None (unknown or revoked)."""
        ...

    async def list(self) -> list[KeyRecord]:
        """Every key, by id."""
        ...

    async def close(self) -> None: ...


class FileKeys:
    """The keys of the config file (re-read on SIGHUP: `replace`)."""

    def __init__(self, records: Iterable[KeyRecord]) -> None:
        self._by_hash = {record.sha256: record for record in records}

    def replace(self, records: Iterable[KeyRecord]) -> None:
        """Serve `records` from now on (one assignment: a lookup sees the old
        set or the new one, never a mix)."""
        self._by_hash = {record.sha256: record for record in records}

    async def lookup(self, sha256: str) -> KeyRecord | None:
        return self._by_hash.get(sha256)

    async def list(self) -> list[KeyRecord]:
        return sorted(self._by_hash.values(), key=lambda record: record.id)

    async def close(self) -> None:
        return None
