"""Server settings: defaults < config file ([server] table) < environment < flags.

Flags and `TOKENRELAY_*` environment variables are read by the CLI (click);
this module owns the typed settings, their limits, and the config file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tokenrelay_server.config.upstream import (
    KeyLines,
    UpstreamConfig,
    UpstreamConfigError,
    load_upstream_config,
)


class ConfigError(Exception):
    """The configuration is invalid; the message names the key."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tr"
    resume_secret: str | None = Field(None, min_length=16)
    retention_s: float = Field(3600.0, gt=0)
    detach_grace_s: float = Field(60.0, ge=0)
    drain_grace_s: float = Field(10.0, ge=0)
    checkpoint_interval: int = Field(10, ge=1, le=100_000)
    max_streams: int = Field(10_000, ge=1)
    max_prompt_bytes: int = Field(1 << 20, ge=1)
    lease_ttl_s: float = Field(10.0, gt=0)
    # Above this resident memory (MiB; 0 = no limit) new streams are refused
    # with RESOURCE_EXHAUSTED and running ones end as typed partials.
    max_memory_mb: float = Field(0.0, ge=0)
    memory_check_interval_s: float = Field(1.0, gt=0)
    first_token_timeout_s: float = Field(30.0, gt=0)
    stall_timeout_s: float = Field(30.0, gt=0)
    # A call that sends no first message (`start`/`resume`) within this time
    # ends with DEADLINE_EXCEEDED, so an idle call holds nothing for long.
    first_message_timeout_s: float = Field(10.0, gt=0)
    sim_pace_ms: float = Field(0.0, ge=0, le=60_000)
    # [recovery]
    max_retries: int = Field(3, ge=0, le=100)
    backoff_base_s: float = Field(1.0, ge=0)
    backoff_cap_s: float = Field(60.0, ge=0)
    jitter: float = Field(0.1, ge=0, le=1)
    retry_budget_ratio: float = Field(0.2, ge=0)
    allow_fallback: bool = True
    allow_partial: bool = True
    resume_on_malformed: bool = False
    selection: Literal["order", "score"] = "order"
    # [breaker]
    breaker_failure_threshold: int = Field(5, ge=1)
    breaker_cooldown_s: float = Field(30.0, ge=0)
    breaker_failure_rate: float = Field(0.5, gt=0, le=1)
    breaker_min_calls: int = Field(20, ge=1)
    breaker_window_s: float = Field(60.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Provider and model tables ([providers.*], [models.*]) from the config file.
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    # Timeouts set by flag or environment: they beat every provider's own.
    timeout_overrides: dict[str, float] = Field(default_factory=dict)


SERVER_KEYS = frozenset(Settings.model_fields) - {"upstream", "timeout_overrides"}
RECOVERY_KEYS = frozenset(
    {
        "max_retries",
        "backoff_base_s",
        "backoff_cap_s",
        "jitter",
        "retry_budget_ratio",
        "allow_fallback",
        "allow_partial",
        "resume_on_malformed",
        "selection",
    }
)
BREAKER_KEYS = frozenset(
    {
        "breaker_failure_threshold",
        "breaker_cooldown_s",
        "breaker_failure_rate",
        "breaker_min_calls",
        "breaker_window_s",
    }
)


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a TOML config file sets: its [server] table, flattened,
    plus the provider tables under "upstream"."""
    try:
        text = path.read_text()
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    unknown = set(raw) - {"server", "providers", "models", "recovery", "breaker"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for table, prefix, keys in (
        ("server", "", SERVER_KEYS - RECOVERY_KEYS - BREAKER_KEYS),
        ("recovery", "", RECOVERY_KEYS),
        ("breaker", "breaker_", BREAKER_KEYS),
    ):
        section = raw.get(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: [{table}] must be a table")
        for key, value in section.items():
            if prefix + key not in keys:
                line = KeyLines(text).line_of((table, key))
                where = f" (line {line})" if line else ""
                raise ConfigError(f"{path}: unknown key {table}.{key}{where}")
            values[prefix + key] = value
    if "providers" in raw or "models" in raw:
        try:
            values["upstream"] = load_upstream_config(raw, str(path), source_text=text)
        except UpstreamConfigError as error:
            raise ConfigError(str(error)) from None
    return values


def build_settings(values: dict[str, Any], *, source: str = "settings") -> Settings:
    try:
        return Settings(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
