"""The engine's tunables, each default written here once.

The server settings (config/settings.py: flags, environment, file) take
their defaults from these classes and from the policy objects beside them
(`RecoveryConfig` and `BackoffPolicy` in recovery.py and retry.py,
`BreakerSettings` in breaker.py), so a default never has two values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long an upstream attempt may be silent."""

    first_token_s: float = 30.0  # from the request to the first token
    stall_s: float = 30.0  # between two tokens


@dataclass(frozen=True, slots=True)
class HubSettings:
    """What one replica's hub holds and for how long."""

    detach_grace_s: float = 60.0  # a generation runs on this long with no reader
    checkpoint_interval: int = 10  # chunks between Checkpoint events
    max_streams: int = 10_000  # running + being admitted, per replica
    lease_ttl_s: float = 10.0  # ownership of a generation in the store
    # Each replica's heartbeat in the store (store/heartbeat.py): renewed this
    # often, gone this long after its last renewal. A follower takes over a
    # stream whose owner's heartbeat is gone without waiting for its lease.
    heartbeat_interval_s: float = 0.5
    heartbeat_ttl_s: float = 2.0
    store_poll_s: float = 1.0  # a follower of another replica's stream looks this often
    max_memory_bytes: int = 0  # resident memory above which streams are shed; 0: no limit
    # The wait a refused start is told to take (RetryInfo, retry-after-ms).
    shed_retry_after_s: float = 1.0
    memory_check_interval_s: float = 1.0
    max_stream_bytes: int = 100 * 1024 * 1024  # the text one stream may hold
    shutdown_wait_s: float = 5.0  # how long close() waits for generations to end


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What one request may hold (the config's [limits] table, issue 13).

    `max_request_bytes` is the gRPC transport's receive limit: a frame past
    it is refused by gRPC itself with RESOURCE_EXHAUSTED before it is
    decoded. The others are checked when a `start` is validated
    (api/requests.py) and refused with INVALID_ARGUMENT naming the field."""

    max_request_bytes: int = 4 << 20  # one StreamRequest frame, encoded
    max_messages: int = 256  # start.messages
    max_content_chars: int = 1_000_000  # start.messages[i].content, each
    max_tools: int = 128  # start.tools
    max_metadata_entries: int = 32  # start.metadata


@dataclass(frozen=True, slots=True)
class LagSettings:
    """When the event loop is too late to take new streams (engine/loop_lag.py)."""

    threshold_s: float = 0.050  # the p99 lag above which new streams are refused
    window_s: float = 1.0  # the samples the p99 is taken over
    # Between samples: 200 a second (about 0.2 % of a core), so that one
    # stall (a collection, a first import) is one sample in ~200, under the
    # 1 % a p99 ignores, while a loop that is late all the time is late in
    # every sample it still takes.
    interval_s: float = 0.005
    quantile: float = 0.99
