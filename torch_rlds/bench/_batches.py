"""What the benchmark checks in a batch: a digest (a resumed run must reproduce the
uninterrupted one) and the shapes (every pipeline must emit the same sample).

Framework-free (numpy only; torch and TensorFlow tensors are read through ``.numpy()``), so
the tf.data measurements use it without importing torch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def batch_digest(batch: Any) -> str:
    """Equal digests exactly when two batches hold the same keys, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    _update(h, batch)
    return h.hexdigest()


def _update(h: Any, tree: Any) -> None:
    if isinstance(tree, dict):
        for key in sorted(tree):
            h.update(f"<{key}>".encode())
            _update(h, tree[key])
    elif isinstance(tree, (list, tuple)):
        h.update(f"[{len(tree)}]".encode())
        for item in tree:
            _update(h, item)
    elif isinstance(tree, (str, bytes)):
        h.update(b"s" + (tree.encode() if isinstance(tree, str) else tree) + b"\0")
    else:
        array = np.asarray(tree.numpy() if hasattr(tree, "numpy") else tree)
        if array.dtype == object:  # tf.data strings: an object array of bytes
            _update(h, array.tolist())
            return
        array = np.ascontiguousarray(array)
        h.update(f"{array.dtype.str}{array.shape}".encode())
        h.update(array.tobytes())


def batch_shapes(batch: Any, prefix: str = "") -> dict[str, list[int]]:
    """``{"observation/image": [32, 1, 256, 256, 3], ...}``: the shape of every array in a
    batch (a list of strings counts as ``[len]``), to check that two pipelines emit the same."""
    shapes = {}
    for key, value in batch.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            shapes.update(batch_shapes(value, f"{name}/"))
        elif hasattr(value, "shape"):
            shapes[name] = [int(d) for d in value.shape]
        else:
            shapes[name] = [len(value)]
    return shapes
