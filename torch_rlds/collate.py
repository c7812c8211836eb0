"""Stacking samples into batches of torch tensors."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, MutableMapping, Sequence
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
    stays bool); torch tensors are stacked (a tensor that requires grad keeps its graph);
    strings and bytes are kept in a list (a tuple inside a tuple, as ``default_collate``
    has it); lists and tuples are collated position by position into a list. Containers keep their type as torch's ``default_collate`` keeps it: a named tuple
    stays that named tuple, a ``Mapping`` subclass (``OrderedDict``...) stays that class. Every
    sample must have the same keys, shapes and dtypes: a mismatch raises ``ValueError`` naming
    the key path, the sample and both values, rather than broadcasting or casting (Python
    numbers excepted: ints among floats become floats, as numpy has it).

    Inside a DataLoader worker all tensors of a batch are laid out in one buffer of shared
    memory, so that the whole batch crosses to the main process as one handle (one
    shared-memory segment per batch rather than one per tensor, which costs about a
    millisecond each), without a copy through a pipe; a :class:`torch_rlds.DataLoader` then
    hands each field out as a tensor of its own (:mod:`torch_rlds._fields`). Outside a worker
    each tensor has memory of its own.
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
    """Empty tensors of the given ``(shape, dtype)``.

    Inside a DataLoader worker they are views of one new buffer of shared memory, each on a
    64-byte boundary, so a batch made of them crosses to the main process as one handle; in a
    worker of a :class:`torch_rlds.DataLoader` it is a buffer the worker reuses once the main
    process holds no tensor of its previous batch (see :mod:`torch_rlds._buffers`). Outside a
    worker each has memory of its own (one buffer would gain nothing there, and would make
    each tensor hold all of them). The tensors' contents are whatever the memory held: fill
    every element.
    """
    if torch.utils.data.get_worker_info() is None:
        return [torch.empty(shape, dtype=dtype) for shape, dtype in specs]
    buffers = _buffers.worker_buffers()
    offsets = []
    offset = _buffers.HEADER if buffers is not None else 0
    for shape, dtype in specs:
        offset = -(-offset // _ALIGN) * _ALIGN
        offsets.append(offset)
        offset += math.prod(shape) * dtype.itemsize
    if buffers is not None:  # a buffer the worker reuses (see torch_rlds._buffers)
        storage = buffers.take(offset - _buffers.HEADER)
    else:
        storage = _buffers.new_shared(max(offset, 1))  # as default_collate does
    return [_buffers.tensor_on(storage, dtype, start // dtype.itemsize, shape)
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
            torch.stack([v.detach() for v in self.values], out=out)
        else:
            target = out.numpy()
            for i, value in enumerate(self.values):
                target[i] = value
        self.tensor = out
        self.values = ()


# torch's words for a batch of nested tensors (code matching them keeps working).
_NESTED = ("Batches of nested tensors are not currently supported by the default collate_fn; "
           "please provide a custom collate_fn to handle them appropriately.")


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
        return _Node(type(first), [(key, _plan([s[key] for s in samples], f"{where}/{key}",
                                               leaves)) for key in keys], first)
    if isinstance(first, (str, bytes)):
        _check_all(samples, type(first), where)
        return samples  # as default_collate: the sequence they came in (a tuple in a tuple)
    if isinstance(first, torch.Tensor):
        _check_all(samples, torch.Tensor, where)
        if any(s.is_nested for s in samples):
            raise RuntimeError(f"collate: {where}: {_NESTED}")
        for i, s in enumerate(samples):
            if s.shape != first.shape or s.dtype != first.dtype:
                raise ValueError(f"collate: {where}: sample {i} is {s.dtype}{tuple(s.shape)} / "
                                 f"sample 0 is {first.dtype}{tuple(first.shape)}")
        if any(s.requires_grad for s in samples) or first.device.type != "cpu":
            return torch.stack(list(samples))  # its graph (or device) stays: not in a buffer
        leaf = _Leaf(list(samples), first.dtype, tuple(first.shape))
        leaves.append(leaf)
        return leaf
    if isinstance(first, (np.ndarray, np.generic, bool, int, float)):
        arrays = [np.asarray(v) for v in samples]
        if all(type(v) in (int, float) for v in samples) and any(type(v) is float
                                                                  for v in samples):
            arrays = [np.asarray(float(v)) for v in samples]  # ints among floats: floats
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
        items = [(j, _plan(group, f"{where}[{j}]", leaves))
                 for j, group in enumerate(zip(*samples))]
        # A named tuple stays one; other sequences become lists, as default_collate has it.
        kind = type(first) if isinstance(first, tuple) and hasattr(first, "_fields") else list
        return _Node(kind, items, first)
    raise TypeError(f"collate: {where}: cannot batch values of type {type(first).__name__}")


class _Node:
    """A container of the batch: its type, its (key, subtree) items and the first sample's
    container (a ``Mapping`` subclass is rebuilt from a copy of it, as default_collate does)."""

    def __init__(self, kind: type, items: list[tuple[Any, Any]], first: Any) -> None:
        self.kind = kind
        self.items = items
        self.first = first

    def build(self) -> Any:
        values = [(key, _build(value)) for key, value in self.items]
        if self.kind is dict:
            return dict(values)
        if self.kind is list:
            return [value for _, value in values]
        if issubclass(self.kind, tuple):  # a named tuple
            return self.kind(*(value for _, value in values))
        return _mapping(self.kind, self.first, values)


def _mapping(kind: type, first: Any, values: list[tuple[Any, Any]]) -> Any:
    """A ``Mapping`` of ``kind`` holding ``values``: a copy of ``first`` updated where it can
    be (keeps what its constructor would not), else ``kind`` built from a dict, else a dict."""
    if isinstance(first, MutableMapping):
        try:
            clone = copy.copy(first)
            clone.update(values)
            return clone
        except (TypeError, AttributeError):
            pass
    try:
        return kind(dict(values))
    except TypeError:
        return dict(values)


def _check_all(samples: Sequence[Any], kind: type | tuple[type, ...], where: str) -> None:
    for i, s in enumerate(samples):
        if not isinstance(s, kind):
            raise ValueError(f"collate: {where}: sample {i} is a {type(s).__name__} / sample 0 "
                             f"is a {type(samples[0]).__name__}")


def _build(tree: Any) -> Any:
    if isinstance(tree, _Leaf):
        return tree.tensor
    if isinstance(tree, _Node):
        return tree.build()
    return tree
