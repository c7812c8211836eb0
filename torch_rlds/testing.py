"""Test helpers for anyone building on torch_rlds: exact-resume checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _to_comparable(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().numpy()
    if isinstance(tree, dict):
        return {k: _to_comparable(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_to_comparable(v) for v in tree]
    return tree


def assert_batches_equal(a: Any, b: Any, where: str = "batch") -> None:
    """Raise ``AssertionError`` naming the first leaf where ``a`` and ``b`` differ (bit for bit:
    same dtype, shape and bytes; strings equal)."""
    a, b = _to_comparable(a), _to_comparable(b)
    if isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            raise AssertionError(f"{where}: keys differ: {sorted(a)} / "
                                 f"{sorted(b) if isinstance(b, dict) else type(b).__name__}")
        for key in a:
            assert_batches_equal(a[key], b[key], f"{where}/{key}")
        return
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        if a_arr.dtype != b_arr.dtype or a_arr.shape != b_arr.shape:
            raise AssertionError(f"{where}: {a_arr.dtype}{a_arr.shape} / {b_arr.dtype}"
                                 f"{b_arr.shape}")
        if a_arr.tobytes() != b_arr.tobytes():
            raise AssertionError(f"{where}: values differ")
        return
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            raise AssertionError(f"{where}: lists differ in length")
        for i, (x, y) in enumerate(zip(a, b)):
            assert_batches_equal(x, y, f"{where}[{i}]")
        return
    if a != b:
        raise AssertionError(f"{where}: {a!r} / {b!r}")


def assert_resumes_exactly(make_loader: Callable[[], Any], num_batches: int, *,
                           restore_points: list[int] | None = None) -> list[Any]:
    """Check that a loader resumes bit for bit from a state saved after any batch.

    Runs ``make_loader()`` uninterrupted for ``num_batches`` batches, keeping the state after
    each. Then, for every ``k < num_batches`` (or each of ``restore_points``), builds a fresh
    loader, loads the state saved after batch ``k`` after a ``json.dumps``/``json.loads`` round
    trip, and checks that every later batch equals the uninterrupted run's. Returns the
    reference batches. ``make_loader`` must return a new loader (``state_dict``,
    ``load_state_dict``, iterable) built the same way each time.
    """
    loader = make_loader()
    reference, states = [], [json.dumps(loader.state_dict())]
    iterator = iter(loader)
    for _ in range(num_batches):
        reference.append(_to_comparable(next(iterator)))
        states.append(json.dumps(loader.state_dict()))
    del iterator
    points = range(num_batches) if restore_points is None else restore_points
    for k in points:
        if not 0 <= k < num_batches:
            raise ValueError(f"restore point {k} outside [0, {num_batches})")
        resumed = make_loader()
        resumed.load_state_dict(json.loads(states[k]))
        iterator = iter(resumed)
        for i in range(k, num_batches):
            try:
                batch = next(iterator)
            except StopIteration:
                raise AssertionError(f"restored after batch {k}: stream ended at batch {i}, the "
                                     f"uninterrupted run had {num_batches}") from None
            assert_batches_equal(reference[i], batch, f"restored after {k}, batch {i}")
        del iterator
    return reference
