"""Test helpers for anyone building on torch_rlds: exact-resume checks, and a simulated
object store (:func:`simulated_bucket`) to test remote datasets without a network."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from torch_rlds._simbucket import RequestCounts, SimulatedBucket


@contextlib.contextmanager
def simulated_bucket(root: str | os.PathLike, name: str = "torch-rlds-sim", *,
                     latency_s: float = 0.0, page_size: int = 1000) -> Iterator[SimulatedBucket]:
    """Serve the local folder ``root`` as ``gs://name/`` while the block runs: an fsspec
    filesystem answering each request after ``latency_s`` seconds and counting requests by
    kind (``bucket.counts``: list, info, read, write, bytes moved). Processes started inside
    the block (DataLoader workers, a second "host") serve it too. ``bucket.url(path)`` is the
    ``gs://`` URL of a local path inside ``root``::

        with simulated_bucket(tmp_path, latency_s=0.03) as bucket:
            source = RLDSSource(bucket.url(dataset_dir))
            print(bucket.counts.snapshot())
    """
    bucket = SimulatedBucket(root, name, latency_s=latency_s, page_size=page_size)
    with bucket:
        yield bucket


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
                           restore_points: Sequence[int] | None = None,
                           chained: bool = False, ends: bool = False,
                           make_restored: Callable[[], Any] | None = None) -> list[Any]:
    """Check that a loader resumes bit for bit from a state saved after any batch.

    Runs ``make_loader()`` uninterrupted for ``num_batches`` batches, keeping the state after
    each (``restore_points`` refer to these: ``k`` is the state after ``k`` batches, ``0`` the
    state before the first). Then, for every ``k < num_batches`` (or each of
    ``restore_points``), builds a fresh loader, loads the state saved after batch ``k`` after a
    ``json.dumps``/``json.loads`` round trip, and checks that every later batch equals the
    uninterrupted run's.

    With ``chained=True`` the restores are one run instead: the loader restored at the first
    point runs to the next point, saves its own state there, a fresh loader loads that, and so
    on to ``num_batches``; each batch is still compared. This checks that a state saved by a
    restored loader resumes exactly too (save, continue, save again, restore...).

    With ``ends=True`` the stream must end right after ``num_batches`` batches (a one-pass
    loader), uninterrupted and restored alike: a restore must not add batches either.

    ``make_restored`` builds the loaders that restore (default ``make_loader``): a loader of
    another topology, for a stream that resumes under any number of workers (the global
    order), whose batches must equal the uninterrupted run's all the same.

    Returns the reference batches. ``make_loader`` must return a new loader (``state_dict``,
    ``load_state_dict``, iterable) built the same way each time. Raises ``AssertionError``
    naming the restore point, the batch and the first differing leaf.
    """
    if type(num_batches) is not int or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1 (got {num_batches!r})")
    points = list(range(num_batches) if restore_points is None else restore_points)
    for k in points:
        if type(k) is not int or not 0 <= k < num_batches:
            raise ValueError(f"restore point {k!r} outside [0, {num_batches})")
    if chained and (not points or points != sorted(set(points))):
        raise ValueError(f"chained restore points must be increasing, at least one (got "
                         f"{points})")
    loader = make_loader()
    reference, states = [], [json.dumps(loader.state_dict())]
    iterator = iter(loader)
    for i in range(num_batches):
        try:
            reference.append(_to_comparable(next(iterator)))
        except StopIteration:
            raise AssertionError(f"the uninterrupted run ended after {i} batches, "
                                 f"num_batches is {num_batches}") from None
        states.append(json.dumps(loader.state_dict()))
    if ends:
        _check_end(iterator, "the uninterrupted run", num_batches)
    del iterator, loader
    if make_restored is not None:
        make_loader = make_restored
    if chained:
        state = states[points[0]]
        stops = [*points[1:], num_batches]
        for k, stop in zip(points, stops):
            state = _resume_and_compare(make_loader, state, reference, k, stop,
                                        f"chained restore at {k}", ends and stop == num_batches)
    else:
        for k in points:
            _resume_and_compare(make_loader, states[k], reference, k, num_batches,
                                f"restored after {k}", ends)
    return reference


def _resume_and_compare(make_loader: Callable[[], Any], state: str, reference: list[Any],
                        start: int, stop: int, where: str, ends: bool) -> str:
    """Restore ``state`` into a fresh loader, compare batches ``start..stop-1`` with
    ``reference``, and return the loader's state after them (as JSON)."""
    loader = make_loader()
    loader.load_state_dict(json.loads(state))
    iterator = iter(loader)
    for i in range(start, stop):
        try:
            batch = next(iterator)
        except StopIteration:
            raise AssertionError(f"{where}: stream ended at batch {i}, the uninterrupted run "
                                 f"had {len(reference)}") from None
        assert_batches_equal(reference[i], batch, f"{where}, batch {i}")
    if ends:
        _check_end(iterator, where, stop)
    return json.dumps(loader.state_dict())


def _check_end(iterator: Any, where: str, num_batches: int) -> None:
    try:
        next(iterator)
    except StopIteration:
        return
    raise AssertionError(f"{where}: the stream goes on after batch {num_batches - 1}; it "
                         f"should end there")


__all__ = [
    "RequestCounts",
    "SimulatedBucket",
    "assert_batches_equal",
    "assert_resumes_exactly",
    "simulated_bucket",
]
