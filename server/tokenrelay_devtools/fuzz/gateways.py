"""The gateway a fuzz run uses when it is not given one: a `tokenrelay serve`
process with timers short enough that a fuzzed stall, a missing first token
or a backoff costs a fraction of a second, a dropped call that takes its
generation with it (no detach grace), a prompt limit a huge string
passes, and breakers and retry budgets out of reach: fuzzed fault scripts
fail the simulator on purpose, and a breaker they opened would end the
clean stream the run ends with (BREAKER_OPEN); no shedding on event-loop
lag either (a loaded machine would refuse that stream too).

`keyed_fuzz_gateway` is the same gateway with tenant keys: two tenants
(FUZZ_TENANTS' limits), so a run has a valid key and a foreign tenant's key
and every missing, malformed or unknown key must be refused. The run's own
tenant may take far more than a run asks for (its limits are exercised,
never reached, so the clean stream the run ends with is admitted); the
foreign one has tighter limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenrelay_devtools.gateway import GatewayProcess, keyed_tenants

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


# [tenants.*] of the keyed gateway: "own" is the run's (Material.api_key),
# "foreign" another tenant's (Material.foreign_key).
FUZZ_TENANTS: dict[str, dict[str, Any]] = {
    "own": {"max_concurrent_streams": 64, "tokens_per_minute": 100_000_000},
    "foreign": {"max_concurrent_streams": 8, "tokens_per_minute": 1_000_000, "models": ["sim"]},
}


def fuzz_gateway(workdir: Path | None = None, **overrides: Any) -> GatewayProcess:
    return GatewayProcess.start(workdir, **{**FUZZ_SETTINGS, **overrides})


def keyed_fuzz_gateway(workdir: Path | None = None, **overrides: Any) -> GatewayProcess:
    """The fuzz gateway with [[auth.keys]]: `key_of("own")` and `key_of("foreign")`."""
    keys, tenants = keyed_tenants(FUZZ_TENANTS["own"], FUZZ_TENANTS["foreign"])
    return GatewayProcess.start(
        workdir, keys=keys, tenants=tenants, **{**FUZZ_SETTINGS, **overrides}
    )
