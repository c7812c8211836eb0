"""A pass of a :class:`torch_rlds.DataLoader`: torchdata's own iterators, which also count what
they hand out, free the buffers the caller let go of, and report dead workers by name."""

from __future__ import annotations

import copy
import traceback
from collections.abc import Callable
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

from torch_rlds import _buffers, _fields, _torchdata
from torch_rlds._loader_metrics import MetricsTracker
from torch_rlds._torchdata import DATASET_STATE, MultiProcessIterBase, SingleProcessIterBase
from torch_rlds._workers import (
    WorkerError,
    diagnose,
    report_deaths_from_next,
    stop_workers,
    summary,
)


class Run:
    """What a loader shares with its iterators: the count of batches handed out, the serving
    figures, and how batches are handed out.

    The iterators hold this rather than the loader, so that an iterator dies with its last
    reference (and its workers with it), not at the next garbage collection of a cycle.

    Args:
      metrics: the loader's serving figures.
      as_numpy: hand out numpy views of the batch tensors.
      ends_on_error: an error ends the pass (see :class:`Counting`).
    """

    def __init__(self, metrics: MetricsTracker, *, as_numpy: bool, ends_on_error: bool) -> None:
        self.batches_seen = 0
        self.metrics = metrics
        self.as_numpy = as_numpy
        self.ends_on_error = ends_on_error


class Counting:
    """What torch_rlds adds to torchdata's iterators (a mixin over both).

    Every batch handed out counts in :attr:`Run.batches_seen` and the serving figures. Batches
    torchdata replays while it restores a state (the steps since its last snapshot) are not
    handed out, and do not count.

    **Errors.** A dead or silent worker raises :class:`~torch_rlds.WorkerError` (a
    ``RuntimeError`` with torch's own wording in its message) and ends the pass: the other
    workers are stopped at once. Any other error passes as torchdata raises it, and the pass
    goes on as torchdata's does, unless the run ``ends_on_error`` (the loader of a torch_rlds
    dataset): a reader that raised has closed its stream, so going on would silently leave out
    the rest of its share. Then the error also ends the pass, every later ``next()`` says so,
    and :meth:`state_dict` is the state after the last batch handed out (taken without workers
    from a mark of the dataset's position before each batch: no ``state_dict()`` call).
    """

    # A mixin: super() is the torchdata iterator it is mixed into (hence type: ignore[misc]).
    _run: Run
    _counting = False
    _ended: WorkerError | str | None = None
    _ended_state: dict[str, Any] | None = None
    _leases: _buffers.Leases | None = None
    _mark: Callable[[], Callable[[], Any]] | None = None

    def _start_counting(self) -> None:
        self._counting = True
        if _torchdata.watched_by_sigchld(self):
            report_deaths_from_next(self)

    @property
    def ended(self) -> bool:
        """Whether this pass ended with an error (its workers are stopped)."""
        return self._ended is not None

    def __next__(self) -> Any:
        if not self._counting:  # torchdata replaying batches to restore a state
            return super().__next__()  # type: ignore[misc]
        if self._ended is not None:
            raise self._ended_error()
        run = self._run
        started = run.metrics.started()
        mark = self._mark() if self._mark is not None else None
        if self._leases is not None:
            self._leases.release()
        _fields.settle_loose()
        try:
            batch = super().__next__()  # type: ignore[misc]
        except StopIteration:
            raise
        except BaseException as e:
            failure = diagnose(self, e) if isinstance(e, Exception) else None
            if failure is not None or run.ends_on_error:
                self._end_pass(failure or e, mark)
            if failure is not None:
                # torch's frames may hold open temporary files (its check of the fd limit);
                # a worker forked later must not inherit them.
                traceback.clear_frames(e.__traceback__)
                raise failure from e
            raise
        run.batches_seen += 1
        run.metrics.served(batch, started)
        return _fields.to_numpy(batch) if run.as_numpy else batch

    def _end_pass(self, error: BaseException, mark: Callable[[], Any] | None) -> None:
        self._ended = (WorkerError(str(error), error.worker, error.pid, error.exitcode)
                       if isinstance(error, WorkerError) else summary(error))
        try:
            # With workers: as of the last batch handed out.
            state = super().state_dict()  # type: ignore[misc]
            if mark is not None:
                state = {**state, DATASET_STATE: mark()}
            self._ended_state = state
        finally:
            stuck = (error.worker if isinstance(error, WorkerError) and error.exitcode is None
                     else None)
            stop_workers(self, stuck)

    def _ended_error(self) -> BaseException:
        ended = self._ended
        if isinstance(ended, WorkerError):
            return WorkerError(f"this pass already ended: {ended}", ended.worker, ended.pid,
                               ended.exitcode)
        return RuntimeError(f"this pass of the loader already ended with {ended}; iter(loader) "
                            "resumes after the last batch handed out")

    def state_dict(self) -> dict[str, Any]:
        """torchdata's state; after a pass that ended with an error, the state after the last
        batch it handed out."""
        if self._ended_state is not None:
            return copy.deepcopy(self._ended_state)
        return super().state_dict()  # type: ignore[misc]


class SingleProcessIter(Counting, SingleProcessIterBase):
    """torchdata's iterator without workers, counting (see :class:`Counting`)."""

    def __init__(self, loader: StatefulDataLoader, pending: dict[str, Any] | None,
                 run: Run) -> None:
        self._run = run
        super().__init__(loader, pending)
        if run.ends_on_error:
            # The dataset moves past the samples of a batch that fails half way: mark where it
            # stood before each batch, to end the pass there.
            self._mark = getattr(_torchdata.iterator_dataset(self), "_state_mark", None)
        self._start_counting()


class MultiProcessIter(Counting, MultiProcessIterBase):
    """torchdata's iterator over worker processes, counting (see :class:`Counting`), freeing
    the buffer slots of batches the caller no longer holds (``leases``)."""

    def __init__(self, loader: StatefulDataLoader, pending: dict[str, Any] | None, run: Run,
                 leases: _buffers.Leases | None) -> None:
        self._run = run
        self._leases = leases
        super().__init__(loader, pending)
        self._start_counting()
