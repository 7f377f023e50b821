"""The package's shape: imports flow one way (no circle among its modules, counting the
imports made inside functions too: a lazy import can hide a circle, it cannot remove one),
modules stay small, and the old flat module names still reach the moved modules."""

import ast
import importlib
from pathlib import Path

import pytest

import whiteboard
from whiteboard import _old_names

PACKAGE = Path(whiteboard.__file__).parent
MAX_PYTHON_LINES = 400
MAX_CPP_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool, modules) -> set[str]:
    """The package modules an ``import from`` uses: ``from a import b`` imports the module
    a.b where there is one, else the name b from the module a."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    submodules = {f"{prefix}.{alias.name}" for alias in node.names} & set(modules)
    return submodules if len(submodules) == len(node.names) else submodules | {prefix}


def _import_graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"]
    modules = {_module_name(p): p for p in paths}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                found.update(_resolve(name, node, path.name == "__init__.py", modules))
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        for dependency in sorted(graph[module]):
            circle = visit(dependency, path + [module])
            if circle:
                return circle
        done.add(module)
        return None

    for module in sorted(graph):
        circle = visit(module, [])
        if circle:
            return circle
    return None


def test_the_package_has_no_import_circle():
    graph = _import_graph()
    assert {"whiteboard.lm.checkpoint", "whiteboard.inspect.report", "whiteboard.nn.layers",
            "whiteboard.backends", "whiteboard.files"} <= set(graph)
    # Package __init__ files re-export their modules' names; a circle through them is still one.
    circle = _find_circle(graph)
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_the_circle_finder_finds_a_circle():
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_circle({"a": {"b"}, "b": set()}) is None


def test_layers_know_only_the_backend_boundary():
    """A layer asks whiteboard.backends which loop runs; it imports no backend's insides."""
    graph = _import_graph()
    for layer_module in ("whiteboard.nn.layers", "whiteboard.nn.recurrent"):
        inside = {m for m in graph.get(layer_module, ()) if m.startswith("whiteboard.backends.")}
        assert inside == set(), f"{layer_module} imports {sorted(inside)}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_python_modules_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_PYTHON_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (limit {MAX_PYTHON_LINES})"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.cpp")) + sorted(PACKAGE.rglob("*.h")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_cpp_files_stay_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_CPP_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines (limit {MAX_CPP_LINES})"


@pytest.mark.parametrize("old, new", sorted(_old_names.MOVED.items()))
def test_old_module_names_give_the_moved_module_itself(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_old_names_work_in_from_imports_and_the_old_experiments_module():
    from whiteboard import experiments, layers, native  # noqa: F401 (old names)
    from whiteboard.backends.compiled import build
    from whiteboard.experiments import comparison, models
    from whiteboard.nn import layers as moved_layers

    assert layers is moved_layers and native is build
    assert experiments.compare is comparison.compare and experiments.CELLS is models.CELLS
