"""tbmesh.core is the pure control plane: the standard library, numpy and itself, nothing else.

Read from the source with `ast`, so an import inside a function (a lazy one) counts too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import tbmesh.core

CORE = Path(tbmesh.core.__file__).parent
# numpy: the planner's arrays; pure computation, no device, no I/O
ALLOWED_THIRD_PARTY = {"numpy"}
# standard-library modules that are I/O, the network or concurrency: the daemon's business
FORBIDDEN_STDLIB = {
    "asyncio", "socket", "ssl", "selectors", "select", "http", "urllib", "subprocess",
    "multiprocessing", "threading", "concurrent",
}  # fmt: skip


def imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, relative imports made absolute."""
    package = path.relative_to(CORE.parent.parent).parts[:-1]  # ("tbmesh", "core")
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            names.append(".".join([*base, *([node.module] if node.module else [])]))
    return names


def allowed(module: str) -> bool:
    top = module.split(".")[0]
    if top == "tbmesh":
        return module == "tbmesh.core" or module.startswith("tbmesh.core.")
    if top in sys.stdlib_module_names:
        return top not in FORBIDDEN_STDLIB
    return top in ALLOWED_THIRD_PARTY


@pytest.mark.parametrize("path", sorted(CORE.rglob("*.py")), ids=lambda p: str(p.relative_to(CORE)))
def test_core_imports_only_core_stdlib_and_numpy(path: Path) -> None:
    outside = [m for m in imported_modules(path) if not allowed(m)]
    assert outside == [], f"tbmesh/core/{path.relative_to(CORE)} imports {outside}: the core must stay pure"


def test_the_rule_catches_what_it_should() -> None:
    assert not allowed("tbmesh.runtime.shapes") and not allowed("mlx.core") and not allowed("transformers")
    assert not allowed("tbmesh.node.state") and not allowed("asyncio") and not allowed("aiohttp")
    assert allowed("tbmesh.core.types") and allowed("dataclasses") and allowed("numpy")
