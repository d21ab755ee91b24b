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
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
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
    ("resume_secret", TEXT, "HMAC secret for resume tokens (the same on every replica)."),
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
def serve(ctx: click.Context, /, config_file: Path | None, **flags: str | bool | None) -> None:
    """Run the gateway (in-memory store and the `sim` model by default)."""
    try:
        settings = load_settings(config_file, flags=flags, env=os.environ)
    except ConfigError as error:
        exit_with_problems(ctx, error)
    setup_logging(
        settings.log_level,
        settings.log_format,
        secrets=known_secrets(settings, os.environ),
    )
    try:
        run_gateway(_serve(settings))
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
    for problem in error.problems:
        click.echo(problem.describe(), err=True)
    count = len(error.problems)
    noun = "mistake" if count == 1 else "mistakes"
    click.echo(f"Error: {count} configuration {noun}; nothing was started.", err=True)
    ctx.exit(CONFIG_ERROR_STATUS)


async def _serve(settings: Settings) -> None:
    from tokenrelay_server.api.server import RelayServer

    server = await RelayServer.start(settings)
    log.info(
        "tokenrelay listening on %s (store=%s, models=%s)",
        server.address,
        settings.store,
        ",".join(server.hub.router.models),
    )
    if settings.port == 0:
        print(f"port {server.port}", flush=True)
    if server.metrics_url is not None:
        log.info("metrics at %s", server.metrics_url)
    if settings.admin_token:
        log.info("Admin service on (calls need authorization: Bearer <admin token>)")
    if settings.resume_secret is None:
        log.warning(
            "no resume secret set (--resume-secret / TOKENRELAY_RESUME_SECRET): using a random "
            "one, so resume tokens will not survive a restart or work on other replicas"
        )
    if server.tls is not None:
        mode = "mTLS" if settings.tls_client_ca else "TLS"
        log.info("%s on; SIGHUP reloads the certificate files", mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_certificates, server)
    await stop.wait()
    loop.remove_signal_handler(signal.SIGHUP)
    log.info("draining: no new streams; open streams get %.0f s", settings.drain_grace_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.drain_and_stop()
    log.info("stopped")


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
