"""Where torch_rlds keeps what it derives from datasets (record indexes, the demo dataset)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TORCH_RLDS_CACHE"


def cache_root(*, create: bool = True) -> Path:
    """The cache folder: ``$TORCH_RLDS_CACHE``, else ``$XDG_CACHE_HOME/torch_rlds``, else
    ``~/.cache/torch_rlds``. With ``create`` it is created (``OSError`` where it cannot be);
    without, whoever writes there creates it, and readers of a cache that may be unwritable
    (the record indexes) fall back to memory."""
    env = os.environ.get(CACHE_ENV)
    if env:
        root = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(base) / "torch_rlds"
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root
