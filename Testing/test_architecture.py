"""The core's layout is its data flow: an import graph with no cycle and no import from a lower layer to a higher one.

Built from the source (AST, every import, including the lazy ones inside functions), with no third-party tool.
Layers, low to high (docs/architecture.md): foundation (errors, progress, resource_files) < geometry < io, synthetic
< diagnose < prealign < crop < engines < qa < pipeline < cli < slicer. A module may import its own layer or lower
ones. Only slicer/ may import Slicer's Python packages (slicer, qt, vtk, ctk), and only lazily, inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "MultimodalPrealign" / "MultimodalPrealignLib"
PACKAGE = "MultimodalPrealignLib"
LAYERS = {
    "": 0, "errors": 0, "progress": 0, "resource_files": 0, "stopping": 0, "parallel": 0,
    "geometry": 1,
    "io": 2, "synthetic": 2,
    "diagnose": 3,
    "prealign": 4,
    "crop": 5,
    "engines": 6,
    "qa": 7,
    "pipeline": 8, "structures": 8,
    "cli": 9, "__main__": 9, "batch": 9,
    "slicer": 10,
}
SLICER_PACKAGES = ("slicer", "qt", "vtk", "ctk", "mrml", "vtkAddon")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_package(root: Path, name: str) -> bool:
    return (root.joinpath(*name.split(".")) / "__init__.py").exists() if name else True


def exists(root: Path, name: str) -> bool:
    return is_package(root, name) or root.joinpath(*name.split(".")).with_suffix(".py").exists()


def import_graph(root: Path, package: str = PACKAGE) -> tuple[dict[str, set[str]], dict[str, list[tuple[str, bool]]]]:
    """({module: modules of this package it imports}, {module: [(third-party top name, lazy?)]}).

    ``from X import name`` counts as an import of ``X.name`` when that is a module, else of ``X``.
    Importing a submodule does not count as importing its parent package's ``__init__``.
    """
    graph: dict[str, set[str]] = {}
    external: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        here = name.split(".") if is_package(root, name) and name else name.split(".")[:-1]
        edges, outside = set(), []
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            lazy = id(node) not in top_level
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1] if node.level > 1 else here
                    origin = [p for p in base + (node.module.split(".") if node.module else []) if p]
                elif node.module == package or (node.module or "").startswith(package + "."):
                    origin = node.module.split(".")[1:]
                else:
                    outside.append(((node.module or "").split(".")[0], lazy))
                    continue
                for alias in node.names:
                    target = ".".join([*origin, alias.name])
                    edges.add(target if exists(root, target) and alias.name != "*" else ".".join(origin))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == package or alias.name.startswith(package + "."):
                        edges.add(".".join(alias.name.split(".")[1:]))
                    else:
                        outside.append((alias.name.split(".")[0], lazy))
        edges.discard(name)
        graph[name] = edges
        external[name] = outside
    return graph, external


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
            for a, targets in sorted(graph.items()) for b in sorted(targets) if layer(b) > layer(a)]


def slicer_imports(external: dict[str, list[tuple[str, bool]]]) -> list[str]:
    wrong = []
    for module, names in sorted(external.items()):
        for top, lazy in names:
            if top in SLICER_PACKAGES and (not module.startswith("slicer") or not lazy):
                wrong.append(f"{module} imports {top}" + ("" if lazy else " at module level"))
    return wrong


# ------------------------------------------------------------------------------------------- the real core
@pytest.fixture(scope="module")
def core_graph():
    return import_graph(CORE)


def test_every_core_module_has_a_layer(core_graph):
    graph, _ = core_graph
    assert {m.split(".")[0] for m in graph} <= set(LAYERS)


def test_core_has_no_import_cycle(core_graph):
    graph, _ = core_graph
    assert cycles(graph) == []


def test_no_import_from_a_lower_layer_to_a_higher_one(core_graph):
    graph, _ = core_graph
    assert upward_imports(graph) == []


def test_only_the_slicer_package_imports_slicer_qt_vtk_ctk_and_lazily(core_graph):
    _, external = core_graph
    assert slicer_imports(external) == []


def test_the_graph_sees_relative_absolute_and_lazy_imports(core_graph):
    graph, _ = core_graph
    assert "geometry.transforms" in graph["prealign.search"]  # from ..geometry import transforms
    assert "engines.itk_engine" in graph["engines"]  # lazy, inside register()
    assert "prealign.base" in graph["prealign.search"]  # from .base import ...


# ------------------------------------------------------------------------------ the checks can fail
def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_deliberate_cycle_is_found(tmp_path):
    root = write_tree(tmp_path, {
        "__init__.py": "", "geometry/__init__.py": "",
        "geometry/transforms.py": "from .image_space import Box\n",
        "geometry/image_space.py": "def f():\n    from .transforms import compose\n",
    })
    graph, _ = import_graph(root)
    assert cycles(graph) == [["geometry.image_space", "geometry.transforms"]]


def test_a_deliberate_upward_import_and_a_slicer_import_are_found(tmp_path):
    root = write_tree(tmp_path, {
        "__init__.py": "", "io/__init__.py": "", "qa/__init__.py": "", "qa/verdict.py": "",
        "io/labels.py": "import vtk\nfrom ..qa import verdict\n",
    })
    graph, external = import_graph(root)
    assert upward_imports(graph) == ["io.labels (layer 2) imports qa.verdict (layer 7)"]
    assert slicer_imports(external) == ["io.labels imports vtk at module level"]
