"""``DataLoader``: torchdata's ``StatefulDataLoader`` with torch_rlds defaults and file I/O."""

from __future__ import annotations

import copy
import functools
import multiprocessing
import os
import sys
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.data
from etils import epath
from torchdata.stateful_dataloader import Stateful, StatefulDataLoader

from torch_rlds import _buffers
from torch_rlds._bootstrap import explain_start_failure, refuse_inside_bootstrap
from torch_rlds._loader_stats import LoaderStats, StatsTracker
from torch_rlds._state import (
    DATASET_STATE,
    ITERATOR_FINISHED,
    LOADER_STATE_KEY,
    LOADER_STATE_VERSION,
    MAIN_SNAPSHOT,
    NUM_WORKERS,
    SNAPSHOT,
    WORKER_SNAPSHOTS,
    check_loader_state,
    saved_num_workers,
)
from torch_rlds._state_file import read_json, write_json_atomic
from torch_rlds._workers import (
    WorkerError,
    diagnose,
    report_deaths_from_next,
    stop_workers,
    summary,
)
from torch_rlds.collate import collate
from torch_rlds.dataset import RLDSDataset

# torchdata 0.11 calls a torch API that newer torch deprecates, once per iterator.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


# Imported once by the fork server rather than by every worker it starts: a worker that
# imports torch itself takes seconds to start.
_FORKSERVER_PRELOAD = ("torch_rlds", "tensorflow_datasets")


def default_start_method() -> str | None:
    """``forkserver`` once jax is imported (forking a process in which jax has started its
    backend threads can deadlock the child), else the platform default.

    With ``forkserver`` it also asks the fork server, if it has not started yet, to import
    torch_rlds and tensorflow_datasets (neither imports jax or tensorflow) before it forks
    workers, keeping any modules already asked for.
    """
    if "jax" not in sys.modules:
        return None
    from multiprocessing import forkserver

    asked = list(getattr(forkserver._forkserver, "_preload_modules", ["__main__"]))
    missing = [m for m in _FORKSERVER_PRELOAD if m not in asked]
    if missing:
        multiprocessing.set_forkserver_preload(asked + missing)
    return "forkserver"


class DataLoader(StatefulDataLoader):
    """A drop-in ``StatefulDataLoader`` with defaults for RLDS training.

    Differences from ``StatefulDataLoader``:

    * over an :class:`~torch_rlds.RLDSDataset`, with ``batch_size`` and no ``collate_fn``, the
      dataset makes the batches ("Batches" there): each frame is decoded straight into its row
      of the batch, with no per-sample Python in between. The batches are those
      :func:`torch_rlds.collate` makes of the same samples, bit for bit. :attr:`dataset` is
      a batching view of the dataset given (:meth:`RLDSDataset.batching_view`: one cursor for
      both, so ``set_epoch`` or ``load_state_dict`` on either applies), and ``batch_size``
      and ``drop_last`` read as given. A dataset that emits batches already is taken as it is
      with ``batch_size=None`` or its own batch size (another raises ``ValueError``). Pass
      ``collate_fn=torch_rlds.collate`` to have samples collated one by one instead;
    * otherwise ``collate_fn`` defaults to :func:`torch_rlds.collate` (a batch is one buffer
      of shared memory; strings as lists); with ``batch_size=None`` to torch's, which turns
      each sample's arrays into tensors;
    * a batch built by torch_rlds crosses from a worker as one handle for its whole buffer
      (torch would send one per tensor). With ``reuse_buffers`` (the default) each worker
      writes its batches into a few buffers of shared memory that it reuses once the main
      process holds no tensor, view, numpy array or storage object of the batch in them, and a
      batch in a buffer the main process has mapped crosses by the buffer's name (see
      :mod:`torch_rlds._buffers`): a fresh buffer costs a page fault per 4 KiB, which on a
      virtual machine can take as long as decoding the batch. A batch the caller keeps is
      never written over. One handed on to another process is not tracked there: clone it
      first, or pass ``reuse_buffers=False``. Off with ``pin_memory`` (pinned batches are
      copies) and with a ``collate_fn`` of the caller's own;
    * ``as_numpy=True`` hands out numpy views of the batch tensors, without a copy;
    * workers start with ``forkserver`` when jax is imported in the parent
      (:func:`default_start_method`, decided again at every ``iter()``), unless
      ``multiprocessing_context`` is given;
    * :attr:`batches_seen` counts the batches handed to the caller and is restored with the
      state; :meth:`save_state` / :meth:`load_state` write and read the state as JSON,
      atomically (temporary file, then rename), locally or on ``gs://``;
    * :meth:`load_state_dict` checks the whole state before torchdata or a worker reads it: a
      state of another worker count, one that does not belong to the dataset, or one malformed
      anywhere (a missing or unknown key, a bool, float or negative number where a count
      belongs, a worker id out of range) raises ``ValueError`` naming the field. No load path
      unpickles anything;
    * a worker that dies (killed, crashed, ``os._exit``) or, under ``timeout``, sends no batch
      in time raises :class:`WorkerError` naming the worker, its pid and exit code, from
      ``next()`` (within a fraction of a second; never from elsewhere in the main thread, as
      torch's SIGCHLD handler would);
    * any error ends the pass (torchdata would go on without the reader that raised, silently
      short of its steps): the workers are stopped at once, later ``next()`` calls say so,
      ``state_dict()`` is the state after the last batch handed out, and ``iter()`` again
      resumes right there, with fresh workers;
    * iteration is one stream whatever ``num_workers`` and ``persistent_workers``: an
      ``iter()`` after an unfinished pass (a ``break``) continues right after the last batch
      handed out (``StatefulDataLoader`` would drop what its workers had prefetched, or start
      over); an ``iter()`` after a finished pass of a one-pass :class:`~torch_rlds.RLDSDataset`
      starts the next epoch (``StatefulDataLoader`` without persistent workers would repeat the
      first one);
    * :meth:`stats` reports throughput, the time the caller waited for data, epoch progress
      and what was served per dataset.

    The state is what ``StatefulDataLoader`` saves (each worker's dataset state gathered with
    the batch it produced, so prefetched batches never leak into it) plus
    ``{"torch_rlds": {"version", "batches_seen"}}``. It survives a JSON round trip.
    Not thread-safe: one thread iterates and saves.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int | None = 1, *,
                 as_numpy: bool = False, collate_fn: Callable[[list[Any]], Any] | None = None,
                 multiprocessing_context: Any = None, reuse_buffers: bool = True,
                 **kwargs: Any) -> None:
        self._choose_start_method = multiprocessing_context is None
        if multiprocessing_context is None and kwargs.get("num_workers", 0) > 0:
            multiprocessing_context = default_start_method()
        workers = kwargs.get("num_workers", 0) > 0
        asked = None
        if (isinstance(dataset, RLDSDataset) and collate_fn is None
                and kwargs.get("batch_sampler") is None
                and (batch_size is not None or dataset.batch_size is not None)):
            # Whole batches built by the dataset, in its workers: see "Batches".
            if batch_size is not None:
                asked = (batch_size, bool(kwargs.pop("drop_last", False)))
                dataset = _batching(dataset, *asked)
            batch_size, collate_fn = None, _whole_batch if workers else _itself
        elif batch_size is not None and collate_fn in (None, collate):
            # (without batching torch's default converts each sample)
            collate_fn = _collate if workers else collate
        super().__init__(dataset, batch_size=batch_size, collate_fn=collate_fn,
                         multiprocessing_context=multiprocessing_context, **kwargs)
        if asked is not None:
            # What was asked for, as torch reports it; the dataset makes the batches.
            object.__setattr__(self, "batch_size", asked[0])
            object.__setattr__(self, "drop_last", asked[1])
        self.reuse_buffers = reuse_buffers
        self.as_numpy = as_numpy
        self.batches_seen = 0
        # (torchdata iterator, its state after the last batch handed out) for a pass that
        # ended with an error: see _CountingIterator.
        self._failed_pass: tuple[Any, dict[str, Any]] | None = None
        self._stats = StatsTracker(_episodes_per_epoch(dataset))

    def __iter__(self) -> Iterator[Any]:
        refuse_inside_bootstrap()
        if (self._choose_start_method and self.num_workers > 0
                and self.multiprocessing_context is None and "jax" in sys.modules):
            # jax was imported after this loader was built: workers must not be forked now.
            self.multiprocessing_context = default_start_method()
        self._prepare_pass()
        return _CountingIterator(self, super().__iter__())

    def _get_iterator(self) -> Any:
        leases = None
        if (self.num_workers > 0 and self.reuse_buffers and not self.pin_memory
                and self.collate_fn in (_whole_batch, _collate) and _buffers.supported()):
            leases = _buffers.Leases(self.num_workers, (self.prefetch_factor or 0)
                                     + _SPARE_BUFFERS)
        init = self.worker_init_fn
        if leases is not None:
            self.worker_init_fn = functools.partial(_init_worker, *leases.worker_args(), init)
        try:
            iterator = super()._get_iterator()
        except RuntimeError as error:
            explained = explain_start_failure(error, self.multiprocessing_context)
            if explained is None:
                raise
            raise explained from error
        finally:
            self.worker_init_fn = init
        iterator._torch_rlds_leases = leases  # freed slots: see _CountingIterator
        if getattr(iterator, "_worker_pids_set", False):
            report_deaths_from_next(iterator)
        queues = getattr(iterator, "_index_queues", None)
        if queues:
            # torch stops workers by sending None down their index queues. When the iterator
            # is collected as part of a reference cycle (an exception's traceback makes one
            # easily), the collector first closes those queues (their finalizers are weakref
            # callbacks), so the None never arrives and shutting down waits 5 s per worker
            # before killing it. Holding the queues from outside the cycle until the iterator
            # is gone keeps them open for its shutdown.
            weakref.finalize(iterator, _drop, queues).atexit = False
        return iterator

    def _prepare_pass(self) -> None:
        """Make the iterator ``StatefulDataLoader.__iter__`` is about to build continue the
        stream (see the class docstring)."""
        previous = self._iterator
        if self.next_iter_state is not None:
            pending = self.next_iter_state  # a loaded state: the next iterator resumes it
        elif previous is None:
            return
        elif self._initial_iter_for_state_dict:
            pending = previous.state_dict()  # an iterator built by state_dict(), not yet used
        elif previous._finished:
            pending = previous.state_dict()
        else:
            # An unfinished pass: resume it from the batches handed out, not from what the
            # workers had already fetched.
            self.load_state_dict(self.state_dict())
            return
        if (pending.get(ITERATOR_FINISHED) is True and self.num_workers > 0
                and not self.persistent_workers and isinstance(self.dataset, RLDSDataset)
                and not self.dataset.repeat):
            # StatefulDataLoader would start fresh workers from this process's copy of the
            # dataset, which never advanced: move that copy to the epoch after the finished one.
            epochs = [s["epoch"] for s in dataset_states(pending) if isinstance(s, dict)]
            self.dataset.set_epoch(max(epochs) + 1 if epochs else 0)
            self.next_iter_state = None
            self._iterator = None
            self._initial_iter_for_state_dict = False

    def stats(self) -> LoaderStats:
        """Throughput, time the caller waited for data, epoch progress and steps and episodes
        served per dataset, since this loader was built (see :class:`LoaderStats`)."""
        return self._stats.snapshot()

    def state_dict(self) -> dict[str, Any]:
        """The loader's state (see the class docstring); after a pass that ended with an error,
        the state after the last batch it handed out."""
        failed = self._failed_pass
        if failed is not None and failed[0] is self._iterator:
            state = copy.deepcopy(failed[1])
        else:
            state = dict(super().state_dict())
        state[LOADER_STATE_KEY] = {"version": LOADER_STATE_VERSION,
                                   "batches_seen": self.batches_seen}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``.

        Checks the whole state first (:func:`torch_rlds._state.check_loader_state`) and, for
        an :class:`~torch_rlds.RLDSDataset`, every worker's dataset state against the dataset:
        a state of another worker count, of another dataset or configuration, or one malformed
        anywhere raises ``ValueError`` naming the field (and, for a mismatch, both values).
        ``{}`` is torchdata's "nothing to restore".
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"loader state must be a dict (got {type(state_dict).__name__})")
        self._failed_pass = None
        if not state_dict:
            super().load_state_dict({})
            return
        rlds = isinstance(self.dataset, RLDSDataset)
        seen, datasets = check_loader_state(
            state_dict, num_workers=self.num_workers, rlds=rlds,
            snapshot_every_n_steps=self.snapshot_every_n_steps)
        if rlds:
            for worker, dataset_state in enumerate(datasets):
                try:
                    self.dataset._check_state(dataset_state, self.num_workers, worker)
                except ValueError as e:
                    where = f"worker {worker}: " if self.num_workers else ""
                    raise ValueError(f"{where}{e}") from None
        super().load_state_dict({k: v for k, v in state_dict.items() if k != LOADER_STATE_KEY})
        if seen is not None:
            self.batches_seen = seen

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
        worker = workers.get(f"worker_{i}")
        if not isinstance(worker, dict):
            raise ValueError(f"loader state: {WORKER_SNAPSHOTS}.worker_{i} is missing ("
                             f"{count} workers saved)")
        out.append(worker.get(DATASET_STATE))
    return out


class _CountingIterator:
    """Counts the batches handed out, and ends the pass at the first error.

    torchdata would go on after an error in a dataset or transform, but the reader that raised
    is finished by then (a generator that raised is closed), and the rest of its share would be
    silently missing from the pass. So any error ends the pass: the workers are stopped at once
    (rather than whenever the garbage collector gets to the iterator, which takes torch five
    seconds per worker), every later ``next()`` says so, and the loader keeps the state after
    the last batch handed out for ``state_dict()`` and the next ``iter()``. Without workers
    the dataset has already moved past the steps of the batch that failed, so its state is
    taken before each batch.
    """

    def __init__(self, loader: DataLoader, inner: Iterator[Any]) -> None:
        self._loader = loader
        self._inner = inner
        # The message later next() calls repeat (not the error: its traceback would keep the
        # frames of the failed call alive, with whatever they held).
        self._ended: WorkerError | str | None = None
        self._leases: _buffers.Leases | None = getattr(inner, "_torch_rlds_leases", None)
        dataset = getattr(inner, "_dataset", None)
        self._dataset_state = (dataset.state_dict if loader.num_workers == 0
                               and isinstance(dataset, Stateful) else None)

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        if self._ended is not None:
            raise self._ended_error()
        tracker = self._loader._stats
        started = tracker.started()
        before = self._dataset_state() if self._dataset_state is not None else None
        if self._leases is not None:
            self._leases.release()
        try:
            batch = next(self._inner)
        except StopIteration:
            raise
        except BaseException as e:
            failure = diagnose(self._inner, e) if isinstance(e, Exception) else None
            self._end_pass(failure or e, before)
            if failure is not None:
                # torch's frames may hold open temporary files (its check of the fd limit);
                # a worker forked later must not inherit them.
                traceback.clear_frames(e.__traceback__)
                raise failure from e
            raise
        self._loader.batches_seen += 1
        tracker.served(batch, started)
        return to_numpy(batch) if self._loader.as_numpy else batch

    def _end_pass(self, error: BaseException, dataset_state: Any) -> None:
        self._ended = (WorkerError(str(error), error.worker, error.pid, error.exitcode)
                       if isinstance(error, WorkerError) else summary(error))
        try:
            state = self._inner.state_dict()  # with workers: as of the last batch handed out
            if dataset_state is not None:
                state = {**state, DATASET_STATE: dataset_state}
            self._loader._failed_pass = (self._loader._iterator, state)
        finally:
            stuck = (error.worker if isinstance(error, WorkerError) and error.exitcode is None
                     else None)
            stop_workers(self._inner, stuck)

    def _ended_error(self) -> BaseException:
        ended = self._ended
        if isinstance(ended, WorkerError):
            return WorkerError(f"this pass already ended: {ended}", ended.worker, ended.pid,
                               ended.exitcode)
        return RuntimeError(f"this pass of the loader already ended with {ended}; iter(loader) "
                            "resumes after the last batch handed out")

    def __len__(self) -> int:
        return len(self._inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# Buffers a worker keeps beyond its prefetched batches: the batch the caller holds, the one
# it held before (still referenced while the next is asked for), and one in reserve.
_SPARE_BUFFERS = 3


def _init_worker(flags: torch.Tensor, token: int, init: Callable[[int], None] | None,
                 worker_id: int) -> None:
    """Worker start: install the worker's buffer pool, then the caller's ``worker_init_fn``."""
    _buffers.install(flags, token, worker_id)
    if init is not None:
        init(worker_id)


def _batching(dataset: RLDSDataset, batch_size: int, drop_last: bool) -> RLDSDataset:
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


def _drop(*_: Any) -> None:
    """The finalizer of a worker iterator (see ``DataLoader._get_iterator``): it only needs to
    have held its arguments."""


def _episodes_per_epoch(dataset: Any) -> int | None:
    source = getattr(dataset, "source", None)
    count = getattr(dataset, "process_count", 1)
    if source is None or not isinstance(count, int) or count < 1:
        return None
    return -(-len(source) // count)


def to_numpy(tree: Any) -> Any:
    """Replace every tensor in ``tree`` with a numpy view of it (no copy)."""
    if isinstance(tree, torch.Tensor):
        return tree.numpy()
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and tree and isinstance(tree[0], torch.Tensor):
        return type(tree)(to_numpy(v) for v in tree)
    return tree
