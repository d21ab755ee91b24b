"""The `tokenrelay` command: serve, chat, stats, top (and the dev tools).

Every `serve` flag can also be set by an environment variable (shown in
`--help`) or in the [server] table of `--config FILE`; a flag beats the
environment, which beats the file, which beats the default.

click only parses the `serve` flags (as text); config.settings checks them
with the environment and the file, so every mistake of a run is reported at
once, each naming its flag, variable or file line, and `serve` exits with
status 2 without starting anything.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from tokenrelay_client.click_options import client_credential_options, client_tls_options
from tokenrelay_server.config.settings import (
    ConfigError,
    Settings,
    env_var,
    flag_of,
    load_settings,
)
from tokenrelay_server.obs.logs import known_secrets, setup_logging

if TYPE_CHECKING:
    from tokenrelay_server.api.server import RelayServer
    from tokenrelay_server.api.workers import WorkerLink

log = logging.getLogger("tokenrelay")


# Shown in --help; the values are checked by config.settings, not by click.
TEXT, INTEGER, NUMBER = "TEXT", "INTEGER", "NUMBER"

# (setting, metavar, help). Defaults live in config.Settings alone; a bool
# setting is a --name/--no-name switch.
SERVE_OPTIONS: list[tuple[str, str | type[bool], str]] = [
    ("host", TEXT, "Address to listen on."),
    ("port", INTEGER, "Port to listen on; 0 picks a free one and prints it."),
    ("store", "[memory|redis]", "Stream log: memory, or Redis shared by replicas."),
    ("redis_url", TEXT, "Redis URL for --store redis."),
    (
        "workers",
        INTEGER,
        "Gateway processes sharing the port (SO_REUSEPORT), restarted when they die; "
        "more than 1 needs --store redis.",
    ),
    (
        "redis_cluster",
        bool,
        "The Redis at --redis-url is a node of a Redis Cluster (use the cluster client).",
    ),
    (
        "heartbeat_interval_s",
        NUMBER,
        "Seconds between this replica's heartbeats in Redis.",
    ),
    (
        "heartbeat_ttl_s",
        NUMBER,
        "Seconds after its last heartbeat that a replica counts as dead (its streams taken over).",
    ),
    (
        "resume_secret",
        "[KID:]SECRET",
        "HMAC secret of resume tokens (the same on every replica); repeatable: the first "
        "signs, all verify (rotation). The variable takes them comma-separated.",
    ),
    (
        "auth_store",
        "[file|redis]",
        "Where tenant API keys live: [[auth.keys]] in --config, or Redis (`tokenrelay keys`).",
    ),
    (
        "allow_unauthenticated",
        bool,
        "Serve with no API key configured on a non-loopback --host (anyone may call).",
    ),
    ("detach_grace_s", NUMBER, "Seconds a generation runs on with no client attached."),
    ("drain_grace_s", NUMBER, "Seconds open streams get to finish after SIGTERM."),
    ("retention_s", NUMBER, "Seconds a stream stays resumable after its last write."),
    ("checkpoint_interval", INTEGER, "Chunks between Checkpoint events."),
    ("first_token_timeout_s", NUMBER, "Seconds to wait for the first token (every provider)."),
    ("stall_timeout_s", NUMBER, "Seconds without a token before a stall (every provider)."),
    (
        "first_message_timeout_s",
        NUMBER,
        "Seconds a call may take to send its first message (start or resume).",
    ),
    ("max_retries", INTEGER, "Upstream retries per provider before falling back."),
    ("backoff_base_s", NUMBER, "First retry delay; doubles per retry, with jitter."),
    ("sim", bool, "Serve model `sim`, the simulator that takes fault scripts from requests."),
    ("sim_pace_ms", NUMBER, "Default delay per token of the simulated model."),
    ("log_level", "[debug|info|warning|error]", "Log verbosity."),
    (
        "log_content",
        bool,
        "Put prompt and answer text in the DEBUG stream lines (off: no line holds any).",
    ),
    # TLS (issue 13): PEM files, reloaded on SIGHUP.
    ("tls_cert", "FILE", "Serve TLS with this certificate (chain), PEM; needs --tls-key."),
    ("tls_key", "FILE", "The private key of --tls-cert, PEM."),
    (
        "tls_client_ca",
        "FILE",
        "mTLS: require client certificates signed by this CA (PEM).",
    ),
    # Observability (issue 11): tracing and structured logs.
    (
        "otel_exporter",
        "[none|console|otlp]",
        "Where spans go: nowhere, stdout, or OTLP/gRPC (the OTEL_EXPORTER_OTLP_* variables).",
    ),
    ("log_format", "[text|json]", "Log lines as text, or one JSON object per line."),
    # Metrics and Admin (issue 11).
    ("metrics_port", INTEGER, "Serve Prometheus metrics at /metrics on this port (0: a free one)."),
    ("metrics_host", TEXT, "Address the metrics endpoint listens on."),
    (
        "admin_token",
        TEXT,
        "Serve the Admin service (stats, top); calls need `authorization: Bearer TOKEN`.",
    ),
]
DEFAULT_SHOWN = {
    "tls_cert": "off (plaintext)",
    "tls_key": "none",
    "tls_client_ca": "off (no client certificates)",
    "resume_secret": "random",
    "metrics_port": "off",
    "admin_token": "off (no Admin service)",
    "sim": "on when the config defines no [models.*]",
}


# What click.option decorates: a command's callback, any signature.
_Callback = TypeVar("_Callback", bound=Callable[..., Any])


def serve_options(function: _Callback) -> _Callback:
    # No envvar= and no click types: the environment is read, and every
    # value checked, by config.settings.load_settings (all mistakes at once).
    for name, metavar, help_text in reversed(SERVE_OPTIONS):
        shown = DEFAULT_SHOWN.get(name, Settings.model_fields[name].default)
        text = f"{help_text}  [env var: {env_var(name)}; default: {shown}]"
        if metavar is bool:
            flag = flag_of(name)
            option = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=text)
        elif name == "resume_secret":
            option = click.option(
                flag_of(name), name, metavar=metavar, multiple=True, default=None, help=text
            )
        else:
            option = click.option(flag_of(name), name, metavar=metavar, default=None, help=text)
        function = option(function)
    return function


@click.group()
@click.version_option(package_name="tokenrelay")
def main() -> None:
    """tokenrelay: a gRPC gateway that makes LLM token streams survive failure."""


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=env_var("config"),
    show_envvar=True,
    default=None,
    help="TOML file with [server], [providers.*] and [models.*] tables.",
)
@serve_options
@click.pass_context
def serve(
    ctx: click.Context, /, config_file: Path | None, **flags: str | bool | tuple[str, ...] | None
) -> None:
    """Run the gateway (in-memory store and the `sim` model by default)."""
    repeated = flags.get("resume_secret")
    if isinstance(repeated, tuple):  # --resume-secret KID:SECRET, repeatable
        flags["resume_secret"] = ",".join(repeated) or None
    try:
        settings = load_settings(config_file, flags=flags, env=os.environ)
    except ConfigError as error:
        exit_with_problems(ctx, error)
    setup_logging(
        settings.log_level,
        settings.log_format,
        secrets=known_secrets(settings, os.environ),
    )

    reread = ConfigSource(config_file, dict(flags))  # SIGHUP: the config file again
    if settings.workers > 1:
        _supervise(ctx, settings, reread)
    try:
        run_gateway(_serve(settings, reread))
    except ConfigError as error:
        exit_with_problems(ctx, error)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass


CONFIG_ERROR_STATUS = 2  # click's status for a usage error


def run_gateway(main: Coroutine[Any, Any, None]) -> None:
    """Run the gateway on uvloop when it is installed (the `uvloop` extra),
    else on asyncio's own loop. Measured (bench/relay_vs_echo.py --quick, 100
    streams, two runs each): the gateway's CPU per chunk 65-73 µs on uvloop
    against 88-90 µs on asyncio (issue 10)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def exit_with_problems(ctx: click.Context, error: ConfigError) -> NoReturn:
    """Every mistake on its own line, then a count; nothing was started."""
    echo_problems(error)
    ctx.exit(CONFIG_ERROR_STATUS)


def echo_problems(error: ConfigError) -> None:
    for problem in error.problems:
        click.echo(problem.describe(), err=True)
    count = len(error.problems)
    noun = "mistake" if count == 1 else "mistakes"
    click.echo(f"Error: {count} configuration {noun}; nothing was started.", err=True)


@dataclass(frozen=True)
class ConfigSource:
    """Where `serve` read its settings, to read them again on SIGHUP (a
    value, not a closure: a worker of `--workers N` is handed it pickled)."""

    config_file: Path | None
    flags: dict[str, Any]

    def __call__(self) -> Settings:
        return load_settings(self.config_file, flags=self.flags, env=os.environ)


def _print_port(port: int) -> None:
    print(f"port {port}", flush=True)


def _supervise(ctx: click.Context, settings: Settings, reread: ConfigSource) -> NoReturn:
    """`serve --workers N` (N > 1): this process only supervises; each
    worker runs `_serve_worker` (api/workers.py)."""
    from tokenrelay_server.api.workers import supervise

    try:
        status = supervise(
            settings,
            functools.partial(_serve_worker, reread=reread),
            announce_port=_print_port if settings.port == 0 else lambda _port: None,
        )
    except ConfigError as error:
        exit_with_problems(ctx, error)
    except OSError as error:
        raise click.ClickException(str(error)) from None
    ctx.exit(status)


def _serve_worker(settings: Settings, worker: WorkerLink, *, reread: ConfigSource) -> None:
    """A worker process of `serve --workers N` (spawned: a fresh interpreter)."""
    worker.die_with_supervisor()
    setup_logging(
        settings.log_level,
        settings.log_format,
        secrets=known_secrets(settings, os.environ),
    )
    try:
        run_gateway(_serve(settings, reread, worker=worker))
    except ConfigError as error:
        echo_problems(error)
        sys.exit(CONFIG_ERROR_STATUS)
    except OSError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass


async def _serve(
    settings: Settings,
    reread: Callable[[], Settings] | None = None,
    *,
    worker: WorkerLink | None = None,
) -> None:
    from tokenrelay_server.api.heap import tune_collector
    from tokenrelay_server.api.server import RelayServer

    server = await RelayServer.start(settings, reuse_port=worker is not None)
    frozen = tune_collector()
    log.debug("froze %d start-up objects out of the collector's way", frozen)
    log.info(
        "tokenrelay listening on %s (store=%s, models=%s%s)",
        server.address,
        settings.store,
        ",".join(server.hub.router.models),
        "" if worker is None else f", {worker.label}, replica {server.hub.replica_id}",
    )
    if settings.port == 0:
        print(f"port {server.port}", flush=True)
    if server.metrics_url is not None:
        log.info("metrics at %s", server.metrics_url)
    if settings.admin_token:
        log.info("Admin service on (calls need authorization: Bearer <admin token>)")
    if server.authenticator is not None and not server.authenticator.required:
        log.warning(
            "no API key configured: the gateway is open to every caller on %s",
            server.address,
        )
    if settings.resume_secret is None:
        log.warning(
            "no resume secret set (--resume-secret / TOKENRELAY_RESUME_SECRET): using a random "
            "one, so resume tokens will not survive a restart or work on other replicas"
        )
    if server.tls is not None:
        mode = "mTLS" if settings.tls_client_ca else "TLS"
        log.info("%s on; SIGHUP reloads the certificate files (and the config file's keys)", mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _on_sighup, server, reread)
    if worker is not None:
        worker.ready(server.port, server.hub.replica_id)
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    log.info("draining: no new streams; open streams get %.0f s", settings.drain_grace_s)
    # While draining, a lone gateway ignores another SIGTERM (`timeout` and
    # systemd signal the process and then its group: the second must not cut
    # the drain short) and stops at once on another SIGINT (Ctrl-C again),
    # as the supervisor of `--workers` does. A worker ignores both (its
    # supervisor forwards the signal it got itself, api/workers.py, and
    # hurries it instead).
    if worker is None:
        loop.remove_signal_handler(signal.SIGINT)
        loop.add_signal_handler(signal.SIGTERM, _already_draining)
    await server.drain_and_stop()
    log.info("stopped")


def _already_draining() -> None:
    log.info("SIGTERM again: already draining (SIGINT, Ctrl-C, stops at once)")


def _on_sighup(server: RelayServer, reread: Callable[[], Settings] | None) -> None:
    _reload_certificates(server)
    if reread is not None:
        _reload_keys(server, reread)


def _reload_keys(server: RelayServer, reread: Callable[[], Settings]) -> None:
    """SIGHUP: the config file's [[auth.keys]] and [tenants.*] again (api/auth.py
    `Authenticator.reload`). A file that does not load changes nothing."""
    if server.authenticator is None:
        return
    try:
        settings = reread()
    except ConfigError as error:
        log.error(
            "SIGHUP: the config file does not load; still using the old API keys and tenants: %s",
            "; ".join(problem.describe() for problem in error.problems),
        )
        return
    summary = server.authenticator.reload(settings.auth)
    log.info("SIGHUP: API keys and tenants reloaded from the config file: %s", summary)


def _reload_certificates(server: RelayServer) -> None:
    """SIGHUP: new connections get the files' certificates; open streams run
    on. Files that do not load leave the old ones in place (api/tls.py)."""
    if server.tls is None:
        log.info("SIGHUP: no TLS files to reload (plaintext port)")
        return
    try:
        server.reload_certificates()
    except ConfigError as error:
        log.error(
            "SIGHUP: the TLS files do not load; still serving the old certificates: %s",
            "; ".join(problem.describe() for problem in error.problems),
        )
        return
    log.info("TLS certificates reloaded (new connections get them; open streams run on)")


@main.command()
@click.argument("prompt")
@click.option(
    "--target",
    default="127.0.0.1:50051",
    envvar=env_var("target"),
    show_envvar=True,
    show_default=True,
    help="The gateway's address.",
)
@click.option("--model", default="sim", show_default=True, help="Model alias.")
@click.option("--max-tokens", type=int, default=None, help="Answer length limit.")
@click.option(
    "--meta",
    "meta",
    multiple=True,
    metavar="KEY=VALUE",
    help="Request metadata, e.g. --meta sim.pace_ms=20 (repeatable).",
)
@click.option(
    "--reconnects",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Reconnect attempts in a row without a new chunk before giving up.",
)
@click.option(
    "--connect-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=2.0,
    show_default=True,
    help="How long one attempt waits for the gateway to answer.",
)
@click.option(
    "--backoff-base-s",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="The first wait before a reconnect; it doubles per attempt.",
)
@click.option(
    "--tool",
    "tool_specs",
    multiple=True,
    metavar="NAME[=SCHEMA]",
    help="Offer the model a tool, with the JSON Schema of its arguments "
    """(e.g. --tool 'get_weather={"type":"object","properties":{"city":{"type":"string"}}}'); """
    "repeatable. Tool calls are shown on stderr.",
)
@click.option(
    "--tool-choice",
    default=None,
    metavar="auto|none|required|NAME",
    help="Whether the model may, must not or must call a tool, or which one.",
)
@click.option(
    "--tool-calls",
    type=click.Choice(["whole", "stream"]),
    default=None,
    help="Tool calls held until whole (the gateway's default) or streamed as they come.",
)
@client_credential_options
def chat(
    prompt: str,
    target: str,
    model: str,
    max_tokens: int | None,
    meta: tuple[str, ...],
    reconnects: int,
    connect_timeout_s: float,
    backoff_base_s: float,
    tool_specs: tuple[str, ...],
    tool_choice: str | None,
    tool_calls: str | None,
    api_key: str | None,
    tls_ca: Path | None,
    tls_client_cert: Path | None,
    tls_client_key: Path | None,
) -> None:
    """Stream an answer to PROMPT, printing tokens as they arrive (the
    model's reasoning and tool calls go to stderr, beside the answer).

    Exit status: 0 a complete answer, 2 a partial one (the gateway gave up
    after some text), 1 no answer."""
    from tokenrelay_client.chat import run_chat

    tools = [_tool_spec(spec) for spec in tool_specs]
    choice: str | dict[str, str] | None = tool_choice
    if tool_choice is not None and tool_choice not in ("auto", "none", "required"):
        choice = {"name": tool_choice}
    metadata: dict[str, str] = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        metadata[key] = value
    sys.exit(
        asyncio.run(
            run_chat(
                target,
                prompt,
                model=model,
                metadata=metadata,
                max_tokens=max_tokens,
                max_reconnects=reconnects,
                connect_timeout_s=connect_timeout_s,
                backoff_base_s=backoff_base_s,
                tools=tools,
                tool_choice=choice,
                tool_calls=tool_calls,
                api_key=api_key,
                tls_ca=tls_ca,
                tls_client_cert=tls_client_cert,
                tls_client_key=tls_client_key,
            )
        )
    )


def _tool_spec(spec: str) -> dict[str, Any]:
    """`NAME` or `NAME=SCHEMA` (JSON) from --tool."""
    name, sep, schema = spec.partition("=")
    if not name:
        raise click.BadParameter(f"{spec!r} has no tool name", param_hint="--tool")
    parameters = None
    if sep:
        try:
            parameters = json.loads(schema)
        except ValueError as error:
            raise click.BadParameter(
                f"the schema of {name!r} is not JSON ({error})", param_hint="--tool"
            ) from None
        if not isinstance(parameters, dict):
            raise click.BadParameter(
                f"the schema of {name!r} is not a JSON object", param_hint="--tool"
            )
    return {"name": name, "parameters": parameters}


# --- operators: stats and top (Admin service, issue 11) ------------------------------------


def admin_options(function: Any) -> Any:
    function = client_tls_options(function)
    function = click.option(
        "--admin-token",
        envvar=env_var("admin_token"),
        show_envvar=True,
        default=None,
        help="The gateway's admin token (sent as authorization: Bearer TOKEN).",
    )(function)
    return click.option(
        "--target",
        default="127.0.0.1:50051",
        envvar=env_var("target"),
        show_envvar=True,
        show_default=True,
        help="The gateway's address.",
    )(function)


def admin_credentials(
    tls_ca: Path | None, tls_client_cert: Path | None, tls_client_key: Path | None
) -> Any:
    """The TLS credentials of `stats`/`top` (None: plaintext)."""
    from tokenrelay_client.credentials import tls_credentials

    try:
        return tls_credentials(tls_ca, tls_client_cert, tls_client_key)
    except ValueError as error:
        raise click.UsageError(str(error)) from None


def require_token(token: str | None) -> str:
    if not token:
        raise click.UsageError(
            "the Admin service needs the gateway's admin token: pass --admin-token or set "
            f"{env_var('admin_token')}"
        )
    return token


@main.command()
@click.option(
    "--period",
    type=click.Choice(["hour", "day", "week"]),
    default="hour",
    show_default=True,
    help="The last hour (minute buckets), day (hour buckets) or week (day buckets).",
)
@admin_options
def stats(
    period: str,
    target: str,
    admin_token: str | None,
    tls_ca: Path | None,
    tls_client_cert: Path | None,
    tls_client_key: Path | None,
) -> None:
    """Print the gateway's error statistics: one row per error type and code,
    most frequent first (every replica's, when they share Redis).

    Exit status: 0 printed, 1 the gateway could not be asked."""
    from rich.console import Console

    from tokenrelay_client.admin import run_stats

    token = require_token(admin_token)
    credentials = admin_credentials(tls_ca, tls_client_cert, tls_client_key)
    sys.exit(
        asyncio.run(
            run_stats(target, token, period, Console(width=_width()), credentials=credentials)
        )
    )


@main.command()
@admin_options
@click.option(
    "--interval-s",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
def top(
    target: str,
    admin_token: str | None,
    interval_s: float,
    tls_ca: Path | None,
    tls_client_cert: Path | None,
    tls_client_key: Path | None,
) -> None:
    """A live view of one gateway replica: streams, tokens/s, errors/min by
    code, breakers, recent recovery actions. Refreshes in place on a terminal
    (Ctrl-C quits); prints one snapshot when stdout is not a terminal."""
    from rich.console import Console

    from tokenrelay_client.admin import run_top

    token = require_token(admin_token)
    credentials = admin_credentials(tls_ca, tls_client_cert, tls_client_key)
    console = Console() if sys.stdout.isatty() else Console(width=_width())
    try:
        sys.exit(
            asyncio.run(
                run_top(target, token, console, interval_s=interval_s, credentials=credentials)
            )
        )
    except KeyboardInterrupt:
        pass


def _width() -> int:
    """Off a terminal rich would wrap at 80 columns; a table row per line reads
    better in a file or a pipe (COLUMNS still wins)."""
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() else 160


# --- tenants: API keys (issue 13) ------------------------------------------------------------


def key_store_options(function: Any) -> Any:
    for option in reversed(
        [
            click.option(
                "--config",
                "config_file",
                type=click.Path(dir_okay=False, path_type=Path),
                envvar=env_var("config"),
                show_envvar=True,
                default=None,
                help="The gateway's config file (its [[auth.keys]], or its Redis settings).",
            ),
            click.option(
                "--store",
                "auth_store",
                type=click.Choice(["file", "redis"]),
                envvar=env_var("auth_store"),
                show_envvar=True,
                default=None,
                help="Keys in the config file (prints TOML to add) or in Redis (stores them). "
                "[default: the config's auth_store, else file]",
            ),
            click.option(
                "--redis-url", envvar=env_var("redis_url"), default=None, help="Redis URL."
            ),
            click.option(
                "--redis-prefix", envvar=env_var("redis_prefix"), default=None, help="Key prefix."
            ),
        ]
    ):
        function = option(function)
    return function


def _key_settings(
    ctx: click.Context,
    config_file: Path | None,
    auth_store: str | None,
    redis_url: str | None,
    redis_prefix: str | None,
) -> Settings:
    from tokenrelay_server.config.settings import build_settings, read_config_file

    try:
        values = read_config_file(config_file) if config_file is not None else {}
        for name, value in (
            ("auth_store", auth_store),
            ("redis_url", redis_url),
            ("redis_prefix", redis_prefix),
        ):
            if value is not None:
                values[name] = value
        return build_settings(values, source="keys")
    except ConfigError as error:
        exit_with_problems(ctx, error)


@main.group()
def keys() -> None:
    """Tenant API keys: add, list, revoke; and a new resume secret."""


@keys.command("add")
@click.option("--tenant", required=True, help="The tenant the key belongs to.")
@click.option("--id", "key_id", default=None, help="The key's id (default: TENANT-<random>).")
@key_store_options
@click.pass_context
def keys_add(
    ctx: click.Context,
    tenant: str,
    key_id: str | None,
    config_file: Path | None,
    auth_store: str | None,
    redis_url: str | None,
    redis_prefix: str | None,
) -> None:
    """Make a new API key (32 random bytes) and print it once. Redis: its hash
    is stored, every replica accepts it now. File: prints the [[auth.keys]]
    lines to add to the config (the key itself is not in them)."""
    import re
    import secrets
    import time

    from tokenrelay_server.config.tenants import NAME_PATTERN, key_hash
    from tokenrelay_server.store.keys import KeyRecord

    key_id = key_id or f"{tenant}-{secrets.token_hex(3)}"
    for what, value in (("--tenant", tenant), ("--id", key_id)):
        if not re.fullmatch(NAME_PATTERN, value):
            raise click.BadParameter("must be 1-64 letters, digits, '_' or '-'", param_hint=what)
    settings = _key_settings(ctx, config_file, auth_store, redis_url, redis_prefix)
    key = "trk_" + secrets.token_urlsafe(32)
    record = KeyRecord(id=key_id, tenant=tenant, sha256=key_hash(key), created_at=time.time())
    if settings.auth_store == "redis":
        if any(entry.id == key_id for entry in settings.auth.keys):
            raise click.ClickException(f"key id {key_id} is already in the config file")
        asyncio.run(_redis_keys(settings, lambda store: store.add(record)))
        click.echo(f"added key {key_id} for tenant {tenant} (Redis); the key, shown once:")
        click.echo(key)
        return
    if any(entry.id == key_id for entry in settings.auth.keys):
        raise click.ClickException(f"key id {key_id} is already in the config file")
    click.echo(f"# key {key_id} for tenant {tenant}; add these lines to the config file:", err=True)
    click.echo(f'[[auth.keys]]\nid = "{key_id}"\ntenant = "{tenant}"\nsha256 = "{record.sha256}"')
    click.echo("# the key, shown once (give it to the tenant):", err=True)
    click.echo(key, err=True)


@keys.command("list")
@key_store_options
@click.pass_context
def keys_list(
    ctx: click.Context,
    config_file: Path | None,
    auth_store: str | None,
    redis_url: str | None,
    redis_prefix: str | None,
) -> None:
    """List the keys: id and tenant (never the key)."""
    settings = _key_settings(ctx, config_file, auth_store, redis_url, redis_prefix)
    if settings.auth_store == "redis":
        records = asyncio.run(_redis_keys(settings, lambda store: store.list()))
        rows = [(record.id, record.tenant) for record in records]
    else:
        rows = [(entry.id, entry.tenant) for entry in settings.auth.keys]
    for key_id, tenant in rows:
        click.echo(f"{key_id}\t{tenant}")
    if not rows:
        click.echo("no keys", err=True)


@keys.command("revoke")
@click.argument("key_id")
@key_store_options
@click.pass_context
def keys_revoke(
    ctx: click.Context,
    key_id: str,
    config_file: Path | None,
    auth_store: str | None,
    redis_url: str | None,
    redis_prefix: str | None,
) -> None:
    """Revoke key KEY_ID. Redis: every replica refuses it within 2 s. File:
    delete its [[auth.keys]] entry and restart the replicas."""
    settings = _key_settings(ctx, config_file, auth_store, redis_url, redis_prefix)
    if settings.auth_store != "redis":
        raise click.ClickException(
            f"keys in the config file are revoked by deleting the [[auth.keys]] entry with "
            f'id = "{key_id}" and restarting the gateway (or keep keys in Redis: --store redis)'
        )
    if not asyncio.run(_redis_keys(settings, lambda store: store.revoke(key_id))):
        raise click.ClickException(f"no key has id {key_id}")
    click.echo(f"revoked key {key_id}")


@keys.command("secret")
def keys_secret() -> None:
    """Print a new resume secret (32 random bytes, hex) for --resume-secret KID:SECRET."""
    from tokenrelay_server.config.secrets import new_secret

    click.echo(new_secret())


_Result = TypeVar("_Result")


async def _redis_keys(settings: Settings, action: Callable[[Any], Any]) -> Any:
    from tokenrelay_server.store.tenants_redis import RedisKeys

    store = RedisKeys.from_url(settings.redis_url, prefix=settings.redis_prefix)
    try:
        return await action(store)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    except OSError as error:
        raise click.ClickException(f"cannot reach Redis at {settings.redis_url}: {error}") from None
    finally:
        await store.close()


def add_tool_commands(group: click.Group) -> None:
    """Commands other installed packages contribute (entry point group
    `tokenrelay.commands`): the development tools (`chaos`, `mock-upstream`,
    `demo`) come this way, so the gateway never imports them itself."""
    for entry in entry_points(group="tokenrelay.commands"):
        command = entry.load()
        if isinstance(command, click.Command):
            group.add_command(command, entry.name)


add_tool_commands(main)


if __name__ == "__main__":
    main()
