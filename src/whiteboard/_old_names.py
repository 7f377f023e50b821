"""The module names whiteboard had before its modules moved into subpackages (``nn``,
``backends``, ``lm``, ``experiments``, ``inspect``), kept working for code that imports them.

``import whiteboard.layers`` gives the very module object ``whiteboard.nn.layers``, not a
copy of its names, so code that patches an attribute through the old name changes what
the package uses.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

#: old name -> where the module lives now
MOVED = {
    "whiteboard.cells": "whiteboard.nn.cells",
    "whiteboard.layers": "whiteboard.nn.layers",
    "whiteboard.regularizers": "whiteboard.nn.regularizers",
    "whiteboard.fused": "whiteboard.backends.functions",
    "whiteboard.planning": "whiteboard.backends.compiled.planning",
    "whiteboard.native": "whiteboard.backends.compiled.build",
    "whiteboard.config": "whiteboard.lm.config",
    "whiteboard.data": "whiteboard.lm.data",
    "whiteboard.vocab": "whiteboard.lm.vocab",
    "whiteboard.model": "whiteboard.lm.model",
    "whiteboard.checkpoint": "whiteboard.lm.checkpoint",
    "whiteboard.rundir": "whiteboard.lm.rundir",
    "whiteboard.train": "whiteboard.lm.train",
    "whiteboard.generate": "whiteboard.lm.generate",
    "whiteboard.tasks": "whiteboard.experiments.tasks",
    "whiteboard.horizon": "whiteboard.experiments.horizon",
    "whiteboard.demo": "whiteboard.experiments.demo",
    "whiteboard.inspection": "whiteboard.inspect.traces",
    "whiteboard.report": "whiteboard.inspect.report",
    "whiteboard.plots": "whiteboard.inspect.plots",
}


class _OldNameFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # a placeholder that exec_module replaces

    def exec_module(self, module) -> None:
        # The import system hands back whatever sys.modules holds under the name once the
        # module has run, and binds that to the parent package's attribute too.
        sys.modules[module.__name__] = importlib.import_module(MOVED[module.__name__])


def install() -> None:
    if not any(isinstance(finder, _OldNameFinder) for finder in sys.meta_path):
        sys.meta_path.append(_OldNameFinder())
