"""The development tools as `tokenrelay` subcommands (`chaos`,
`mock-upstream`, `demo`), registered through the `tokenrelay.commands`
entry point group: the gateway's CLI finds them when this package is
installed and never imports it by name. (`setup_logging`, obs/logs.py, is
imported inside each command: registering the commands loads nothing more.)"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import click

from tokenrelay_client.click_options import client_credential_options
from tokenrelay_server.config.settings import env_var


@click.command()
@click.option("--runs", type=int, default=1000, show_default=True, help="Seeded runs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the schedules.")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Runs at once.")
def chaos(runs: int, seed: int, concurrency: int) -> None:
    """Random fault schedules over real HTTP and gRPC; prints a tally and
    every violation, and exits 1 if there is any."""
    from tokenrelay_devtools.chaos import run_chaos
    from tokenrelay_server.obs.logs import setup_logging

    setup_logging("error")
    tally = asyncio.run(run_chaos(runs, seed=seed, concurrency=concurrency, progress=True))
    print(tally.line())
    for violation in tally.violations:
        print(f"VIOLATION {violation}")
    sys.exit(1 if tally.violations else 0)


@click.command("mock-upstream")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8081, show_default=True, help="Port to listen on.")
def mock_upstream(host: str, port: int) -> None:
    """Serve the simulator over HTTP in the OpenAI and Anthropic streaming
    formats, with fault injection per request (see the README)."""
    from tokenrelay_devtools.mock_upstream import main as serve_mock
    from tokenrelay_server.obs.logs import setup_logging

    setup_logging("info")
    serve_mock(host, port)


@click.command()
@click.option(
    "--target",
    default=None,
    envvar=env_var("target"),
    help="Use this gateway instead of starting one in-process.",
)
@client_credential_options
def demo(
    target: str | None,
    api_key: str | None,
    tls_ca: Path | None,
    tls_client_cert: Path | None,
    tls_client_key: Path | None,
) -> None:
    """Watch a stream survive a dropped connection: cut, reconnect, resume, verify.
    The --api-key and --tls-* options are for a --target gateway's calls."""
    from tokenrelay_devtools.demo import ClientCredentials, run_demo
    from tokenrelay_server.obs.logs import setup_logging

    if target is None and any(
        value is not None for value in (tls_ca, tls_client_cert, tls_client_key)
    ):
        raise click.UsageError(
            "--tls-ca, --tls-client-cert and --tls-client-key are for a --target gateway "
            "(the in-process one serves plaintext)"
        )
    credentials = ClientCredentials(api_key, tls_ca, tls_client_cert, tls_client_key)
    setup_logging("warning")
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(run_demo(target, credentials=credentials)))
