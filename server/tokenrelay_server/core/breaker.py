"""A circuit breaker per (provider, upstream model).

    CLOSED ──failure threshold or failure rate──▶ OPEN
    OPEN ──cool-down elapsed, next allow()──────▶ HALF_OPEN (one probe goes through)
    HALF_OPEN ──probe succeeded─────────────────▶ CLOSED
    HALF_OPEN ──probe failed────────────────────▶ OPEN

The legal transitions are the table `TRANSITIONS`; `_apply` is the only place
the state changes, and it tells the listeners (logging, metrics). Time comes
from an injected `Clock`.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokenrelay_server.core.clock import Clock

log = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class BreakerEvent(enum.StrEnum):
    TRIP = "trip"
    COOLDOWN_ELAPSED = "cooldown_elapsed"
    PROBE_SUCCEEDED = "probe_succeeded"
    PROBE_FAILED = "probe_failed"


TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (BreakerState.CLOSED, BreakerEvent.TRIP): BreakerState.OPEN,
    (BreakerState.OPEN, BreakerEvent.COOLDOWN_ELAPSED): BreakerState.HALF_OPEN,
    (BreakerState.HALF_OPEN, BreakerEvent.PROBE_SUCCEEDED): BreakerState.CLOSED,
    (BreakerState.HALF_OPEN, BreakerEvent.PROBE_FAILED): BreakerState.OPEN,
}


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_threshold: int = 5  # consecutive failures that open the breaker
    cooldown_s: float = 30.0
    window_s: float = 60.0  # for the failure rate
    failure_rate: float = 0.5  # open above this share of failures in the window …
    min_calls: int = 20  # … once the window holds at least this many calls


@dataclass(frozen=True, slots=True)
class BreakerChange:
    name: str
    before: BreakerState
    after: BreakerState
    event: BreakerEvent


BreakerListener = Callable[[BreakerChange], None]


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        clock: Clock,
        settings: BreakerSettings = BreakerSettings(),
        listeners: tuple[BreakerListener, ...] = (),
    ) -> None:
        self.name = name
        self._clock = clock
        self._settings = settings
        self._listeners = listeners
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False
        self._outcomes: deque[tuple[float, bool]] = deque()  # (time, failed)

    @property
    def state(self) -> BreakerState:
        return self._state

    def available(self) -> bool:
        """Whether a call could go through now (without taking the probe)."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return self._cooled_down()
        return not self._probe_in_flight

    def allow(self) -> bool:
        """Ask to make a call. In HALF_OPEN only one probe is let through."""
        if self._state is BreakerState.OPEN and self._cooled_down():
            self._apply(BreakerEvent.COOLDOWN_ELAPSED)
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._record(failed=False)
        self._consecutive_failures = 0
        if self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False
            self._apply(BreakerEvent.PROBE_SUCCEEDED)

    def record_failure(self) -> None:
        self._record(failed=True)
        self._consecutive_failures += 1
        if self._state is BreakerState.HALF_OPEN:
            self._probe_in_flight = False
            self._apply(BreakerEvent.PROBE_FAILED)
        elif self._state is BreakerState.CLOSED and self._should_trip():
            self._apply(BreakerEvent.TRIP)

    def _should_trip(self) -> bool:
        if self._consecutive_failures >= self._settings.failure_threshold:
            return True
        calls = len(self._outcomes)
        if calls < self._settings.min_calls:
            return False
        failures = sum(1 for _, failed in self._outcomes if failed)
        # failure_rate = 1 turns the rate rule off: no share exceeds it.
        return failures / calls > self._settings.failure_rate

    def _record(self, *, failed: bool) -> None:
        now = self._clock.monotonic()
        self._outcomes.append((now, failed))
        horizon = now - self._settings.window_s
        while self._outcomes and self._outcomes[0][0] <= horizon:
            self._outcomes.popleft()

    def _cooled_down(self) -> bool:
        return self._clock.monotonic() - self._opened_at >= self._settings.cooldown_s

    def _apply(self, event: BreakerEvent) -> None:
        before = self._state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise RuntimeError(f"breaker {self.name}: no transition from {before} on {event}")
        self._state = after
        if after is BreakerState.OPEN:
            self._opened_at = self._clock.monotonic()
            self._outcomes.clear()
        if after is BreakerState.CLOSED:
            self._consecutive_failures = 0
        log.info("breaker %s: %s -> %s (%s)", self.name, before, after, event)
        change = BreakerChange(self.name, before, after, event)
        for listener in self._listeners:
            listener(change)
