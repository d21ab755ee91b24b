"""Build the provider adapters from validated configuration: one pooled
httpx client per provider, its API key from the environment."""

from __future__ import annotations

import functools
import importlib.util
import ssl
from collections.abc import Mapping

import httpx

from tokenrelay_server.config.upstream import (
    ProviderConfig,
    UpstreamConfig,
    UpstreamConfigError,
    missing_api_keys,
)
from tokenrelay_server.core.clock import Clock
from tokenrelay_server.upstream.anthropic import AnthropicProvider
from tokenrelay_server.upstream.base import Provider
from tokenrelay_server.upstream.openai import OpenAIProvider


def h2_available() -> bool:
    """HTTP/2 needs the optional `h2` package (`httpx[http2]`)."""
    return importlib.util.find_spec("h2") is not None


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS settings every provider's client verifies servers with (the
    certifi CA bundle, or SSL_CERT_FILE / SSL_CERT_DIR), built once: loading
    the bundle costs ~25 ms of CPU per client, and one context can serve
    every connection."""
    return httpx.create_ssl_context()


def make_client(config: ProviderConfig) -> httpx.AsyncClient:
    """The one pooled client of a provider.

    The connect timeout is the adapter's; reads have none because the
    generation loop enforces first-token and stall timeouts for every
    provider alike. Redirects are not followed: an API that redirects a
    POST is misconfigured, and following it could leak the key elsewhere.
    """
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=config.connect_timeout_s,
            read=None,
            write=config.connect_timeout_s,
            pool=config.connect_timeout_s,
        ),
        limits=httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_keepalive_connections,
            keepalive_expiry=config.keepalive_expiry_s,
        ),
        http2=config.http2 and h2_available(),
        follow_redirects=False,
        verify=tls_context(),
    )


def resolve_api_key(config: ProviderConfig, env: Mapping[str, str]) -> str | None:
    """The key from the environment variable the config names (never logged)."""
    if config.api_key_env is None:
        return None
    return env[config.api_key_env].strip()


def build_providers(
    config: UpstreamConfig, env: Mapping[str, str], *, clock: Clock | None = None
) -> dict[str, Provider]:
    """One adapter per configured provider, each with its own pooled client.

    Raises `UpstreamConfigError` (naming every `api_key_env` whose variable
    is missing) before any client is opened.
    The caller owns the result: `await provider.aclose()` each at shutdown.
    """
    missing = missing_api_keys(config, env, "environment")
    if missing:
        raise UpstreamConfigError("environment", missing)
    keys = {name: resolve_api_key(cfg, env) for name, cfg in config.providers.items()}
    providers: dict[str, Provider] = {}
    for name, cfg in config.providers.items():
        client = make_client(cfg)
        if cfg.kind == "openai":
            providers[name] = OpenAIProvider(name, cfg, client, api_key=keys[name], clock=clock)
        else:
            providers[name] = AnthropicProvider(name, cfg, client, api_key=keys[name], clock=clock)
    return providers
