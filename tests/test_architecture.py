"""The package's shape: dependencies point one way (ops -> layers -> models -> the rest), no module imports
itself through a cycle (lazy imports inside functions included), and no module reaches outside the repository.
What this is not: a style check (ruff does that)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nestlearn"
# each layer may import only the layers listed for it (besides itself and the top-level helper modules)
ALLOWED = {
    "ops": set(),
    "layers": {"ops"},
    "models": {"ops", "layers"},
    "optim": {"ops"},
    "data": set(),
}
HELPERS = {"io", "errors", "fields"}  # top-level modules any layer may use


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every nestlearn module imported anywhere in the file (function-level imports too), resolved."""
    mod, out = _module(path), set()
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("nestlearn")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.startswith("nestlearn"):
                out |= {f"{base}.{a.name}" if _exists(f"{base}.{a.name}") else base for a in node.names}
    return {m for m in out if m != mod}


def _exists(mod: str) -> bool:
    p = ROOT.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_dependencies_point_one_way(layer: str) -> None:
    bad = []
    for mod, deps in GRAPH.items():
        if mod.split(".")[1:2] != [layer]:
            continue
        for dep in deps:
            top = dep.split(".")[1] if dep.count(".") else ""
            if top not in ALLOWED[layer] | {layer} | HELPERS:
                bad.append(f"{mod} imports {dep}")
    assert not bad, bad


def test_no_import_cycles_between_modules() -> None:
    """Package `__init__` files re-export their modules and are left out; every other edge counts."""
    graph = {m: {d for d in deps if not _is_package(d)} for m, deps in GRAPH.items() if not _is_package(m)}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(d) :], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def _is_package(mod: str) -> bool:
    return (ROOT.joinpath(*mod.split(".")) / "__init__.py").is_file()


def test_nothing_points_outside_the_repository() -> None:
    texts = [p for p in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.md"), *(ROOT / "docs").glob("*.md"),
                         ROOT / "README.md"]]  # fmt: skip
    bad = [str(p.relative_to(ROOT)) for p in texts if "shared/" in p.read_text()]
    assert not bad, f"references to ../shared in {bad}"
