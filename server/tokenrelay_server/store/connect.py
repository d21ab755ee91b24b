"""Redis clients for the stores: one standalone server, or a Redis Cluster.

`connect(url, cluster=...)` is the one place that picks between redis-py's
`redis.asyncio.Redis` and `redis.asyncio.cluster.RedisCluster`; the stores
(redis.py, error_stats_redis.py, heartbeat.py) take either as a
`RedisClient` and use only what both offer: single-key commands, scripts
whose KEYS share one hash slot, and non-transactional pipelines.

On a cluster:
- the URL names any one node; the client discovers the others (CLUSTER
  SLOTS) and follows MOVED/ASK redirections itself;
- every multi-key script gets keys under one hash tag (`{stream_id}` for a
  stream's keys, `{G I}` for an error bucket); redis-py checks this on the
  client side before sending ("all keys must map to the same key slot"), and
  so does the server (CROSSSLOT);
- a database other than 0 does not exist, so the URL's database must be 0.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import MaxConnectionsError
from redis.typing import EncodableT

RedisClient: TypeAlias = Redis | RedisCluster

# How long a command waits for a free connection of the cluster client.
CLUSTER_CONNECTION_WAIT_S = 10.0


class InitializedRedisCluster(RedisCluster):
    """redis-py's async cluster client, set up before its first command runs.

    redis-py (8.1) resolves a command's policy, and may ask the startup node
    for it, before it initializes the client, and initializing closes the
    startup node's connections: when the first commands of a fresh client
    are concurrent (a burst of stream starts), some find their connection
    closed under them (`'NoneType' object has no attribute 'writelines'`;
    27 of 100 fresh clients given 12 concurrent GETs, here). Initializing
    first, under the client's own lock, makes the rest wait for it.

    Its connections are bounded, and a command waits for one: each node's
    pool in redis-py's cluster client raises `MaxConnectionsError` at once
    when it holds `max_connections` (there is no blocking pool for a
    cluster, as `BlockingConnectionPool` is for one server). So no more than
    `max_connections` commands run at once on the whole client (so on any
    node); the next waits up to `connection_wait_s` for one to finish, then
    raises `MaxConnectionsError` (a `ConnectionError`: the store's caller
    sees a store failure, not a bug).
    """

    def __init__(
        self, *args: Any, connection_wait_s: float = CLUSTER_CONNECTION_WAIT_S, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._connection_wait_s = connection_wait_s
        self._max_in_flight = int(kwargs.get("max_connections", 100))
        self._in_flight = asyncio.Semaphore(self._max_in_flight)

    async def execute_command(self, *args: EncodableT, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        try:
            async with asyncio.timeout(self._connection_wait_s):
                await self._in_flight.acquire()
        except TimeoutError:
            raise MaxConnectionsError(
                f"no free connection to the Redis Cluster within {self._connection_wait_s}s "
                f"({self._max_in_flight} commands in flight)"
            ) from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._in_flight.release()


def connect(url: str, *, cluster: bool = False, **client_kwargs: Any) -> RedisClient:
    """A client for the Redis (or, with `cluster`, the Redis Cluster) at `url`.

    `client_kwargs` go to `from_url`; on a cluster `max_connections` is per
    node. Nothing is connected yet: the first command connects.
    """
    if not cluster:
        return Redis.from_url(url, **client_kwargs)
    database = url.split("://", 1)[-1].partition("/")[2].split("?", 1)[0]
    if database not in ("", "0"):
        raise ValueError(
            f"a Redis Cluster has only database 0; the Redis URL names database {database}"
        )
    return InitializedRedisCluster.from_url(url, **client_kwargs)


def connection_kwargs(client: RedisClient) -> dict[str, Any]:
    """The settings each connection of `client` is made with (socket timeout, …)."""
    if isinstance(client, RedisCluster):
        return dict(client.get_connection_kwargs())
    return dict(client.connection_pool.connection_kwargs)


__all__ = ["InitializedRedisCluster", "RedisClient", "connect", "connection_kwargs"]
