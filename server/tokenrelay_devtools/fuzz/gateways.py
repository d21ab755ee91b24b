"""The gateway a fuzz run uses when it is not given one: a `tokenrelay serve`
process with timers short enough that a fuzzed stall, a missing first token
or a backoff costs a fraction of a second, a dropped call that takes its
generation with it (no detach grace), and a prompt limit a huge string
passes."""

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
    "log_level": "warning",
}


def fuzz_gateway(workdir: Path | None = None, **overrides: Any) -> GatewayProcess:
    return GatewayProcess.start(workdir, **{**FUZZ_SETTINGS, **overrides})
