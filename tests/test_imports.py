"""The rules of the house about imports, read from the source with ast: no import circle in
the package, and the data plane (tbmesh.serving) imports neither the daemon nor any HTTP
module (only the API modules speak HTTP status codes). Imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import tbmesh

ROOT = Path(tbmesh.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """tbmesh module -> the tbmesh modules and outside packages it imports."""
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
        found[name] = targets
    return found


def test_no_import_circle_in_the_package():
    graph = imports()
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    # a module's package __init__ is not a real edge back (importing a.b runs a/__init__ first)
    visiting, done, circles = set(), set(), []

    def visit(module: str, path: list[str]) -> None:
        if module in done:
            return
        if module in visiting:
            circles.append(path[path.index(module):] + [module])
            return
        visiting.add(module)
        for target in sorted(edges[module]):
            visit(target, path + [target])
        visiting.discard(module)
        done.add(module)

    for module in sorted(edges):
        visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_data_plane_imports_neither_the_daemon_nor_http():
    forbidden = ("tbmesh.daemon", "tbmesh.api", "tbmesh.openai_api", "tbmesh.ollama_api", "tbmesh.cli", "aiohttp", "http")
    for module, targets in imports().items():
        if module.startswith("tbmesh.serving") or module in ("tbmesh.generation", "tbmesh.runtime.local"):
            bad = sorted(t for t in targets if t.startswith(forbidden))
            assert not bad, f"{module} imports {bad}"


def test_the_pure_parts_of_serving_import_no_mlx_and_no_asyncio():
    for name in ("conductor", "scheduler", "keeper", "prefix_cache", "messages", "view", "settings"):
        targets = imports()[f"tbmesh.serving.{name}"]
        bad = sorted(t for t in targets if t.split(".")[0] in ("mlx", "mlx_lm", "asyncio", "socket", "threading"))
        assert not bad, f"tbmesh.serving.{name} imports {bad}"
