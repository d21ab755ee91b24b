"""The Redis stream log: any replica can serve a resume, and a chunk survives
the replica that produced it.

Key layout (P is the prefix, S the stream id, K an idempotency key)::

    P:{S}:meta   hash    meta (encode_meta JSON), last_seq, notices, ended,
                         cancel, idem (the full idempotency key name), idem_at
    P:{S}:log    stream  one entry per log entry, ID "s-n", field "e" holds
                         encode_entry JSON
    P:{S}:lease  string  the owner's name, with PX = the lease TTL
    P:idem:K     string  S

Why this shape:

- The braces make `{S}` the Redis Cluster hash tag, so the three keys of one
  stream live in one slot and every multi-key Lua script below is legal on a
  cluster. The idempotency key lives elsewhere (it is looked up by K, not S),
  so nothing here touches it together with the stream's keys in one script.
- Entry IDs are the memory store's log positions (memory.py): chunk s is
  "s-0", the notices after chunk s are "s-1", "s-2", …, the End is
  "total_seq+1-0". So `XRANGE key (S-0 +` is exactly "everything after chunk
  S" (rule 1 of base.py) and `XREAD … S-0` wakes on exactly that.
- Appends go through one writer per store (group commit,
  store/group_commit.py): the appends of every stream of the process that
  arrive while a batch is on the wire are sent together, as one EVALSHA of
  `_APPEND_MANY` per hash slot (one in all on a single server), pipelined.
  For each stream the script checks the seq rules and the epoch against its
  hash, XADDs and refreshes the retention TTL atomically; a caller's
  `append` returns once its batch is acknowledged (durable before visible).
- Every key carries a TTL of `retention_s`, refreshed on append (rule 5).
  The idempotency key cannot be refreshed in the same script (other slot), so
  it gets a longer TTL (`_IDEM_TTL_FACTOR`) and the append script asks for a
  separate refresh once a quarter of the retention has passed since the last
  one. An idempotency key that outlives its stream is treated as free.
- Readers waiting for a stream to grow (`wait`) share one watcher
  (store/follow.py): on one server a single XREAD BLOCK over every watched
  log key, on the blocking client (a pool of its own, so it never takes a
  connection appends need); on a cluster, one pipelined poll of the watched
  logs' last IDs every `follow_poll_s`. 1,000 followers, one connection.

Failures (issue 9; the tree is in store/errors.py):

- Pools are bounded `BlockingConnectionPool`s (`max_connections`): a command
  waits for a free connection (up to `pool_timeout_s`) instead of failing.
- redis-py's own retries are off: a retried EVALSHA whose first run may have
  landed must be resolved, not repeated blindly. `_run` retries transient
  errors (connection lost, timeouts, no free connection, LOADING) with a
  capped backoff for up to `retry_window_s`, then raises `StoreUnavailable`.
  Nothing from redis-py escapes the store.
- A batch whose outcome is unknown is retried with `retry = 1`: the script
  then first asks, per stream, whether its entries are already the tail of the log (stored
  identically, entry for entry) and answers success if so; otherwise it is
  checked and applied as usual (a gap is still refused). Only the stream's
  one writer (see fencing) appends, so "the batch is the tail" means "my
  earlier try landed".
- Fencing (DESIGN.md guarantee 5): the meta hash holds the stream's `epoch`.
  `acquire_lease` raises it whenever the lease changes hands and returns it;
  every append carries the writer's epoch and the script refuses a stale one
  (`StreamFenced`) in the same atomic step. An End must carry the total seq
  of the log it closes (`TR_ORDER` otherwise).
- `ping` (the server's health probe) uses a one-connection client of its own,
  so a busy command pool never makes a live store look dead.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import lru_cache, partial
from typing import Any, TypeVar

import orjson
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenrelay_server.core.clock import Clock, SystemClock
from tokenrelay_server.core.errors import StreamNotFound
from tokenrelay_server.core.model import Chunk, LogEntry, Notice, StreamMeta
from tokenrelay_server.store.base import AppendDone, AppendObserver, ReadStart, StreamTail
from tokenrelay_server.store.codec import decode_entry, decode_meta, encode_meta, entry_json
from tokenrelay_server.store.connect import RedisClient, connect, connection_kwargs
from tokenrelay_server.store.errors import StoreError, StoreUnavailable, StreamFenced
from tokenrelay_server.store.follow import BlockingWatcher, PollingWatcher
from tokenrelay_server.store.group_commit import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_WAIT_S,
    GroupCommit,
    PendingAppend,
)
from tokenrelay_server.store.heartbeat import RedisHeartbeats
from tokenrelay_server.store.seal import SealBroken, Sealer

T = TypeVar("T")

# The idempotency key is refreshed every `retention / _IDEM_REFRESH_DIVISOR`
# at most, so its TTL must cover that gap on top of the stream's retention.
_IDEM_REFRESH_DIVISOR = 4
_IDEM_TTL_FACTOR = 1.0 + 1.0 / _IDEM_REFRESH_DIVISOR

# Redis ends an expired BLOCK from its timer, up to 1/hz late (100 ms at the
# default hz 10), and the reply still has to travel: a blocking read must be
# asked to end this much before the client's socket timeout would fire.
_BLOCK_SLACK_S = 0.5
# `from_url` gives the blocking client a socket timeout of slice + slack, so a
# follower parked on a dead connection notices within a few seconds.
_BLOCK_SLICE_S = 5.0

# The watcher's client: its one blocking read, and one to spare while a
# connection that broke is replaced.
_WATCHER_CONNECTIONS = 2
# On a Redis Cluster, how often the watcher asks whether followed logs grew.
DEFAULT_FOLLOW_POLL_S = 0.01

# How many times `create` retries claiming an idempotency key that other
# creators keep changing under it (each retry means someone else progressed).
_CLAIM_ATTEMPTS = 8

# Errors raised by the scripts start with one of these words, so they can be
# turned back into the exceptions the memory store raises.
_UNKNOWN = "TR_UNKNOWN"
_ORDER = "TR_ORDER"
_FENCED = "TR_FENCED"


# Errors worth retrying: the command may not have run, or its reply was lost.
# (BusyLoadingError, a server loading its data after a restart, is a
# ConnectionError; so is the pool's "No connection available.".)
def _closed_under_us(error: AttributeError | RuntimeError) -> bool:
    """redis-py's way of saying a connection closed while a command used it
    (a cluster client re-initializing after a node restart closes them under
    concurrent commands; on uvloop a write to a closed transport raises):
    `'NoneType' object has no attribute 'writelines'` and uvloop's
    `unable to perform operation on <TCPTransport closed=True …>; the handler
    is closed`. Transient, like any lost connection: the nemesis saw both
    surface as INTERNAL on a Redis Cluster."""
    text = str(error)
    if isinstance(error, AttributeError):
        return text.startswith("'NoneType' object has no attribute")
    return "handler is closed" in text or "closed=True" in text


def _lost_connection(error: AttributeError | RuntimeError) -> RedisConnectionError:
    """What `_closed_under_us` recognised, as the transient error it is."""
    return RedisConnectionError(f"the connection closed mid-command: {error}")


_TRANSIENT: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    OSError,
)
# The backoff between retries of a transient error: doubling from the first
# to the cap, never past the window.
_RETRY_FIRST_S = 0.02
_RETRY_CAP_S = 0.5
# The health probe's own connection gives up this fast.
_PING_TIMEOUT_S = 1.0

# KEYS: meta, log, lease. ARGV: encoded meta, retention ms, idem key name or "",
# now ms. A create replaces whatever an earlier stream of the same id left.
_CREATE = """
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'last_seq', 0, 'notices', 0, 'ended', '0')
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'idem', ARGV[3], 'idem_at', ARGV[4])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The appends of a batch (group commit, store/group_commit.py): one call for
# any number of streams whose keys share a slot (on one server: all of them).
# KEYS: meta, log of each stream. ARGV: retention ms, now ms, idem refresh
# interval ms, retry (0/1), and the batch as one JSON array (one argument for
# the whole batch: packing many small arguments was most of the client's
# cost per append), an item per stream: [epoch ("" = unfenced), [[kind, seq,
# payload], ...]] (an End's seq is its total_seq). Each stream's entries are
# checked before anything of them is written, so a rejected append leaves
# that log unchanged, and one stream's refusal touches no other. A retry whose
# entries are already the log's tail (stored identically) succeeds without
# writing. Answers one string per stream: "" stored, "+" and the idempotency
# key name (stored, and the key's TTL is due for a refresh), or "!" and the
# refusal (TR_UNKNOWN, TR_FENCED, TR_ORDER ...).
_APPEND_MANY = """
local retention, now, refresh = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local retry = ARGV[4] == '1'

local function append_one(meta, log, epoch, entries)
  local state = redis.call('HMGET', meta, 'last_seq', 'notices', 'ended', 'idem', 'idem_at',
    'epoch')
  if not state[1] then
    return '!TR_UNKNOWN stream is unknown or expired'
  end
  if epoch ~= '' and tonumber(state[6] or 0) ~= tonumber(epoch) then
    return string.format('!TR_FENCED epoch %d is stale: the stream is at epoch %s', epoch,
      state[6] or '0')
  end
  local count = #entries
  if retry and count > 0 then
    local stored = redis.call('XREVRANGE', log, '+', '-', 'COUNT', count)
    if #stored == count then
      local same = true
      for j = 1, count do
        if stored[count + 1 - j][2][2] ~= entries[j][3] then
          same = false
          break
        end
      end
      if same then
        return ''
      end
    end
  end
  local last_seq = tonumber(state[1])
  local notices = tonumber(state[2])
  local ended = state[3] == '1'
  local ids = {}
  for j = 1, count do
    if ended then
      return '!TR_ORDER stream has ended; nothing can follow its End'
    end
    local kind, seq = entries[j][1], entries[j][2]
    if kind == 'c' then
      if seq ~= last_seq + 1 then
        return string.format('!TR_ORDER chunk seq %d does not follow %d', seq, last_seq)
      end
      last_seq = seq
      notices = 0
      ids[j] = string.format('%d-0', last_seq)
    elseif kind == 'n' then
      notices = notices + 1
      ids[j] = string.format('%d-%d', last_seq, notices)
    else
      if seq ~= last_seq then
        return string.format(
          '!TR_ORDER the End says total_seq %d but the log holds %d chunks', seq, last_seq)
      end
      ended = true
      ids[j] = string.format('%d-0', last_seq + 1)
    end
  end
  for j = 1, count do
    redis.call('XADD', log, ids[j], 'e', entries[j][3])
  end
  redis.call('HSET', meta, 'last_seq', last_seq, 'notices', notices,
    'ended', ended and '1' or '0')
  redis.call('PEXPIRE', meta, retention)
  redis.call('PEXPIRE', log, retention)
  if state[4] and now - tonumber(state[5] or 0) >= refresh then
    redis.call('HSET', meta, 'idem_at', ARGV[2])
    return '+' .. state[4]
  end
  return ''
end

local batch = cjson.decode(ARGV[5])
local out = {}
for s = 1, #batch do
  out[s] = append_one(KEYS[2 * s - 1], KEYS[2 * s], batch[s][1], batch[s][2])
end
return out
"""

# KEYS: meta, log. ARGV: XRANGE start, limit. Returns {state, payload...} where
# state is 0 (unknown stream), 1 (live) or 2 (live and ended).
_READ = """
local ended = redis.call('HGET', KEYS[1], 'ended')
if not ended then
  return {0}
end
local out = {ended == '1' and 2 or 1}
local limit = tonumber(ARGV[2])
if limit > 0 then
  for _, item in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', limit)) do
    out[#out + 1] = item[2][2]
  end
end
return out
"""

# A resume's first look (open_read). KEYS: meta, log. ARGV: XRANGE start,
# limit. Returns {} for an unknown stream, else {meta, last_seq, ended,
# payload...}.
_OPEN_READ = """
local state = redis.call('HMGET', KEYS[1], 'meta', 'last_seq', 'ended')
if not state[1] then
  return {}
end
local out = {state[1], state[2] or '0', state[3] or '0'}
for _, item in ipairs(redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))) do
  out[#out + 1] = item[2][2]
end
return out
"""

# KEYS: meta, log, lease. Returns the idempotency key name, if the stream had one.
_DELETE = """
local idem = redis.call('HGET', KEYS[1], 'idem')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
return idem
"""

# KEYS: the key. ARGV: expected value. Deletes the key only if it holds that value.
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: the idempotency key. ARGV: stale stream id, new stream id, TTL ms.
_SWAP_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
"""

# KEYS: meta, lease. ARGV: owner, TTL ms. The holder may acquire again (which
# extends the lease and keeps the epoch), as in the memory store; a lease that
# changes hands (or is taken after it lapsed) raises the epoch. Returns the
# epoch the owner now writes with, or 0 when someone else holds the lease.
_ACQUIRE_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('TR_UNKNOWN stream is unknown or expired')
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
if holder then
  return tonumber(redis.call('HGET', KEYS[1], 'epoch') or 0)
end
return redis.call('HINCRBY', KEYS[1], 'epoch', 1)
"""

# KEYS: meta, lease. ARGV: owner, TTL ms, the owner's epoch ("" = unknown).
# A lease that lapsed while nobody took the stream over (the epoch is still
# ours) is taken back: only a takeover fences a writer.
_RENEW_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local holder = redis.call('GET', KEYS[2])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if not holder and ARGV[3] ~= '' and
    tonumber(redis.call('HGET', KEYS[1], 'epoch') or 0) == tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: meta, lease. A lease of an expired stream is no lease.
_LEASE_OWNER = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
return redis.call('GET', KEYS[2])
"""

# KEYS: meta. ARGV: reason.
_REQUEST_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('TR_UNKNOWN stream is unknown or expired')
end
return redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
"""


def stream_key(prefix: str, stream_id: str, part: str) -> str:
    """The key of one part (meta, log, lease) of a stream: `{stream_id}` is
    its hash tag, so a stream's keys share a Redis Cluster slot."""
    return f"{prefix}:{{{stream_id}}}:{part}"


@lru_cache(maxsize=1 << 14)
def _log_key_bytes(prefix: str, stream_id: str) -> tuple[bytes, bytes]:
    """A stream's meta and log keys (`RedisStore._log_keys`) as bytes, made
    once per live stream rather than once per batch it is in."""
    return (
        stream_key(prefix, stream_id, "meta").encode(),
        stream_key(prefix, stream_id, "log").encode(),
    )


class RedisStore:
    """The `StreamStore` on Redis (see the module docstring for the key layout).

    `client` serves every command except the blocking read in `wait`, which
    uses `blocking_client` (default: `client`; `from_url` gives it a pool of
    its own), and `ping`, which uses `probe_client` (default: `client`). The
    store owns the clients: `close()` closes them. Give the clients no retry
    of their own (`from_url` does so): `_run` retries, within
    `retry_window_s`, and resolves appends whose outcome it does not know.

    TTLs (retention, leases) run on the Redis server's clock; `clock` only
    dates the idempotency-key refreshes. Retries wait on the event loop's
    clock: an outage of Redis is real time, whatever the injected clock says.
    """

    in_process = False

    def __init__(
        self,
        client: RedisClient,
        *,
        blocking_client: RedisClient | None = None,
        probe_client: RedisClient | None = None,
        retention_s: float = 3600.0,
        prefix: str = "tr",
        clock: Clock | None = None,
        retry_window_s: float = 10.0,
        label: str = "the Redis store",
        group_commit_max_entries: int = DEFAULT_MAX_ENTRIES,
        group_commit_max_wait_s: float = DEFAULT_MAX_WAIT_S,
        group_commit_max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        append_observer: AppendObserver | None = None,
        sealer: Sealer | None = None,
        follow_poll_s: float = DEFAULT_FOLLOW_POLL_S,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            # A brace in the prefix would become the hash tag and put every
            # stream in one cluster slot.
            raise ValueError(f"the key prefix must not contain braces: {prefix!r}")
        if retention_s <= 0:
            raise ValueError(f"retention_s must be positive, not {retention_s}")
        if retry_window_s < 0:
            raise ValueError(f"retry_window_s must not be negative, not {retry_window_s}")
        self._client = client
        self._blocking = blocking_client or client
        self._probe = probe_client or client
        self._retention_ms = _ms(retention_s)
        self._idem_ttl_ms = _ms(retention_s * _IDEM_TTL_FACTOR)
        self._idem_refresh_ms = _ms(retention_s / _IDEM_REFRESH_DIVISOR)
        self._prefix = prefix
        self._clock = clock or SystemClock()
        self._retry_window_s = retry_window_s
        self.label = label
        self._block_slice_s = _block_slice(self._blocking)
        register = client.register_script
        self._create = register(_CREATE)
        self._append_many = register(_APPEND_MANY)
        self._read = register(_READ)
        self._open_read = register(_OPEN_READ)
        self._delete = register(_DELETE)
        self._delete_if_equal = register(_DELETE_IF_EQUAL)
        self._swap_if_equal = register(_SWAP_IF_EQUAL)
        self._acquire_lease = register(_ACQUIRE_LEASE)
        self._renew_lease = register(_RENEW_LEASE)
        self._lease_owner = register(_LEASE_OWNER)
        self._request_cancel = register(_REQUEST_CANCEL)
        # Replica heartbeats live beside the streams, on the same client.
        self.heartbeats = RedisHeartbeats(client, prefix=prefix)
        self._cluster = isinstance(client, RedisCluster)
        # Values at rest: sealed when the gateway has resume secrets (every
        # replica has the same ones); readable either way.
        self._sealer = sealer
        # Told of each batch once it is durable (ObservableStore in base.py).
        self.append_observer = append_observer
        # Every reader waiting for a stream owned elsewhere waits on one
        # watcher (store/follow.py): one blocking read on a single server,
        # one pipelined poll per follow_poll_s on a cluster.
        self._watcher: BlockingWatcher | PollingWatcher = (
            PollingWatcher(client, poll_s=follow_poll_s)
            if self._cluster
            else BlockingWatcher(
                self._blocking, client, prefix=prefix, block_slice_s=self._block_slice_s
            )
        )
        self._commits = GroupCommit(
            self._send_batch,
            max_entries=group_commit_max_entries,
            max_wait_s=group_commit_max_wait_s,
            max_in_flight=group_commit_max_in_flight,
            on_batch=self._observe_batch,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retention_s: float = 3600.0,
        prefix: str = "tr",
        clock: Clock | None = None,
        max_connections: int = 128,
        cluster: bool = False,
        pool_timeout_s: float = 5.0,
        retry_window_s: float = 10.0,
        group_commit_max_entries: int = DEFAULT_MAX_ENTRIES,
        group_commit_max_wait_s: float = DEFAULT_MAX_WAIT_S,
        group_commit_max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        sealer: Sealer | None = None,
        follow_poll_s: float = DEFAULT_FOLLOW_POLL_S,
        **client_kwargs: Any,
    ) -> RedisStore:
        """Connect to the Redis at `url` (redis://, rediss://, unix://), or
        with `cluster` to the Redis Cluster `url` names a node of (connect.py).

        `max_connections` bounds the command pool (a command waits up to
        `pool_timeout_s` for a free connection; longer is a transient error,
        retried within `retry_window_s`). Readers waiting in `wait` share
        one watcher (store/follow.py), on a client of its own with
        `_WATCHER_CONNECTIONS` connections, however many they are.
        `client_kwargs` go to every client, except that the blocking client's
        socket timeout is raised to fit a slice of its blocking read (see
        `_BLOCK_SLICE_S`).
        """
        if max_connections < 1:
            raise ValueError(f"max_connections ({max_connections}) must be at least 1")
        client_kwargs["decode_responses"] = False
        # No retries inside redis-py: `_run` owns them (see the module docstring).
        client_kwargs["retry"] = Retry(NoBackoff(), 0)

        def client_of(size: int, **overrides: Any) -> RedisClient:
            settings = {**client_kwargs, "max_connections": size, **overrides}
            return connect(url, cluster=cluster, pool_timeout_s=pool_timeout_s, **settings)

        client = client_of(max_connections)
        blocking_client = client_of(
            _WATCHER_CONNECTIONS,
            socket_timeout=max(
                client_kwargs.get("socket_timeout") or 0.0, _BLOCK_SLICE_S + _BLOCK_SLACK_S
            ),
        )
        probe_client = client_of(
            1, socket_timeout=_PING_TIMEOUT_S, socket_connect_timeout=_PING_TIMEOUT_S
        )
        return cls(
            client,
            blocking_client=blocking_client,
            probe_client=probe_client,
            retention_s=retention_s,
            prefix=prefix,
            clock=clock,
            retry_window_s=retry_window_s,
            label=f"the Redis store at {_safe_url(url)}",
            group_commit_max_entries=group_commit_max_entries,
            group_commit_max_wait_s=group_commit_max_wait_s,
            group_commit_max_in_flight=group_commit_max_in_flight,
            sealer=sealer,
            follow_poll_s=follow_poll_s,
        )

    # -- failures --------------------------------------------------------------------

    async def _run(self, what: str, stream_id: str, call: Callable[[bool], Awaitable[T]]) -> T:
        """`call(retried)`, retried on transient errors for up to the retry
        window; our scripts' refusals become the memory store's exceptions;
        anything else from redis-py becomes a `StoreError`."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        delay = _RETRY_FIRST_S
        retried = False
        while True:
            try:
                try:
                    return await call(retried)
                except (AttributeError, RuntimeError) as error:
                    if not _closed_under_us(error):
                        raise
                    raise _lost_connection(error) from error
            except _TRANSIENT as error:
                _raise_if_cancelling()
                now = loop.time()
                if deadline is None:
                    deadline = now + self._retry_window_s
                if now >= deadline:
                    raise StoreUnavailable(
                        f"{self.label} did not answer for {self._retry_window_s:g} s "
                        f"({what}: {type(error).__name__}: {error}); retry later"
                    ) from None
                await asyncio.sleep(min(delay, deadline - now))
                delay = min(delay * 2, _RETRY_CAP_S)
                retried = True
            except ResponseError as error:
                raise _translate(error, stream_id, self.label) from None
            except RedisError as error:
                raise StoreError(
                    f"{self.label} failed ({what}: {type(error).__name__}: {error})"
                ) from None

    async def ping(self) -> None:
        """Raise `StoreUnavailable` unless Redis answers now (no retries: the
        server's health probe asks again soon)."""
        try:
            await self._probe.ping()
        except (RedisError, OSError) as error:
            _raise_if_cancelling()
            raise StoreUnavailable(
                f"{self.label} is unreachable ({type(error).__name__}: {error})"
            ) from None

    # -- lifecycle ---------------------------------------------------------------

    async def create(self, meta: StreamMeta) -> tuple[StreamMeta, bool]:
        key = meta.idempotency_key
        idem_key = self._idem_key(key) if key else ""
        stream_id = meta.stream_id
        if key:
            # The common retry: the key already names a live stream.
            existing = await self._stream_named_by(idem_key)
            if existing is not None:
                return existing, False
        # Write the stream before claiming the key, so that a key always points
        # to a stream that exists or existed: a pointer to a missing stream is
        # stale, never "about to be written". (Creating again is harmless.)
        args: list[str | int] = [
            self._seal(encode_meta(meta).encode(), stream_id),
            self._retention_ms,
            idem_key,
            self._now_ms(),
        ]
        await self._run(
            "create",
            stream_id,
            lambda _: self._create(keys=self._stream_keys(stream_id), args=args),
        )
        if not key:
            return meta, True
        for _ in range(_CLAIM_ATTEMPTS):
            claimed = await self._run(
                "create",
                stream_id,
                lambda retried: self._claim(idem_key, stream_id, retried),
            )
            if claimed:
                return meta, True
            holder = await self._run("create", stream_id, lambda _: self._client.get(idem_key))
            if holder is None:
                continue  # it expired just now; claim it again
            holder_id = _text(holder)
            if holder_id == stream_id:
                # A concurrent create of this very stream id won the claim.
                stored = await self.get_meta(holder_id)
                return (stored or meta), False
            held = await self.get_meta(holder_id)
            if held is not None:
                await self._run(
                    "create", stream_id, lambda _: self._delete(keys=self._stream_keys(stream_id))
                )
                return held, False
            # The holder's stream expired or was deleted: take the key over,
            # unless another creator just did.
            swap_args: list[str | int] = [holder_id, stream_id, self._idem_ttl_ms]
            if await self._run("create", stream_id, partial(self._swap, idem_key, swap_args)):
                return meta, True
        await self._run(
            "create", stream_id, lambda _: self._delete(keys=self._stream_keys(stream_id))
        )
        raise StoreError(
            f"could not claim idempotency key {key!r}: it kept changing; retry the create"
        )

    async def _claim(self, idem_key: str, stream_id: str, retried: bool) -> bool:
        """SET NX of the idempotency key; a retry whose first try may have
        landed counts the key holding our id as claimed."""
        if await self._client.set(idem_key, stream_id, nx=True, px=self._idem_ttl_ms):
            return True
        if retried:
            holder = await self._client.get(idem_key)
            return holder is not None and _text(holder) == stream_id
        return False

    async def _swap(self, idem_key: str, args: list[str | int], _retried: bool) -> Any:
        return await self._swap_if_equal(keys=[idem_key], args=args)

    async def find_idempotent(self, idempotency_key: str) -> StreamMeta | None:
        return await self._stream_named_by(self._idem_key(idempotency_key))

    async def get_meta(self, stream_id: str) -> StreamMeta | None:
        key = self._key(stream_id, "meta")
        raw = await self._run("get_meta", stream_id, lambda _: self._client.hget(key, "meta"))
        return None if raw is None else decode_meta(self._open(raw, stream_id))

    async def delete(self, stream_id: str) -> None:
        idem_key = await self._run(
            "delete", stream_id, lambda _: self._delete(keys=self._stream_keys(stream_id))
        )
        if idem_key is not None:
            await self._run(
                "delete",
                stream_id,
                lambda _: self._delete_if_equal(keys=[idem_key], args=[stream_id]),
            )

    # -- the log -----------------------------------------------------------------

    async def append(
        self, stream_id: str, entries: Sequence[LogEntry], *, epoch: int | None = None
    ) -> None:
        """Queue the entries for the next batch (group commit) and return once
        that batch is acknowledged. Encoded once: a batch retried after an
        unknown outcome sends the very bytes it sent before, which is what
        the script's "already the tail" check compares."""
        await self._commits.submit(
            stream_id, self._payload(stream_id, entries, epoch), len(entries)
        )

    def post_append(
        self, stream_id: str, entries: Sequence[LogEntry], done: AppendDone, *, epoch: int | None
    ) -> None:
        """`append` with a callback (SubmitsAppends in base.py): `done` is
        told once the batch holding the entries is answered."""
        self._commits.post(stream_id, self._payload(stream_id, entries, epoch), len(entries), done)

    async def _send_batch(self, batch: Sequence[PendingAppend]) -> list[BaseException | None]:
        """Store a batch of appends (each of another stream): one script call
        per hash slot (one in all on a single server), in one round trip.
        Transient failures retry the whole batch within the retry window
        (with `retry`, so appends whose first run landed are not repeated)."""
        answers = await self._run(
            "append", f"a batch of {len(batch)} streams", partial(self._append_batch, batch)
        )
        outcomes, refresh = self._outcomes(batch, answers)
        if refresh:
            # Best effort: the refresh is asked for again a quarter of the
            # retention later if this one is lost.
            with contextlib.suppress(StoreError):
                await self._run("append", "", partial(self._refresh_idem, refresh))
        return outcomes

    def _outcomes(
        self, batch: Sequence[PendingAppend], answers: Sequence[Any]
    ) -> tuple[list[BaseException | None], list[str]]:
        """Each append's outcome (None: stored), and the idempotency keys due
        for a refresh."""
        outcomes: list[BaseException | None] = []
        refresh: list[str] = []
        for pending, answer in zip(batch, answers, strict=True):
            if isinstance(answer, BaseException):
                outcomes.append(answer)
                continue
            text = _text(answer)
            if text.startswith("!"):
                outcomes.append(_refusal(text[1:], pending.stream_id, self.label))
                continue
            if text.startswith("+"):
                refresh.append(text[1:])
            outcomes.append(None)
        return outcomes, refresh

    async def _append_batch(self, batch: Sequence[PendingAppend], retried: bool) -> list[Any]:
        """One run of the batch: an answer per append, in batch order (a
        string from the script, or the ResponseError of its group)."""
        head = [
            b"%d" % self._retention_ms,
            b"%d" % self._now_ms(),
            b"%d" % self._idem_refresh_ms,
            b"1" if retried else b"0",
        ]
        groups = self._by_slot(batch)
        if len(groups) == 1:
            (members,) = groups
            answers = await self._append_many(*self._group_call(batch, members, head))
            return list(answers)
        results: list[Any] = [None] * len(batch)
        todo = groups
        for _ in range(2):  # a second pass after loading the script where it was missing
            pipe = self._client.pipeline(transaction=False)
            for members in todo:
                keys, args = self._group_call(batch, members, head)
                # (redis-py blocks the evalsha method of a cluster pipeline by
                # name; the command itself is routed by its keys like any other.)
                pipe.execute_command("EVALSHA", self._append_many.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                # A node that was down, moving or restarting: the outcome of
                # the whole batch is unknown to `_run`, which retries it
                # (with `retry`: groups that landed are not written twice).
                if isinstance(reply, _TRANSIENT):
                    raise reply
                if isinstance(reply, (AttributeError, RuntimeError)) and _closed_under_us(reply):
                    raise _lost_connection(reply)
            missing: list[list[int]] = []
            for members, reply in zip(todo, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(members)
                    continue
                for position, index in enumerate(members):
                    results[index] = reply if isinstance(reply, Exception) else reply[position]
            if not missing:
                break
            await self._client.script_load(_APPEND_MANY)
            todo = missing
        return [
            _batch_failure(result, self.label) if isinstance(result, Exception) else result
            for result in results
        ]

    def _by_slot(self, batch: Sequence[PendingAppend]) -> list[list[int]]:
        """Positions in the batch, grouped so each group's keys share a slot."""
        if not self._cluster:
            return [list(range(len(batch)))]
        groups: dict[int, list[int]] = {}
        for index, pending in enumerate(batch):
            log_key = _log_key_bytes(self._prefix, pending.stream_id)[1]
            groups.setdefault(key_slot(log_key), []).append(index)
        return list(groups.values())

    def _group_call(
        self, batch: Sequence[PendingAppend], members: list[int], head: list[bytes]
    ) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of one `_APPEND_MANY` call, as bytes: redis-py packs
        bytes as they are, where a str or an int is encoded on every call
        (84 against 31 µs for 20 streams, most of the client's cost per batch)."""
        keys: list[bytes] = []
        items: list[bytes] = []
        prefix = self._prefix
        for index in members:
            pending = batch[index]
            keys += _log_key_bytes(prefix, pending.stream_id)
            items.append(pending.payload)
        return keys, [*head, b"[" + b",".join(items) + b"]"]

    async def _refresh_idem(self, keys: list[str], _retried: bool) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.pexpire(key, self._idem_ttl_ms)
        await pipe.execute()

    async def read(self, stream_id: str, after_seq: int, limit: int = 1000) -> list[LogEntry]:
        entries, _ = await self._read_after(stream_id, after_seq, limit)
        return entries

    async def wait(
        self, stream_id: str, after_seq: int, timeout_s: float, *, seen_notices: int = 0
    ) -> list[LogEntry]:
        entries, ended = await self._read_after(stream_id, after_seq)
        if len(entries) > seen_notices or ended or timeout_s <= 0:
            return entries
        # The watcher rings when the log holds an entry after "S-N" (XREAD is
        # exclusive; the notices after chunk S are "S-1", "S-2", …, so this is
        # past the N the reader saw); the entries come from `read`, which
        # applies the limit and knows about the End. Real time: Redis's BLOCK
        # timer runs on it whatever the injected clock says (the memory store
        # uses asyncio.timeout here for the same reason).
        rang = await self._watcher.wait(
            self._key(stream_id, "log"), f"{max(after_seq, 0)}-{seen_notices}", timeout_s
        )
        return await self.read(stream_id, after_seq) if rang else []

    async def open_read(
        self, stream_id: str, after_seq: int, limit: int = 1000
    ) -> ReadStart | None:
        keys = self._log_keys(stream_id)
        args: list[str | int] = [_after(after_seq), limit]
        reply = await self._run(
            "open_read", stream_id, lambda _: self._open_read(keys=keys, args=args)
        )
        if not reply:
            return None
        raw_meta, last_seq, ended, *payloads = reply
        return ReadStart(
            decode_meta(self._open(raw_meta, stream_id)),
            StreamTail(int(last_seq), _text(ended) == "1"),
            self._entries(payloads, stream_id),
        )

    async def tail(self, stream_id: str) -> StreamTail | None:
        key = self._key(stream_id, "meta")
        last_seq, ended = await self._run(
            "tail", stream_id, lambda _: self._client.hmget(key, ["last_seq", "ended"])
        )
        if last_seq is None:
            return None
        # _CREATE writes both fields together; a hash without `ended` reads
        # as not ended, as it always has.
        return StreamTail(int(last_seq), ended is not None and _text(ended) == "1")

    # -- ownership and cancellation ------------------------------------------------

    async def acquire_lease(self, stream_id: str, owner: str, ttl_s: float) -> int | None:
        keys = self._lease_keys(stream_id)
        args: list[str | int] = [owner, _ms(ttl_s)]
        # Acquiring again is harmless: the holder keeps its epoch.
        epoch = await self._run(
            "acquire_lease", stream_id, lambda _: self._acquire_lease(keys=keys, args=args)
        )
        return int(epoch) or None

    async def renew_lease(
        self, stream_id: str, owner: str, ttl_s: float, *, epoch: int | None = None
    ) -> bool:
        keys = self._lease_keys(stream_id)
        args: list[str | int] = [owner, _ms(ttl_s), "" if epoch is None else epoch]
        renewed = await self._run(
            "renew_lease", stream_id, lambda _: self._renew_lease(keys=keys, args=args)
        )
        return bool(renewed)

    async def release_lease(self, stream_id: str, owner: str) -> None:
        key = self._key(stream_id, "lease")
        await self._run(
            "release_lease",
            stream_id,
            lambda _: self._delete_if_equal(keys=[key], args=[owner]),
        )

    async def lease_owner(self, stream_id: str) -> str | None:
        keys = self._lease_keys(stream_id)
        owner = await self._run("lease_owner", stream_id, lambda _: self._lease_owner(keys=keys))
        return None if owner is None else _text(owner)

    async def request_cancel(self, stream_id: str, reason: str) -> None:
        key = self._key(stream_id, "meta")
        await self._run(
            "request_cancel",
            stream_id,
            lambda _: self._request_cancel(keys=[key], args=[reason]),
        )

    async def cancel_requested(self, stream_id: str) -> str | None:
        key = self._key(stream_id, "meta")
        reason = await self._run(
            "cancel_requested", stream_id, lambda _: self._client.hget(key, "cancel")
        )
        return None if reason is None else _text(reason)

    @property
    def watcher(self) -> BlockingWatcher | PollingWatcher:
        """The doorbell of every reader waiting here (its stats, for operators)."""
        return self._watcher

    @property
    def group_commit(self) -> GroupCommit:
        """The writer batching this store's appends (its stats, for operators)."""
        return self._commits

    def _observe_batch(self, entries: int, seconds: float) -> None:
        observer = self.append_observer
        if observer is not None:
            observer(entries, seconds)

    async def close(self) -> None:
        # What is queued is sent first (the writer refuses new appends after).
        with contextlib.suppress(Exception):
            await self._commits.close()
        await self._watcher.close()
        for client in {id(c): c for c in (self._probe, self._blocking, self._client)}.values():
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    # -- sealing -------------------------------------------------------------------

    def _payload(self, stream_id: str, entries: Sequence[LogEntry], epoch: int | None) -> bytes:
        """One stream's item of `_APPEND_MANY`'s batch: [epoch, [[kind, seq, payload], ...]]."""
        seal = self._seal
        items: list[tuple[str, int, str]] = []
        for entry in entries:
            if isinstance(entry, Chunk):
                items.append(("c", entry.seq, seal(entry_json(entry), stream_id)))
            elif isinstance(entry, Notice):
                items.append(("n", 0, seal(entry_json(entry), stream_id)))
            else:
                items.append(("e", entry.total_seq, seal(entry_json(entry), stream_id)))
        return orjson.dumps(("" if epoch is None else epoch, items))

    def _seal(self, value: bytes, stream_id: str) -> str:
        """A value as stored: its JSON, or with a sealer that JSON sealed
        (store/seal.py) and in base64, bound to its stream."""
        sealer = self._sealer
        if sealer is None:
            return value.decode()
        sealed = sealer.seal(value, aad=stream_id.encode())
        return binascii.b2a_base64(sealed, newline=False).decode("ascii")

    def _open(self, raw: bytes | str, stream_id: str) -> bytes | str:
        return open_value(raw, stream_id, self._sealer)

    # -- helpers -------------------------------------------------------------------

    def _key(self, stream_id: str, part: str) -> str:
        return stream_key(self._prefix, stream_id, part)

    def _stream_keys(self, stream_id: str) -> list[str]:
        return [self._key(stream_id, part) for part in ("meta", "log", "lease")]

    def _log_keys(self, stream_id: str) -> list[str]:
        return [self._key(stream_id, "meta"), self._key(stream_id, "log")]

    def _lease_keys(self, stream_id: str) -> list[str]:
        return [self._key(stream_id, "meta"), self._key(stream_id, "lease")]

    def _idem_key(self, idempotency_key: str) -> str:
        return f"{self._prefix}:idem:{idempotency_key}"

    def _now_ms(self) -> int:
        return int(self._clock.wall() * 1000)

    async def _stream_named_by(self, idem_key: str) -> StreamMeta | None:
        holder = await self._run("create", "", lambda _: self._client.get(idem_key))
        return None if holder is None else await self.get_meta(_text(holder))

    async def _read_after(
        self, stream_id: str, after_seq: int, limit: int = 1000
    ) -> tuple[list[LogEntry], bool]:
        keys = self._log_keys(stream_id)
        args: list[str | int] = [_after(after_seq), limit]
        state, *payloads = await self._run(
            "read", stream_id, lambda _: self._read(keys=keys, args=args)
        )
        if state == 0:
            raise StreamNotFound(f"stream {stream_id} is unknown or expired")
        return self._entries(payloads, stream_id), state == 2

    def _entries(self, payloads: Sequence[bytes], stream_id: str) -> list[LogEntry]:
        return [decode_entry(self._open(raw, stream_id)) for raw in payloads]


def open_value(raw: bytes | str, stream_id: str, sealer: Sealer | None) -> bytes | str:
    """The JSON of a value the store wrote for `stream_id`: plain (written
    without a sealer) or sealed (for tools that read Redis directly too)."""
    if raw[:1] in (b"{", "{"):
        return raw
    if sealer is None:
        raise SealBroken(
            f"a value of stream {stream_id} is sealed, and this gateway has no resume "
            "secret to open it: give it the secrets the other replicas have",
            reason="no key",
        )
    try:
        value = binascii.a2b_base64(raw)
    except (binascii.Error, ValueError):
        raise SealBroken(
            f"a value of stream {stream_id} is neither JSON nor sealed", reason="format"
        ) from None
    return sealer.open(value, aad=stream_id.encode())


def _raise_if_cancelling() -> None:
    """Re-raise a cancellation that redis-py turned into an error of its own.

    A task cancelled while a pool wait's own timeout fires (Python 3.11's
    asyncio.timeout then raises TimeoutError, which redis-py reports as "No
    connection available.") would otherwise retry or carry on as if nothing
    happened, and a `task.cancel(); await task` would wait for ever (seen:
    lease keepers and the health probe outliving their server)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _after(after_seq: int) -> str:
    """The XRANGE start of "everything after chunk S" (rule 1 of base.py)."""
    return f"({after_seq}-0" if after_seq >= 0 else "-"


def _ms(seconds: float) -> int:
    """Whole milliseconds for PX/PEXPIRE/BLOCK, at least 1 (0 means "forever" to BLOCK)."""
    return max(1, math.ceil(seconds * 1000))


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _block_slice(client: RedisClient) -> float | None:
    """The longest XREAD BLOCK the client can wait for without its own socket
    timeout firing first (None: no socket timeout, block as long as asked)."""
    socket_timeout: float | None = connection_kwargs(client).get("socket_timeout")
    if not socket_timeout:
        return None
    if socket_timeout <= 2 * _BLOCK_SLACK_S:
        raise ValueError(
            f"the blocking client's socket_timeout ({socket_timeout}s) is too short for "
            f"blocking reads: pass a blocking_client whose socket_timeout is over "
            f"{2 * _BLOCK_SLACK_S}s, or None"
        )
    return socket_timeout - _BLOCK_SLACK_S


def _translate(exc: ResponseError, stream_id: str, label: str) -> Exception:
    """The memory store's exception for a script's refusal (ours for the rest)."""
    return _refusal(str(exc), stream_id, label)


def _batch_failure(error: Exception, label: str) -> Exception:
    """A group of a batch that Redis refused as a whole (not one stream's refusal)."""
    return StoreError(f"{label} refused an append batch ({type(error).__name__}: {error})")


def _refusal(message: str, stream_id: str, label: str) -> Exception:
    """The memory store's exception for a script's refusal `message`."""
    if message.startswith(_UNKNOWN):
        return StreamNotFound(f"stream {stream_id} is unknown or expired")
    if message.startswith(_ORDER):
        return ValueError(f"{message.removeprefix(_ORDER).strip()} in {stream_id}")
    if message.startswith(_FENCED):
        return StreamFenced(
            f"stream {stream_id}: {message.removeprefix(_FENCED).strip()}; another replica "
            "took it over: resume it (anywhere) with your latest resume token"
        )
    return StoreError(f"{label} refused a command ({message})")


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.partition(":")[0]
    return f"{scheme}://{user + '@' if user else ''}{host}"


__all__ = ["RedisStore", "open_value"]
