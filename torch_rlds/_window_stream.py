"""One reader's part of the window order: episodes read whole, steps mixed within a window.

The order for media where random reads are slow (array_record shards, object stores): each
epoch permutes the episodes and reader ``r`` of ``R`` (one per host and worker) takes every
``R``-th, cuts its share into windows of ``shuffle_window`` episodes and emits all steps of a
window in a seeded permutation (:mod:`torch_rlds._order`). Each episode is read and parsed once
per window; the next window is read in a background thread while one is emitted. The cursor
(:class:`~torch_rlds._state.Cursor`) names a step of one reader's stream, so a state resumes
under the same hosts and workers only.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from torch_rlds import _order
from torch_rlds._corrupt import CORRUPT_ERRORS
from torch_rlds._samples import EpisodeSamples
from torch_rlds._state import Cursor, data_fingerprint, load_cursor, make_state

logger = logging.getLogger(__name__)

# (sampler, step, epoch, cursor after it); a sampler of None moves the cursor without a sample.
Plan = tuple[EpisodeSamples | None, int, int, Any]


class WindowStream:
    """The window order of one dataset (see the module docstring). Stateless: the dataset
    holds the cursor."""

    kind = "window"

    # -- identity and state --------------------------------------------------------------------
    def initial(self, dataset: Any) -> Cursor:
        """The cursor of a stream that has not started."""
        return Cursor()

    def fingerprint(self, dataset: Any, num_workers: int, worker: int) -> dict[str, Any]:
        """What a state must match to be loaded by worker ``worker`` of ``num_workers``."""
        return {
            **data_fingerprint(dataset),
            "shuffle_window": dataset.shuffle_window,
            "process_index": dataset.process_index,
            "process_count": dataset.process_count,
            "num_workers": num_workers,
            "worker_index": worker,
        }

    def make_state(self, dataset: Any, cursor: Cursor, num_workers: int,
                   worker: int) -> dict[str, Any]:
        """The JSON state of ``cursor`` for worker ``worker`` of ``num_workers``."""
        return make_state(self.fingerprint(dataset, num_workers, worker), cursor)

    def check_state(self, dataset: Any, state: Any, num_workers: int, worker: int,
                    ended: bool) -> Cursor:
        """The cursor of ``state`` if it belongs to this reader and names a step of its
        stream (a cursor inside a window is checked against the window's steps, which reads
        the window: it is kept in the dataset's progress for the pass that resumes there)."""
        cursor = load_cursor(state, self.fingerprint(dataset, num_workers, worker))
        reader, num_readers = dataset._reader_of(num_workers, worker)
        windows = self._windows(dataset, reader, num_readers)
        if cursor.window > windows or (cursor.window == windows and cursor.position != 0):
            raise ValueError(f"state field 'window': {cursor.window} (position "
                             f"{cursor.position}) is past the end of reader {reader}'s "
                             f"{windows} windows")
        if ended and (dataset.repeat or cursor.window < windows):
            what = ("the stream of a repeat=True dataset never ends" if dataset.repeat else
                    f"reader {reader} is in window {cursor.window} of {windows}")
            raise ValueError(f"state field 'fetcher_ended' is true, but {what}")
        if cursor.position > 0:
            key = (reader, num_readers, cursor.epoch, cursor.window)
            episodes = _order.window_episodes(
                self._episodes(dataset, cursor.epoch, reader, num_readers), cursor.window,
                dataset.shuffle_window)
            window = self.read_window(dataset, episodes, cursor.epoch)
            steps = sum(len(s.sample_steps) for s in window[0])
            if cursor.position > steps:
                raise ValueError(f"state field 'position': {cursor.position} is past the end "
                                 f"of window {cursor.window} of epoch {cursor.epoch} ({steps} "
                                 "steps)")
            dataset._progress.windows[key] = window
        return cursor

    def at_epoch(self, dataset: Any, epoch: int, cursor: Cursor) -> Cursor:
        """The cursor of the start of ``epoch`` (keeping the count of skipped episodes)."""
        return Cursor(epoch=epoch, skipped=cursor.skipped)

    # -- a pass --------------------------------------------------------------------------------
    def begin(self, dataset: Any, cursor: Cursor, resume: bool, num_workers: int,
              worker: int) -> Cursor:
        """Where a pass starts: ``cursor``, or the next epoch when the previous pass of a
        one-pass dataset finished this one."""
        reader, num_readers = dataset._reader_of(num_workers, worker)
        if dataset.repeat and len(dataset.source) < num_readers:
            raise ValueError(
                f"{num_readers} readers (process_count {dataset.process_count} x workers) but "
                f"the split has {len(dataset.source)} episodes: reader {reader} would have none "
                "under the window order; use fewer workers or processes, or order='global'")
        windows = self._windows(dataset, reader, num_readers)
        if not dataset.repeat and not resume and 0 < windows <= cursor.window:
            return Cursor(cursor.epoch + 1, skipped=cursor.skipped)
        return cursor

    def reads(self, dataset: Any) -> WindowReads:
        """The read-ahead of a pass: the next window, in a background thread."""
        return WindowReads(lambda key, episodes: self.read_window(dataset, episodes, key[0]))

    def plan(self, dataset: Any, cursor: Cursor, num_workers: int, worker: int,
             reads: WindowReads) -> Iterator[Plan]:
        """The stream from ``cursor`` on: every step to emit, with the cursor after it.

        It runs ahead of what was emitted (the caller decodes ahead), so it never touches the
        dataset's cursor; the caller sets that as it hands items out.
        """
        reader, num_readers = dataset._reader_of(num_workers, worker)
        windows = self._windows(dataset, reader, num_readers)
        epoch, first_window, first_position = cursor.epoch, cursor.window, cursor.position
        skipped = cursor.skipped
        empty_epochs = 0
        shuffle_window = dataset.shuffle_window
        while True:
            episodes = self._episodes(dataset, epoch, reader, num_readers)
            emitted = 0
            for window in range(first_window, windows):
                checked = dataset._progress.take_window((reader, num_readers, epoch, window))
                samplers, corrupt = checked or reads.get((epoch, window), _order.window_episodes(
                    episodes, window, shuffle_window))
                if window + 1 < windows:
                    following = (epoch, window + 1), _order.window_episodes(
                        episodes, window + 1, shuffle_window)
                elif dataset.repeat:
                    following = (epoch + 1, 0), _order.window_episodes(
                        self._episodes(dataset, epoch + 1, reader, num_readers), 0,
                        shuffle_window)
                else:
                    following = None
                start = first_position if window == first_window else 0
                # A window's skipped episodes count once it is opened: a cursor inside it (a
                # position past 0) already holds them.
                if start == 0:
                    skipped += corrupt
                which, steps = _order.window_steps(
                    [len(s.sample_steps) for s in samplers], seed=dataset.seed, epoch=epoch,
                    shuffle=dataset.shuffle, reader=reader, window=window)
                if start > len(which):
                    raise ValueError(f"state field 'position': {start} is past the end of "
                                     f"window {window} of epoch {epoch} ({len(which)} steps)")
                # The cursor names the next step; past a window's last step it names the next
                # window, so a state never makes a resume read a consumed window.
                after = self._after_window(dataset, epoch, window, windows, skipped)
                last = len(which) - 1
                # The next window is read once half of this one is out: early enough to be
                # ready, late enough that a short-lived iterator (a restore that is checked
                # and dropped) does not read it for nothing.
                halfway = start + (len(which) - start) // 2
                for position, (k, t) in enumerate(zip(which[start:].tolist(),
                                                      steps[start:].tolist()), start):
                    if position == halfway and following is not None:
                        reads.prefetch(*following)
                    yield (samplers[k], int(samplers[k].sample_steps[t]), epoch,
                           Cursor(epoch, window, position + 1, skipped=skipped)
                           if position < last else after)
                emitted += len(which) - start
                yield None, 0, 0, after
            if not dataset.repeat:
                return
            epoch, first_window, first_position = epoch + 1, 0, 0
            empty_epochs = empty_epochs + 1 if emitted == 0 else 0
            if empty_epochs > 1:
                raise ValueError(f"reader {reader} of {num_readers} emitted no step in two "
                                 "epochs: its episodes are all empty")

    # -- helpers -------------------------------------------------------------------------------
    def _windows(self, dataset: Any, reader: int, num_readers: int) -> int:
        return _order.num_windows(_order.share_size(len(dataset.source), reader, num_readers),
                                  dataset.shuffle_window)

    def _episodes(self, dataset: Any, epoch: int, reader: int, num_readers: int) -> np.ndarray:
        return _order.reader_episodes(len(dataset.source), seed=dataset.seed, epoch=epoch,
                                      shuffle=dataset.shuffle, reader=reader,
                                      num_readers=num_readers)

    def _after_window(self, dataset: Any, epoch: int, window: int, windows: int,
                      skipped: int) -> Cursor:
        if window + 1 < windows:
            return Cursor(epoch, window + 1, skipped=skipped)
        # After the epoch's last window: an endless stream goes on with the next epoch; a
        # one-pass dataset stays at the end of this one (see "Passes").
        return (Cursor(epoch + 1, skipped=skipped) if dataset.repeat
                else Cursor(epoch, windows, skipped=skipped))

    def read_window(self, dataset: Any, episodes: np.ndarray, epoch: int = 0
                    ) -> tuple[list[EpisodeSamples], int]:
        """The samplers of ``episodes`` (at ``epoch``) and how many were skipped as corrupt."""
        indices = episodes.tolist()
        try:
            # One round trip for the window on an object store (one read after another
            # locally); a damaged record among them is read again alone below, to be named.
            payloads: list[Any] = dataset.source.read_many(indices)
        except CORRUPT_ERRORS:
            payloads = [None] * len(indices)
        samplers = []
        for e, payload in zip(indices, payloads):
            try:
                samplers.append(self._sampler(dataset, e, payload, epoch))
            except CORRUPT_ERRORS as error:
                if dataset.on_corrupt == "raise":
                    raise
                logger.warning("torch_rlds: skipping corrupt episode %d of %s (%s): %s", e,
                               dataset.source.info.name, dataset.source.describe(e), error)
        return samplers, len(episodes) - len(samplers)

    def _sampler(self, dataset: Any, episode_index: int, payload: Any = None,
                 epoch: int = 0) -> EpisodeSamples:
        name = dataset.source.describe(episode_index)
        episode = (dataset.source.episode(episode_index) if payload is None
                   else dataset.source.decoder.decode(payload, name=name))
        if dataset._plan is None:
            return dataset._samples_of(episode, episode_index, name)
        traj, kept = dataset._plan.sampled(episode, episode_index, epoch, name)
        sampler = dataset._samples_of(dataset._plan.standard_episode(traj, episode),
                                      episode_index, name)
        sampler.sample_steps = kept
        return sampler


class WindowReads:
    """Reads windows of episodes with ``read``, the next one in a background thread.

    :meth:`prefetch` names the window to read ahead; :meth:`start` (called as an item is
    handed out) starts reading it; :meth:`get` returns a window, from that read when it is the
    same key, else read here. What is read never depends on timing, and an error of the read
    is raised by ``get``.
    """

    def __init__(self, read: Callable[[Any, np.ndarray], Any]) -> None:
        self._read = read
        self._stop = shutdown
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._next: tuple[Any, np.ndarray] | None = None
        self._pending: tuple[Any, concurrent.futures.Future] | None = None

    def get(self, key: Any, episodes: np.ndarray) -> Any:
        """Window ``key`` (its ``episodes``): read ahead already, or read now."""
        pending, self._pending = self._pending, None
        if self._next is not None and self._next[0] == key:
            self._next = None
        if pending is not None and pending[0] == key:
            return pending[1].result()
        if pending is not None:
            pending[1].cancel()
        return self._read(key, episodes)

    def prefetch(self, key: Any, episodes: np.ndarray) -> None:
        """Name the window to read ahead once :meth:`start` is called."""
        self._next = (key, episodes)

    def start(self) -> None:
        """Start reading the window named by :meth:`prefetch`, if any."""
        if self._next is None:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="torch_rlds-read")
        key, episodes = self._next
        self._next = None
        self._pending = (key, self._executor.submit(self._read, key, episodes))

    def close(self) -> None:
        """Drop what is read ahead and stop the thread."""
        self._next = self._pending = None
        if self._executor is not None:
            self._stop(self._executor)


def shutdown(executor: concurrent.futures.Executor,
             _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
    """Stop ``executor`` without waiting; at interpreter exit, when the modules it needs may
    be gone already, its threads are left to the interpreter."""
    if not _finalizing():
        executor.shutdown(wait=False, cancel_futures=True)
