"""The import graph shows the layers (issue 8): every module imports only
from its own layer or the ones below, there is no import cycle, and the
gateway never imports the development tools.

    core      pure types, errors, classification, decision, retry, breaker, stitching, clock
    config    settings and provider/model tables (validated values, no I/O)
    upstream  provider adapters (httpx), the SSE decoder, the in-process sim
    store     the stream log: memory and Redis
    engine    generations, the hub, routing, selection, takeover
    obs       observability: tracing, logs (engine observers, the gRPC interceptor)
    api       the gRPC edge: servicer, tokens, reflection, server assembly
    cli       the `tokenrelay` command
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[1] / "server"
LAYERS = ["core", "config", "upstream", "store", "engine", "obs", "api", "cli"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SERVER).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every tokenrelay module a file imports (at any depth of the file)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith(("tokenrelay_server", "tokenrelay_devtools")):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(("tokenrelay_server", "tokenrelay_devtools")):
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; use the absolute module name")
    return found


def layer_of(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "tokenrelay_server", module
    if len(parts) == 1:
        return -1  # the package itself
    return LAYERS.index(parts[1])


GATEWAY = sorted((SERVER / "tokenrelay_server").rglob("*.py"))
GRAPH = {module_name(path): imports_of(path) for path in GATEWAY}


@pytest.mark.parametrize("module", sorted(GRAPH), ids=lambda m: m)
def test_a_module_imports_only_its_own_layer_or_lower(module: str) -> None:
    own = layer_of(module)
    for imported in GRAPH[module]:
        assert not imported.startswith("tokenrelay_devtools"), (
            f"{module} imports {imported}: the gateway never imports the development tools"
        )
        assert layer_of(imported) <= own, f"{module} ({LAYERS[own]}) imports {imported}"


def test_the_import_graph_has_no_cycle() -> None:
    def target(imported: str) -> str:
        # `from pkg.module import name` may name a module or a package.
        return imported if imported in GRAPH else imported.rsplit(".", 1)[0]

    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "visiting"
        for imported in sorted(GRAPH.get(module, ())):
            name = target(imported)
            if name == module or name not in GRAPH:
                continue
            if state.get(name) == "visiting":
                cycle = [*path[path.index(name) :], name]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if name not in state:
                visit(name, [*path, name])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_every_layer_is_a_package_of_its_own() -> None:
    for layer in LAYERS[:-1]:
        assert (SERVER / "tokenrelay_server" / layer / "__init__.py").is_file(), layer
