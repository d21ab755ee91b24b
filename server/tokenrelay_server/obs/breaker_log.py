"""One structured warning when a circuit breaker opens (issue 11.5).

Logged through the standard `logging` module with the fields in `extra`
(event, breaker, provider, upstream_model, state_before, trigger), so the
log formatter of the deployment (text or JSON) decides how it looks. Only
the opening from CLOSED warns: a breaker that re-opens after a failed
half-open probe is still the same outage (core/breaker.py logs every change
at INFO), and TokenrelayBreakerOpen alerts when it lasts."""

from __future__ import annotations

import logging

from tokenrelay_server.core.breaker import BreakerChange, BreakerState

log = logging.getLogger(__name__)


def warn_on_breaker_open(change: BreakerChange) -> None:
    """A breaker listener (core/breaker.py BreakerListener): the server
    assembly gives it to every breaker, so it costs nothing per chunk."""
    if change.after is not BreakerState.OPEN or change.before is not BreakerState.CLOSED:
        return
    provider, _, model = change.name.partition("/")
    log.warning(
        "circuit breaker %s opened (%s): calls to it are refused until its cool-down ends",
        change.name,
        change.event,
        extra={
            "event": "breaker_opened",
            "breaker": change.name,
            "provider": provider,
            "upstream_model": model,
            "state_before": str(change.before),
            "trigger": str(change.event),
        },
    )
