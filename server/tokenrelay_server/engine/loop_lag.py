"""How late the event loop runs: the gateway's measure of CPU saturation.

One process runs every stream on one event loop; when the loop has more
work than a core can do, every callback runs late, the chunks of every
stream with them. The lateness is what overload costs the streams already
running, so it is what decides whether a new one is taken (issue 10, like
Envoy's overload manager): `LoopLagMonitor.run()` sleeps `interval_s` again
and again on the injected clock and records how much later than asked each
wake-up came; `overloaded` says whether the `quantile` (p99) of the lags
recorded in the last `window_s` is above `threshold_s`.

The p99 is the nearest-rank one over the samples a window should hold
(window / interval: 200), the samples the loop did not take counted as on
time. So one stall in an otherwise timely second (a garbage collection, a
first import, the start of the process) is one late sample and sheds
nothing, while a loop late all the time is late in every sample it still
takes: a loop so busy that it wakes the monitor only 10 times a second,
each 60 ms late, has 10 of 200 samples late, 5 %, and sheds. Samples older
than the window are dropped when the monitor is asked, so a lag ends when
the window has passed it.

The clock is injected: a test records samples, or moves a `ManualClock`
past a wake-up, and never waits on real time. The server gives it the real
clock always (a loop's lag is real time by definition; a test server on a
`ManualClock` would otherwise see a lag of whatever the test moved).
"""

from __future__ import annotations

import math
from collections import deque

from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.limits import LagSettings


class LoopLagMonitor:
    """The event loop's recent lag (module doc). `run()` is owned by the server."""

    def __init__(self, clock: Clock, settings: LagSettings | None = None) -> None:
        self._clock = clock
        self.settings = settings or LagSettings()
        self._samples: deque[tuple[float, float]] = deque()  # (when, lag seconds)
        # lag_s() of the window it was computed over (first, last, count):
        # every admission asks, and samples change only every interval_s.
        self._cached: tuple[float, float, int, float] | None = None

    def record(self, lag_s: float) -> None:
        """A wake-up `lag_s` seconds late, now on the clock."""
        self._samples.append((self._clock.monotonic(), max(lag_s, 0.0)))
        self._drop_old()

    def lag_s(self) -> float:
        """The `quantile` of the lags within the window, over the samples the
        window should hold (module doc; 0: none late)."""
        self._drop_old()
        samples = self._samples
        if not samples:
            return 0.0
        cached = self._cached
        first, last, count = samples[0][0], samples[-1][0], len(samples)
        if cached is not None and cached[:3] == (first, last, count):
            return cached[3]
        lag = self._quantile()
        self._cached = (first, last, count, lag)
        return lag

    def _quantile(self) -> float:
        lags = sorted(lag for _, lag in self._samples)
        settings = self.settings
        missing = max(round(settings.window_s / settings.interval_s) - len(lags), 0)
        rank = math.ceil(settings.quantile * (len(lags) + missing))  # nearest rank, 1-based
        index = max(rank, 1) - 1 - missing  # in `lags`, after `missing` zeros
        return lags[index] if index >= 0 else 0.0

    def max_lag_s(self) -> float:
        """The largest lag within the window (0: none)."""
        self._drop_old()
        return max((lag for _, lag in self._samples), default=0.0)

    @property
    def overloaded(self) -> bool:
        return self.lag_s() > self.settings.threshold_s

    @property
    def samples(self) -> int:
        """Samples within the window."""
        self._drop_old()
        return len(self._samples)

    async def run(self) -> None:
        """Sample the loop's lag for ever (until cancelled)."""
        interval = self.settings.interval_s
        while True:
            due = self._clock.monotonic() + interval
            await self._clock.sleep(interval)
            self.record(self._clock.monotonic() - due)

    def _drop_old(self) -> None:
        oldest = self._clock.monotonic() - self.settings.window_s
        samples = self._samples
        while samples and samples[0][0] < oldest:
            samples.popleft()
