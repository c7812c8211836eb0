"""Stacking samples into batches of torch tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data

from torch_rlds import _buffers

_ALIGN = 64  # byte alignment of each tensor inside a batch's buffer


def collate(samples: Sequence[Any]) -> Any:
    """Stack a list of samples into one batch.

    Dicts are collated key by key; numpy arrays, numpy scalars, Python numbers and bools become
    torch tensors with a leading batch axis (dtypes kept: a uint8 image stays uint8, a bool mask
    stays bool); torch tensors are stacked; strings become a list; lists and tuples are
    collated position by position into a list. Every sample must have the same keys, shapes and
    dtypes: a mismatch raises ``ValueError`` naming the key path, the sample and both values,
    rather than broadcasting or casting.

    All tensors of a batch are views of one buffer. Inside a DataLoader worker that buffer is
    allocated in shared memory, so the whole batch crosses to the main process as one handle
    (one shared-memory segment per batch rather than one per tensor, which costs about a
    millisecond each), without a copy through a pipe. A tensor of the batch keeps the whole
    buffer alive.
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    leaves: list[_Leaf] = []
    tree = _plan(samples, "batch", leaves)
    tensors = allocate([(leaf.shape, leaf.dtype) for leaf in leaves])
    for leaf, tensor in zip(leaves, tensors):
        leaf.fill(tensor)
    return _build(tree)


def allocate(specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    """Empty tensors of the given ``(shape, dtype)``, all views of one new buffer.

    Each starts on a 64-byte boundary. Inside a DataLoader worker the buffer is shared memory,
    so a batch made of these tensors crosses to the main process as one handle; in a worker of
    a :class:`torch_rlds.DataLoader` it is one the worker reuses once the main process holds no
    tensor of its previous batch (see :mod:`torch_rlds._buffers`). The tensors' contents are
    whatever the buffer held: fill every element.
    """
    in_worker = torch.utils.data.get_worker_info() is not None
    pool = _buffers.pool() if in_worker else None
    offsets = []
    offset = _buffers.HEADER if pool is not None else 0
    for shape, dtype in specs:
        offset = -(-offset // _ALIGN) * _ALIGN
        offsets.append(offset)
        offset += math.prod(shape) * dtype.itemsize
    if pool is not None:  # a buffer the worker reuses (see torch_rlds._buffers)
        storage = pool.take(offset - _buffers.HEADER)
    elif in_worker:
        storage = _buffers.new_shared(max(offset, 1))  # as default_collate does
    else:
        storage = torch.UntypedStorage(max(offset, 1))
    return [torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)
            for (shape, dtype), start in zip(specs, offsets)]


class _Leaf:
    """One tensor of the batch: the samples' values, checked alike, and where it goes."""

    def __init__(self, values: Sequence[Any], dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.values = values
        self.dtype = dtype
        self.shape = (len(values), *shape)
        self.tensor: torch.Tensor | None = None

    def fill(self, out: torch.Tensor) -> None:
        if isinstance(self.values[0], torch.Tensor):
            torch.stack(list(self.values), out=out)
        else:
            target = out.numpy()
            for i, value in enumerate(self.values):
                target[i] = value
        self.tensor = out
        self.values = ()


def _plan(samples: Sequence[Any], where: str, leaves: list[_Leaf]) -> Any:
    """Check ``samples`` alike and return the batch's tree with a :class:`_Leaf` per tensor."""
    first = samples[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for i, sample in enumerate(samples):
            if not isinstance(sample, Mapping) or set(sample) != set(keys):
                found = sorted(map(str, sample)) if isinstance(sample, Mapping) else (
                    type(sample).__name__)
                raise ValueError(f"collate: {where}: sample {i} has keys {found} / sample 0 "
                                 f"has {sorted(map(str, keys))}")
        return {key: _plan([s[key] for s in samples], f"{where}/{key}", leaves) for key in keys}
    if isinstance(first, str):
        _check_all(samples, str, where)
        return [str(s) for s in samples]
    if isinstance(first, torch.Tensor):
        _check_all(samples, torch.Tensor, where)
        for i, s in enumerate(samples):
            if s.shape != first.shape or s.dtype != first.dtype:
                raise ValueError(f"collate: {where}: sample {i} is {s.dtype}{tuple(s.shape)} / "
                                 f"sample 0 is {first.dtype}{tuple(first.shape)}")
        leaf = _Leaf([s.detach().cpu() for s in samples], first.dtype, tuple(first.shape))
        leaves.append(leaf)
        return leaf
    if isinstance(first, (np.ndarray, np.generic, bool, int, float)):
        arrays = [np.asarray(v) for v in samples]
        head = arrays[0]
        if head.dtype == object or head.dtype.kind in "USV":
            raise TypeError(f"collate: {where}: cannot batch arrays of dtype {head.dtype}")
        for i, a in enumerate(arrays):
            if a.dtype == object or a.dtype.kind in "USV":
                raise ValueError(f"collate: {where}: sample {i} is a {type(samples[i]).__name__}"
                                 f" / sample 0 is {head.dtype}{head.shape}")
            if a.shape != head.shape or a.dtype != head.dtype:
                raise ValueError(f"collate: {where}: sample {i} is {a.dtype}{a.shape} / sample "
                                 f"0 is {head.dtype}{head.shape}")
        leaf = _Leaf(arrays, torch.from_numpy(np.empty(0, head.dtype)).dtype, head.shape)
        leaves.append(leaf)
        return leaf
    if isinstance(first, (list, tuple)):
        _check_all(samples, (list, tuple), where)
        for i, s in enumerate(samples):
            if len(s) != len(first):
                raise ValueError(f"collate: {where}: sample {i} has {len(s)} entries / sample 0 "
                                 f"has {len(first)}")
        return [_plan(list(group), f"{where}[{j}]", leaves)
                for j, group in enumerate(zip(*samples))]
    raise TypeError(f"collate: {where}: cannot batch values of type {type(first).__name__}")


def _check_all(samples: Sequence[Any], kind: type | tuple[type, ...], where: str) -> None:
    for i, s in enumerate(samples):
        if not isinstance(s, kind):
            raise ValueError(f"collate: {where}: sample {i} is a {type(s).__name__} / sample 0 "
                             f"is a {type(samples[0]).__name__}")


def _build(tree: Any) -> Any:
    if isinstance(tree, _Leaf):
        return tree.tensor
    if isinstance(tree, dict):
        return {key: _build(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_build(value) for value in tree]
    return tree

