"""The circuit breaker's state table, on an injected clock."""

from __future__ import annotations

from tokenrelay_server.core.breaker import (
    BreakerChange,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
)
from tokenrelay_server.core.clock import ManualClock


def make(**settings) -> tuple[CircuitBreaker, ManualClock, list[BreakerChange]]:
    clock = ManualClock()
    changes: list[BreakerChange] = []
    breaker = CircuitBreaker(
        "sim/sim", clock=clock, settings=BreakerSettings(**settings), listeners=(changes.append,)
    )
    return breaker, clock, changes


def test_breaker_opens_after_consecutive_failures() -> None:
    breaker, _, changes = make(failure_threshold=3)
    for _ in range(2):
        breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    assert [c.after for c in changes] == [BreakerState.OPEN]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _, _ = make(failure_threshold=3, failure_rate=1.0)
    for _ in range(10):
        breaker.record_failure()
        breaker.record_failure()
        breaker.record_success()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_opens_on_failure_rate_over_the_window() -> None:
    breaker, _, _ = make(failure_threshold=100, failure_rate=0.5, min_calls=10)
    for _ in range(4):
        breaker.record_success()
    for _ in range(3):
        breaker.record_failure()
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN


def test_breaker_half_opens_after_cooldown_and_lets_one_probe_through() -> None:
    breaker, clock, _ = make(failure_threshold=1, cooldown_s=30)
    breaker.record_failure()
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.available()
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow()  # only one probe


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker, clock, changes = make(failure_threshold=1, cooldown_s=5)
    breaker.record_failure()
    clock.advance(5)
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert [c.after for c in changes] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_a_failed_probe_opens_it_again_for_another_cooldown() -> None:
    breaker, clock, _ = make(failure_threshold=1, cooldown_s=5)
    breaker.record_failure()
    clock.advance(5)
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    clock.advance(4)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
