"""The options of a command that calls the gateway as a client (`tokenrelay
chat`, `demo`, `stats`, `top`; issue 13): the API key and the TLS files, as
RelayClient takes them (credentials.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .credentials import API_KEY_ENV

_Callback = TypeVar("_Callback", bound=Callable[..., Any])


def _apply(function: _Callback, options: list[Callable[[Any], Any]]) -> _Callback:
    for option in reversed(options):
        function = option(function)
    return function


def client_tls_options(function: _Callback) -> _Callback:
    """--tls-ca, --tls-client-cert and --tls-client-key, passed to the
    command as tls_ca, tls_client_cert and tls_client_key (Paths or None)."""
    existing = click.Path(exists=True, dir_okay=False, path_type=Path)
    return _apply(
        function,
        [
            click.option(
                "--tls-ca",
                type=existing,
                default=None,
                help="Connect with TLS, trusting this CA (PEM) for the gateway's certificate.",
            ),
            click.option(
                "--tls-client-cert",
                type=existing,
                default=None,
                help="mTLS: the client certificate (PEM); needs --tls-client-key.",
            ),
            click.option(
                "--tls-client-key",
                type=existing,
                default=None,
                help="mTLS: the client certificate's private key (PEM).",
            ),
        ],
    )


def client_credential_options(function: _Callback) -> _Callback:
    """--api-key ($TOKENRELAY_API_KEY) and the --tls-* files, passed to the
    command as api_key, tls_ca, tls_client_cert and tls_client_key."""
    return _apply(
        client_tls_options(function),
        [
            click.option(
                "--api-key",
                envvar=API_KEY_ENV,
                show_envvar=True,
                default=None,
                help="The tenant's API key (sent as authorization: Bearer KEY).",
            ),
        ],
    )
