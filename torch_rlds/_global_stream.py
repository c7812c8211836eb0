"""One reader's part of the global order: the samples of the host batches it makes, read by step.

A reader (a DataLoader worker of one host, or the host itself without workers) makes host
batches ``w, w + W, ...`` of the global stream (:mod:`torch_rlds._global_order`); for each
sample it reads the steps its observation window and action chunk need
(:class:`~torch_rlds._step_reader.StepReader`: byte ranges where the step index is built, else
the whole record) into a sparse episode, maps it with the key map, and hands the sample's
:class:`~torch_rlds._samples.EpisodeSamples` to the dataset's sample or batch emitter. The
plan it yields is the same whatever the timing, the reader count or how far the step index
build got.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from torch_rlds._corrupt import CORRUPT_ERRORS
from torch_rlds._global_order import GlobalOrder, host_samples, worker_batches
from torch_rlds._images import EncodedImages
from torch_rlds._plan import KeptSteps
from torch_rlds._samples import EpisodeSamples, goal_step
from torch_rlds._state import (
    GlobalCursor,
    data_fingerprint,
    load_global_cursor,
    make_global_state,
)
from torch_rlds._step_reader import StepFiles, StepReader
from torch_rlds._window_stream import shutdown

logger = logging.getLogger(__name__)

# With on_corrupt="skip", how many later epochs' samples at the same stream position a corrupt
# sample is replaced by, at most, before the error stands.
_REPLACEMENTS = 64
# Samples whose reads are grouped (see GlobalStream.plan), and how far apart two steps of one
# episode may lie to share a read.
_GROUP_SAMPLES = 64
_NEAR_STEPS = 32


class GlobalStream:
    """The global order of one dataset and the reading of its samples.

    Built once, in the process that builds the dataset (it counts the steps of every episode,
    see :class:`~torch_rlds._step_reader.StepFiles`), and pickled to workers with it.

    Args:
      files: the source's step files.
      lengths: steps of every episode of the source.
      seed, shuffle: the order's.
      kept: with trajectory transforms or filters, the steps each episode may be sampled at
        (:class:`~torch_rlds._plan.KeptSteps`): the order covers those, in trajectory steps.
    """

    def __init__(self, files: StepFiles, lengths: np.ndarray, *, seed: int,
                 shuffle: bool, kept: KeptSteps | None = None) -> None:
        self.files = files
        self.kept = kept
        self.order = GlobalOrder(lengths if kept is None else kept.counts, seed=seed,
                                 shuffle=shuffle)
        self.reader = StepReader(files, np.asarray(lengths, dtype=np.int64))

    kind = "global"

    @property
    def num_steps(self) -> int:
        """Steps of the split: samples per epoch."""
        return self.order.num_steps

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch, episode and step of the samples at stream ``positions``: the sample of
        step ``step`` (of the episode as the dataset samples it)."""
        epochs, episodes, steps = self.order.locate(positions)
        if self.kept is not None and steps.size:
            steps = self.kept.step_of(episodes, steps)
        return epochs, episodes, steps

    def epoch_end(self, position: int) -> int:
        """The stream position where the epoch holding ``position`` ends."""
        return (position // self.num_steps + 1) * self.num_steps

    # -- identity and state --------------------------------------------------------------------
    def initial(self, dataset: Any) -> GlobalCursor:
        """The cursor of a stream that has not started."""
        return GlobalCursor(0, global_batch_size(dataset), 0, 0)

    def fingerprint(self, dataset: Any, num_workers: int = 0, worker: int = 0) -> dict[str, Any]:
        """What a state must match to be loaded: the data and the configuration that decide
        the sequence of samples, and nothing of the hosts and workers that read it."""
        return {**data_fingerprint(dataset), "num_steps": self.num_steps,
                "recipe": dataset._recipe}

    def make_state(self, dataset: Any, cursor: GlobalCursor, num_workers: int,
                   worker: int) -> dict[str, Any]:
        """The JSON state of ``cursor`` (the same for every reader that stands there)."""
        return make_global_state(self.fingerprint(dataset), cursor)

    def check_state(self, dataset: Any, state: Any, num_workers: int, worker: int,
                    ended: bool) -> GlobalCursor:
        """The cursor of ``state`` if it is a state of this dataset's global order (saved under
        any hosts and workers); ``ended`` (its iterator had ended) only at the end of a
        one-pass epoch."""
        cursor = load_global_cursor(state, self.fingerprint(dataset))
        if ended and (dataset.repeat or cursor.position < self.epoch_end(cursor.start)):
            what = ("the stream of a repeat=True dataset never ends" if dataset.repeat else
                    f"it stands at sample {cursor.position}, before its epoch's end at "
                    f"{self.epoch_end(cursor.start)}")
            raise ValueError(f"state field 'fetcher_ended' is true, but {what}")
        return cursor

    def at_epoch(self, dataset: Any, epoch: int, cursor: GlobalCursor) -> GlobalCursor:
        """The cursor of the start of ``epoch``."""
        return GlobalCursor(epoch * self.num_steps, global_batch_size(dataset), 0,
                            cursor.skipped)

    def at_position(self, dataset: Any, position: int, skipped: int = 0) -> GlobalCursor:
        """The cursor of a stream that goes on from sample ``position``."""
        return GlobalCursor(position, global_batch_size(dataset), 0, skipped)

    def resume_cursor(self, dataset: Any, cursors: list[GlobalCursor],
                      handed: int | None) -> GlobalCursor:
        """The cursor after the last batch a loader handed out, from its readers' states
        (``handed``: the batches of the pass the states were saved in, which every state
        starts at; ``None`` without workers, where the one state is exact)."""
        first = cursors[0]
        if handed is None:
            return self.at_position(dataset, first.position, first.skipped)
        if any((c.start, c.batch_size) != (first.start, first.batch_size) for c in cursors):
            raise ValueError("loader state: the workers' dataset states name different starts "
                             "or batch sizes of one pass")
        return self.at_position(dataset, first.start + handed * first.batch_size,
                                sum(c.skipped for c in cursors))

    # -- a pass --------------------------------------------------------------------------------
    def begin(self, dataset: Any, cursor: GlobalCursor, resume: bool, num_workers: int,
              worker: int) -> GlobalCursor:
        """Where a pass starts: ``cursor`` (a stream cut into batches of another size goes on
        from the next sample it had not handed out); the next epoch when the previous pass of a
        one-pass dataset finished this one."""
        if self.num_steps == 0:
            raise ValueError(f"{dataset.source.info.name} split {dataset.source.split!r} has "
                             "no steps")
        if cursor.batch_size != global_batch_size(dataset):
            cursor = self.at_position(dataset, cursor.position, cursor.skipped)
        if (not dataset.repeat and not resume and cursor.done
                and cursor.position >= self.epoch_end(cursor.start)):
            return self.at_epoch(dataset, cursor.start // self.num_steps + 1, cursor)
        return cursor

    def reads(self, dataset: Any) -> GroupReads:
        """The read-ahead of a pass: the next group of host batches, read in a background
        thread while the current one is decoded."""
        return GroupReads()

    def plan(self, dataset: Any, cursor: GlobalCursor, num_workers: int, worker: int,
             reads: Any = None) -> Iterator[tuple[EpisodeSamples | None, int, int,
                                                  GlobalCursor]]:
        """The stream of this reader from ``cursor`` on: ``(sampler, step, epoch, cursor
        after)`` per sample, the cursor moving past a host batch with its last sample; a
        sampler of ``None`` marks the end of a one-pass epoch (the cursor moves without a
        sample)."""
        batch_size = global_batch_size(dataset)
        local = host_batch_size(dataset)
        end = None if dataset.repeat else self.epoch_end(cursor.start)
        batch = worker_batches(cursor.done, worker, num_workers)
        stride = max(num_workers, 1)
        # Host batches read together: samples of one episode among them share one read (and
        # their frames one decode), which matters where consecutive samples are near steps of
        # one episode (shuffle=False).
        group = max(1, _GROUP_SAMPLES // local)
        skipped = cursor.skipped

        def positions_of(first_batch: int) -> tuple[list[int], list[np.ndarray]]:
            batches = [first_batch + i * stride for i in range(group)]
            parts = []
            for b in batches:
                positions = host_samples(cursor.start, b, batch_size, dataset.process_index,
                                         dataset.process_count)
                if end is not None:
                    positions = positions[positions < end]
                parts.append(positions)
            return batches, parts

        def read(parts: list[np.ndarray]) -> tuple[list[Any], np.ndarray]:
            everything = np.concatenate(parts)
            epochs, episodes, steps = (self.locate(everything) if everything.size
                                       else (everything,) * 3)
            return self._items(dataset, everything, epochs, episodes, steps)

        batches, parts = positions_of(batch)
        pending: Any = None
        while True:
            # This group's samples, read ahead while the previous group was handed out (an
            # error of the read is raised here, in its turn).
            items, replaced = pending.result() if pending is not None else read(parts)
            pending = None
            following = None
            if all(p.size for p in parts):  # not the end of a one-pass epoch: read on
                following = positions_of(batches[-1] + stride)
                if reads is not None:
                    pending = reads.submit(read, following[1])
            first = 0
            for b, positions in zip(batches, parts):
                if positions.size == 0:
                    yield None, 0, 0, GlobalCursor(cursor.start, batch_size, b, skipped)
                    return
                last = first + positions.size
                skipped += int(replaced[first:last].sum())
                after = GlobalCursor(cursor.start, batch_size, b + 1, skipped)
                middle = GlobalCursor(cursor.start, batch_size, b, skipped)
                for i in range(first, last):
                    sampler, step, epoch = items[i]
                    yield sampler, step, epoch, after if i == last - 1 else middle
                first = last
            if following is None:  # (an empty part returned above)
                return
            batches, parts = following

    def _items(self, dataset: Any, positions: np.ndarray, epochs: np.ndarray,
               episodes: np.ndarray, steps: np.ndarray
               ) -> tuple[list[tuple[EpisodeSamples, int, int]], np.ndarray]:
        """The ``(sampler, step, epoch)`` of each sample, samples of one episode whose steps
        lie close together sharing one sampler; and how many corrupt samples each replaced."""
        items: list[Any] = [None] * len(positions)
        replaced = np.zeros(len(positions), dtype=np.int64)
        # A plan's trajectory and goal steps may differ by epoch: one sampler per epoch.
        same_epoch = dataset._plan is not None or dataset.goal_seed is not None
        order = np.lexsort((steps, episodes, epochs if same_epoch else np.zeros_like(epochs)))
        start = 0
        while start < len(order):
            stop = start + 1
            while (stop < len(order) and episodes[order[stop]] == episodes[order[start]]
                   and steps[order[stop]] - steps[order[stop - 1]] <= _NEAR_STEPS
                   and not (same_epoch and epochs[order[stop]] != epochs[order[start]])):
                stop += 1
            members = order[start:stop].tolist()
            episode = int(episodes[order[start]])
            first, last = int(steps[order[start]]), int(steps[order[stop - 1]])
            try:
                sampler = self.sampler(dataset, episode, first, last,
                                       epoch=int(epochs[order[start]]),
                                       steps=[int(steps[i]) for i in members])
                for i in members:
                    items[i] = (sampler, int(steps[i]), int(epochs[i]))
            except CORRUPT_ERRORS:
                if dataset.on_corrupt == "raise":
                    raise
                for i in members:  # each on its own: its replacement lies elsewhere
                    items[i], replaced[i] = self._item(dataset, int(positions[i]),
                                                       int(epochs[i]), episode, int(steps[i]))
            start = stop
        return items, replaced

    def _item(self, dataset: Any, position: int, epoch: int, episode: int,
              step: int) -> tuple[tuple[EpisodeSamples, int, int], int]:
        """The sample at ``position``, or with ``on_corrupt="skip"`` the first healthy one at
        the same position of a later epoch; returns it and how many were replaced."""
        replaced = 0
        while True:
            try:
                return (self.sampler(dataset, episode, step, epoch=epoch), step,
                        epoch), replaced
            except CORRUPT_ERRORS as error:
                if dataset.on_corrupt == "raise" or replaced == _REPLACEMENTS:
                    raise
                logger.warning("torch_rlds: sample %d (step %d of episode %d, %s) is corrupt, "
                               "replaced by the same position of the next epoch: %s", position,
                               step, episode, self.files.source.describe(episode), error)
            replaced += 1
            position += self.num_steps
            epochs, episodes, steps = self.locate(np.asarray([position]))
            epoch, episode, step = int(epochs[0]), int(episodes[0]), int(steps[0])

    def sampler(self, dataset: Any, episode: int, first: int, last: int | None = None, *,
                epoch: int = 0, steps: list[int] | None = None) -> EpisodeSamples:
        """The sampler of the samples of ``steps`` (default: ``first``) between ``first`` and
        ``last`` of ``episode`` at ``epoch``: the steps those samples need, read."""
        last = first if last is None else last
        steps = [first] if steps is None else steps
        if dataset._plan is not None:
            return self._planned_sampler(dataset, episode, first, last, epoch, steps)
        window = (first - dataset.obs_window + 1, last)
        chunk = (first, last + dataset.action_horizon - 1)
        wants = {name: window for name in dataset._global_observations}
        wants.update({name: chunk for name in dataset._global_actions})
        if dataset._global_language is not None:
            wants[dataset._global_language] = (first, last)
        episode_tree = self.reader.read(episode, wants)
        name = self.files.source.describe(episode)
        if dataset.goal_seed is not None:
            count = int(self.reader.lengths[episode])
            goals = {goal_step(dataset.goal_seed, epoch, episode, t, count) for t in steps}
            images = [k for k in dataset._global_observations
                      if self.reader.leaf(k).kind == "image"]
            for g in sorted(goals):
                _merge_frames(episode_tree, self.reader.read(episode, {k: (g, g)
                                                                      for k in images}))
        return dataset._samples_of(episode_tree, episode, name)


    def _planned_sampler(self, dataset: Any, episode: int, first: int, last: int,
                         epoch: int, steps: list[int]) -> EpisodeSamples:
        """A sampler of trajectory steps ``first..last`` of ``episode`` under the dataset's
        plan: the numbers of the whole episode read and transformed, then the frames of the
        rows the samples' observation windows need."""
        plan = dataset._plan
        count = int(self.reader.lengths[episode])
        name = self.files.source.describe(episode)
        tree = self.reader.read(episode, {k: (0, count - 1) for k in plan.number_features()})
        traj = plan.trajectory(tree, episode, epoch, name)
        rows = np.arange(max(0, first - dataset.obs_window + 1), last + 1)
        frame_steps = traj.frame_steps[rows]
        cameras = sorted({f"steps/{traj.cameras[role]}" for role in plan.key_map.cameras()})
        span = (int(frame_steps.min()), int(frame_steps.max()))
        tree = self.reader.read(episode, {k: span for k in cameras})
        if dataset.goal_seed is not None:
            goals = sorted({goal_step(dataset.goal_seed, epoch, episode, t, traj.num_steps)
                            for t in steps})
            for g in goals:
                at = int(traj.frame_steps[g])
                _merge_frames(tree, self.reader.read(episode, {k: (at, at) for k in cameras}))
            rows = np.concatenate([rows, np.asarray(goals, dtype=np.int64)])
        # The frames were read sparsely: only those of the samples' rows are there to check.
        return dataset._samples_of(plan.standard_episode(traj, tree, rows), episode, name,
                                   check_images=False)


def _merge_frames(tree: dict[str, Any], other: dict[str, Any]) -> None:
    """Add the frames ``other`` read (sparse :class:`EncodedImages` over the same episode) to
    those of ``tree``."""
    for key, value in other.items():
        mine = tree.get(key)
        if isinstance(value, dict) and isinstance(mine, dict):
            _merge_frames(mine, value)
        elif isinstance(value, EncodedImages) and isinstance(mine, EncodedImages):
            merged = [a if a is not None else b for a, b in zip(mine.encoded, value.encoded)]
            tree[key] = EncodedImages(merged, mine.shape, mine.dtype, name=mine.name,
                                      format=mine.format)
        elif mine is None:
            tree[key] = value


def global_batch_size(dataset: Any) -> int:
    """Samples per global batch: the host batch (the dataset's ``batch_size``; when it emits
    samples, the batch its loader collates, 1 when unknown) times the hosts."""
    return host_batch_size(dataset) * dataset.process_count


def host_batch_size(dataset: Any) -> int:
    """Samples per host batch of ``dataset``."""
    return dataset.batch_size or dataset._host_batch


class GroupReads:
    """The global order's read-ahead: one background thread that reads the next group of
    host batches (:meth:`submit`) while the current one is decoded. What is read never depends
    on timing; :meth:`close` drops what was read ahead and stops the thread."""

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, read: Any, *args: Any) -> concurrent.futures.Future:
        """Run ``read(*args)`` in the read-ahead thread."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="torch_rlds-read")
        return self._executor.submit(read, *args)

    def start(self) -> None:
        """Nothing to start: reads are submitted by the plan."""

    def close(self) -> None:
        """Drop what is read ahead and stop the thread."""
        if self._executor is not None:
            shutdown(self._executor)
            self._executor = None
