"""The fields of a batch that crossed from a worker in one buffer: each a tensor of its own.

A batch built by torch_rlds crosses from a DataLoader worker as one buffer of shared memory
(:mod:`torch_rlds._buffers`). Views of that buffer would make every field hold all of it:
keeping a batch's labels would keep its images in ``/dev/shm``, and ``torch.save`` of one
field would write the whole buffer. So each field is handed out as a tensor with a storage of
its own, over exactly its own bytes of the buffer (no copy): ``torch.save`` writes that field,
sending it to another process copies that field (torch moves a storage that is not in shared
memory into a new segment of its own first), and the buffer keeps a record of which of its
fields are still held.

When some fields of a batch are still held while the others are not (the caller kept the
labels, or an adapter kept the arrays it uses), :meth:`Batch.settle` gives the pages no held
field touches back to the system (``madvise(MADV_REMOVE)``, Linux): a kept field keeps its
own pages, not the batch. Settling is done at the loader's next ``next()``, never while a
batch is being dropped field by field (that would give back pages a worker is about to write
into again). Where the system cannot give pages back, the whole buffer stays until its last
field goes, as it would with views.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import threading
import weakref
from typing import Any

import numpy as np
import torch

PAGE = mmap.PAGESIZE
_MADV_REMOVE = 9  # Linux: free the range and its backing store (tmpfs, shared memory)
_libc: Any = None
_lock = threading.Lock()
# Batches of buffers that belong to no pool (reuse off, or a pool that was full), settled at
# every next() of any torch_rlds loader in this process.
_loose: list[Batch] = []


def _madvise() -> Any:
    """libc's ``madvise``, or ``None`` where the system has no way to give pages back."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                function = ctypes.CDLL(None, use_errno=True).madvise
                function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                _libc = function
            except (OSError, AttributeError):
                pass
    return _libc or None


class Batch:
    """The fields of one batch in one buffer, as handed out in this process.

    Holds the buffer (``base``, a uint8 array over all of it) only weakly: the fields hold it.
    """

    __slots__ = ("_base", "_fields", "_held", "_given")

    def __init__(self, base: np.ndarray, fields: list[tuple[Any, int, int]]) -> None:
        self._base = weakref.ref(base)
        self._fields = fields  # (weakref to the field's bytes, start, end)
        self._held = len(fields)
        self._given: np.ndarray | None = None  # pages given back

    def held(self) -> int:
        """How many fields something in this process still holds."""
        return sum(1 for ref, _, _ in self._fields if ref() is not None)

    def settle(self) -> bool:
        """Give back the pages that no held field touches; ``True`` once no field is held (the
        buffer is then free)."""
        held = [(start, end) for ref, start, end in self._fields if ref() is not None]
        if not held:
            return True
        if len(held) < self._held:
            self._held = len(held)
            base = self._base()  # held strongly while pages go: the mapping must not
            if base is not None:
                self._give_back(base, held)
        return False

    def _give_back(self, base: np.ndarray, held: list[tuple[int, int]]) -> None:
        madvise = _madvise()
        if madvise is None:
            return
        address = base.ctypes.data
        if address % PAGE:
            return  # not a mapping of its own
        pages = -(-base.nbytes // PAGE)
        keep = np.zeros(pages, bool)
        for start, end in held:
            keep[start // PAGE:-(-end // PAGE)] = True
        if self._given is None:
            self._given = np.zeros(pages, bool)
        todo = ~keep & ~self._given
        if not todo.any():
            return
        edges = np.flatnonzero(np.diff(np.concatenate([[0], todo.view(np.int8), [0]])))
        for first, stop in zip(edges[::2].tolist(), edges[1::2].tolist()):
            length = min(stop * PAGE, base.nbytes) - first * PAGE
            if madvise(address + first * PAGE, length, _MADV_REMOVE) != 0:
                return  # not shared memory this system gives back: keep it all
            self._given[first:stop] = True


def split(base: np.ndarray, views: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]],
          *, loose: bool) -> tuple[list[torch.Tensor], Batch]:
    """The tensors of ``views`` (dtype, shape, stride, offset in elements) of the buffer
    ``base``, each on a storage of its own over its bytes, and their :class:`Batch`.

    ``loose``: the buffer belongs to no pool, so this module settles it itself (at
    :func:`settle_loose`) until no field is held.
    """
    tensors, fields = [], []
    for dtype, shape, stride, offset in views:
        if 0 in shape:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        size = dtype.itemsize
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
        start = offset * size
        end = start + extent * size
        own = base[start:end]
        tensors.append(torch.frombuffer(own, dtype=dtype).as_strided(shape, stride))
        fields.append((weakref.ref(own), start, end))
    batch = Batch(base, fields)
    if loose and fields:
        with _lock:
            _loose.append(batch)
    return tensors, batch


def settle_loose() -> None:
    """Settle the batches of buffers that belong to no pool; forget those no field holds."""
    if not _loose:
        return
    with _lock:
        _loose[:] = [batch for batch in _loose if not batch.settle()]


def to_numpy(tree: Any) -> Any:
    """Replace every tensor in ``tree`` with a numpy view of it (no copy)."""
    if isinstance(tree, torch.Tensor):
        return tree.numpy()
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], torch.Tensor):
        return type(tree)(to_numpy(v) for v in tree)
    return tree
