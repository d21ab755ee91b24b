"""The replica's state as operators see it, read from the hub when asked
(a scrape, an Admin call): breakers of every chain entry and how many
entries of each alias can take calls."""

from __future__ import annotations

from tokenrelay_server.core.breaker import BreakerState
from tokenrelay_server.engine.hub import StreamHub


def breaker_states(hub: StreamHub) -> dict[tuple[str, str], BreakerState]:
    """The breaker state of every (provider, upstream model) of every chain;
    an entry never used yet has no breaker, so it is closed."""
    breakers = hub.recovery.health.breakers()
    states: dict[tuple[str, str], BreakerState] = {}
    router = hub.router
    for alias in router.models:
        for route in router.resolve(alias):
            states[(route.provider.name, route.upstream_model)] = BreakerState.CLOSED
    for key, breaker in breakers.items():
        states[key] = breaker.state
    return states


def usable_routes(hub: StreamHub) -> dict[str, int]:
    """Per model alias, the chain entries whose breaker lets a call through
    now (0: no provider is available for the alias)."""
    breakers = hub.recovery.health.breakers()
    router = hub.router
    usable: dict[str, int] = {}
    for alias in router.models:
        count = 0
        for route in router.resolve(alias):
            breaker = breakers.get((route.provider.name, route.upstream_model))
            count += breaker is None or breaker.available()
        usable[alias] = count
    return usable
