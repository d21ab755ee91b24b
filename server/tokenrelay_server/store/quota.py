"""Per-tenant quotas (issue 13): concurrent streams and tokens per minute.

`admit` takes both in one step: a slot among the tenant's
`max_concurrent_streams` (running and detached generations), and a
reservation of the start's `params.max_tokens` (or the tenant's
`default_max_tokens`) against its `tokens_per_minute` over the last 60 s.
At the end, `release` frees the slot and settles the reservation to the
tokens really produced.

- `MemoryQuota`: one process; no await between the check and the write.
- `RedisQuota`: every replica's admissions through one Lua script (never
  check-then-write: two replicas cannot both take the last slot). A slot is
  a sorted-set member whose score is its expiry on the Redis server's clock;
  it is renewed with the generation's lease (`renew`, every third of the
  lease TTL) and lapses with it, so a killed replica's slots free
  themselves once their lease would have lapsed.

Key layout (P the prefix, T the tenant; `{T}` is the cluster hash tag)::

    P:quota:{T}:slots   zset  stream id → slot expiry (ms, Redis TIME)
    P:quota:{T}:tpm     zset  stream id → admission time (ms)
    P:quota:{T}:tokens  hash  stream id → tokens reserved, then used
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.errors import QuotaExceeded, QuotaUnavailable

WINDOW_S = 60.0
# When a stream slot frees is not known in advance: suggest this much.
STREAMS_RETRY_S = 1.0


@dataclass(frozen=True, slots=True)
class QuotaLimits:
    max_concurrent_streams: int | None = None
    tokens_per_minute: int | None = None


class Quota(Protocol):
    async def admit(
        self, tenant: str, stream_id: str, limits: QuotaLimits, reserve_tokens: int
    ) -> None:
        """Take a slot and reserve tokens for a new generation, or raise QuotaExceeded."""
        ...

    async def renew(self, tenant: str, stream_id: str) -> None:
        """Keep the generation's slot (with its lease)."""
        ...

    async def release(self, tenant: str, stream_id: str, used_tokens: int) -> None:
        """Free the slot; the reservation becomes `used_tokens`."""
        ...

    async def close(self) -> None: ...


def exceeded(tenant: str, limit: str, value: int, retry_after_s: float) -> QuotaExceeded:
    streams = limit == "max_concurrent_streams"
    what = "concurrent streams" if streams else "tokens in the last minute"
    return QuotaExceeded(
        f"tenant {tenant} is over its quota: {limit} = {value} {what}; retry in "
        f"{retry_after_s:.1f} s",
        tenant=tenant,
        limit=limit,
        retry_after_s=retry_after_s,
    )


@dataclass
class _TenantUse:
    slots: set[str] = field(default_factory=set)
    # stream id → [admitted at (monotonic), tokens]; dicts keep insertion order.
    tokens: dict[str, list[float]] = field(default_factory=dict)


class MemoryQuota:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._use: dict[str, _TenantUse] = {}

    async def admit(
        self, tenant: str, stream_id: str, limits: QuotaLimits, reserve_tokens: int
    ) -> None:
        use = self._use.setdefault(tenant, _TenantUse())
        now = self._clock.monotonic()
        for sid, (at, _) in list(use.tokens.items()):
            if at > now - WINDOW_S:
                break
            del use.tokens[sid]
        streams = limits.max_concurrent_streams
        if streams is not None and len(use.slots) >= streams:
            raise exceeded(tenant, "max_concurrent_streams", streams, STREAMS_RETRY_S)
        per_minute = limits.tokens_per_minute
        if per_minute is not None:
            used = sum(tokens for _, tokens in use.tokens.values())
            if used + reserve_tokens > per_minute:
                retry = WINDOW_S
                for at, tokens in use.tokens.values():
                    used -= tokens
                    if used + reserve_tokens <= per_minute:
                        retry = at + WINDOW_S - now
                        break
                raise exceeded(tenant, "tokens_per_minute", per_minute, max(retry, 0.001))
        use.slots.add(stream_id)
        use.tokens[stream_id] = [now, float(reserve_tokens)]

    async def renew(self, tenant: str, stream_id: str) -> None:
        return None  # a slot lives as long as this process

    async def release(self, tenant: str, stream_id: str, used_tokens: int) -> None:
        use = self._use.get(tenant)
        if use is None:
            return
        use.slots.discard(stream_id)
        entry = use.tokens.get(stream_id)
        if entry is not None:
            entry[1] = float(used_tokens)
        if not use.slots and not use.tokens:
            del self._use[tenant]

    def running(self, tenant: str) -> int:
        use = self._use.get(tenant)
        return 0 if use is None else len(use.slots)

    async def close(self) -> None:
        self._use.clear()


# KEYS: slots, tpm, tokens. ARGV: stream id, max streams (0: none), tokens per
# minute (0: none), tokens to reserve, slot TTL ms, window ms.
# Returns {1} admitted, or {0, limit, value, retry ms}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_streams = tonumber(ARGV[2])
local per_minute = tonumber(ARGV[3])
local reserve = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local window = tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if max_streams > 0 and not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= max_streams then
    return {0, 'max_concurrent_streams', max_streams, 1000}
  end
end
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - window)
if #old > 0 then
  redis.call('HDEL', KEYS[3], unpack(old))
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
end
if per_minute > 0 then
  local members = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  local used = 0
  local amounts = {}
  for i = 1, #members, 2 do
    local amount = tonumber(redis.call('HGET', KEYS[3], members[i]) or '0')
    amounts[#amounts + 1] = {tonumber(members[i + 1]), amount}
    used = used + amount
  end
  if used + reserve > per_minute then
    local retry = window
    for _, entry in ipairs(amounts) do
      used = used - entry[2]
      if used + reserve <= per_minute then
        retry = entry[1] + window - now
        break
      end
    end
    if retry < 1 then retry = 1 end
    return {0, 'tokens_per_minute', per_minute, retry}
  end
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], reserve)
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], window + ttl)
end
return {1}
"""

# KEYS: slots. ARGV: stream id, slot TTL ms. Only a slot still held is renewed.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], 60000 + tonumber(ARGV[2]))
  return 1
end
return 0
"""

# KEYS: slots, tpm, tokens. ARGV: stream id, used tokens.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
end
return 1
"""


class RedisQuota:
    """Quotas shared by every replica on one Redis (see the module docstring)."""

    def __init__(self, client: Redis, *, prefix: str = "tr", slot_ttl_s: float = 30.0) -> None:
        self._client = client
        self._prefix = prefix
        self._slot_ttl_ms = max(1, int(slot_ttl_s * 1000))
        self._admit = client.register_script(_ADMIT)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "tr", slot_ttl_s: float = 30.0) -> RedisQuota:
        return cls(Redis.from_url(url, decode_responses=True), prefix=prefix, slot_ttl_s=slot_ttl_s)

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self._prefix}:quota:{{{tenant}}}"
        return [f"{base}:slots", f"{base}:tpm", f"{base}:tokens"]

    async def admit(
        self, tenant: str, stream_id: str, limits: QuotaLimits, reserve_tokens: int
    ) -> None:
        try:
            result = await self._admit(
                keys=self._keys(tenant),
                args=[
                    stream_id,
                    limits.max_concurrent_streams or 0,
                    limits.tokens_per_minute or 0,
                    reserve_tokens,
                    self._slot_ttl_ms,
                    int(WINDOW_S * 1000),
                ],
            )
        except (RedisError, OSError) as error:
            raise QuotaUnavailable(
                f"tenant {tenant}'s quota cannot be checked: Redis is unreachable "
                f"({type(error).__name__}); nothing was started, retry with backoff"
            ) from None
        if int(result[0]) == 1:
            return
        _, limit, value, retry_ms = result
        raise exceeded(tenant, str(limit), int(value), int(retry_ms) / 1000)

    async def renew(self, tenant: str, stream_id: str) -> None:
        await self._renew(keys=self._keys(tenant)[:1], args=[stream_id, self._slot_ttl_ms])

    async def release(self, tenant: str, stream_id: str, used_tokens: int) -> None:
        await self._release(keys=self._keys(tenant), args=[stream_id, used_tokens])

    async def running(self, tenant: str) -> int:
        """Slots held now (expired ones not counted)."""
        now_s, now_us = await self._client.time()
        now_ms = now_s * 1000 + now_us // 1000
        return int(await self._client.zcount(self._keys(tenant)[0], f"({now_ms}", "+inf"))

    async def close(self) -> None:
        await self._client.aclose()
