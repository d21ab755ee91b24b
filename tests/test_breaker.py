"""The circuit breaker's state table and permits, on an injected clock."""

from __future__ import annotations

import pytest

from tokenrelay_server.core.breaker import (
    TRANSITIONS,
    BreakerChange,
    BreakerEvent,
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    Permit,
)
from tokenrelay_server.core.clock import ManualClock


def make(**settings) -> tuple[CircuitBreaker, ManualClock, list[BreakerChange]]:
    clock = ManualClock()
    changes: list[BreakerChange] = []
    breaker = CircuitBreaker(
        "sim/sim", clock=clock, settings=BreakerSettings(**settings), listeners=(changes.append,)
    )
    return breaker, clock, changes


def call(breaker: CircuitBreaker) -> Permit:
    permit = breaker.try_acquire()
    assert permit is not None, f"the breaker refused a call in {breaker.state}"
    return permit


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        call(breaker).failed()


def trip_and_cool(breaker: CircuitBreaker, clock: ManualClock, cooldown_s: float) -> None:
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    clock.advance(cooldown_s)


def test_breaker_opens_after_consecutive_failures() -> None:
    breaker, _, changes = make(failure_threshold=3)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.try_acquire() is None
    assert [c.after for c in changes] == [BreakerState.OPEN]


def test_a_success_resets_the_consecutive_count() -> None:
    breaker, _, _ = make(failure_threshold=3, failure_rate=1.0)
    for _ in range(10):
        fail(breaker, 2)
        call(breaker).succeeded()
    assert breaker.state is BreakerState.CLOSED


def test_breaker_opens_on_failure_rate_over_the_window() -> None:
    breaker, _, _ = make(failure_threshold=100, failure_rate=0.5, min_calls=10)
    for _ in range(4):
        call(breaker).succeeded()
    for _ in range(3):
        fail(breaker, 2)
    assert breaker.state is BreakerState.OPEN


def test_breaker_half_opens_after_cooldown_and_lets_one_probe_through() -> None:
    breaker, clock, _ = make(failure_threshold=1, cooldown_s=30)
    fail(breaker)
    clock.advance(29)
    assert breaker.try_acquire() is None
    clock.advance(1)
    assert breaker.available()
    probe = breaker.try_acquire()
    assert probe is not None and probe.is_probe
    assert breaker.state is BreakerState.PROBING
    assert not breaker.available()
    assert breaker.try_acquire() is None  # only one probe


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker, clock, changes = make(failure_threshold=1, cooldown_s=5)
    trip_and_cool(breaker, clock, 5)
    call(breaker).succeeded()
    assert breaker.state is BreakerState.CLOSED
    assert [c.after for c in changes] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.PROBING,
        BreakerState.CLOSED,
    ]


def test_a_failed_probe_opens_it_again_for_another_cooldown() -> None:
    breaker, clock, _ = make(failure_threshold=1, cooldown_s=5)
    trip_and_cool(breaker, clock, 5)
    call(breaker).failed()
    assert breaker.state is BreakerState.OPEN
    clock.advance(4)
    assert breaker.try_acquire() is None
    clock.advance(1)
    assert breaker.try_acquire() is not None


@pytest.mark.parametrize(
    "end_the_probe",
    [
        lambda permit: permit.released(),
        lambda permit: permit.__exit__(None, None, None),
        lambda permit: permit.__exit__(TimeoutError, TimeoutError(), None),
    ],
    ids=[
        "a probe released without a verdict frees the slot",
        "a probe left unsettled at the end of its block frees the slot",
        "a probe whose block raised frees the slot",
    ],
)
def test_an_abandoned_probe_frees_the_slot_for_the_next(end_the_probe) -> None:
    breaker, clock, changes = make(failure_threshold=1, cooldown_s=1)
    trip_and_cool(breaker, clock, 1)
    probe = call(breaker)
    end_the_probe(probe)
    assert breaker.state is BreakerState.HALF_OPEN
    assert changes[-1].event is BreakerEvent.PROBE_ABANDONED
    next_probe = breaker.try_acquire()
    assert next_probe is not None and next_probe.is_probe
    next_probe.succeeded()
    assert breaker.state is BreakerState.CLOSED


def test_a_permit_settles_once_and_later_settles_change_nothing() -> None:
    breaker, clock, _ = make(failure_threshold=1, cooldown_s=1)
    trip_and_cool(breaker, clock, 1)
    probe = call(breaker)
    probe.succeeded()
    probe.failed()
    with probe:
        pass
    assert breaker.state is BreakerState.CLOSED


def test_a_late_failure_of_a_call_from_before_the_trip_changes_nothing() -> None:
    breaker, clock, changes = make(failure_threshold=1, cooldown_s=5)
    early = call(breaker)  # let through while closed
    fail(breaker)  # trips
    early.failed()  # ends after the trip
    assert breaker.state is BreakerState.OPEN
    clock.advance(5)
    assert breaker.try_acquire() is not None  # the cool-down was not restarted
    assert [c.after for c in changes] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.PROBING,
    ]


def test_a_late_success_does_not_close_a_breaker_whose_probe_is_out() -> None:
    breaker, clock, _ = make(failure_threshold=1, cooldown_s=5)
    early = call(breaker)
    fail(breaker)
    clock.advance(5)
    probe = call(breaker)
    early.succeeded()  # not the probe: no verdict on the half-open state
    assert breaker.state is BreakerState.PROBING
    probe.failed()
    assert breaker.state is BreakerState.OPEN


def test_every_state_has_a_way_back_to_closed_in_the_table() -> None:
    # From every state some sequence of events reaches CLOSED: no dead end.
    reaches_closed = {BreakerState.CLOSED}
    changed = True
    while changed:
        changed = False
        for (before, _), after in TRANSITIONS.items():
            if after in reaches_closed and before not in reaches_closed:
                reaches_closed.add(before)
                changed = True
    assert reaches_closed == set(BreakerState)


def test_an_event_the_table_does_not_allow_is_refused() -> None:
    breaker, _, _ = make()
    with pytest.raises(RuntimeError, match="no transition"):
        breaker._apply(BreakerEvent.PROBE_SUCCEEDED)
