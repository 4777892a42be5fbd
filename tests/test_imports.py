"""The rules of the house about imports, read from the source with ast (imports inside
functions count): the packages stand in one order, each importing only itself and those
below it; no import circle; the data plane (tbmesh.serving) imports neither the node nor
HTTP (only the API modules speak HTTP status codes); the pure parts import no MLX and no
asyncio."""

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


# from the bottom up; the README's design section draws the same order
ORDER = ("core", "net", "weights", "runtime", "serving", "http", "node", "testbed", "cli")
PURE = ("tbmesh.core",)  # the control plane's logic and the shared vocabulary
NOT_PURE = ("mlx", "mlx_lm", "asyncio", "socket", "ssl", "threading", "concurrent", "subprocess", "aiohttp", "zeroconf")


def package_of(module: str) -> str | None:
    """`core` for tbmesh.core.cluster; None for tbmesh itself, tbmesh.__main__ and outsiders."""
    parts = module.split(".")
    return parts[1] if parts[0] == "tbmesh" and len(parts) > 1 and parts[1] in ORDER else None


def test_every_package_imports_only_itself_and_those_below_it():
    assert {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()} == set(ORDER)
    upward = []
    for module, targets in sorted(imports().items()):
        here = package_of(module)
        if here is None:
            assert module in ("tbmesh", "tbmesh.__main__"), f"{module} belongs in a package"
            continue
        for target in sorted(targets):
            there = package_of(target)
            if there is not None and ORDER.index(there) > ORDER.index(here):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports up the order: " + "; ".join(upward)


def test_the_pure_packages_import_no_mlx_and_no_asyncio():
    for module, targets in sorted(imports().items()):
        if module.startswith(PURE):
            bad = sorted(t for t in targets if t.split(".")[0] in NOT_PURE)
            assert not bad, f"{module} imports {bad}"


def test_the_order_rule_catches_an_upward_import():
    assert package_of("tbmesh.serving.engine") == "serving" and package_of("tbmesh.__main__") is None
    assert ORDER.index(package_of("tbmesh.node.daemon")) > ORDER.index(package_of("tbmesh.serving.engine"))


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
    forbidden = ("tbmesh.node", "tbmesh.http", "tbmesh.cli", "aiohttp", "http")
    for module, targets in imports().items():
        if module.startswith("tbmesh.serving") or module in ("tbmesh.core.generation", "tbmesh.runtime.local"):
            bad = sorted(t for t in targets if t.startswith(forbidden))
            assert not bad, f"{module} imports {bad}"


def test_the_pure_parts_of_serving_import_no_mlx_and_no_asyncio():
    for name in ("conductor", "scheduler", "keeper", "prefix_cache", "messages", "view", "settings"):
        targets = imports()[f"tbmesh.serving.{name}"]
        bad = sorted(t for t in targets if t.split(".")[0] in ("mlx", "mlx_lm", "asyncio", "socket", "threading"))
        assert not bad, f"tbmesh.serving.{name} imports {bad}"
