"""Upstream providers: each turns a `ProviderRequest` into a stream of
normalized deltas, and every failure into an `UpstreamError` with a `Fault`."""

from tokenrelay_server.upstream.base import (
    Delta,
    Finish,
    Provider,
    ProviderRequest,
    TextDelta,
    UsageReport,
)

__all__ = ["Delta", "Finish", "Provider", "ProviderRequest", "TextDelta", "UsageReport"]
