"""The benchmark suite: torch_rlds against the tf.data pipeline of Octo and openpi and against
the JPEG-decode limit (``torch-rlds bench``, ``nox -s bench``).

``main(argv)`` runs it from the command line; ``run(settings, out_dir)`` from Python. The names
are loaded on first use, so that the measuring processes of tf.data and of the decode limit
import this package without importing torch or the rest of torch_rlds.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchSettings", "main", "run"]

_EXPORTS = {
    "BenchSettings": "torch_rlds.bench._settings",
    "main": "torch_rlds.bench._main",
    "run": "torch_rlds.bench._main",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'torch_rlds.bench' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
