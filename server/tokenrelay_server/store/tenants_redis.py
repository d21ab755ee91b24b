"""API keys in Redis (issue 13), shared by every replica.

Key layout (P is the prefix)::

    P:auth:keys  hash  SHA-256 hex of a key → JSON {"id", "tenant", "created_at"}
    P:auth:ids   hash  key id → SHA-256 hex

Only hashes are stored, never a key. `add` and `revoke` are one Lua script
each, so the two hashes never disagree. The gateway looks a key up on every
call, through `Authenticator`'s short cache (api/auth.py): a revoked key is
refused by every replica once that cache lapses (2 s).
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from tokenrelay_server.store.keys import KeyRecord

# KEYS: keys hash, ids hash. ARGV: sha256, id, record JSON. 0: the id is taken.
_ADD = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  return 0
end
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: keys hash, ids hash. ARGV: id. 0: no such id.
_REVOKE = """
local sha = redis.call('HGET', KEYS[2], ARGV[1])
if not sha then
  return 0
end
redis.call('HDEL', KEYS[1], sha)
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


class KeyIdTaken(ValueError):
    """`add` with an id that already names a key: pick another id (or revoke it first)."""


class RedisKeys:
    def __init__(self, client: Redis, *, prefix: str = "tr") -> None:
        self._client = client
        # Not a stream key: no hash tag; one slot for both (a cluster
        # needs the braces so the scripts may touch both hashes).
        self._keys = f"{prefix}:{{auth}}:keys"
        self._ids = f"{prefix}:{{auth}}:ids"
        self._add = client.register_script(_ADD)
        self._revoke = client.register_script(_REVOKE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "tr", **client_kwargs: Any) -> RedisKeys:
        return cls(Redis.from_url(url, decode_responses=True, **client_kwargs), prefix=prefix)

    async def lookup(self, sha256: str) -> KeyRecord | None:
        raw = await self._client.hget(self._keys, sha256)
        return None if raw is None else _record(sha256, raw)

    async def list(self) -> list[KeyRecord]:
        stored = await self._client.hgetall(self._keys)
        return sorted(
            (_record(sha, raw) for sha, raw in stored.items()), key=lambda record: record.id
        )

    async def add(self, record: KeyRecord) -> None:
        body = json.dumps(
            {"id": record.id, "tenant": record.tenant, "created_at": record.created_at}
        )
        added = await self._add(keys=[self._keys, self._ids], args=[record.sha256, record.id, body])
        if added == 0:
            raise KeyIdTaken(f"key id {record.id} is already in use; choose another --id")
        if added == -1:
            raise ValueError("this key is already stored under another id")

    async def revoke(self, key_id: str) -> bool:
        """Forget the key `key_id`; False when no key has that id."""
        return bool(await self._revoke(keys=[self._keys, self._ids], args=[key_id]))

    async def close(self) -> None:
        await self._client.aclose()


def _record(sha256: str | bytes, raw: str | bytes) -> KeyRecord:
    sha = sha256.decode() if isinstance(sha256, bytes) else sha256
    data = json.loads(raw)
    return KeyRecord(
        id=str(data["id"]),
        tenant=str(data["tenant"]),
        sha256=sha,
        created_at=float(data.get("created_at", 0.0)),
    )
