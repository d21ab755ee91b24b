"""How long to wait before trying again, and whether we may.

`next_delay` is a pure function (the RNG is passed in). `RetryBudget` keeps a
provider from being hit by a retry storm: like gRPC's retry throttling, retries
may be at most `ratio` of the requests over a sliding window (with a small
floor so a quiet provider can still be retried). Time comes from a `Clock`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from tokenrelay_server.core.clock import Clock

# Retries may be at most this share of a provider's requests (plus a floor).
DEFAULT_RETRY_BUDGET_RATIO = 0.2


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    base_s: float = 1.0
    cap_s: float = 60.0
    jitter: float = 0.1  # ±10 %
    rate_limit_factor: float = 2.0  # 429/529 wait twice as long
    retry_after_cap_s: float = 60.0  # a provider's Retry-After is obeyed up to this


def next_delay(
    retry_number: int,
    *,
    policy: BackoffPolicy,
    rng: random.Random,
    retry_after_s: float | None = None,
    rate_limited: bool = False,
) -> float:
    """Seconds to wait before retry `retry_number` (1 for the first retry).

    A provider's Retry-After wins when present (capped): it knows its own
    recovery time better than our exponent does. Otherwise exponential:
    base · 2^(n-1), doubled for rate limits, capped, then ±jitter so that
    clients that failed together do not retry together."""
    if retry_after_s is not None and retry_after_s >= 0:
        return min(retry_after_s, policy.retry_after_cap_s)
    delay = policy.base_s * 2.0 ** max(retry_number - 1, 0)
    if rate_limited:
        delay *= policy.rate_limit_factor
    delay = min(delay, policy.cap_s)
    spread = delay * policy.jitter
    return max(0.0, delay + rng.uniform(-spread, spread))


class RetryBudget:
    """Retries ≤ ratio * requests over the last `window_s` seconds, plus `floor`."""

    def __init__(
        self,
        *,
        clock: Clock,
        ratio: float = DEFAULT_RETRY_BUDGET_RATIO,
        window_s: float = 60.0,
        floor: int = 3,
    ) -> None:
        self._clock = clock
        self._ratio = ratio
        self._window_s = window_s
        self._floor = floor
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_request(self) -> None:
        self._requests.append(self._clock.monotonic())

    def allows_retry(self) -> bool:
        self._prune()
        return len(self._retries) < self._floor + self._ratio * len(self._requests)

    def spend_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        if not self.allows_retry():
            return False
        self._retries.append(self._clock.monotonic())
        return True

    def _prune(self) -> None:
        horizon = self._clock.monotonic() - self._window_s
        for times in (self._requests, self._retries):
            while times and times[0] <= horizon:
                times.popleft()
