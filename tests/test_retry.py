"""Backoff delays and the retry budget, on an injected clock."""

from __future__ import annotations

import random

import pytest

from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.core.retry import BackoffPolicy, RetryBudget, next_delay

EXACT = BackoffPolicy(jitter=0.0)


@pytest.mark.parametrize(
    ("retry", "kwargs", "expected"),
    [
        (1, {}, 1.0),
        (2, {}, 2.0),
        (3, {}, 4.0),
        (7, {}, 60.0),
        (1, {"rate_limited": True}, 2.0),
        (6, {"rate_limited": True}, 60.0),
        (1, {"retry_after_s": 12.5}, 12.5),
        (1, {"retry_after_s": 0.0}, 0.0),
        (1, {"retry_after_s": 3600.0}, 60.0),
    ],
    ids=[
        "first retry waits the base",
        "second doubles",
        "third doubles again",
        "the cap holds",
        "rate limits wait twice as long",
        "rate limits are capped too",
        "Retry-After wins",
        "Retry-After zero means now",
        "Retry-After is capped",
    ],
)
def test_next_delay(retry: int, kwargs: dict, expected: float) -> None:
    assert next_delay(retry, policy=EXACT, rng=random.Random(1), **kwargs) == expected


def test_jitter_stays_within_ten_percent_and_varies() -> None:
    rng = random.Random(42)
    delays = [next_delay(3, policy=BackoffPolicy(), rng=rng) for _ in range(200)]
    assert all(3.6 <= d <= 4.4 for d in delays)
    assert len(set(delays)) > 100


def test_budget_allows_a_floor_of_retries_then_a_share_of_requests() -> None:
    clock = ManualClock()
    budget = RetryBudget(clock=clock, ratio=0.2, window_s=60, floor=3)
    assert [budget.spend_retry() for _ in range(4)] == [True, True, True, False]
    for _ in range(10):
        budget.record_request()
    assert [budget.spend_retry() for _ in range(3)] == [True, True, False]


def test_budget_refills_as_the_window_slides() -> None:
    clock = ManualClock()
    budget = RetryBudget(clock=clock, ratio=0.0, window_s=60, floor=1)
    assert budget.spend_retry()
    assert not budget.spend_retry()
    clock.advance(61)
    assert budget.spend_retry()
