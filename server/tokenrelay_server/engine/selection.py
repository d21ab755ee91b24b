"""Which provider of a model's chain to start with, and the health behind it.

Per chain entry (provider, upstream model) the gateway keeps a circuit
breaker, a retry budget per provider, and an EWMA of time to first token,
inter-token time and error rate. Selection skips entries whose breaker is
open; among the rest it takes the chain order (`order`, the default) or the
best score (`score`: lower is better: expected latency, penalised by errors).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from tokenrelay_server.core.breaker import (
    BreakerChange,
    BreakerListener,
    BreakerSettings,
    CircuitBreaker,
)
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.core.recovery import SelectionMode
from tokenrelay_server.core.retry import DEFAULT_RETRY_BUDGET_RATIO, RetryBudget
from tokenrelay_server.engine.routing import Route

EWMA_ALPHA = 0.2
# A typical answer is ~ this many tokens: weighs inter-token time against TTFT.
TYPICAL_TOKENS = 200


@dataclass
class Health:
    ttft_s: float | None = None
    inter_token_s: float | None = None
    error_rate: float = 0.0
    # Tokens per text delta, learned from the usage the provider reports at
    # the end of an answer: weighs the deltas of an attempt that broke before
    # its usage came (a continuation's token budget depends on it).
    tokens_per_delta: float | None = None

    def observe_success(self, ttft_s: float | None, inter_token_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft_s = _ewma(self.ttft_s, ttft_s)
        if inter_token_s is not None:
            self.inter_token_s = _ewma(self.inter_token_s, inter_token_s)
        self.error_rate = _ewma(self.error_rate, 0.0)

    def observe_usage(self, deltas: int, completion_tokens: int) -> None:
        if deltas > 0 and completion_tokens > 0:
            self.tokens_per_delta = _ewma(self.tokens_per_delta, completion_tokens / deltas)

    def delta_weight(self) -> float:
        """Tokens a delta is worth when the provider did not say (1 until learned)."""
        return self.tokens_per_delta or 1.0

    def observe_failure(self) -> None:
        self.error_rate = _ewma(self.error_rate, 1.0)

    def score(self) -> float:
        """Expected seconds for a typical answer, inflated by the error rate."""
        latency = (self.ttft_s or 0.0) + TYPICAL_TOKENS * (self.inter_token_s or 0.0)
        return latency / max(1.0 - self.error_rate, 0.05)


def _ewma(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - EWMA_ALPHA) * previous + EWMA_ALPHA * value


@dataclass
class UpstreamHealth:
    """Breakers, budgets and health of every chain entry this replica used."""

    clock: Clock
    breaker_settings: BreakerSettings = field(default_factory=BreakerSettings)
    retry_budget_ratio: float = DEFAULT_RETRY_BUDGET_RATIO
    listeners: tuple[BreakerListener, ...] = ()
    # How often each breaker changed state, by (breaker, new state): for metrics.
    transitions: Counter[tuple[str, str]] = field(default_factory=Counter)
    _breakers: dict[tuple[str, str], CircuitBreaker] = field(default_factory=dict)
    _budgets: dict[str, RetryBudget] = field(default_factory=dict)
    _health: dict[tuple[str, str], Health] = field(default_factory=dict)

    def breaker(self, route: Route) -> CircuitBreaker:
        key = (route.provider.name, route.upstream_model)
        if key not in self._breakers:
            self._breakers[key] = CircuitBreaker(
                f"{key[0]}/{key[1]}",
                clock=self.clock,
                settings=self.breaker_settings,
                listeners=(self._count, *self.listeners),
            )
        return self._breakers[key]

    def breakers(self) -> dict[tuple[str, str], CircuitBreaker]:
        """The breakers made so far, by (provider, upstream model): a copy,
        for operators (a chain entry never used has none: it is closed)."""
        return dict(self._breakers)

    def _count(self, change: BreakerChange) -> None:
        self.transitions[(change.name, str(change.after))] += 1

    def budget(self, route: Route) -> RetryBudget:
        name = route.provider.name
        if name not in self._budgets:
            self._budgets[name] = RetryBudget(clock=self.clock, ratio=self.retry_budget_ratio)
        return self._budgets[name]

    def health(self, route: Route) -> Health:
        return self._health.setdefault((route.provider.name, route.upstream_model), Health())

    def choose(self, chain: list[Route], mode: SelectionMode) -> int | None:
        """The chain index to start with, or None when every breaker is open."""
        usable = [i for i, route in enumerate(chain) if self.breaker(route).available()]
        if not usable:
            return None
        if mode == "order":
            return usable[0]
        scores = {i: self.health(chain[i]).score() for i in usable}
        best = min(scores.values())
        return next(i for i in usable if math.isclose(scores[i], best) or scores[i] == best)
