"""The `tokenrelay` command: serve, chat, demo.

Every `serve` flag can also be set by an environment variable (shown in
`--help`) or in the [server] table of `--config FILE`; a flag beats the
environment, which beats the file, which beats the default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from tokenrelay_server.config.settings import (
    ConfigError,
    Settings,
    build_settings,
    read_config_file,
)

log = logging.getLogger("tokenrelay")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # httpx logs every upstream request at INFO; keep that for debug.
    if level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _env(name: str) -> str:
    return f"TOKENRELAY_{name.upper()}"


# (setting, click type, help). Defaults live in config.Settings alone.
SERVE_OPTIONS: list[tuple[str, Any, str]] = [
    ("host", str, "Address to listen on."),
    ("port", int, "Port to listen on; 0 picks a free one and prints it."),
    (
        "store",
        click.Choice(["memory", "redis"]),
        "Stream log: memory, or Redis shared by replicas.",
    ),
    ("redis_url", str, "Redis URL for --store redis."),
    ("resume_secret", str, "HMAC secret for resume tokens (the same on every replica)."),
    ("detach_grace_s", float, "Seconds a generation runs on with no client attached."),
    ("drain_grace_s", float, "Seconds open streams get to finish after SIGTERM."),
    ("retention_s", float, "Seconds a stream stays resumable after its last write."),
    ("checkpoint_interval", int, "Chunks between Checkpoint events."),
    ("first_token_timeout_s", float, "Seconds to wait for the first token (every provider)."),
    ("stall_timeout_s", float, "Seconds without a token before a stall (every provider)."),
    (
        "first_message_timeout_s",
        float,
        "Seconds a call may take to send its first message (start or resume).",
    ),
    ("max_retries", int, "Upstream retries per provider before falling back."),
    ("backoff_base_s", float, "First retry delay; doubles per retry, with jitter."),
    ("sim_pace_ms", float, "Default delay per token of the simulated model."),
    ("log_level", click.Choice(["debug", "info", "warning", "error"]), "Log verbosity."),
]


def serve_options(function: Any) -> Any:
    for name, kind, help_text in reversed(SERVE_OPTIONS):
        default = Settings.model_fields[name].default
        shown = "random" if name == "resume_secret" else default
        function = click.option(
            "--" + name.replace("_", "-"),
            name,
            type=kind,
            default=None,
            envvar=_env(name),
            show_envvar=True,
            help=f"{help_text}  [default: {shown}]",
        )(function)
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
    envvar=_env("config"),
    show_envvar=True,
    default=None,
    help="TOML file with [server], [providers.*] and [models.*] tables.",
)
@serve_options
@click.pass_context
def serve(ctx: click.Context, config_file: Path | None, **flags: Any) -> None:
    """Run the gateway (in-memory store and the `sim` model by default)."""
    try:
        settings = resolve_settings(ctx, config_file, flags)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    setup_logging(settings.log_level)
    try:
        asyncio.run(_serve(settings))
    except (OSError, ConfigError) as error:
        raise click.ClickException(str(error)) from None
    except KeyboardInterrupt:
        pass


def resolve_settings(
    ctx: click.Context, config_file: Path | None, flags: dict[str, Any]
) -> Settings:
    """Defaults < config file < environment < flags (click reads the last two)."""
    del ctx
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    explicit = {name: value for name, value in flags.items() if value is not None}
    values.update(explicit)
    # A timeout given as a flag or variable applies to every provider, `sim` included.
    overrides = {
        k: explicit[k] for k in ("stall_timeout_s", "first_token_timeout_s") if k in explicit
    }
    values["timeout_overrides"] = overrides
    return build_settings(values, source=str(config_file or "settings"))


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
    if settings.resume_secret is None:
        log.warning(
            "no resume secret set (--resume-secret / TOKENRELAY_RESUME_SECRET): using a random "
            "one, so resume tokens will not survive a restart or work on other replicas"
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining: no new streams; open streams get %.0f s", settings.drain_grace_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.drain_and_stop()
    log.info("stopped")


@main.command()
@click.argument("prompt")
@click.option(
    "--target",
    default="127.0.0.1:50051",
    envvar=_env("target"),
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
def chat(
    prompt: str, target: str, model: str, max_tokens: int | None, meta: tuple[str, ...]
) -> None:
    """Stream an answer to PROMPT, printing tokens as they arrive."""
    from tokenrelay_client.chat import run_chat

    metadata: dict[str, str] = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        metadata[key] = value
    sys.exit(
        asyncio.run(run_chat(target, prompt, model=model, metadata=metadata, max_tokens=max_tokens))
    )


@main.command()
@click.option("--runs", type=int, default=1000, show_default=True, help="Seeded runs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the schedules.")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Runs at once.")
def chaos(runs: int, seed: int, concurrency: int) -> None:
    """Random fault schedules over real HTTP and gRPC; prints a tally and
    every violation, and exits 1 if there is any."""
    from tokenrelay_devtools.chaos import run_chaos

    setup_logging("error")
    tally = asyncio.run(run_chaos(runs, seed=seed, concurrency=concurrency, progress=True))
    print(tally.line())
    for violation in tally.violations:
        print(f"VIOLATION {violation}")
    sys.exit(1 if tally.violations else 0)


@main.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8081, show_default=True, help="Port to listen on.")
def mock_upstream(host: str, port: int) -> None:
    """Serve the simulator over HTTP in the OpenAI and Anthropic streaming
    formats, with fault injection per request (see the README)."""
    from tokenrelay_devtools.mock_upstream import main as serve_mock

    setup_logging("info")
    serve_mock(host, port)


@main.command()
@click.option(
    "--target",
    default=None,
    envvar=_env("target"),
    help="Use this gateway instead of starting one in-process.",
)
def demo(target: str | None) -> None:
    """Watch a stream survive a dropped connection: cut, reconnect, resume, verify."""
    from tokenrelay_devtools.demo import run_demo

    setup_logging("warning")
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(run_demo(target)))


if __name__ == "__main__":
    main()
