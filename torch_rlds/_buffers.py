"""How a batch crosses from a DataLoader worker to the main process, and the buffers a worker
reuses once the main process is done with them.

**One handle per batch.** All tensors of a batch are views of one buffer of shared memory
(:func:`torch_rlds.collate.allocate`). Torch would pickle each tensor with a handle of its own
(a file descriptor the main process fetches from the worker over a socket, with an
authentication handshake, then maps): nine for a batch of nine tensors. :func:`packed` wraps a
batch so that it pickles as one handle and the tensors' views.

**Reused buffers.** A new buffer costs a page fault per 4 KiB page the first time it is written
in the worker, and again the first time it is read in the main process: for two 256x256
cameras and 32 samples about 3,000 faults a batch, as long as decoding its JPEGs on some
virtual machines. So the workers of a :class:`torch_rlds.DataLoader` keep a few buffers
(slots) each and write batch after batch into them; the main process keeps them mapped, and
tells a worker when a buffer is free again through a small shared table of flags:

* a worker takes a free slot (flag 0), marks it with a new sequence number and writes a header
  (``MAGIC``, the table's token, worker, slot, sequence) into the first bytes of the buffer,
  before the batch's tensors;
* the first batch in a slot carries the buffer's handle, which the main process maps and keeps
  for as long as the loader's iterator lives; later batches in that slot carry only the slot's
  name, so they cost neither a handle nor a page fault;
* the main process notes each batch's slot and sequence as it unpickles it, and hands the
  batch out as fields of their own (:mod:`torch_rlds._fields`); at each ``next()`` it frees
  (flag back to 0) every slot whose batch has no field held any more in the main process
  (batches torchdata drops unseen, as when it skips ahead to a restored position, free their
  slots too);
* a worker with no free slot allocates a new buffer as before, so nothing ever waits, and a
  batch the caller keeps stays intact however long it is kept.

A field sent on from the main process to yet another process (a ``torch.multiprocessing``
queue) is copied into shared memory of its own as it goes, so the slot is free again.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import weakref
from typing import Any, cast

import numpy as np
import torch
import torch.utils.data

from torch_rlds import _fields, _torchdata

# Bytes before a pooled batch's first tensor: MAGIC, token, worker, slot, sequence (int64 each).
HEADER = 64
MAGIC = 0x746F7263685F726C  # "torch_rl"
_FIELDS = 5

# The worker's reused batch buffers, installed by :func:`install` at worker start.
_installed: WorkerBuffers | None = None
# Main process: per live Leases token, the slot buffers mapped so far, the sequence of the
# batch last unpickled in each and its fields: {(worker, slot): [buffer, sequence, batch]}
# (a buffer as a uint8 array over all of it, a _fields.Batch).
_mapped: dict[int, dict[tuple[int, int], list[Any]]] = {}


_SHM = "/dev/shm"
# The name torch gives the shared-memory file it failed to allocate, in its error message.
_SHM_NAME = re.compile(r"<(/torch_\d+_\d+_\d+)>")


def new_shared(nbytes: int) -> torch.UntypedStorage:
    """A new shared-memory buffer of ``nbytes`` (torch's own, :func:`torch_rlds._torchdata.new_shared_storage`), with two
    guarantees torch does not give: a buffer larger than the free space of ``/dev/shm`` is
    refused before anything is allocated, and a failed allocation never leaves its
    ``/dev/shm/torch_*`` file behind."""
    try:
        st = os.statvfs(_SHM)
    except OSError:
        st = None  # no /dev/shm here: torch's own error, if any, stands
    if st is not None and nbytes > st.f_bavail * st.f_frsize:
        raise RuntimeError(
            f"torch_rlds: a batch buffer of {nbytes} bytes does not fit in {_SHM} "
            f"({st.f_bavail * st.f_frsize} bytes free); lower batch_size or num_workers, or "
            f"give {_SHM} more room")
    try:
        return _torchdata.new_shared_storage(nbytes)
    except BaseException as e:
        _remove_left_behind(e)
        raise


def _remove_left_behind(error: BaseException) -> None:
    """Remove the shared-memory file of a failed allocation: torch names it in ``error``;
    failing that, any ``torch_<this pid>_*`` file (under the file-descriptor strategy torch
    unlinks each file as soon as it is mapped, so a file of this process that is still there
    belongs to no buffer)."""
    names = [f"{_SHM}{m}" for m in _SHM_NAME.findall(str(error))]
    if not names and torch.multiprocessing.get_sharing_strategy() == "file_descriptor":
        prefix = f"torch_{os.getpid()}_"
        with contextlib.suppress(OSError):
            names = [os.path.join(_SHM, n) for n in os.listdir(_SHM) if n.startswith(prefix)]
    for name in names:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _header(buffer: np.ndarray) -> list[int] | None:
    """MAGIC, token, worker, slot, sequence of a pooled buffer (a uint8 array over all of it);
    ``None`` for another one."""
    if buffer.nbytes < HEADER:
        return None
    header = buffer[:_FIELDS * 8].view(np.int64).tolist()
    return header if header[0] == MAGIC else None


class Leases:
    """The main process's side: the flag table, and the slot buffers it has mapped.

    Args:
      num_workers: the loader's workers.
      slots: buffers each worker may keep.
    """

    def __init__(self, num_workers: int, slots: int) -> None:
        self.flags = torch.zeros((num_workers, slots), dtype=torch.int64).share_memory_()
        self.token = secrets.randbits(62) + 1
        self._flags = self.flags.numpy()
        self._buffers = _mapped[self.token] = {}
        weakref.finalize(self, _mapped.pop, self.token, None)

    def worker_args(self) -> tuple[torch.Tensor, int]:
        """What :func:`install` needs in a worker."""
        return self.flags, self.token

    def release(self) -> int:
        """Free every slot whose batch, unpickled here, has no field held any more (and give
        back the pages of the fields let go of where others are still held:
        :meth:`torch_rlds._fields.Batch.settle`); returns how many slots were freed."""
        freed = 0
        for key, entry in self._buffers.items():
            seq = entry[1]
            if not seq or self._flags[key] != seq:
                continue  # freed already, or a newer batch is on its way
            if entry[2] is None or entry[2].settle():
                entry[1] = 0
                self._flags[key] = 0
                freed += 1
        return freed


class WorkerBuffers:
    """A worker's side: its row of the flag table and the buffers of its slots."""

    def __init__(self, flags: torch.Tensor, token: int, worker: int) -> None:
        self._flags = flags[worker].numpy()
        self.token = token
        self.worker = worker
        self._storages: list[torch.UntypedStorage | None] = [None] * len(self._flags)
        # whether the buffer now in each slot has crossed to the main process as a handle
        self._sent = [False] * len(self._flags)
        self._seq = 0

    def take(self, nbytes: int) -> torch.UntypedStorage:
        """A shared buffer of at least ``HEADER + nbytes`` bytes, header written; the tensors
        go from offset ``HEADER`` on."""
        need = HEADER + nbytes
        free = [s for s in range(len(self._flags)) if self._flags[s] == 0]
        fits = [s for s in free if (held := self._storages[s]) is not None
                and held.nbytes() >= need]
        self._seq += 1
        storage: torch.UntypedStorage
        if fits:
            slot = fits[0]
            storage = cast(torch.UntypedStorage, self._storages[slot])  # one of the fits
        elif free:
            slot = free[0]
            storage = self._storages[slot] = new_shared(need)
            self._sent[slot] = False
        else:  # every slot still in use by the main process: a buffer of its own
            slot = -1
            storage = new_shared(need)
        if slot >= 0:
            self._flags[slot] = self._seq
        header = tensor_on(storage, torch.int64, 0, (_FIELDS,))
        header.copy_(torch.tensor([MAGIC, self.token, self.worker, slot, self._seq]))
        return storage

    def mapped(self, storage: torch.UntypedStorage) -> int | None:
        """The slot of ``storage`` if the main process has it mapped already, else ``None``
        (and from now on it has: the caller sends its handle)."""
        slot = next((s for s, held in enumerate(self._storages) if held is storage), None)
        if slot is None:
            return None
        if self._sent[slot]:
            return slot
        self._sent[slot] = True
        return None


def install(flags: torch.Tensor, token: int, worker: int) -> None:
    """Make :func:`worker_buffers` this worker's buffers (called at worker start)."""
    global _installed
    _installed = WorkerBuffers(flags, token, worker)


def worker_buffers() -> WorkerBuffers | None:
    """This process's reused batch buffers: set inside a worker of a loader that reuses
    buffers."""
    return _installed


# -- the crossing ---------------------------------------------------------------------------
def packed(batch: Any) -> Any:
    """``batch`` wrapped so that pickling it (a DataLoader worker sending it to the main
    process) sends the buffer its tensors share once (or, for a slot the main process has
    mapped, only the slot's name) and where each tensor lies in it; what unpickles is the
    plain batch, each tensor on a storage of its own over its bytes of the buffer
    (:mod:`torch_rlds._fields`). Outside a DataLoader worker, ``batch`` itself."""
    if torch.utils.data.get_worker_info() is None:
        return batch
    return _Packed(batch)


class _Packed:
    """A batch on its way out of a worker (see :func:`packed`).

    Laid out here, in the worker's main thread: pickling happens in the queue's feeder thread,
    where an error would be printed and the batch dropped, leaving the main process waiting.
    """

    def __init__(self, batch: Any) -> None:
        views: list[tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]] = []
        base: list[torch.UntypedStorage] = []
        skeleton = _strip(batch, base, views)
        if not base:
            self._reduced: tuple[Any, tuple[Any, ...]] = (_plain, (batch,))
            return
        storage = base[0]
        buffers = _installed
        slot = buffers.mapped(storage) if buffers is not None else None
        if buffers is not None and slot is not None:
            self._reduced = (_unpack_mapped, (buffers.token, buffers.worker, slot, views, skeleton))
            return
        whole = tensor_on(storage, torch.uint8, 0, (storage.nbytes(),))
        self._reduced = (_unpack, (whole, views, skeleton))

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self._reduced


class _View:
    """Where view ``index`` of the shared buffer goes in a packed batch."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __reduce__(self) -> tuple[Any, tuple[int]]:
        return _View, (self.index,)


class _Tree:
    """A dict, list or tuple of a packed batch that holds views of the shared buffer (directly
    or deeper down). Containers without any are sent as they are and not rebuilt."""

    def __init__(self, kind: type, items: Any) -> None:
        self.kind = kind  # dict (items: key-value pairs), list or tuple
        self.items = items

    def __reduce__(self) -> tuple[Any, tuple[type, Any]]:
        return _Tree, (self.kind, self.items)


def _strip(tree: Any, base: list[torch.UntypedStorage], views: list) -> Any:
    """``tree`` with each CPU tensor on the buffer of the first one replaced by a
    :class:`_View`, its (dtype, shape, stride, offset) appended to ``views``, and each
    container above one by a :class:`_Tree`."""
    if isinstance(tree, torch.Tensor):
        if tree.device.type != "cpu" or tree.requires_grad or type(tree) is not torch.Tensor:
            return tree
        storage = tree.untyped_storage()
        if not base:
            base.append(storage)
        elif storage.data_ptr() != base[0].data_ptr() or storage.nbytes() != base[0].nbytes():
            return tree  # another buffer: pickled as torch does
        views.append((tree.dtype, tuple(tree.shape), tuple(tree.stride()),
                      tree.storage_offset()))
        return _View(len(views) - 1)
    if type(tree) is dict:
        pairs = [(k, _strip(v, base, views)) for k, v in tree.items()]
        return _Tree(dict, pairs) if _holds_views(v for _, v in pairs) else tree
    if type(tree) in (list, tuple):
        values = [_strip(v, base, views) for v in tree]
        return _Tree(type(tree), values) if _holds_views(values) else tree
    return tree


def tensor_on(storage: torch.UntypedStorage, dtype: torch.dtype, offset: int,
              shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` over ``storage`` from element ``offset``, no copy."""
    # torch's stubs type set_() with typed storages only; it takes an untyped one as well.
    return torch.empty(0, dtype=dtype).set_(storage, offset, shape)  # type: ignore[call-overload]


def _holds_views(stripped: Any) -> bool:
    return any(type(v) in (_View, _Tree) for v in stripped)


def _unpack(whole: torch.Tensor, views: list, skeleton: Any) -> Any:
    """Main process: a batch that brought its buffer's handle. A slot buffer is kept mapped
    for the batches that later come in the same slot."""
    buffer = whole.numpy()
    header = _header(buffer)
    if header is not None and header[3] >= 0 and header[1] in _mapped:
        _, token, worker, slot, seq = header
        entry = _mapped[token][(worker, slot)] = [buffer, seq, None]
        tensors, entry[2] = _fields.split(buffer, views, loose=False)
    else:
        tensors, _ = _fields.split(buffer, views, loose=True)
    return _put(skeleton, tensors)


def _unpack_mapped(token: int, worker: int, slot: int, views: list, skeleton: Any) -> Any:
    """Main process: a batch in a slot whose buffer is mapped here already."""
    entry = _mapped.get(token, {}).get((worker, slot))
    if entry is None:
        raise RuntimeError(f"torch_rlds: a batch of worker {worker} came in buffer slot {slot}, "
                           "which this process never received (the loader's iterator that "
                           "mapped it is gone)")
    header = _header(entry[0])
    entry[1] = header[4] if header is not None else 0
    tensors, entry[2] = _fields.split(entry[0], views, loose=False)
    return _put(skeleton, tensors)


def _put(tree: Any, tensors: list[torch.Tensor]) -> Any:
    kind = type(tree)
    if kind is _View:
        return tensors[tree.index]
    if kind is not _Tree:
        return tree
    if tree.kind is dict:
        return {k: _put(v, tensors) for k, v in tree.items}
    return tree.kind(_put(v, tensors) for v in tree.items)


def _plain(batch: Any) -> Any:
    return batch
