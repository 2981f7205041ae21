"""Structure rules that keep the code easy to hold in one's head: no import circles in a package.

Every import between a package's own modules counts, also those inside functions and under
`if TYPE_CHECKING:`: a deferred import only hides a circle (that is how `generate` ↔ `inversion`
once lived), it does not remove it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PACKAGES = ["core", "bridge_server", "krita_plugin/collage_diffusion"]


def _module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name (relative to the package's parent folder) → file, for every module."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imported(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement refers to: `from pkg import sub` names pkg.sub."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        # `.` is the module's own package: the module itself for an __init__, its parent otherwise.
        base = module.split(".")[: len(module.split(".")) - node.level + is_package]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{alias.name}" for alias in node.names]


def unresolved_imports(package_dir: Path) -> list[str]:
    """Relative imports of modules that do not exist (a deferred one fails only when it runs)."""
    modules = _module_names(package_dir)
    bad = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                target = _imported(name, is_package, node)[0].rpartition(".")[0]
                if target not in modules:
                    bad.append(
                        f"{path.relative_to(package_dir.parent)}:{node.lineno}: {'.' * node.level}{node.module}"
                    )
    return bad


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module → the package's own modules it imports, anywhere in its source."""
    modules = _module_names(package_dir)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported(name, is_package, node):
                # A name inside a module (`from .a import f`) is an import of that module.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node) :] + [node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(graph[node]):
            if found := visit(nxt):
                return found
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if found := visit(node):
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circle(package):
    graph = import_graph(ROOT / package)
    assert len(graph) > 3, "the package's modules were not found"
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle)


@pytest.mark.parametrize("package", PACKAGES)
def test_relative_imports_resolve(package):
    assert unresolved_imports(ROOT / package) == []


def test_known_edges_are_seen():
    """The graph sees relative, nested-package and deferred imports (or the test above proves nothing)."""
    graph = import_graph(ROOT / "core")
    assert "core.inversion" in graph["core.generate"]
    assert "core.collage" in graph["core.formats.psd"]  # `from ..collage import`
    assert "core.formats.document" in graph["core.formats"]  # the package's __init__
    assert "core.sizing" in graph["core.cli"]  # imported inside a function


def test_deferred_imports_count(tmp_path):
    """A circle closed by a function-level or TYPE_CHECKING import is still found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import run\n")
    (pkg / "b.py").write_text("def run():\n    from .a import x\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import y\n"
    )
    (pkg / "d.py").write_text("from . import c\n")
    (pkg / "e.py").write_text("def f():\n    from .nowhere import g\n")
    assert unresolved_imports(pkg) == ["pkg/e.py:2: .nowhere"]
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.c"}
    assert find_cycle({k: v for k, v in graph.items() if k != "pkg.d"}) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({k: v for k, v in graph.items() if k not in ("pkg.a", "pkg.b")}) == [
        "pkg.c",
        "pkg.d",
        "pkg.c",
    ]
