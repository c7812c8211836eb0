"""Batch buffers that a DataLoader worker reuses once the main process is done with them.

A batch crosses from a worker as one buffer of shared memory (see :func:`collate.allocate`).
A new buffer costs a page fault per 4 KiB page the first time it is written, in the worker,
and again the first time it is read in the main process: for two 256x256 cameras and 32
samples that is about 3,000 faults a batch, as much time as decoding the batch's JPEGs on some
virtual machines. So the workers of a :class:`torch_rlds.DataLoader` keep a few buffers each
and write batch after batch into them; the main process keeps them mapped, and tells a worker
when a buffer is free again through a small shared table of flags:

* a worker takes a free slot (flag 0), marks it with a new sequence number and writes a header
  (``MAGIC``, the table's token, worker, slot, sequence) into the first bytes of the buffer,
  before the batch's tensors;
* the main process, for each batch handed out, reads that header and holds the buffer; at each
  ``next()`` it frees (flag back to 0) every buffer whose batch nothing references any more
  (no tensor, view or numpy array of it is alive in the main process);
* a worker with no free slot allocates a new buffer as before, so nothing ever waits, and a
  batch the caller keeps stays intact however long it is kept.

A batch sent on from the main process to yet another process (a ``torch.multiprocessing``
queue) is not seen there: clone it first, or build the loader with ``reuse_buffers=False``.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import torch

# Bytes before a pooled batch's first tensor: MAGIC, token, worker, slot, sequence (int64 each).
HEADER = 64
MAGIC = 0x746F7263685F726C  # "torch_rl"
_FIELDS = 5

# The worker's pool, installed by :func:`install` at worker start.
_pool: WorkerPool | None = None


def storage_use_count(storage: torch.UntypedStorage) -> int | None:
    """How many references (tensors, views, storage objects) hold ``storage``'s memory, or
    ``None`` where torch does not say."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(storage._cdata)


def supported() -> bool:
    """Whether this torch can tell when the main process no longer uses a buffer."""
    return storage_use_count(torch.UntypedStorage(1)) is not None


class Leases:
    """The main process's side: the flag table, and the buffers it has received.

    Args:
      num_workers: the loader's workers.
      slots: buffers each worker may keep.
    """

    def __init__(self, num_workers: int, slots: int) -> None:
        self.flags = torch.zeros((num_workers, slots), dtype=torch.int64).share_memory_()
        self.token = secrets.randbits(62) + 1
        self._flags = self.flags.numpy()
        # (worker, slot) -> [storage, sequence of the batch in it or 0 once freed]
        self._held: dict[tuple[int, int], list[Any]] = {}

    def worker_args(self) -> tuple[torch.Tensor, int]:
        """What :func:`install` needs in a worker."""
        return self.flags, self.token

    def received(self, batch: Any) -> None:
        """Note the buffer of ``batch``, just handed out, if it is one of the pooled ones."""
        tensor = _first_tensor(batch)
        if tensor is None:
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() < HEADER or storage.device.type != "cpu":
            return
        header = torch.empty(0, dtype=torch.int64).set_(storage, 0, (_FIELDS,)).tolist()
        magic, token, worker, slot, seq = header
        if magic != MAGIC or token != self.token or not 0 <= worker < self._flags.shape[0] \
                or not 0 <= slot < self._flags.shape[1] or seq <= 0:
            return
        self._held[(worker, slot)] = [storage, seq]

    def release(self) -> int:
        """Free every held buffer that nothing references any more; returns how many."""
        freed = 0
        for (worker, slot), entry in self._held.items():
            storage, seq = entry
            if seq and self._flags[worker, slot] == seq and storage_use_count(storage) == 1:
                entry[1] = 0
                # Kept mapped: the worker's next batch in this slot arrives as the same memory,
                # already mapped here, so reading it costs no page faults.
                self._flags[worker, slot] = 0
                freed += 1
        return freed


class WorkerPool:
    """A worker's side: its row of the flag table and the buffers of its slots."""

    def __init__(self, flags: torch.Tensor, token: int, worker: int) -> None:
        self._flags = flags[worker].numpy()
        self.token = token
        self.worker = worker
        self._storages: list[torch.UntypedStorage | None] = [None] * len(self._flags)
        self._seq = 0
        self.reused = 0
        self.allocated = 0

    def take(self, nbytes: int) -> torch.UntypedStorage:
        """A shared buffer of at least ``HEADER + nbytes`` bytes, header written; the tensors
        go from offset ``HEADER`` on."""
        need = HEADER + nbytes
        free = [s for s in range(len(self._flags)) if self._flags[s] == 0]
        fits = [s for s in free if self._storages[s] is not None
                and self._storages[s].nbytes() >= need]
        self._seq += 1
        if fits:
            slot = fits[0]
            storage = self._storages[slot]
            self.reused += 1
        elif free:
            slot = free[0]
            storage = self._storages[slot] = torch.UntypedStorage._new_shared(need)
            self.allocated += 1
        else:  # every slot still in use by the main process: a buffer of its own
            slot = -1
            storage = torch.UntypedStorage._new_shared(need)
            self.allocated += 1
        if slot >= 0:
            self._flags[slot] = self._seq
        header = torch.empty(0, dtype=torch.int64).set_(storage, 0, (_FIELDS,))
        header.copy_(torch.tensor([MAGIC, self.token, self.worker, slot, self._seq]))
        return storage


def install(flags: torch.Tensor, token: int, worker: int) -> None:
    """Make :func:`pool` this worker's pool (called at worker start)."""
    global _pool
    _pool = WorkerPool(flags, token, worker)


def pool() -> WorkerPool | None:
    """This process's pool: set inside a worker of a loader that reuses buffers."""
    return _pool


def _first_tensor(tree: Any) -> torch.Tensor | None:
    for value in _leaves(tree):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _leaves(tree: Any) -> Iterator[Any]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from _leaves(value)
    else:
        yield tree
