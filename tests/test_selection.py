"""Choosing where a stream starts: skip open breakers, then order or score."""

from __future__ import annotations

from tokenrelay_server.core.breaker import BreakerSettings
from tokenrelay_server.core.clock import ManualClock
from tokenrelay_server.engine.routing import Route
from tokenrelay_server.engine.selection import Health, UpstreamHealth
from tokenrelay_server.upstream.sim import SimProvider

CHAIN = [Route(SimProvider("a"), "m"), Route(SimProvider("b"), "m"), Route(SimProvider("c"), "m")]


def registry() -> UpstreamHealth:
    return UpstreamHealth(
        clock=ManualClock(), breaker_settings=BreakerSettings(failure_threshold=1)
    )


def test_order_mode_takes_the_first_entry_with_a_closed_breaker() -> None:
    health = registry()
    assert health.choose(CHAIN, "order") == 0
    health.breaker(CHAIN[0]).try_acquire().failed()  # type: ignore[union-attr]
    assert health.choose(CHAIN, "order") == 1


def test_no_usable_entry_means_none() -> None:
    health = registry()
    for route in CHAIN:
        health.breaker(route).try_acquire().failed()  # type: ignore[union-attr]
    assert health.choose(CHAIN, "order") is None


def test_an_open_breaker_becomes_usable_after_its_cooldown() -> None:
    clock = ManualClock()
    health = UpstreamHealth(
        clock=clock, breaker_settings=BreakerSettings(failure_threshold=1, cooldown_s=10)
    )
    health.breaker(CHAIN[0]).try_acquire().failed()  # type: ignore[union-attr]
    assert health.choose(CHAIN, "order") == 1
    clock.advance(10)
    assert health.choose(CHAIN, "order") == 0


def test_score_mode_prefers_the_faster_healthy_provider() -> None:
    health = registry()
    health.health(CHAIN[0]).observe_success(ttft_s=2.0, inter_token_s=0.05)
    health.health(CHAIN[1]).observe_success(ttft_s=0.2, inter_token_s=0.01)
    health.health(CHAIN[2]).observe_success(ttft_s=0.5, inter_token_s=0.02)
    assert health.choose(CHAIN, "score") == 1


def test_errors_weigh_against_a_fast_provider() -> None:
    health = registry()
    health.health(CHAIN[0]).observe_success(ttft_s=0.3, inter_token_s=0.02)
    health.health(CHAIN[1]).observe_success(ttft_s=0.2, inter_token_s=0.01)
    for _ in range(10):
        health.health(CHAIN[1]).observe_failure()
    assert health.choose(CHAIN[:2], "score") == 0


def test_ewma_moves_toward_recent_observations() -> None:
    h = Health()
    h.observe_success(1.0, 0.1)
    for _ in range(20):
        h.observe_success(0.1, 0.01)
    assert h.ttft_s is not None and h.ttft_s < 0.15
