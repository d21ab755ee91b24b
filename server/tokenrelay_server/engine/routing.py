"""Model aliases → chains of (provider, upstream model), with their timeouts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tokenrelay_server.core.errors import UnknownModel
from tokenrelay_server.core.limits import Timeouts
from tokenrelay_server.core.model import StartRequest
from tokenrelay_server.upstream.base import Provider


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of a chain: a provider, its upstream model name, its timeouts."""

    provider: Provider
    upstream_model: str
    timeouts: Timeouts = field(default_factory=Timeouts)


class Router:
    """Model aliases → chains. Validation hooks let a provider reject bad
    per-request settings (e.g. a malformed `sim.faults`) before anything starts."""

    def __init__(self, routes: dict[str, list[Route]]) -> None:
        self._routes = routes

    @property
    def models(self) -> list[str]:
        return sorted(self._routes)

    def resolve(self, model: str) -> list[Route]:
        routes = self._routes.get(model)
        if not routes:
            known = ", ".join(self.models) or "none"
            raise UnknownModel(f"start.model: unknown model {model!r} (configured: {known})")
        return routes

    def validate(self, request: StartRequest) -> None:
        for route in self.resolve(request.model):
            validate: Callable[[tuple[tuple[str, str], ...]], None] | None = getattr(
                route.provider, "validate", None
            )
            if validate is not None:
                validate(request.metadata)

    def providers(self) -> list[Provider]:
        """Every distinct provider object behind the aliases."""
        seen: dict[int, Provider] = {}
        for chain in self._routes.values():
            for route in chain:
                seen.setdefault(id(route.provider), route.provider)
        return list(seen.values())
