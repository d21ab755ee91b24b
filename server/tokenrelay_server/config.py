"""Server settings: defaults < config file ([server] table) < environment < flags.

Flags and `TOKENRELAY_*` environment variables are read by the CLI (click);
this module owns the typed settings, their limits, and the config file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


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
    first_token_timeout_s: float = Field(30.0, gt=0)
    stall_timeout_s: float = Field(30.0, gt=0)
    sim_pace_ms: float = Field(0.0, ge=0, le=60_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Provider and model tables ([providers.*], [models.*]) from the config file.
    upstream: dict[str, Any] = Field(default_factory=dict)


SERVER_KEYS = frozenset(Settings.model_fields) - {"upstream"}


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a TOML config file sets: its [server] table, flattened,
    plus the provider tables under "upstream"."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: {error}") from None
    unknown = set(raw) - {"server", "providers", "models", "recovery", "breaker"}
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(sorted(unknown))}")
    server = raw.get("server", {})
    bad = set(server) - SERVER_KEYS
    if bad:
        raise ConfigError(f"{path}: unknown key(s) server.{', server.'.join(sorted(bad))}")
    values = dict(server)
    upstream = {k: raw[k] for k in ("providers", "models", "recovery", "breaker") if k in raw}
    if upstream:
        values["upstream"] = upstream
    return values


def build_settings(values: dict[str, Any], *, source: str = "settings") -> Settings:
    try:
        return Settings(**values)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None
