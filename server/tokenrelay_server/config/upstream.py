"""Upstream configuration: providers and model aliases, from TOML.

    [providers.local-openai]
    kind = "openai"                 # "openai" (any OpenAI-compatible API) or "anthropic"
    base_url = "http://127.0.0.1:8081/v1"   # → {base_url}/chat/completions or {base_url}/messages
    api_key_env = "LOCAL_OPENAI_KEY"        # optional; the key is read from this env var
    connect_timeout_s = 5
    first_token_timeout_s = 30
    stall_timeout_s = 30

    [models.fast]                   # the alias a client puts in StartGeneration.model
    chain = [
      { provider = "local-openai", model = "gpt-4o-mini" },
      { provider = "local-anthropic", model = "claude-3-5-haiku-latest" },
    ]

Optional provider keys (defaults in `ProviderConfig`): `max_response_bytes`
(the size cap, 100 MB), `max_connections`, `max_keepalive_connections`,
`keepalive_expiry_s`, `http2` (used when the `h2` package is installed),
`include_usage` (OpenAI `stream_options.include_usage`; turn off for servers
that reject it), `anthropic_version`, `default_max_tokens` (Anthropic needs
one), `assistant_prefill` (Anthropic continuation as a prefill rather than an
instruction), `forward_sim_headers` (send the attempt number and `sim.*` request
metadata as `x-sim-*` headers, for the mock upstream; off by default, so a
real API never sees them).

Secrets never live in the file: a key is read from the environment variable
that `api_key_env` names, when the providers are built, and an `api_key`
key in the file is an error that says so.

Validation errors name the key path (`providers.local-openai.base_url`,
`models.fast.chain[1].provider`) and, when the source text is at hand, the
line (config/problems.py).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import httpx
import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tokenrelay_server.config.problems import (
    ConfigError,
    ConfigProblem,
    KeyLines,
    format_key_path,
    toml_syntax_problem,
    validation_problems,
)
from tokenrelay_server.core.limits import Timeouts

DEFAULT_MAX_RESPONSE_BYTES = 100 * 1024 * 1024
BUILTIN_PROVIDERS: frozenset[str] = frozenset({"sim"})
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    """One upstream: where it is, how to authenticate, how long to wait."""

    kind: Literal["openai", "anthropic"]
    base_url: str
    api_key_env: str | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    first_token_timeout_s: float = Field(default=Timeouts().first_token_s, gt=0)
    stall_timeout_s: float = Field(default=Timeouts().stall_s, gt=0)
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, gt=0)
    max_connections: int = Field(default=100, gt=0)
    max_keepalive_connections: int = Field(default=20, ge=0)
    keepalive_expiry_s: float = Field(default=30.0, gt=0)
    http2: bool = True
    include_usage: bool = True
    anthropic_version: str = "2023-06-01"
    default_max_tokens: int = Field(default=4096, gt=0)
    assistant_prefill: bool = True
    forward_sim_headers: bool = False

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except (httpx.InvalidURL, TypeError) as exc:
            raise ValueError(f"is not a URL ({exc})") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("must be an http:// or https:// URL with a host")
        if url.userinfo:
            # It would reach logs and errors with the URL (issue 13).
            raise ValueError(
                "must not carry a user or password (user:password@); a key goes in the "
                "environment variable api_key_env names"
            )
        if url.query or url.fragment:
            raise ValueError("must not have a query or fragment")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("must be the name of an environment variable, like OPENAI_API_KEY")
        return value


class ChainEntry(_Strict):
    """One step of a fallback chain: a configured provider and its model name."""

    provider: str = Field(min_length=1)
    model: str = Field(min_length=1)


class ModelRoute(_Strict):
    """A model alias: the providers to try, in order."""

    chain: tuple[ChainEntry, ...] = Field(min_length=1)


class UpstreamConfig(_Strict):
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, ModelRoute] = Field(default_factory=dict)


# --- errors that name the key --------------------------------------------------------------


class UpstreamConfigError(ConfigError, ValueError):
    """The upstream configuration is invalid. Each problem names its key
    (and its line, when the source text was at hand)."""

    def __init__(self, source_name: str, problems: Collection[ConfigProblem]) -> None:
        self.source_name = source_name
        super().__init__(
            problem if problem.source else replace(problem, source=source_name)
            for problem in problems
        )


def load_upstream_config(
    document: Mapping[str, Any],
    source_name: str,
    *,
    source_text: str | None = None,
    builtin_providers: Collection[str] = BUILTIN_PROVIDERS,
) -> UpstreamConfig:
    """Validate the `providers` and `models` tables of a parsed TOML document.

    Other top-level tables are ignored (they belong to the rest of the
    gateway's configuration). A chain may name a configured provider or one
    of `builtin_providers` (the simulator). Raises `UpstreamConfigError`.
    """
    section = {key: document[key] for key in ("providers", "models") if key in document}
    lines = KeyLines(source_text) if source_text is not None else None

    def line_of(loc: tuple[str | int, ...]) -> int | None:
        return lines.line_of(loc) if lines else None

    problems: list[ConfigProblem] = []
    config: UpstreamConfig | None = None
    try:
        config = UpstreamConfig.model_validate(section)
    except pydantic.ValidationError as exc:
        problems.extend(
            validation_problems(exc, lambda loc: (source_name, format_key_path(loc), line_of(loc)))
        )
    # Checked on the document itself, so a chain naming an unknown provider is
    # reported even when some other key is wrong too.
    providers = section.get("providers")
    known = set(builtin_providers) | (set(providers) if isinstance(providers, dict) else set())
    names = ", ".join(sorted(known)) or "none"
    for loc, provider in _chain_providers(section.get("models")):
        if provider not in known:
            problems.append(
                ConfigProblem(
                    path=format_key_path(loc),
                    message=f"no provider named {provider!r} (known: {names})",
                    line=line_of(loc),
                )
            )
    if problems or config is None:
        raise UpstreamConfigError(source_name, problems)
    return config


def _chain_providers(models: object) -> list[tuple[tuple[str | int, ...], str]]:
    """(key path, provider name) of every chain entry that names one."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    if not isinstance(models, dict):
        return found
    for alias, route in models.items():
        chain = route.get("chain") if isinstance(route, dict) else None
        if not isinstance(chain, list):
            continue
        for index, entry in enumerate(chain):
            provider = entry.get("provider") if isinstance(entry, dict) else None
            if isinstance(provider, str) and provider:
                found.append((("models", alias, "chain", index, "provider"), provider))
    return found


def missing_api_keys(
    config: UpstreamConfig,
    env: Mapping[str, str],
    source_name: str,
    *,
    source_text: str | None = None,
) -> list[ConfigProblem]:
    """A problem at each `api_key_env` whose variable is not set (or empty),
    so a missing key is reported with the other mistakes, before anything
    starts. (`upstream.build` checks again when it builds the providers.)"""
    lines = KeyLines(source_text) if source_text is not None else None
    problems = []
    for name, provider in config.providers.items():
        if provider.api_key_env is not None and not env.get(provider.api_key_env, "").strip():
            loc = ("providers", name, "api_key_env")
            problems.append(
                ConfigProblem(
                    path=format_key_path(loc),
                    message=f"environment variable {provider.api_key_env} is not set or empty",
                    line=lines.line_of(loc) if lines else None,
                    source=source_name,
                )
            )
    return problems


def load_upstream_config_file(
    path: str | Path, *, builtin_providers: Collection[str] = BUILTIN_PROVIDERS
) -> UpstreamConfig:
    """Read and validate a TOML file (tomllib's syntax errors carry a line)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UpstreamConfigError(str(path), [toml_syntax_problem(str(path), exc)]) from None
    return load_upstream_config(
        document, str(path), source_text=text, builtin_providers=builtin_providers
    )
