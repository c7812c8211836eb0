"""Makes ``torch_rlds.adapters`` and ``torch_rlds.configs`` importable from a source checkout.

In a wheel or an editable install, setup.cfg's ``package_dir`` maps the checkout's top-level
``adapters/`` and ``configs/`` folders into the package. Python started from the checkout's
root (``python -m torch_rlds``, a script or notebook there, the root on ``sys.path``) imports
the checkout's ``torch_rlds/`` folder directly instead, and finds neither beside it. So, when
they are missing inside the package and the folder above it is this project's checkout (its
setup.cfg names torch-rlds), importing this module registers them as the package's
subpackages from there: every import path then sees the same package. ``torch_rlds`` imports
it before anything else.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from typing import cast

_PACKAGE = __name__.rpartition(".")[0]
_MOUNTED = ("adapters", "configs")


def _is_checkout(root: str) -> bool:
    try:
        with open(os.path.join(root, "setup.cfg"), encoding="utf-8") as f:
            return "name = torch-rlds" in f.read()
    except OSError:
        return False


def mount(package_dir: str) -> list[str]:
    """Register each of :data:`_MOUNTED` that ``package_dir`` lacks from the checkout around
    it; returns the names registered (none in an install)."""
    root = os.path.dirname(package_dir)
    missing = [name for name in _MOUNTED
               if f"{_PACKAGE}.{name}" not in sys.modules
               and not os.path.isdir(os.path.join(package_dir, name))
               and os.path.isfile(os.path.join(root, name, "__init__.py"))]
    if not missing or not _is_checkout(root):
        return []
    package = sys.modules[_PACKAGE]
    for name in missing:
        folder = os.path.join(root, name)
        spec = importlib.util.spec_from_file_location(
            f"{_PACKAGE}.{name}", os.path.join(folder, "__init__.py"),
            submodule_search_locations=[folder])
        # A file location always has a spec with a loader (the folder's __init__.py exists).
        spec = cast(importlib.machinery.ModuleSpec, spec)
        loader = cast(importlib.abc.Loader, spec.loader)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loader.exec_module(module)
        setattr(package, name, module)
    return missing


mount(os.path.dirname(os.path.abspath(__file__)))
