"""The data package and the launch package import one way: no module reaches (at import time or
lazily inside a function) a module that reaches it back. A circle makes the import order decide
whether a name exists yet, and hides which layer owns what."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "petlbench"


def internal_imports(package: str) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports}, lazy (in-function) imports included.
    The package itself is the node ``__init__``: a module that imports a name from the package
    (``from petlbench.launch import x``, ``from . import x``) depends on it."""
    folder = ROOT / package
    names = {p.stem for p in folder.glob("*.py")}
    pkg = f"petlbench.{package}"
    prefix = f"{pkg}."

    def module_or_package(name: str) -> str:
        return name if name in names else "__init__"

    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        deps: set[str] = set()
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:  # relative: from .x import y / from . import x
                    targets = [node.module] if node.module else [module_or_package(a.name) for a in node.names]
                elif node.module and node.module.startswith(prefix):
                    targets = [node.module[len(prefix):]]
                elif node.module == pkg:
                    targets = [module_or_package(a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name[len(prefix):] if a.name.startswith(prefix) else "__init__"
                           for a in node.names if a.name == pkg or a.name.startswith(prefix)]
            deps.update(t.split(".")[0] for t in targets if t.split(".")[0] in names)
        deps.discard(name)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("package", ["data", "launch", "report", "estimate"])
def test_package_imports_one_way(package: str) -> None:
    graph = internal_imports(package)
    assert len(graph) >= 4  # the parser saw the package's modules
    cycle = find_cycle(graph)
    assert cycle is None, f"petlbench.{package} import circle: {' -> '.join(cycle or [])}"


def test_data_layers() -> None:
    """The readers know nothing of the cache, the loader or the demo; the demo builds on them."""
    graph = internal_imports("data")
    assert not graph["readers"] & {"cache", "loader", "demo", "roots"}
    assert "readers" in graph["cache"] and "cache" in graph["loader"]
    assert graph["paths"] == set()


def test_data_depends_on_neither_config_nor_the_method_api() -> None:
    """data/ imports only its own modules, petlbench.errors and petlbench._lazy (lazy imports in
    functions included): the suite loader once checked train_defaults through petlbench.config,
    which tied data/ into a circle with config and method (method imports data)."""
    allowed = ("petlbench.data", "petlbench.errors", "petlbench._lazy")
    bad = []
    for path in (ROOT / "data").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            bad += [f"{path.name}:{node.lineno} imports {n}" for n in names
                    if (n == "petlbench" or n.startswith("petlbench.")) and not n.startswith(allowed)]
    assert bad == []


def test_report_layers() -> None:
    """The report's data model (table) imports nothing of the report; rendering and plots read only it."""
    graph = internal_imports("report")
    assert graph["table"] == set()
    assert not graph["rendering"] & {"aggregate", "rows", "stats", "notes", "select"}
    assert not graph["plots"] & {"aggregate", "rows", "stats", "notes", "select"}
    assert graph["aggregate"] >= {"table", "rows", "stats", "notes", "select"}


def test_launchers_only_share_common() -> None:
    graph = internal_imports("launch")
    for name in ("inline", "local", "slurm"):
        assert graph[name] == {"common"}, name
    assert graph["common"] == set()
    assert graph["__init__"] >= {"common", "inline", "local", "slurm"}  # the parser follows the package's imports


def test_a_module_importing_from_its_package_is_a_circle(tmp_path, monkeypatch) -> None:
    """``from petlbench.launch import x`` inside launch/local.py reaches launch/__init__.py, which
    imports local: the parser must see that edge, not only module-to-module ones."""
    folder = tmp_path / "launch"
    folder.mkdir()
    (folder / "__init__.py").write_text("from petlbench.launch.local import run\n")
    (folder / "local.py").write_text("def run():\n    from petlbench.launch import plan\n")
    (folder / "other.py").write_text("from . import local\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    graph = internal_imports("launch")
    assert graph == {"__init__": {"local"}, "local": {"__init__"}, "other": {"local"}}
    assert find_cycle(graph) == ["__init__", "local", "__init__"]
