"""What the benchmark checks in a batch besides its digest (``torch_rlds._trees.batch_digest``,
by which a resumed run must reproduce the uninterrupted one): the shapes, which every pipeline
must emit alike.

Framework-free (numpy only), so the tf.data measurements use it without importing torch.
"""

from __future__ import annotations

from typing import Any


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
