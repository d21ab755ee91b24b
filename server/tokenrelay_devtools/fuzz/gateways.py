"""The gateway a fuzz run uses when it is not given one: a `tokenrelay serve`
process with timers short enough that a fuzzed stall, a missing first token
or a backoff costs a fraction of a second, a dropped call that takes its
generation with it (no detach grace), a prompt limit a huge string
passes, and breakers and retry budgets out of reach: fuzzed fault scripts
fail the simulator on purpose, and a breaker they opened would end the
clean stream the run ends with (BREAKER_OPEN); no shedding on event-loop
lag either (a loaded machine would refuse that stream too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenrelay_devtools.gateway import GatewayProcess

FUZZ_SETTINGS: dict[str, Any] = {
    "detach_grace_s": 0,
    "max_prompt_bytes": 64 << 10,
    "stall_timeout_s": 0.2,
    "first_token_timeout_s": 0.5,
    "backoff_base_s": 0,
    "backoff_cap_s": 0,
    "retry_budget_ratio": 1000,
    "breaker_failure_threshold": 1_000_000,
    "breaker_failure_rate": 1.0,
    "max_loop_lag_ms": 0,
    "log_level": "warning",
}


def fuzz_gateway(workdir: Path | None = None, **overrides: Any) -> GatewayProcess:
    return GatewayProcess.start(workdir, **{**FUZZ_SETTINGS, **overrides})
