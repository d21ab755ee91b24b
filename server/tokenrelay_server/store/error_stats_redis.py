"""Error statistics in Redis, shared by every replica (rules in error_stats.py).

Key layout (P is the prefix; G the bucket's granularity letter, m, h or d;
I the bucket's index, wall-clock seconds // its size)::

    P:errors:{GI}   hash   per (type, code, provider, model) four counters:
                           field "c" + K  errors
                           field "b" + K  bytes received, summed
                           field "t" + K  tokens received, summed
                           field "r" + K  recoverable errors
                           where K is the JSON array [type, code, provider, model]

Why this shape:

- One hash per bucket, so one bucket is one key, and the braces make `{GI}`
  its Redis Cluster hash tag: anything added to a bucket later lives in the
  same slot, and the script below (one bucket per call) is legal on a cluster.
- Each batch of records is summed per bucket first; each bucket then gets one
  script call that adds its counters and sets its TTL atomically, so a
  reader never sees a count without its sums. The calls of a batch go in one
  pipeline (one round trip), not a transaction: they touch different slots.
  They go as EVAL, not EVALSHA: on a Redis Cluster the pipeline is split per
  node and cannot load a script on a node that lacks it first (the script
  is a few hundred bytes; a batch is a handful of buckets).
- The TTL (rule 4) is relative, computed from the injected clock: a bucket
  lives until `Granularity.expires_at`, a week and a day for day buckets.
- Replicas add into the same keys (HINCRBY), so the statistics are the whole
  deployment's (rule 3).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.store.connect import RedisClient, connect
from tokenrelay_server.store.error_stats import (
    GRANULARITIES,
    AggregateKey,
    ErrorRecord,
    ErrorRow,
    Period,
    Totals,
    aggregate,
    rows_of,
)

# KEYS: the bucket. ARGV: TTL in ms, then (field, increment) pairs.
_ADD = """
for i = 2, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

_STATS = (
    ("c", "count"),
    ("b", "bytes_received"),
    ("t", "tokens_received"),
    ("r", "recoverable"),
)


def _field_key(key: AggregateKey) -> str:
    return json.dumps(list(key), separators=(",", ":"), ensure_ascii=False)


MAX_CONNECTIONS = 4


class RedisErrorStats:
    def __init__(
        self, client: RedisClient, *, prefix: str = "tr", clock: Clock | None = None
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._clock = clock or SystemClock()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "tr",
        clock: Clock | None = None,
        cluster: bool = False,
        max_connections: int = MAX_CONNECTIONS,
        pool_timeout_s: float = 5.0,
        **client_kwargs: Any,
    ) -> RedisErrorStats:
        """A client of its own with a bounded pool: the recorder writes from
        one task and Admin reads now and then, so `max_connections` (4) is
        plenty, and a slow Redis makes a write wait `pool_timeout_s` for a
        connection (then fail, counted as dropped) instead of opening new
        connections without bound."""
        client_kwargs["decode_responses"] = True
        client = connect(
            url,
            cluster=cluster,
            pool_timeout_s=pool_timeout_s,
            max_connections=max_connections,
            **client_kwargs,
        )
        return cls(client, prefix=prefix, clock=clock)

    def bucket_key(self, granularity_name: str, index: int) -> str:
        return f"{self._prefix}:errors:{{{granularity_name}{index}}}"

    async def record(self, records: Sequence[ErrorRecord]) -> None:
        if not records:
            return
        now = self._clock.wall()
        calls: list[tuple[str, list[str | int]]] = []
        for granularity in GRANULARITIES.values():
            by_index: dict[int, list[ErrorRecord]] = {}
            for record in records:
                by_index.setdefault(granularity.index(record.at), []).append(record)
            for index, bucket_records in by_index.items():
                ttl_ms = math.ceil((granularity.expires_at(index) - now) * 1000)
                if ttl_ms <= 0:
                    continue  # too old to be read by any period
                args: list[str | int] = [ttl_ms]
                for key, totals in aggregate(bucket_records).items():
                    field = _field_key(key)
                    for letter, name in _STATS:
                        value = getattr(totals, name)
                        if value:
                            args += [letter + field, value]
                calls.append((self.bucket_key(granularity.name, index), args))
        async with self._client.pipeline(transaction=False) as pipe:
            for bucket, args in calls:
                pipe.eval(_ADD, 1, bucket, *args)
            await pipe.execute()

    async def summary(self, period: Period) -> list[ErrorRow]:
        granularity = GRANULARITIES[period]
        indexes = granularity.indexes(self._clock.wall())
        async with self._client.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.hgetall(self.bucket_key(granularity.name, index))
            replies: list[dict[str, str]] = await pipe.execute()
        return rows_of(self._decode(reply) for reply in replies)

    @staticmethod
    def _decode(reply: dict[str, str]) -> dict[AggregateKey, Totals]:
        bucket: dict[AggregateKey, Totals] = {}
        names = dict(_STATS)
        for field, value in reply.items():
            letter, raw_key = field[:1], field[1:]
            name = names.get(letter)
            if name is None:
                continue
            error_type, code, provider, model = json.loads(raw_key)
            key = (int(error_type), str(code), str(provider), str(model))
            totals = bucket.setdefault(key, Totals())
            setattr(totals, name, getattr(totals, name) + int(value))
        return bucket

    async def close(self) -> None:
        await self._client.aclose()


__all__ = ["RedisErrorStats"]
