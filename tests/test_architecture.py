"""Imports flow one way: the package's modules form no import circle, counting the imports
made inside functions too (a lazy import can hide a circle, it cannot remove one)."""

import ast
from pathlib import Path

import whiteboard

PACKAGE = Path(whiteboard.__file__).parent


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                names.add(node.module.split(".")[0])
            else:
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("whiteboard."):
            names.add(node.module.split(".")[1])
    return names


def test_the_package_has_no_import_circle():
    modules = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")}
    graph = {m: {d for d in deps if d in modules and d != m} for m, deps in modules.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for dependency in sorted(graph[module]):
            visit(dependency, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert {"checkpoint", "vocab", "inspection", "report", "layers", "regularizers", "files"} <= set(graph)
