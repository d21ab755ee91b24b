"""Server settings: defaults < config file < environment < flags.

The file's [server], [recovery], [limits] and [breaker] tables, the `TOKENRELAY_*`
environment variables and the `serve` flags each set some settings; the CLI
reads the flags (click) and hands them here with the environment.
`load_settings` checks every source on its own, so a file value that a flag
overrides is still checked, and a mistake is reported where it was made
(`FILE:LINE: server.port`, `TOKENRELAY_PORT`, `--port`), every mistake of
a run at once (config/problems.py).

pydantic-settings is not used: it merges its sources before validating, so
an error could name only the setting, never the flag, variable or line that
set it, and an overridden file value would go unchecked.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from redis.asyncio.connection import parse_url

from tokenrelay_server.config.problems import (
    ConfigError,
    ConfigProblem,
    KeyLines,
    format_key_path,
    toml_syntax_problem,
    validation_problems,
)
from tokenrelay_server.config.secrets import parse_resume_secrets
from tokenrelay_server.config.tenants import AuthConfig
from tokenrelay_server.config.upstream import (
    UpstreamConfig,
    UpstreamConfigError,
    load_upstream_config,
    missing_api_keys,
)
from tokenrelay_server.core.breaker import BreakerSettings
from tokenrelay_server.core.limits import HubSettings, LagSettings, RequestLimits, Timeouts
from tokenrelay_server.core.recovery import RecoveryConfig, SelectionMode
from tokenrelay_server.core.retry import DEFAULT_RETRY_BUDGET_RATIO, BackoffPolicy

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "Settings",
    "build_settings",
    "env_var",
    "flag_of",
    "load_settings",
    "read_config_file",
]

ENV_PREFIX = "TOKENRELAY_"


def env_var(name: str) -> str:
    """The environment variable of a setting: `port` → `TOKENRELAY_PORT`."""
    return ENV_PREFIX + name.upper()


def flag_of(name: str) -> str:
    """The flag of a setting: `resume_secret` → `--resume-secret`."""
    return "--" + name.replace("_", "-")


def check_redis_url(url: str) -> str:
    """redis-py's own parser (the one `Redis.from_url` runs) plus what it lets
    pass silently: a host, and a database number that is a number."""
    try:
        parse_url(url)
    except ValueError as error:
        reason = str(error)
        if "scheme" in reason:
            raise ValueError("must start with redis://, rediss:// or unix://") from None
        raise ValueError(f"is not a valid Redis URL: {reason[:1].lower()}{reason[1:]}") from None
    scheme, _, rest = url.partition("://")
    if scheme == "unix":
        if not rest.split("?", 1)[0]:
            raise ValueError("must give the socket path, like unix:///run/redis.sock")
        return url
    authority, _, path = rest.partition("/")
    host = authority.rsplit("@", 1)[-1].split("?", 1)[0]
    if not host or host.startswith(":"):
        raise ValueError("must name a host, like redis://127.0.0.1:6379/0")
    database = path.split("?", 1)[0]
    if database and not database.isdigit():
        raise ValueError("must end with a database number, like /0")
    return url


# The defaults of the engine's settings live with the engine's types.
_HUB = HubSettings()
_LAG = LagSettings()
_TIMEOUTS = Timeouts()
_POLICY = RecoveryConfig()
_BACKOFF = BackoffPolicy()
_BREAKER = BreakerSettings()
_LIMITS = RequestLimits()


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    store: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tr"
    # The Redis at redis_url is a node of a Redis Cluster (store/connect.py).
    redis_cluster: bool = False
    # Worker processes sharing the port through SO_REUSEPORT (issue 10; api/
    # workers.py supervises them). More than one needs the Redis store: a
    # resume may land on any worker (checked in load_settings).
    workers: int = Field(1, ge=1, le=256)
    # Redis connections (issue 9): a bounded pool per replica; a command waits
    # up to redis_pool_timeout_s for a free connection. A transient store
    # failure is retried for store_retry_window_s (appends held back, not
    # dropped); past it running streams end STORE_UNAVAILABLE. Health is
    # probed every store_probe_interval_s (NOT_SERVING while unreachable).
    redis_max_connections: int = Field(128, ge=1)
    redis_pool_timeout_s: float = Field(5.0, gt=0)
    # Group commit (issue 10; store/group_commit.py): the appends of every
    # stream of the process go to Redis together. With a slot free (two
    # batches on the wire at most), a batch goes once it holds max_entries
    # entries or its oldest append has waited max_wait_ms (0: at once); with
    # every slot busy they gather until a batch returns.
    redis_group_commit_max_entries: int = Field(256, ge=1, le=100_000)
    redis_group_commit_max_wait_ms: float = Field(2.0, ge=0, le=1000)
    store_retry_window_s: float = Field(10.0, ge=0)
    store_probe_interval_s: float = Field(0.5, gt=0)
    # `KID:SECRET[,KID:SECRET…]` (a bare SECRET is kid k0): the first signs
    # resume tokens, all verify (rotation); each needs >= 128 bits (secrets.py).
    resume_secret: str | None = None
    retention_s: float = Field(3600.0, gt=0)
    detach_grace_s: float = Field(_HUB.detach_grace_s, ge=0)
    drain_grace_s: float = Field(10.0, ge=0)
    checkpoint_interval: int = Field(_HUB.checkpoint_interval, ge=1, le=100_000)
    max_streams: int = Field(_HUB.max_streams, ge=1)
    max_prompt_bytes: int = Field(1 << 20, ge=1)
    # [limits] (issue 13; core/limits.py RequestLimits): the transport's
    # receive limit (RESOURCE_EXHAUSTED), then what a `start` may hold
    # (INVALID_ARGUMENT naming the field).
    max_request_bytes: int = Field(_LIMITS.max_request_bytes, ge=1024, le=1 << 30)
    max_messages: int = Field(_LIMITS.max_messages, ge=1)
    max_content_chars: int = Field(_LIMITS.max_content_chars, ge=1)
    max_tools: int = Field(_LIMITS.max_tools, ge=0)
    max_metadata_entries: int = Field(_LIMITS.max_metadata_entries, ge=0)
    # TLS (issue 13; api/tls.py): PEM files. Both or neither of cert and key;
    # a client CA turns on mTLS (every client presents a certificate it
    # signed). Reloaded from the same paths on SIGHUP.
    tls_cert: str | None = Field(None, min_length=1)
    tls_key: str | None = Field(None, min_length=1)
    tls_client_ca: str | None = Field(None, min_length=1)
    # The text one stream may hold, across all its attempts (a longer answer
    # ends partial with RESPONSE_TOO_LARGE).
    max_response_bytes: int = Field(_HUB.max_stream_bytes, ge=1)
    lease_ttl_s: float = Field(_HUB.lease_ttl_s, gt=0)
    heartbeat_interval_s: float = Field(_HUB.heartbeat_interval_s, gt=0)
    heartbeat_ttl_s: float = Field(_HUB.heartbeat_ttl_s, gt=0)
    # Above this resident memory (MiB; 0 = no limit) new streams are refused
    # with RESOURCE_EXHAUSTED and running ones end as typed partials.
    max_memory_mb: float = Field(0.0, ge=0)
    memory_check_interval_s: float = Field(_HUB.memory_check_interval_s, gt=0)
    # Load shedding (issue 10): while the event loop's p99 lag over the last
    # loop_lag_window_s is above max_loop_lag_ms (0 = never), new streams get
    # RESOURCE_EXHAUSTED; every refused start is told to retry after
    # shed_retry_after_s (RetryInfo and retry-after-ms).
    max_loop_lag_ms: float = Field(_LAG.threshold_s * 1000, ge=0)
    loop_lag_window_s: float = Field(_LAG.window_s, gt=0, le=60)
    shed_retry_after_s: float = Field(_HUB.shed_retry_after_s, ge=0, le=3600)
    first_token_timeout_s: float = Field(_TIMEOUTS.first_token_s, gt=0)
    stall_timeout_s: float = Field(_TIMEOUTS.stall_s, gt=0)
    # A call that sends no first message (`start`/`resume`) within this time
    # ends with DEADLINE_EXCEEDED, so an idle call holds nothing for long.
    first_message_timeout_s: float = Field(10.0, gt=0)
    sim_pace_ms: float = Field(0.0, ge=0, le=60_000)
    # Route model `sim` (the built-in simulator, which takes fault scripts
    # from request metadata)? None: only when the config defines no [models.*].
    sim: bool | None = None
    # [recovery]
    max_retries: int = Field(_POLICY.max_retries, ge=0, le=100)
    backoff_base_s: float = Field(_BACKOFF.base_s, ge=0)
    backoff_cap_s: float = Field(_BACKOFF.cap_s, ge=0)
    jitter: float = Field(_BACKOFF.jitter, ge=0, le=1)
    retry_budget_ratio: float = Field(DEFAULT_RETRY_BUDGET_RATIO, ge=0)
    allow_fallback: bool = _POLICY.allow_fallback
    allow_partial: bool = _POLICY.allow_partial
    resume_on_malformed: bool = _POLICY.resume_on_malformed
    selection: SelectionMode = _POLICY.selection
    # [breaker]
    breaker_failure_threshold: int = Field(_BREAKER.failure_threshold, ge=1)
    breaker_cooldown_s: float = Field(_BREAKER.cooldown_s, ge=0)
    breaker_failure_rate: float = Field(_BREAKER.failure_rate, gt=0, le=1)
    breaker_min_calls: int = Field(_BREAKER.min_calls, ge=1)
    breaker_window_s: float = Field(_BREAKER.window_s, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Observability: tracing and logs (issue 11; obs/tracing.py, obs/logs.py).
    # `otlp` exports over gRPC as the standard OTEL_EXPORTER_OTLP_* variables say.
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    log_format: Literal["text", "json"] = "text"
    # Prompt and answer text in the lifecycle log lines (DEBUG); off, no
    # line holds any (issue 13).
    log_content: bool = False
    # Metrics and Admin (issue 11): Prometheus /metrics on metrics_host:
    # metrics_port (None: not served; 0 picks a free port); the Admin service
    # only with an admin token, which every Admin call must carry.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    admin_token: str | None = Field(None, min_length=16)
    # Tenants (issue 13): API keys from [[auth.keys]] ("file") or Redis
    # ("redis", shared by replicas; `tokenrelay keys`), limits from [tenants.*].
    auth_store: Literal["file", "redis"] = "file"
    # With no API key configured, serve only on a loopback host unless this is set.
    allow_unauthenticated: bool = False
    auth: AuthConfig = Field(default_factory=AuthConfig)
    # Provider and model tables ([providers.*], [models.*]) from the config file.
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    # Timeouts set by flag or environment: they beat every provider's own.
    timeout_overrides: dict[str, float] = Field(default_factory=dict)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return check_redis_url(value)

    @field_validator("heartbeat_ttl_s")
    @classmethod
    def _heartbeat_ttl(cls, value: float, info: ValidationInfo) -> float:
        # Fields validate in order: the interval (declared before) is known here.
        interval = info.data.get("heartbeat_interval_s", _HUB.heartbeat_interval_s)
        if value <= interval:
            raise ValueError(
                f"must be longer than heartbeat_interval_s ({interval}), or every replica "
                "would look dead between two heartbeats"
            )
        return value

    @property
    def request_limits(self) -> RequestLimits:
        return RequestLimits(
            max_request_bytes=self.max_request_bytes,
            max_messages=self.max_messages,
            max_content_chars=self.max_content_chars,
            max_tools=self.max_tools,
            max_metadata_entries=self.max_metadata_entries,
        )

    @field_validator("resume_secret", mode="before")
    @classmethod
    def _resume_secret(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):  # a TOML array of KID:SECRET strings
            value = ",".join(str(item) for item in value)
        if isinstance(value, str):
            parse_resume_secrets(value)
        return value

    @property
    def resume_keys(self) -> list[tuple[str, str]]:
        """(kid, secret) pairs, the signing one first; [] when none is set."""
        return [] if self.resume_secret is None else parse_resume_secrets(self.resume_secret)

    @property
    def requires_keys(self) -> bool:
        """Every Relay call must carry an API key (keys in Redis, or some in the file)."""
        return self.auth_store == "redis" or bool(self.auth.keys)

    @property
    def sim_routable(self) -> bool:
        """Model `sim` is served: as `sim` says, else only without [models.*]
        (a deployment with real models does not offer fault injection)."""
        return self.sim if self.sim is not None else not self.upstream.models


SERVER_KEYS = frozenset(Settings.model_fields) - {"upstream", "timeout_overrides", "auth"}
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
LIMITS_KEYS = frozenset(
    {
        "max_request_bytes",
        "max_messages",
        "max_content_chars",
        "max_tools",
        "max_metadata_entries",
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


# table → (prefix of its settings, its settings); [breaker] failure_threshold
# is the setting breaker_failure_threshold.
TABLES: dict[str, tuple[str, frozenset[str]]] = {
    "server": ("", SERVER_KEYS - RECOVERY_KEYS - BREAKER_KEYS - LIMITS_KEYS),
    "recovery": ("", RECOVERY_KEYS),
    "limits": ("", LIMITS_KEYS),
    "breaker": ("breaker_", BREAKER_KEYS),
}
UPSTREAM_TABLES = ("providers", "models")
AUTH_TABLES = ("auth", "tenants")
KNOWN_TABLES = (*TABLES, *UPSTREAM_TABLES, *AUTH_TABLES)


def _table_key(setting: str) -> tuple[str, str]:
    """Where a setting lives in the file: max_retries → (recovery, max_retries)."""
    for table, (prefix, keys) in TABLES.items():
        if setting in keys:
            return table, setting.removeprefix(prefix)
    return "server", setting


@dataclass
class _FileSettings:
    """What a config file sets, the mistakes in it, and its text (for lines)."""

    values: dict[str, Any] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)
    text: str | None = None


def _unknown_key(table: str, key: str) -> str:
    prefix, keys = TABLES[table]
    for other, (other_prefix, other_keys) in TABLES.items():
        if other != table and other_prefix + key in other_keys:
            return f"is not a [{table}] key; it belongs in [{other}]"
    names = sorted(name.removeprefix(prefix) for name in keys)
    close = difflib.get_close_matches(key, names, n=1)
    return "is not a known key" + (f" (did you mean {close[0]}?)" if close else "")


def _read_file(path: Path) -> _FileSettings:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return _FileSettings(problems=[ConfigProblem("", "the file does not exist", None, source)])
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        message = f"the file cannot be read ({reason})"
        return _FileSettings(problems=[ConfigProblem("", message, None, source)])
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        return _FileSettings(problems=[toml_syntax_problem(source, error)], text=text)
    result = _check_document(document, source, KeyLines(text))
    if any(name in document for name in UPSTREAM_TABLES):
        try:
            result.values["upstream"] = load_upstream_config(document, source, source_text=text)
        except UpstreamConfigError as error:
            result.problems.extend(error.problems)
    if any(name in document for name in AUTH_TABLES):
        _check_auth(document, source, KeyLines(text), result)
    result.problems.sort(key=lambda problem: problem.line or 0)
    result.text = text
    return result


def _check_auth(
    document: dict[str, Any], source: str, lines: KeyLines, result: _FileSettings
) -> None:
    """[[auth.keys]] and [tenants.*]: into result.values["auth"], or problems
    naming the key (never echoing a value)."""
    auth = document.get("auth", {})
    values: dict[str, Any] = {"tenants": document.get("tenants", {})}
    if isinstance(auth, dict):
        for key in auth:
            if key != "keys":
                path: tuple[str | int, ...] = ("auth", key)
                result.problems.append(
                    ConfigProblem(
                        format_key_path(path),
                        "is not a known key (known: keys)",
                        lines.line_of(path),
                        source,
                    )
                )
        values["keys"] = auth.get("keys", [])
    else:
        result.problems.append(
            ConfigProblem("auth", "must be a table", lines.line_of(("auth",)), source)
        )

    def locate(loc: tuple[str | int, ...]) -> tuple[str, str, int | None]:
        path = ("auth", *loc) if loc and loc[0] == "keys" else loc
        return source, format_key_path(path) or "auth", lines.line_of(path)

    try:
        result.values["auth"] = AuthConfig.model_validate(values)
    except ValidationError as error:
        result.problems.extend(validation_problems(error, locate))


def _check_document(document: dict[str, Any], source: str, lines: KeyLines) -> _FileSettings:
    """The [server], [recovery] and [breaker] settings of a parsed file, and
    every mistake in them and in the top-level tables."""
    result = _FileSettings()

    def problem(loc: tuple[str | int, ...], message: str) -> None:
        result.problems.append(
            ConfigProblem(format_key_path(loc), message, lines.line_of(loc), source)
        )

    for name in document:
        if name in KNOWN_TABLES:
            continue
        if name in SERVER_KEYS:
            table, _ = _table_key(name)
            problem((name,), f"is not a table; the setting {name} belongs in [{table}]")
        else:
            problem((name,), f"is not a known table (known: {', '.join(sorted(KNOWN_TABLES))})")
    where: dict[str, tuple[str, str]] = {}  # setting → (table, key)
    for table, (prefix, keys) in TABLES.items():
        section = document.get(table, {})
        if not isinstance(section, dict):
            problem((table,), "must be a table")
            continue
        for key, value in section.items():
            if prefix + key not in keys:
                problem((table, key), _unknown_key(table, key))
                continue
            result.values[prefix + key] = value
            where[prefix + key] = (table, key)

    def locate(loc: tuple[str | int, ...]) -> tuple[str, str, int | None]:
        path = (*where.get(str(loc[0]), ("server", str(loc[0]))), *loc[1:])
        return source, format_key_path(path), lines.line_of(path)

    try:
        Settings.model_validate(result.values)
    except ValidationError as error:
        result.problems.extend(validation_problems(error, locate))
    return result


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings a TOML config file sets: its [server], [recovery] and
    [breaker] tables, flattened, plus the provider tables under "upstream".
    Raises `ConfigError` listing every mistake in the file."""
    file = _read_file(path)
    if file.problems:
        raise ConfigError(file.problems)
    return file.values


def _problems_of(values: Mapping[str, Any], name_of: Callable[[str], str]) -> list[ConfigProblem]:
    """The mistakes of one source on its own (environment or flags)."""
    try:
        Settings.model_validate(values)
    except ValidationError as error:
        return validation_problems(error, lambda loc: (name_of(str(loc[0])), "", None))
    return []


def load_settings(
    config_file: Path | None,
    *,
    flags: Mapping[str, Any],
    env: Mapping[str, str],
) -> Settings:
    """Defaults < config file < environment < flags, every source checked.

    `flags` maps each setting that has a flag to the value given on the
    command line (None: not given); each of those settings can also be set
    by its `TOKENRELAY_*` variable in `env` (an empty variable counts as
    unset, as click has it). `env` also holds the variables that providers'
    `api_key_env` name. Raises `ConfigError` with every mistake found.
    """
    file = _read_file(config_file) if config_file is not None else _FileSettings()
    problems = list(file.problems)
    upstream = file.values.get("upstream")
    if isinstance(upstream, UpstreamConfig):
        problems += missing_api_keys(upstream, env, str(config_file), source_text=file.text)
        problems.sort(key=lambda problem: problem.line or 0)
    environment = {name: env[env_var(name)] for name in flags if env.get(env_var(name))}
    given = {name: value for name, value in flags.items() if value is not None}
    problems += _problems_of(environment, env_var)
    problems += _problems_of(given, flag_of)
    if problems:
        raise ConfigError(problems)
    explicit = {**environment, **given}
    # A timeout given as a flag or variable applies to every provider, `sim` included.
    overrides = {
        name: explicit[name]
        for name in ("stall_timeout_s", "first_token_timeout_s")
        if name in explicit
    }
    settings = build_settings({**file.values, **explicit, "timeout_overrides": overrides})
    problems = _worker_problems(settings, given, environment, config_file, file.text)
    if problems:
        raise ConfigError(problems)
    return settings


def _worker_problems(
    settings: Settings,
    given: Mapping[str, Any],
    environment: Mapping[str, Any],
    config_file: Path | None,
    text: str | None,
) -> list[ConfigProblem]:
    """What `workers` > 1 needs of the merged settings, reported where
    `workers` was set: the Redis store (a resume may land on any worker, and
    only Redis is shared by them), and room for one metrics port per worker
    (worker i serves /metrics on metrics_port + i)."""
    count = settings.workers
    if count == 1:
        return []
    if "workers" in given:
        source, path, line = flag_of("workers"), "", None
    elif "workers" in environment:
        source, path, line = env_var("workers"), "", None
    else:
        source, path = str(config_file), "server.workers"
        line = KeyLines(text).line_of(("server", "workers")) if text is not None else None
    problems = []
    if settings.store != "redis":
        problems.append(
            ConfigProblem(
                path,
                f"{count} workers need the Redis store ({flag_of('store')} redis): a resume "
                "may land on any worker, and only Redis is shared by them "
                f"(the store is {settings.store})",
                line,
                source,
            )
        )
    first = settings.metrics_port
    if first:  # None: no metrics; 0: each worker picks a free port
        last = first + count - 1
        if last > 65535:
            problems.append(
                ConfigProblem(
                    path,
                    f"{count} workers serve metrics on {flag_of('metrics_port')} + 0..{count - 1}, "
                    f"which passes port 65535; use a lower {flag_of('metrics_port')}",
                    line,
                    source,
                )
            )
        elif first <= settings.port <= last:
            problems.append(
                ConfigProblem(
                    path,
                    f"{count} workers serve metrics on ports {first}-{last}, which holds "
                    f"{flag_of('port')} {settings.port}; move one of them",
                    line,
                    source,
                )
            )
    return problems


def build_settings(values: dict[str, Any], *, source: str = "settings") -> Settings:
    """Settings from already merged values (tests, the chaos runner, the
    benchmarks); a mistake is reported against `source`."""
    try:
        return Settings(**values)
    except ValidationError as error:
        raise ConfigError(
            validation_problems(error, lambda loc: (source, format_key_path(loc), None))
        ) from None
