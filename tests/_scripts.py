"""Import a repository script (under ``benchmarks/``, ``scripts/`` or ``examples/``) as a module.

The scripts are not part of the installed package, so tests load them from their file. The module is
registered in ``sys.modules`` first, as a normal import would, so that dataclasses, pickling and a
script importing its neighbour by name resolve it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str, name: str | None = None) -> ModuleType:
    """Load ``ROOT / path`` as the module ``name`` (default: the file's stem) and return it."""
    file = ROOT / path
    name = name or file.stem
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
