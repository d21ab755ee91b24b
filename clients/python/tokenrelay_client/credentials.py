"""How a client proves who it is (issue 13): an API key, sent as
`authorization: Bearer <key>` with every call, and TLS, optionally with a
client certificate (mTLS).

    api_key       the tenant's key; default: $TOKENRELAY_API_KEY (unset or
                  empty: no key is sent)
    tls_ca        PEM file of the CA that signed the gateway's certificate;
                  turns TLS on (without it, TLS uses the system's roots when
                  a client certificate is given)
    tls_client_cert, tls_client_key
                  PEM files of the client's certificate and key, for a
                  gateway that requires them (mTLS); both or neither

A key is never shown in an error message or a repr.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import grpc

API_KEY_ENV = "TOKENRELAY_API_KEY"
PathLike = str | os.PathLike[str]


def api_key_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `api_key` (or $TOKENRELAY_API_KEY)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    key = key.strip()
    if not key:
        return ()
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in key):
        # gRPC would refuse the header with an error that quotes it.
        raise ValueError("api_key must be printable ASCII without spaces")
    return (("authorization", f"Bearer {key}"),)


def _read(path: PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{what} {os.fspath(path)!r} cannot be read: {error.strerror}") from None


def tls_credentials(
    tls_ca: PathLike | None = None,
    tls_client_cert: PathLike | None = None,
    tls_client_key: PathLike | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS channel credentials from PEM files; None when none is given (a
    plaintext channel). Raises ValueError naming the option that is wrong."""
    if (tls_client_cert is None) != (tls_client_key is None):
        given = "tls_client_cert" if tls_client_key is None else "tls_client_key"
        missing = "tls_client_key" if tls_client_key is None else "tls_client_cert"
        raise ValueError(f"{given} is given but {missing} is not: a client certificate needs both")
    if tls_ca is None and tls_client_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=None if tls_ca is None else _read(tls_ca, "tls_ca"),
        private_key=None if tls_client_key is None else _read(tls_client_key, "tls_client_key"),
        certificate_chain=(
            None if tls_client_cert is None else _read(tls_client_cert, "tls_client_cert")
        ),
    )


def merged_metadata(
    api_key: str | None, call_metadata: Sequence[tuple[str, str]] | None
) -> tuple[tuple[str, str], ...]:
    """The key's metadata, then the caller's own (an explicit authorization
    entry in call_metadata wins: the key is then not added)."""
    extra = tuple(call_metadata or ())
    if any(name.lower() == "authorization" for name, _ in extra):
        return extra
    return (*api_key_metadata(api_key), *extra)
