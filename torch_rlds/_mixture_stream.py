"""A mixture in the global order: one stream of global batches drawn from several datasets.

Global sample ``k`` comes from dataset ``d = draw(seed, weights, k)``
(:class:`~torch_rlds._global_order.MixtureDraws`: a pure function of the seed, the weights and
``k``), and is sample ``c_d(k)`` of that dataset's own global order, where ``c_d(k)`` counts
the samples drawn from ``d`` before ``k``. Global batches, host slices and the round robin of
workers are those of a single dataset (:mod:`torch_rlds._global_stream`), so the stream does
not depend on the hosts or workers either, and its state (the position ``k`` and the counts
``c_d`` there) resumes under any other topology. Each dataset keeps its own permutation,
epochs and sample settings (windows, transforms); the draws may use other weights after a
restore (every dataset goes on from its own count).

A worker holds one decode pool and one batch builder for all datasets (their samplers carry
their dataset's :class:`~torch_rlds._samples.Recipe`), and only the samples in flight: its
memory grows with what is in flight, not with the number of datasets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from torch_rlds._global_order import MixtureDraws, host_samples, worker_batches
from torch_rlds._global_stream import _GROUP_SAMPLES, global_batch_size, host_batch_size
from torch_rlds._samples import EpisodeSamples, Recipe
from torch_rlds._state import MixtureCursor, load_mixture_cursor, make_mixture_state


class MixtureStream:
    """The global order of a mixture of datasets that each read in the global order.

    Args:
      datasets: the mixture's :class:`~torch_rlds.RLDSDataset` s (``repeat=True``, global
        order, one process index and count).
      weights: their normalised weights.
      seed: the seed of the draws.
    """

    kind = "global"

    def __init__(self, datasets: list[Any], weights: np.ndarray, seed: int) -> None:
        self.datasets = datasets
        self.weights = np.asarray(weights, dtype=np.float64)
        self.draws = MixtureDraws(self.weights, seed)
        self.recipes = [Recipe.of(d, i) for i, d in enumerate(datasets)]

    # -- identity and state --------------------------------------------------------------------
    def initial(self, mixture: Any) -> MixtureCursor:
        """The cursor of a stream that has not started."""
        return MixtureCursor(0, global_batch_size(mixture), 0, (0,) * len(self.datasets), 0)

    def fingerprint(self, mixture: Any, num_workers: int = 0, worker: int = 0) -> dict[str, Any]:
        """What a state must match: the seed of the draws and each dataset's own fingerprint
        (not the weights: see the module docstring)."""
        return {"num_datasets": len(self.datasets), "seed": self.draws.seed,
                "datasets": [d._stream.fingerprint(d) for d in self.datasets]}

    def make_state(self, mixture: Any, cursor: MixtureCursor, num_workers: int,
                   worker: int) -> dict[str, Any]:
        """The JSON state of ``cursor`` (the same for every reader that stands there)."""
        return make_mixture_state(self.fingerprint(mixture), cursor, self.weights)

    def check_state(self, mixture: Any, state: Any, num_workers: int, worker: int,
                    ended: bool) -> MixtureCursor:
        """The cursor of ``state`` if it is a state of this mixture (saved under any hosts
        and workers); an endless stream's iterator never ends."""
        cursor = load_mixture_cursor(state, self.fingerprint(mixture))
        if ended:
            raise ValueError("state field 'fetcher_ended' is true, but a mixture of endless "
                             "datasets never ends")
        return cursor

    def at_position(self, mixture: Any, position: int, skipped: int = 0,
                    counts: tuple[int, ...] | None = None) -> MixtureCursor:
        """The cursor of the stream from ``position`` on (with the counts drawn before it,
        counted here when not given)."""
        if counts is None:
            counts = tuple(int(c) for c in self.draws.counts(0, position))
        return MixtureCursor(position, global_batch_size(mixture), 0, counts, skipped)

    def at_epoch(self, mixture: Any, epoch: int, cursor: MixtureCursor) -> MixtureCursor:
        """A mixture has no epochs of its own (each dataset has its own)."""
        raise ValueError("set_epoch() does not apply to a mixture in the global order: each "
                         "dataset keeps its own epochs; seek() to a position instead")

    def resume_cursor(self, mixture: Any, cursors: list[MixtureCursor],
                      handed: int | None) -> MixtureCursor:
        """The cursor after the last batch a loader handed out, from its readers' states
        (``handed``: the batches of the pass the states were saved in; ``None`` without
        workers, where the one state is exact)."""
        last = max(cursors, key=lambda c: c.done)
        position = last.position if handed is None else last.start + handed * last.batch_size
        counts = np.asarray(last.counts, dtype=np.int64) + self.draws.counts(last.position,
                                                                            position)
        return self.at_position(mixture, position, sum(c.skipped for c in cursors),
                                tuple(int(c) for c in counts))

    # -- a pass --------------------------------------------------------------------------------
    def begin(self, mixture: Any, cursor: MixtureCursor, resume: bool, num_workers: int,
              worker: int) -> MixtureCursor:
        """Where a pass starts: ``cursor`` (cut into batches of another size, it goes on from
        the next sample it had not handed out)."""
        if cursor.batch_size != global_batch_size(mixture):
            return MixtureCursor(cursor.position, global_batch_size(mixture), 0, cursor.counts,
                                 cursor.skipped)
        return cursor

    def reads(self, mixture: Any) -> Any:
        """The read-ahead of a pass (the reading happens as the plan is consumed)."""
        return self.datasets[0]._stream.reads(self.datasets[0])

    def plan(self, mixture: Any, cursor: MixtureCursor, num_workers: int, worker: int,
             reads: Any = None) -> Iterator[tuple[EpisodeSamples, int, int, MixtureCursor]]:
        """The stream of this reader from ``cursor`` on (see
        :meth:`torch_rlds._global_stream.GlobalStream.plan`)."""
        batch_size = global_batch_size(mixture)
        local = host_batch_size(mixture)
        stride = max(num_workers, 1)
        group = max(1, _GROUP_SAMPLES // local)
        counts = np.asarray(cursor.counts, dtype=np.int64)
        position = cursor.position
        batch = worker_batches(cursor.done, worker, num_workers)
        skipped = cursor.skipped
        while True:
            batches = [batch + i * stride for i in range(group)]
            parts, starts, afters = [], [], []
            for b in batches:
                first = cursor.start + b * batch_size
                counts = counts + self.draws.counts(position, first)
                starts.append(tuple(int(c) for c in counts))
                samples = host_samples(cursor.start, b, batch_size, mixture.process_index,
                                       mixture.process_count)
                before = counts + self.draws.counts(first, int(samples[0]))
                parts.append(self._locals(samples, before))
                counts = counts + self.draws.counts(first, first + batch_size)
                position = first + batch_size
                afters.append(tuple(int(c) for c in counts))
            items, replaced = self._items(parts)
            done = 0
            for b, (samples, _, _), at_start, after_counts in zip(batches, parts, starts,
                                                                  afters):
                size = len(samples)
                skipped += int(replaced[done:done + size].sum())
                after = MixtureCursor(cursor.start, batch_size, b + 1, after_counts, skipped)
                middle = MixtureCursor(cursor.start, batch_size, b, at_start, skipped)
                for i in range(done, done + size):
                    sampler, step, epoch = items[i]
                    yield sampler, step, epoch, after if i == done + size - 1 else middle
                done += size
            batch = batches[-1] + stride

    def locate(self, positions: np.ndarray, counts: np.ndarray | None = None, at: int = 0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The dataset, and the epoch, episode and step in it, of the samples at the ascending
        stream ``positions``: where :meth:`plan` reads them (each dataset's own
        :meth:`~torch_rlds._global_stream.GlobalStream.locate` of its count there).

        ``counts``: the samples each dataset had drawn before position ``at`` (<= the first
        position), to count on from; by default the stream's start. Counting the draws
        between costs time in proportion to the positions passed.
        """
        positions = np.asarray(positions, dtype=np.int64)
        n = len(self.datasets)
        counts = np.zeros(n, dtype=np.int64) if counts is None else np.asarray(counts,
                                                                               dtype=np.int64)
        if positions.ndim != 1 or counts.shape != (n,):
            raise ValueError(f"positions must be 1-d and counts one per dataset ({n}), got "
                             f"shapes {positions.shape} and {counts.shape}")
        if positions.size and (positions[0] < at or (np.diff(positions) <= 0).any()):
            raise ValueError(f"positions must ascend from at={at} (got {positions[0]} .. "
                             f"{positions[-1]})")
        drawn = np.empty(len(positions), dtype=np.int64)
        index = np.empty(len(positions), dtype=np.int64)
        # Runs of consecutive positions, each counted from the draws before it.
        cuts = np.flatnonzero(np.diff(positions) != 1) + 1
        for run in np.split(np.arange(len(positions)), cuts) if positions.size else []:
            first, last = int(positions[run[0]]), int(positions[run[-1]])
            counts = counts + self.draws.counts(at, first)
            _, drawn[run], index[run] = self._locals(positions[run], counts)
            counts = counts + np.bincount(drawn[run], minlength=n)
            at = last + 1
        epochs, episodes, steps = (np.empty(len(positions), dtype=np.int64) for _ in range(3))
        for d in np.unique(drawn).tolist():
            where = drawn == d
            epochs[where], episodes[where], steps[where] = (
                self.datasets[d]._stream.locate(index[where]))
        return drawn, epochs, episodes, steps

    def _locals(self, samples: np.ndarray, before: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(samples, dataset, index in its dataset's stream)`` of a host slice whose first
        sample has ``before`` samples of each dataset drawn before it."""
        drawn = self.draws.datasets(samples)
        index = np.empty(len(samples), dtype=np.int64)
        for d in np.unique(drawn).tolist():
            where = drawn == d
            index[where] = before[d] + np.arange(int(where.sum()))
        return samples, drawn, index

    def _items(self, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
               ) -> tuple[list[tuple[EpisodeSamples, int, int]], np.ndarray]:
        """The samplers of every sample of ``parts``, each dataset's read together."""
        drawn = np.concatenate([p[1] for p in parts])
        index = np.concatenate([p[2] for p in parts])
        items: list[Any] = [None] * len(drawn)
        replaced = np.zeros(len(drawn), dtype=np.int64)
        for d in np.unique(drawn).tolist():
            where = np.flatnonzero(drawn == d)
            dataset = self.datasets[d]
            stream = dataset._stream
            epochs, episodes, steps = stream.locate(index[where])
            got, again = stream._items(dataset, index[where], epochs, episodes, steps)
            recipe = self.recipes[d]
            for i, item in zip(where.tolist(), got):
                item[0].recipe = recipe
                items[i] = item
            replaced[where] = again
        return items, replaced
