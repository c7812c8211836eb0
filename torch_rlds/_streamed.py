"""What every torch_rlds stream shares: its cursor, state protocol, passes and emitters.

:class:`StreamedDataset` is the part of :class:`~torch_rlds.RLDSDataset` (and of a
:class:`~torch_rlds.MixtureDataset` in the global order) that does not depend on where the
samples come from. A subclass sets ``_stream`` (an order: :mod:`torch_rlds._global_stream`,
:mod:`torch_rlds._window_stream`, :mod:`torch_rlds._mixture_stream`, which plans the samples
and owns the state format) and the sample settings (``obs_window``, ``action_horizon``,
``fast_jpeg``, ``sample_transform``, ``batch_size``, ``drop_last``, ``decode_threads``,
``process_index``, ``process_count``, ``repeat``); this class turns the plan into samples or
batches, decoded ``decode_threads`` at a time, and keeps the cursor after the last item
handed out.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch.utils.data

from torch_rlds._batch import BatchBuilder, Item
from torch_rlds._rules import check_int
from torch_rlds._samples import EpisodeSamples, Recipe
from torch_rlds._window_stream import shutdown

# One step of the stream: (sampler, step, epoch, cursor after it). A sampler of None is a
# marker: the cursor moves (past an empty window, at the end) without a sample.
_Plan = tuple[EpisodeSamples | None, int, int, Any]
# Samples made ahead per decode thread: enough to keep the threads busy while the consumer
# collates a batch of a few dozen.
_LOOKAHEAD = 16
# Threads chosen when decode_threads is None, at most: beyond that a process on a large machine
# would hold hundreds of samples ahead for little gain.
_MAX_THREADS = 8


class StreamedDataset(torch.utils.data.IterableDataset):
    """A resumable stream of step samples planned by an order (see the module docstring).

    Not thread-safe: one thread iterates, saves and restores; under a DataLoader each worker
    holds a copy.
    """

    # Set by each subclass (see the module docstring).
    _stream: Any
    _progress: Progress
    obs_window: int
    action_horizon: int
    fast_jpeg: bool
    sample_transform: Callable[[dict[str, Any]], dict[str, Any]] | None
    batch_size: int | None
    drop_last: bool
    decode_threads: int | None
    process_index: int
    process_count: int
    repeat: bool
    # Samples per host batch when the dataset emits samples (see sampling_view).
    _host_batch: int

    @property
    def order(self) -> str:
        """The order this dataset reads in: ``"global"`` or ``"window"``."""
        return self._stream.kind

    @property
    def num_steps(self) -> int:
        """The steps of the split (global order: counted when the dataset is built)."""
        if self._stream.kind != "global":
            raise ValueError("num_steps is counted under the global order only (the window "
                             "order reads episodes as it goes)")
        return self._stream.num_steps

    def epoch_after(self, states: list[dict[str, Any]]) -> int:
        """The epoch after the one the reader states ``states`` (of one pass, checked) stood
        in: where the next pass of a one-pass dataset starts once that one is finished."""
        if not states:
            return 0
        if self._stream.kind == "global":
            return max(s["start"] for s in states) // self._stream.num_steps + 1
        return max(s["epoch"] for s in states) + 1

    # -- reader identity -------------------------------------------------------------------
    def _reader(self) -> tuple[int, int, int, int]:
        """(reader, num_readers, num_workers, worker_index) in the current process."""
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (0, 0)
        return (*self._reader_of(workers, worker), workers, worker)

    def _reader_of(self, num_workers: int, worker_index: int) -> tuple[int, int]:
        per_host = max(num_workers, 1)
        return self.process_index * per_host + worker_index, self.process_count * per_host

    def fingerprint(self) -> dict[str, Any]:
        """What a state must match to be loaded into this dataset in this process."""
        _, _, workers, worker = self._reader()
        return self._stream.fingerprint(self, workers, worker)

    # -- Stateful protocol -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The reader's position (see the class docstring); JSON-serialisable."""
        _, _, workers, worker = self._reader()
        return self._stream.make_state(self, self._progress.cursor, workers, worker)

    def _state_mark(self) -> Callable[[], dict[str, Any]]:
        """What :meth:`state_dict` returns now, made when called: a loader takes one before
        each batch, at no cost, and uses it only when the batch fails half way."""
        cursor = self._progress.cursor
        _, _, workers, worker = self._reader()
        return lambda: self._stream.make_state(self, cursor, workers, worker)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from ``state_dict`` on the next ``iter()``; raises ``ValueError`` on mismatch.

        The next ``iter()`` continues the pass the state was saved in: with ``repeat=False`` it
        emits the rest of the state's epoch, nothing if this reader had finished it.
        """
        self._progress.cursor = self._check_state(state_dict, *self._reader()[2:])
        self._progress.resume = True

    def _check_state(self, state_dict: Any, num_workers: int, worker_index: int,
                     ended: bool = False) -> Any:
        """The cursor of ``state_dict`` if it belongs to worker ``worker_index`` of
        ``num_workers`` (any reader, under the global order) and names a position of the
        stream; raises ``ValueError`` naming every field that differs, or the field out of
        range. ``ended``: the state's iterator had ended (torchdata's ``fetcher_ended``), which
        only a one-pass dataset at the end of its epoch can be."""
        return self._stream.check_state(self, state_dict, num_workers, worker_index, ended)

    def seek(self, position: int, skipped: int = 0) -> None:
        """Go on from stream position ``position`` (a sample count since the start of epoch 0)
        on the next ``iter()``: what a loader does with a state saved under another topology.
        Global order only."""
        if self._stream.kind != "global":
            raise ValueError("seek() needs the global order (the window order's position is "
                             "one per reader)")
        self._progress.cursor = self._stream.at_position(self, position, skipped)
        self._progress.resume = True

    def batched(self, batch_size: int, *, drop_last: bool = False) -> StreamedDataset:
        """A copy of this dataset that emits batches of ``batch_size`` samples (see "Batches"),
        for ``DataLoader(..., batch_size=None)``.

        The copy shares the source and starts where this dataset would (a loaded state
        included); from then on each keeps its own state.
        """
        out = self.batching_view(batch_size, drop_last=drop_last)
        out._progress = Progress(self._progress.cursor, self._progress.resume)
        return out

    def batching_view(self, batch_size: int, *, drop_last: bool = False) -> StreamedDataset:
        """This dataset emitting batches of ``batch_size`` samples (see "Batches"), with one
        cursor for both: iterating, :meth:`set_epoch` and :meth:`load_state_dict` on either
        move the other. What :class:`torch_rlds.DataLoader` iterates when given this dataset
        and a ``batch_size``."""
        check_int("batch_size", batch_size, 1)
        out = copy.copy(self)
        out.batch_size = batch_size
        out.drop_last = bool(drop_last)
        return out

    def sampling_view(self, batch_size: int) -> StreamedDataset:
        """This dataset emitting samples whose loader collates them ``batch_size`` at a time
        (one cursor for both, as :meth:`batching_view`). Under the global order a reader then
        takes the samples of whole host batches, so the loader's batches are those a
        batching view makes, under any worker count. What :class:`torch_rlds.DataLoader`
        iterates when given this dataset, a ``batch_size`` and a ``collate_fn``."""
        check_int("batch_size", batch_size, 1)
        if self.batch_size is not None:
            raise ValueError(f"the dataset emits batches (batch_size={self.batch_size}); a "
                             "sampling view is of a dataset that emits samples")
        out = copy.copy(self)
        out._host_batch = batch_size
        return out

    def set_epoch(self, epoch: int) -> None:
        """Start from the beginning of ``epoch`` on the next ``iter()`` (drops any cursor but
        the count of skipped episodes)."""
        if type(epoch) is not int or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0 (got {epoch!r})")
        self._progress.cursor = self._stream.at_epoch(self, epoch, self._progress.cursor)
        self._progress.resume = False

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        """A pass: see "Passes" in the class docstring. Where it starts is decided here."""
        _, _, workers, worker = self._reader()
        cursor, resume = self._progress.cursor, self._progress.resume
        self._progress.resume = False
        cursor = self._progress.cursor = self._stream.begin(self, cursor, resume, workers,
                                                            worker)
        return self._steps(cursor, workers, worker)

    def _steps(self, cursor: Any, workers: int, worker: int) -> Iterator[Any]:
        threads = self._threads()
        pool = None
        reads = self._stream.reads(self)
        stop = shutdown  # the module's globals may be gone when a generator left open closes
        try:
            if threads > 1:
                pool = concurrent.futures.ThreadPoolExecutor(
                    threads, thread_name_prefix="torch_rlds-decode")
            plans = self._stream.plan(self, cursor, workers, worker, reads)
            if self.batch_size is None:
                yield from self._emit_samples(plans, pool, threads, reads)
            else:
                yield from self._emit_batches(plans, BatchBuilder(
                    self._recipe_of_self(), pool=pool, threads=threads), reads,
                    self.batch_size)
        finally:
            reads.close()
            if pool is not None:
                stop(pool)

    def _recipe_of_self(self) -> Recipe:
        """How this dataset's own samples are made (a mixture's carry their dataset's)."""
        return Recipe.of(self)

    def _decoded(self, sampler: EpisodeSamples, t: int, epoch: int) -> dict[str, Any]:
        """The sample of step ``t``, its frames decoded (the part that runs on the pool)."""
        recipe = sampler.recipe or self._recipe_of_self()
        return sampler.sample(t, recipe.obs_window, recipe.action_horizon, epoch,
                              fast_jpeg=recipe.fast_jpeg, window_actions=recipe.window_actions,
                              goal_seed=recipe.goal_seed, decode_sizes=recipe.decode_sizes)

    def _finished(self, sampler: EpisodeSamples, sample: dict[str, Any]) -> dict[str, Any]:
        """``sample`` transformed as its dataset says (in the iterating thread)."""
        recipe = sampler.recipe or self._recipe_of_self()
        return recipe.finish(sample)

    def _threads(self) -> int:
        if self.decode_threads is not None:
            return self.decode_threads
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else 1
        return max(1, min(_MAX_THREADS, cpus // workers))

    def _emit_samples(self, plans: Iterator[_Plan], pool: concurrent.futures.Executor | None,
                 threads: int, reads: Any) -> Iterator[dict[str, Any]]:
        """Samples of ``plans``, made up to a few ahead on ``pool``, cursor set as emitted.

        The first sample is made alone, and the next window is read only once it is out, so
        a restore waits for one window and one sample, no more.
        """
        ahead: collections.deque = collections.deque()
        depth = 1
        while True:
            while len(ahead) < depth:
                try:
                    plan = next(plans)
                except StopIteration:
                    break
                except Exception as error:  # the plan's own error, raised in its turn
                    ahead.append((None, error))
                    break
                sampler, t, epoch, cursor = plan
                if sampler is None:
                    ahead.append((cursor, None))
                elif pool is not None:
                    ahead.append((cursor, (sampler, pool.submit(self._decoded, sampler, t,
                                                                epoch))))
                else:
                    ahead.append((cursor, (sampler, t, epoch)))
            if not ahead:
                return
            cursor, job = ahead.popleft()
            if cursor is None:
                raise job
            if job is None:
                self._progress.cursor = cursor
                continue
            if len(job) == 2:
                sampler, future = job
                sample = future.result()
            else:
                sampler, t, epoch = job
                sample = self._decoded(sampler, t, epoch)
            sample = self._finished(sampler, sample)
            self._progress.cursor = cursor
            yield sample
            reads.start()
            # Lookahead grows with what was consumed, so that an iterator dropped early did
            # at most as much work ahead as it handed out.
            depth = min(depth + 1, _LOOKAHEAD * threads) if pool is not None else 1

    def _emit_batches(self, plans: Iterator[_Plan], builder: BatchBuilder, reads: Any,
                      batch_size: int) -> Iterator[dict[str, Any]]:
        """Batches of ``batch_size`` samples of ``plans``; with a pool the next batch is
        decoding while one is handed out (from the second batch on, so that a restore waits
        for one batch only)."""
        pending: collections.deque = collections.deque()
        depth = 1
        done = False
        while True:
            while not done and len(pending) < depth:
                items: list[Item] = []
                cursor = None
                try:
                    while len(items) < batch_size:
                        sampler, t, epoch, cursor = next(plans)
                        if sampler is not None:
                            items.append((sampler, t, epoch))
                except StopIteration:
                    done = True
                except Exception as error:  # the plan's own error, raised in its turn
                    pending.append((None, error))
                    done = True
                    break
                if items and not (done and self.drop_last and len(items) < batch_size):
                    try:
                        pending.append((cursor, builder.start(items)))
                    except Exception as error:
                        pending.append((None, error))
                        done = True
                elif cursor is not None:
                    pending.append((cursor, None))
            if not pending:
                return
            cursor, job = pending.popleft()
            if cursor is None:
                raise job
            batch = job.result() if job is not None else None
            self._progress.cursor = cursor
            if batch is not None:
                yield batch
                reads.start()
                depth = 2 if builder.pool is not None else 1



class Progress:
    """Where a dataset's next pass starts: the cursor, whether it was loaded (resumed) rather
    than reached, and the windows that checking loaded states read (by reader, reader count,
    epoch and window), for the pass that starts there."""

    def __init__(self, cursor: Any, resume: bool = False) -> None:
        self.cursor = cursor
        self.resume = resume
        self.windows: dict[tuple[int, int, int, int], tuple[list[EpisodeSamples], int]] = {}

    def take_window(self, key: tuple[int, int, int, int]
                    ) -> tuple[list[EpisodeSamples], int] | None:
        """The window ``key`` if a check read it; the others are dropped (a worker forked
        after the checks holds every worker's)."""
        window = self.windows.pop(key, None)
        self.windows.clear()
        return window

    def __getstate__(self) -> dict[str, Any]:
        # Read windows stay in this process: a worker started by pickling reads its own.
        return {**self.__dict__, "windows": {}}


