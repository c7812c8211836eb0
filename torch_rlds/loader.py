"""``DataLoader``: torchdata's ``StatefulDataLoader``, the same for any dataset, with
torch_rlds's batching, exact passes and state files for its own datasets."""

from __future__ import annotations

import copy
import functools
import gc
import multiprocessing
import os
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.utils.data
from etils import epath

from torch_rlds import _buffers, _torchdata
from torch_rlds._bootstrap import explain_start_failure, refuse_inside_bootstrap
from torch_rlds._fields import to_numpy
from torch_rlds._loader_metrics import LoaderMetrics, MetricsTracker
from torch_rlds._pass import MultiProcessIter, Run, SingleProcessIter
from torch_rlds._start import default_start_method, init_worker, start_method_for
from torch_rlds._state import (
    LOADER_STATE_KEY,
    LOADER_STATE_VERSION,
    check_loader_state,
    saved_num_workers,
)
from torch_rlds._state_file import read_json, write_json_atomic
from torch_rlds._streamed import StreamedDataset
from torch_rlds._torchdata import (
    DATASET_STATE,
    ITERATOR_FINISHED,
    MAIN_SNAPSHOT,
    NUM_WORKERS,
    SNAPSHOT,
    SNAPSHOT_STEP,
    STEPS_SINCE_SNAPSHOT,
    WORKER_SNAPSHOTS,
    LoaderBase,
    worker_key,
)
from torch_rlds._workers import WorkerError
from torch_rlds.collate import collate
from torch_rlds.dataset import RLDSDataset
from torch_rlds.mixture import MixtureDataset
from torch_rlds.transforms import TransformedDataset

__all__ = ["DataLoader", "WorkerError", "dataset_states", "default_start_method",
           "is_rlds_dataset", "to_numpy"]

# torchdata 0.11 calls a torch API that newer torch deprecates, once per iterator.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

_T_co = TypeVar("_T_co", covariant=True)


def is_rlds_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is one of torch_rlds's streams: an :class:`~torch_rlds.RLDSDataset`,
    a :class:`~torch_rlds.TransformedDataset` of one, or a :class:`~torch_rlds.MixtureDataset`
    of such. Their state is a cursor that resumes the stream exactly."""
    if isinstance(dataset, RLDSDataset):
        return True
    if isinstance(dataset, TransformedDataset):
        return is_rlds_dataset(dataset.dataset)
    if isinstance(dataset, MixtureDataset):
        return all(map(is_rlds_dataset, dataset.datasets))
    return False


class DataLoader(LoaderBase[_T_co]):
    """torchdata's ``StatefulDataLoader``, with torch_rlds's batching and passes for its own
    datasets.

    **Any other dataset** is loaded exactly as ``StatefulDataLoader`` loads it: the same
    arguments (positional ones included), batches (torch's ``default_collate``), ``iter()``
    semantics, errors (a dataset's error passes and the pass goes on) and states (it loads
    every state ``StatefulDataLoader`` loads, and only checks their types and ranges first).
    What it adds there: :attr:`batches_seen`, :meth:`metrics`, :meth:`save_state` /
    :meth:`load_state`, ``as_numpy``, workers that never outlive the training process, and
    dead or silent workers named by :class:`WorkerError` (a ``RuntimeError`` in torch's
    words), raised from ``next()`` only; the pass ends with it (its other workers are stopped
    at once, where torchdata's iterator would be left unusable), and ``iter()`` again starts
    a new pass with fresh workers.

    **A torch_rlds dataset** (:func:`is_rlds_dataset`: an :class:`~torch_rlds.RLDSDataset`,
    a transformed one, a mixture of them) gets, besides:

    * *batches built by the dataset*: over an :class:`~torch_rlds.RLDSDataset` with
      ``batch_size`` and no ``collate_fn``, each frame is decoded straight into its row of the
      batch, with no per-sample Python in between; the batches are those
      :func:`torch_rlds.collate` makes of the same samples, bit for bit. :attr:`dataset` is a
      batching view of the dataset given (:meth:`RLDSDataset.batching_view`: one cursor for
      both, so ``set_epoch`` or ``load_state_dict`` on either applies), and ``batch_size`` and
      ``drop_last`` read as given. A dataset that emits batches already is taken as it is with
      ``batch_size=None`` or its own batch size (another raises ``ValueError``). Over other
      torch_rlds datasets ``collate_fn`` defaults to :func:`torch_rlds.collate`;
    * *one buffer per batch*: a batch built by torch_rlds crosses from a worker as one handle
      for its whole buffer (torch would send one per tensor). With ``reuse_buffers`` (the
      default) each worker writes its batches into a few buffers of shared memory that it
      reuses once the main process holds no field of the batch in them, and a batch in a
      buffer the main process has mapped crosses by the buffer's name (see
      :mod:`torch_rlds._buffers`). Each field the caller receives is a tensor of its own:
      ``torch.save`` of it writes that field only, sending it to another process copies that
      field only, and a field kept after the rest of its batch is dropped keeps only its own
      pages of shared memory (:mod:`torch_rlds._fields`). Off with ``pin_memory`` (pinned
      batches are copies) and with a ``collate_fn`` of the caller's own;
    * *one stream over passes*, with ``continue_passes`` (on by default for these datasets,
      and off with ``in_order=False`` and workers, where torchdata's state lags the batches
      handed out): an ``iter()`` after an unfinished pass (a ``break``) continues right after
      the last batch handed out, whatever ``num_workers`` and ``persistent_workers``
      (``StatefulDataLoader`` would drop what its workers had prefetched, or start over), and
      an ``iter()`` after a finished pass of a one-pass :class:`~torch_rlds.RLDSDataset` starts
      the next epoch (``StatefulDataLoader`` without persistent workers would repeat the first
      one). ``continue_passes=False`` gives ``StatefulDataLoader``'s passes;
    * *an error ends the pass*: the dataset's stream in the reader that raised is closed, so
      going on (as torchdata does) would silently leave out the rest of that reader's share.
      The workers are stopped at once, later ``next()`` calls say so, ``state_dict()`` is the
      state after the last batch handed out, and ``iter()`` again resumes right there, with
      fresh workers. (A ``collate_fn`` error ends it too: the loader cannot tell it apart.)
    * *strict states*: :meth:`load_state_dict` checks each worker's dataset state against the
      dataset (fingerprint, cursor in range, a stream that cannot end marked as ended) and the
      sampler and iterator states against what such a loader saves, before torchdata or a
      worker reads them; a mismatch raises ``ValueError`` naming the field and both values.

    Workers start with ``forkserver`` rather than ``fork`` when jax has started its backend in
    this process and ``multiprocessing_context`` is ``None`` (:func:`default_start_method`,
    decided at every ``iter()``, with a warning the first time); ``multiprocessing_context``
    itself keeps what the caller set. Every worker exits as soon as the training process is
    gone, however it died.

    The state is what ``StatefulDataLoader`` saves (each worker's dataset state gathered with
    the batch it produced, so prefetched batches never leak into it) plus
    ``{"torch_rlds": {"version", "batches_seen"}}``. It survives a JSON round trip. Any state
    loads only into a loader of the same ``num_workers``, and no load path unpickles anything.
    Not thread-safe: one thread iterates and saves.

    Args (besides ``StatefulDataLoader``'s):
      as_numpy: hand out numpy views of the batch tensors, without a copy.
      reuse_buffers: see "one buffer per batch".
      continue_passes: see "one stream over passes" (``None``: on for torch_rlds datasets
        where it is exact).
    """

    def __init__(self, dataset: torch.utils.data.Dataset[_T_co], batch_size: int | None = 1,
                 shuffle: bool | None = None,
                 sampler: torch.utils.data.Sampler | Iterable | None = None,
                 batch_sampler: torch.utils.data.Sampler | Iterable | None = None,
                 num_workers: int = 0, collate_fn: Callable[[list[Any]], Any] | None = None,
                 pin_memory: bool = False, drop_last: bool = False, timeout: float = 0,
                 worker_init_fn: Callable[[int], None] | None = None,
                 multiprocessing_context: Any = None, generator: torch.Generator | None = None,
                 *, prefetch_factor: int | None = None, persistent_workers: bool = False,
                 pin_memory_device: str = "", in_order: bool = True,
                 snapshot_every_n_steps: int | None = 1, as_numpy: bool = False,
                 reuse_buffers: bool = True, continue_passes: bool | None = None) -> None:
        rlds = is_rlds_dataset(dataset)
        workers = isinstance(num_workers, int) and num_workers > 0
        asked = None
        if (isinstance(dataset, StreamedDataset) and collate_fn is None and batch_sampler is None
                and (batch_size is not None or dataset.batch_size is not None)):
            # Whole batches built by the dataset, in its workers: see "batches built by the
            # dataset".
            if batch_size is not None:
                asked = (batch_size, bool(drop_last))
                dataset = _batching(dataset, *asked)
                drop_last = False
            batch_size, collate_fn = None, _whole_batch if workers else _itself
        else:
            if isinstance(dataset, StreamedDataset) and batch_size is not None \
                    and dataset.batch_size is None and batch_sampler is None:
                # Collated samples: under the global order a reader takes whole host batches.
                dataset = dataset.sampling_view(batch_size)
            if batch_size is not None and (collate_fn is collate
                                           or (collate_fn is None and rlds)):
                collate_fn = _collate if workers else collate
        super().__init__(dataset, batch_size, shuffle, sampler, batch_sampler, num_workers,
                         collate_fn, pin_memory, drop_last, timeout, worker_init_fn,
                         multiprocessing_context, generator, prefetch_factor=prefetch_factor,
                         persistent_workers=persistent_workers,
                         pin_memory_device=pin_memory_device, in_order=in_order,
                         snapshot_every_n_steps=snapshot_every_n_steps)
        if asked is not None:
            # What was asked for, as torch reports it; the dataset makes the batches.
            _torchdata.report_batching(self, *asked)
        exact = num_workers == 0 or in_order
        if continue_passes is None:
            continue_passes = rlds and exact
        elif continue_passes and not exact:
            raise ValueError("continue_passes=True needs in_order=True with workers (out of "
                             "order, torchdata's state lags the batches handed out, so a "
                             "continued pass would repeat or skip some)")
        self.continue_passes = bool(continue_passes)
        # (batches_seen, state) of a global-order state just loaded: see _load_global.
        self._loaded: tuple[int, dict[str, Any]] | None = None
        self.reuse_buffers = reuse_buffers
        self.as_numpy = as_numpy
        self._rlds = rlds
        self._run = Run(MetricsTracker(_episodes_per_epoch(dataset) if rlds else None),
                        as_numpy=as_numpy, ends_on_error=rlds)

    @property
    def as_numpy(self) -> bool:
        """Whether batches are handed out as numpy views of their tensors."""
        return self._as_numpy

    @as_numpy.setter
    def as_numpy(self, value: bool) -> None:
        self._as_numpy = bool(value)
        run = getattr(self, "_run", None)
        if run is not None:
            run.as_numpy = self._as_numpy

    @property
    def batches_seen(self) -> int:
        """Batches handed to the caller since the start of the stream (restored with the
        state)."""
        return self._run.batches_seen

    @batches_seen.setter
    def batches_seen(self, value: int) -> None:
        self._run.batches_seen = value

    # -- passes ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        refuse_inside_bootstrap()
        previous = _torchdata.live_iterator(self)
        if previous is not None and previous.ended:
            # A pass that ended with an error (its workers are stopped): a torch_rlds stream
            # goes on from its state; another dataset gets a new pass, with fresh workers.
            if self._rlds:
                self.load_state_dict(previous.state_dict())
            else:
                _torchdata.forget_iterator(self)
        elif self.continue_passes:
            self._continue_pass()
        return super().__iter__()

    def _new_iterator(self) -> Any:
        pending = _torchdata.pending_state(self)
        if self.num_workers == 0:
            iterator = SingleProcessIter(self, pending, self._run)
            _torchdata.set_pending_state(self, None)
            return iterator
        _torchdata.check_worker_count(self)
        leases = None
        if (self.reuse_buffers and not self.pin_memory
                and self.collate_fn in (_whole_batch, _collate)):
            leases = _buffers.Leases(self.num_workers, (self.prefetch_factor or 0)
                                     + _SPARE_BUFFERS)
        init, method = self.worker_init_fn, start_method_for(self)  # type: ignore[has-type]
        self.worker_init_fn = functools.partial(
            init_worker, os.getpid(), leases.worker_args() if leases is not None else None,
            init)
        if method is not None:
            self.multiprocessing_context = method
        # Forked workers share the parent's objects until they write to them, and a garbage
        # collection in a worker writes to every object it visits: frozen, the parent's
        # objects are never visited there, so a worker's private memory does not grow with
        # what the parent holds (per-episode tables of large datasets). Unfrozen in the
        # parent once the workers exist.
        frozen = _method_name(self.multiprocessing_context) == "fork"
        if frozen:
            gc.freeze()
        try:
            iterator = MultiProcessIter(self, pending, self._run, leases)
        except RuntimeError as error:
            explained = explain_start_failure(error, method or self.multiprocessing_context)
            if explained is None:
                raise
            raise explained from error
        finally:
            if frozen:
                gc.unfreeze()
            self.worker_init_fn = init
            if method is not None:
                self.multiprocessing_context = None  # type: ignore[assignment]
        _torchdata.set_pending_state(self, None)
        for part in _rlds_parts(self.dataset):
            part._progress.windows.clear()  # read by the checks for the workers, now forked
        # torch stops workers by sending None down their index queues. When the iterator is
        # collected as part of a reference cycle (an exception's traceback makes one easily),
        # the collector first closes those queues (their finalizers are weakref callbacks),
        # so the None never arrives and shutting down waits 5 s per worker before killing it.
        # Holding the queues from outside the cycle until the iterator is gone keeps them
        # open for its shutdown.
        weakref.finalize(iterator, _drop, _torchdata.index_queues(iterator)).atexit = False
        return iterator

    def _continue_pass(self) -> None:
        """Make the iterator ``StatefulDataLoader.__iter__`` is about to build continue the
        stream (see "one stream over passes")."""
        previous = _torchdata.live_iterator(self)
        pending = _torchdata.pending_state(self)  # a loaded state: the next iterator resumes it
        if pending is None:
            if previous is None:
                return
            if not (_torchdata.iterator_unused(self) or _torchdata.pass_finished(previous)):
                # An unfinished pass: resume it from the batches handed out, not from what the
                # workers had already fetched.
                self.load_state_dict(self.state_dict())
                return
            # A finished pass, or an iterator built by state_dict() and not yet used.
            pending = previous.state_dict()
        if (pending.get(ITERATOR_FINISHED) is True and self.num_workers > 0
                and not self.persistent_workers and isinstance(self.dataset, RLDSDataset)
                and not self.dataset.repeat):
            # StatefulDataLoader would start fresh workers from this process's copy of the
            # dataset, which never advanced: move that copy to the epoch after the finished one.
            states = [s for s in dataset_states(pending) if isinstance(s, dict)]
            self.dataset.set_epoch(self.dataset.epoch_after(states))
            _torchdata.set_pending_state(self, None)
            _torchdata.forget_iterator(self)

    def metrics(self) -> LoaderMetrics:
        """Throughput, time the caller waited for data, epoch progress and steps and episodes
        served per dataset, since this loader was built (see :class:`LoaderMetrics`)."""
        return self._run.metrics.snapshot()

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loader's state (see the class docstring); after a pass that ended with an error,
        the state after the last batch it handed out."""
        loaded = self._loaded
        if loaded is not None and loaded[0] == self.batches_seen:
            return copy.deepcopy(loaded[1])
        self._loaded = None
        state = dict(super().state_dict())
        state[LOADER_STATE_KEY] = {"version": LOADER_STATE_VERSION,
                                   "batches_seen": self.batches_seen}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``.

        Checks the whole state first (:func:`torch_rlds._state.check_loader_state`: a state of
        another worker count, or one whose counters, seeds or flags have the wrong type or
        range, raises ``ValueError`` naming the field) and, for a torch_rlds dataset, every
        worker's dataset state against the dataset (of another dataset or configuration, a
        cursor out of range, an endless stream marked as ended: ``ValueError`` naming the
        field and, for a mismatch, both values). ``{}`` is torchdata's "nothing to restore".
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"loader state must be a dict (got {type(state_dict).__name__})")
        self._loaded = None
        if not state_dict:
            super().load_state_dict({})
            return
        if isinstance(self.dataset, StreamedDataset) and self.dataset.order == "global":
            self._load_global(state_dict)
            return
        found = check_loader_state(state_dict, num_workers=self.num_workers, rlds=self._rlds)
        if self._rlds:
            for worker, (dataset_state, ended) in enumerate(zip(found.datasets, found.ended)):
                try:
                    self.dataset._check_state(dataset_state, self.num_workers, worker, ended)
                except ValueError as e:
                    if type(e) is not ValueError:  # the data's own error, reading a window
                        raise
                    where = f"worker {worker}: " if self.num_workers else ""
                    raise ValueError(f"{where}{e}") from None
        super().load_state_dict({k: v for k, v in state_dict.items() if k != LOADER_STATE_KEY})
        if found.batches_seen is not None:
            self.batches_seen = found.batches_seen

    def _load_global(self, state_dict: dict[str, Any]) -> None:
        """Load a state of a dataset in the global order, saved under any worker count (and,
        the state naming no host, under any host count): the stream's position is one number,
        so the loader starts a fresh pass there rather than restoring each worker."""
        found = check_loader_state(state_dict, num_workers=None, rlds=True)
        cursors = []
        for worker, (dataset_state, ended) in enumerate(zip(found.datasets, found.ended)):
            try:
                cursors.append(self.dataset._check_state(dataset_state, found.num_workers,
                                                         worker, ended))
            except ValueError as e:
                if type(e) is not ValueError:
                    raise
                where = f"worker {worker}: " if found.num_workers else ""
                raise ValueError(f"{where}{e}") from None
        handed = None
        if found.num_workers:
            # The batches handed out in the pass the state was saved in: the snapshot counts
            # them, and every worker's state names the pass's start.
            handed = state_dict[SNAPSHOT][SNAPSHOT_STEP] + state_dict[STEPS_SINCE_SNAPSHOT]
        cursor = self.dataset._stream.resume_cursor(self.dataset, cursors, handed)
        super().load_state_dict({})
        # Until a batch is handed out, state_dict() is the state loaded, as torchdata's is.
        self._loaded = (found.batches_seen or 0, copy.deepcopy(state_dict))
        if state_dict.get(ITERATOR_FINISHED) is True and not self.dataset.repeat:
            # The pass had ended: the next one is the next epoch, as it would have been.
            self.dataset.set_epoch(cursors[0].start // self.dataset.num_steps + 1)
        else:
            self.dataset._progress.cursor = cursor
            self.dataset._progress.resume = True
        if found.batches_seen is not None:
            self.batches_seen = found.batches_seen

    def save_state(self, path: str | os.PathLike) -> epath.Path:
        """Write the state as JSON to ``path`` atomically; returns the path.

        The JSON goes to a temporary file beside ``path`` that is flushed to disk and renamed
        over it, so a save killed at any point leaves the previous state intact (no file before
        the first save), never a partial one; temporary files that killed saves left behind
        are removed by the next save.
        """
        path = epath.Path(path)
        write_json_atomic(path, self.state_dict())
        return path

    def load_state(self, path: str | os.PathLike) -> None:
        """Load a state written by :meth:`save_state`.

        Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
        one that is not a whole JSON state of this loader (truncated, edited, another
        dataset's or configuration's).
        """
        state = read_json(path)
        try:
            if state == {}:  # load_state_dict's "nothing to restore"; save_state never writes it
                raise ValueError("an empty state")
            self.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{epath.Path(path)}: {e}") from None


def dataset_states(state: dict[str, Any]) -> list[Any]:
    """The dataset states inside a ``StatefulDataLoader`` state, one per worker in worker
    order (one without workers); ``None`` where a worker saved none."""
    if saved_num_workers(state) == 0:
        return [state.get(DATASET_STATE)]
    workers = state[SNAPSHOT].get(WORKER_SNAPSHOTS)
    if not isinstance(workers, dict):
        raise ValueError(f"loader state field {WORKER_SNAPSHOTS!r} must be a dict (got "
                         f"{type(workers).__name__})")
    count = state[SNAPSHOT][MAIN_SNAPSHOT][NUM_WORKERS]
    out = []
    for i in range(count):
        worker = workers.get(worker_key(i))
        if not isinstance(worker, dict):
            raise ValueError(f"loader state: {WORKER_SNAPSHOTS}.{worker_key(i)} is missing ("
                             f"{count} workers saved)")
        out.append(worker.get(DATASET_STATE))
    return out


# Buffers a worker keeps beyond its prefetched batches: the batch the caller holds, the one
# it held before (still referenced while the next is asked for), and one in reserve.
_SPARE_BUFFERS = 3


def _batching(dataset: StreamedDataset, batch_size: int, drop_last: bool) -> StreamedDataset:
    """``dataset`` emitting the loader's batches: a batching view of it (one cursor for both),
    or itself when it already emits those batches."""
    if dataset.batch_size is None:
        return dataset.batching_view(batch_size, drop_last=drop_last)
    if (dataset.batch_size, dataset.drop_last) != (batch_size, drop_last):
        raise ValueError(
            f"the dataset emits batches already (batch_size={dataset.batch_size}, drop_last="
            f"{dataset.drop_last}); a DataLoader over it takes batch_size=None or the same "
            f"batch_size and drop_last (got batch_size={batch_size}, drop_last={drop_last})")
    return dataset


def _itself(batch: Any) -> Any:
    """The collate_fn of a dataset that emits whole batches, without workers."""
    return batch


def _whole_batch(batch: Any) -> Any:
    """The collate_fn of a dataset that emits whole batches: each item is one already (packed
    for its trip out of a worker: :func:`torch_rlds._buffers.packed`)."""
    return _buffers.packed(batch)


def _collate(samples: list[Any]) -> Any:
    """:func:`torch_rlds.collate`, packed for the trip out of a worker."""
    return _buffers.packed(collate(samples))


def _method_name(context: Any) -> str:
    """The start method ``multiprocessing_context`` (``None``, a name or a context) means."""
    if context is None:
        return multiprocessing.get_start_method()
    return context if isinstance(context, str) else context.get_start_method()


def _drop(*_: Any) -> None:
    """The finalizer of a worker iterator (see ``DataLoader._new_iterator``): it only needs to
    have held its arguments."""


def _rlds_parts(dataset: Any) -> Iterator[RLDSDataset]:
    """The RLDS datasets inside a torch_rlds dataset."""
    if isinstance(dataset, RLDSDataset):
        yield dataset
    elif isinstance(dataset, TransformedDataset):
        yield from _rlds_parts(dataset.dataset)
    elif isinstance(dataset, MixtureDataset):
        for part in dataset.datasets:
            yield from _rlds_parts(part)


def _episodes_per_epoch(dataset: Any) -> int | None:
    """The episodes of this process's share of an epoch of an RLDS dataset (transformed or
    not), or ``None`` (a mixture)."""
    while isinstance(dataset, TransformedDataset):
        dataset = dataset.dataset
    if not isinstance(dataset, RLDSDataset):
        return None
    return -(-len(dataset.source) // dataset.process_count)
