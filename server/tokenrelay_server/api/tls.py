"""TLS and mTLS for the gateway's port, with certificates that reload (issue 13).

`serve --tls-cert FILE --tls-key FILE` serves TLS; `--tls-client-ca FILE`
adds mTLS: a client must present a certificate that CA signed (its API key
is still required by the servicer). The files are PEM.

Reload without dropping streams: the port's credentials are
`grpc.dynamic_ssl_server_credentials`, whose fetcher gRPC core calls at each
new TLS handshake. `reload()` reads and checks the files again (SIGHUP, in
cli.py) and hands the fetcher the new configuration, once; a handshake after
that presents the new certificate (and trusts the new client CA), while
connections already made keep the session they negotiated, so their streams
run on untouched. Files that do not load (missing, unreadable, not PEM, a
key that does not match the certificate) are refused before anything
changes: at start as a configuration mistake naming the flag, at a reload
as a `TlsFilesError` the caller logs, and the old certificate stays.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc

from tokenrelay_server.config.problems import ConfigError, ConfigProblem
from tokenrelay_server.config.settings import Settings, flag_of


class TlsFilesError(ConfigError):
    """The TLS files cannot be used: each problem names its flag and says why.
    At start nothing was started; at a reload the old certificate stays."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where the PEM files are (the settings' paths)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def of(cls, settings: Settings) -> TlsFiles | None:
        """The TLS files `settings` name; None for a plaintext port. Raises
        `TlsFilesError` when only one of cert and key is given, or a client
        CA without them."""
        cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        problems: list[ConfigProblem] = []
        if (cert is None) != (key is None):
            given, missing = ("tls_cert", "tls_key") if key is None else ("tls_key", "tls_cert")
            problems.append(
                ConfigProblem(
                    "",
                    f"is set but {flag_of(missing)} is not: TLS needs the certificate and its key",
                    source=flag_of(given),
                )
            )
        elif ca is not None and cert is None:
            problems.append(
                ConfigProblem(
                    "",
                    "needs --tls-cert and --tls-key too: mTLS is TLS that also checks the client",
                    source=flag_of("tls_client_ca"),
                )
            )
        if problems:
            raise TlsFilesError(problems)
        if cert is None or key is None:
            return None
        return cls(Path(cert), Path(key), None if ca is None else Path(ca))


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """The files' contents, checked."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    @classmethod
    def load(cls, files: TlsFiles) -> TlsMaterial:
        problems: list[ConfigProblem] = []
        cert = _read(files.cert, "tls_cert", problems)
        key = _read(files.key, "tls_key", problems)
        ca = None if files.client_ca is None else _read(files.client_ca, "tls_client_ca", problems)
        if cert is not None and key is not None:
            _check_pair(files, problems)
        if ca is not None:
            _check_ca(ca, problems)
        if problems or cert is None or key is None:
            raise TlsFilesError(problems)
        return cls(cert, key, ca)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.cert_chain)], root_certificates=self.client_ca
        )


def _read(path: Path, setting: str, problems: list[ConfigProblem]) -> bytes | None:
    def problem(message: str) -> None:
        problems.append(ConfigProblem("", f"{path}: {message}", source=flag_of(setting)))

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problem("the file does not exist")
        return None
    except OSError as error:
        problem(f"the file cannot be read ({error.strerror or error})")
        return None
    if b"-----BEGIN " not in data:
        problem("is not a PEM file (no -----BEGIN line)")
        return None
    return data


def _check_pair(files: TlsFiles, problems: list[ConfigProblem]) -> None:
    """The standard library's own check: the chain parses, the key parses and
    belongs to the certificate (what grpc would otherwise only report, as a
    handshake failure, to the first client)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as error:
        reason = getattr(error, "reason", None) or str(error)
        problems.append(
            ConfigProblem(
                "",
                "the certificate and the key do not load as a pair "
                f"({reason}; is the key the certificate's own?)",
                source=f"{flag_of('tls_cert')}/{flag_of('tls_key')}",
            )
        )


def _check_ca(ca: bytes, problems: list[ConfigProblem]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as error:
        problems.append(
            ConfigProblem(
                "", f"is not a PEM CA certificate ({error})", source=flag_of("tls_client_ca")
            )
        )


class ReloadableCredentials:
    """The port's server credentials and the configuration they fetch.

    gRPC core calls the fetcher from its own threads at each handshake; the
    lock keeps `reload` (on the event loop) and the fetcher from racing."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0
        material = TlsMaterial.load(files)
        self.credentials = grpc.dynamic_ssl_server_credentials(
            material.configuration(),
            # grpc's documented contract: the fetcher returns None for "no
            # change"; typeshed's stub leaves the None out.
            cast("Callable[[], grpc.ServerCertificateConfiguration]", self._fetch),
            require_client_authentication=files.client_ca is not None,
        )

    def reload(self) -> None:
        """Read the files again; new handshakes use them from now on. Raises
        `TlsFilesError` (and changes nothing) when they do not load."""
        configuration = TlsMaterial.load(self.files).configuration()
        with self._lock:
            self._pending = configuration
            self.reloads += 1

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # None: keep the current configuration.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending
