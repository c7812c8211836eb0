"""Batches as trees: nested dicts, lists and tuples whose leaves are arrays, tensors and
strings. Their leaves by path, and digests that two runs compare to show they saw the same
batches bit for bit.

numpy only: torch and TensorFlow tensors are read through their ``.numpy()``, so a tf.data
measurement digests its batches without importing torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def flat_items(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested mapping by their ``a/b/c`` path (``prefix`` before each)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat_items(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = value
    return out


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The ``a/b/c`` paths of the leaves of a nested mapping (what error messages list)."""
    return list(flat_items(tree, prefix))


def batch_digest(batch: Any) -> str:
    """A SHA-256 over every leaf of ``batch`` (dtype, shape and bytes; strings as UTF-8), dicts
    in key order: two batches have the same digest exactly when they hold the same keys,
    dtypes, shapes and bytes."""
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
        _update_array(h, array)


def _update_array(h: Any, array: Any) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())


def array_digest(array: Any) -> str:
    """A short (128-bit) digest of one array's dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=16)
    _update_array(h, np.asarray(array))
    return h.hexdigest()
