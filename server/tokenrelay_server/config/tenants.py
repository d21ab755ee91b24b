"""Tenants and their API keys (issue 13): the [[auth.keys]] and [tenants.*]
tables of the config file.

    [[auth.keys]]
    id = "acme-1"
    tenant = "acme"
    sha256 = "9f86d0…"          # SHA-256 hex of the key; the key itself is never stored
    [tenants.acme]
    max_concurrent_streams = 20
    tokens_per_minute = 60000
    models = ["fast", "smart"]  # optional: the aliases this tenant may use
    default_max_tokens = 1024   # reserved against tokens_per_minute when a start sets none

With `auth_store = "redis"` the keys live in Redis instead (shared by every
replica; `tokenrelay keys add/list/revoke`), and the [tenants.*] tables still
come from the file (every replica reads the same file).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_NAME = re.compile(NAME_PATTERN)
SHA256_PATTERN = r"^[0-9a-f]{64}$"
DEFAULT_MAX_TOKENS = 1024


def key_hash(key: str) -> str:
    """What is stored of an API key: its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=NAME_PATTERN)
    tenant: str = Field(pattern=NAME_PATTERN)
    sha256: str = Field(pattern=SHA256_PATTERN)

    @field_validator("sha256", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent_streams: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    models: tuple[str, ...] | None = None
    default_max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1)

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


NO_LIMITS = TenantLimits()


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    keys: tuple[KeyEntry, ...] = ()
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantLimits]) -> dict[str, TenantLimits]:
        for name in value:
            if not _NAME.fullmatch(name):
                raise ValueError(f"tenant name {name!r} must be 1-64 letters, digits, '_' or '-'")
        return value

    @model_validator(mode="after")
    def _unique_keys(self) -> AuthConfig:
        ids: set[str] = set()
        hashes: set[str] = set()
        for entry in self.keys:
            if entry.id in ids:
                raise ValueError(f"auth.keys: key id {entry.id} is given twice")
            if entry.sha256 in hashes:
                raise ValueError(f"auth.keys: key {entry.id} has the same sha256 as another key")
            ids.add(entry.id)
            hashes.add(entry.sha256)
        return self

    def limits(self, tenant: str) -> TenantLimits:
        return self.tenants.get(tenant, NO_LIMITS)
