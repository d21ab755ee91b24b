"""A circuit breaker per (provider, upstream model).

    CLOSED ──failure threshold or failure rate (TRIP)──▶ OPEN
    OPEN ──cool-down elapsed (COOLDOWN_ELAPSED)────────▶ HALF_OPEN
    HALF_OPEN ──a call is let through (PROBE_STARTED)──▶ PROBING
    PROBING ──the probe succeeded──────────────────────▶ CLOSED
    PROBING ──the probe failed─────────────────────────▶ OPEN
    PROBING ──the probe ended with no verdict──────────▶ HALF_OPEN
              (cancelled, stopped, a caller's fault: issue 8, a stuck probe
              slot blocked a provider until restart)

Rules:
- Every change of state and of the counters goes through `_apply` and the
  table `TRANSITIONS`, including the events that keep the state (a success
  in CLOSED resets the consecutive count; a late outcome of a call that
  started before a trip changes nothing).
- A call takes a `Permit` (`try_acquire`) and settles it exactly once:
  `succeeded()`, `failed()` or `released()` (no verdict). A permit used as
  a context manager that was not settled is released on the way out, so an
  attempt that ends any other way (cancelled, timed out, an exception) can
  never leave the probe slot taken.
- Only the provider's own failures are `failed()`: a request the provider
  rightly refused says nothing about its health (`counts_against_provider`
  in classify.py decides).
- Time comes from an injected `Clock`; listeners (logging, metrics) are
  told of every change of state.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from tokenrelay_server.core.clock import Clock

log = logging.getLogger(__name__)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"  # cooled down; the next call is the probe
    PROBING = "probing"  # half open with the probe in flight


class BreakerEvent(enum.StrEnum):
    SUCCESS = "success"  # a call that was not the probe succeeded
    FAILURE = "failure"  # a call that was not the probe failed (below the trip point)
    TRIP = "trip"
    COOLDOWN_ELAPSED = "cooldown_elapsed"
    PROBE_STARTED = "probe_started"
    PROBE_SUCCEEDED = "probe_succeeded"
    PROBE_FAILED = "probe_failed"
    PROBE_ABANDONED = "probe_abandoned"


S, E = BreakerState, BreakerEvent

TRANSITIONS: dict[tuple[BreakerState, BreakerEvent], BreakerState] = {
    (S.CLOSED, E.SUCCESS): S.CLOSED,
    (S.CLOSED, E.FAILURE): S.CLOSED,
    (S.CLOSED, E.TRIP): S.OPEN,
    (S.OPEN, E.COOLDOWN_ELAPSED): S.HALF_OPEN,
    (S.HALF_OPEN, E.PROBE_STARTED): S.PROBING,
    (S.PROBING, E.PROBE_SUCCEEDED): S.CLOSED,
    (S.PROBING, E.PROBE_FAILED): S.OPEN,
    (S.PROBING, E.PROBE_ABANDONED): S.HALF_OPEN,
    # Late outcomes: calls let through while CLOSED that end after a trip.
    # They are counted for the failure rate and change nothing else.
    (S.OPEN, E.SUCCESS): S.OPEN,
    (S.OPEN, E.FAILURE): S.OPEN,
    (S.HALF_OPEN, E.SUCCESS): S.HALF_OPEN,
    (S.HALF_OPEN, E.FAILURE): S.HALF_OPEN,
    (S.PROBING, E.SUCCESS): S.PROBING,
    (S.PROBING, E.FAILURE): S.PROBING,
}

del S, E


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


class Permit:
    """Leave to make one call. Settle it exactly once; later settles are
    ignored, and leaving its `with` block unsettled releases it."""

    __slots__ = ("_breaker", "is_probe", "settled")

    def __init__(self, breaker: CircuitBreaker, *, is_probe: bool) -> None:
        self._breaker = breaker
        self.is_probe = is_probe
        self.settled = False

    def succeeded(self) -> None:
        if self._settle():
            self._breaker._outcome(self, failed=False)

    def failed(self) -> None:
        if self._settle():
            self._breaker._outcome(self, failed=True)

    def released(self) -> None:
        """The call ended without a verdict on the provider."""
        if self._settle() and self.is_probe:
            self._breaker._apply(BreakerEvent.PROBE_ABANDONED)

    def _settle(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        return True

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.released()


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        clock: Clock,
        settings: BreakerSettings | None = None,
        listeners: tuple[BreakerListener, ...] = (),
    ) -> None:
        self.name = name
        self._clock = clock
        self._settings = settings or BreakerSettings()
        self._listeners = listeners
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
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
        return self._state is BreakerState.HALF_OPEN

    def try_acquire(self) -> Permit | None:
        """Leave for one call, or None. In HALF_OPEN the call is the one probe."""
        if self._state is BreakerState.OPEN and self._cooled_down():
            self._apply(BreakerEvent.COOLDOWN_ELAPSED)
        if self._state is BreakerState.CLOSED:
            return Permit(self, is_probe=False)
        if self._state is BreakerState.HALF_OPEN:
            self._apply(BreakerEvent.PROBE_STARTED)
            return Permit(self, is_probe=True)
        return None

    # -- the table ---------------------------------------------------------------------

    def _outcome(self, permit: Permit, *, failed: bool) -> None:
        if permit.is_probe:
            self._apply(BreakerEvent.PROBE_FAILED if failed else BreakerEvent.PROBE_SUCCEEDED)
            return
        self._apply(BreakerEvent.FAILURE if failed else BreakerEvent.SUCCESS)
        if failed and self._state is BreakerState.CLOSED and self._should_trip():
            self._apply(BreakerEvent.TRIP)

    def _apply(self, event: BreakerEvent) -> None:
        before = self._state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise RuntimeError(f"breaker {self.name}: no transition from {before} on {event}")
        now = self._clock.monotonic()
        # The counters change here and only here, with the event.
        if event in (BreakerEvent.SUCCESS, BreakerEvent.PROBE_SUCCEEDED):
            self._record(now, failed=False)
            self._consecutive_failures = 0
        elif event in (BreakerEvent.FAILURE, BreakerEvent.PROBE_FAILED):
            self._record(now, failed=True)
            self._consecutive_failures += 1
        if after is BreakerState.OPEN and before is not BreakerState.OPEN:
            self._opened_at = now
            self._outcomes.clear()
        if after is BreakerState.CLOSED and before is not BreakerState.CLOSED:
            self._consecutive_failures = 0
        self._state = after
        if after is before:
            return
        log.info("breaker %s: %s -> %s (%s)", self.name, before, after, event)
        change = BreakerChange(self.name, before, after, event)
        for listener in self._listeners:
            listener(change)

    def _should_trip(self) -> bool:
        if self._consecutive_failures >= self._settings.failure_threshold:
            return True
        calls = len(self._outcomes)
        if calls < self._settings.min_calls:
            return False
        failures = sum(1 for _, failed in self._outcomes if failed)
        # failure_rate = 1 turns the rate rule off: no share exceeds it.
        return failures / calls > self._settings.failure_rate

    def _record(self, now: float, *, failed: bool) -> None:
        self._outcomes.append((now, failed))
        horizon = now - self._settings.window_s
        while self._outcomes and self._outcomes[0][0] <= horizon:
            self._outcomes.popleft()

    def _cooled_down(self) -> bool:
        return self._clock.monotonic() - self._opened_at >= self._settings.cooldown_s
