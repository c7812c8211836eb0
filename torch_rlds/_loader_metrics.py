"""What a loader has served, for ``DataLoader.metrics()``: the figures people look at when
accelerators starve (throughput, time the caller waited for data, epoch progress)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoaderMetrics:
    """A snapshot of a loader's serving figures since it was built (or ``reset``).

    Attributes:
      batches: batches handed to the caller.
      samples: samples in those batches.
      elapsed_s: seconds since the first batch was requested.
      samples_per_s: ``samples / elapsed_s``.
      wait_s: seconds the caller spent inside ``next()`` waiting for a batch.
      wait_fraction: ``wait_s / elapsed_s``: near 1 means the training step starves for data.
      epoch: the highest epoch among the samples served.
      epoch_steps: steps served from that epoch.
      epoch_episodes: distinct episodes served from that epoch.
      episodes_per_epoch: episodes in this process's share of an epoch (``None`` if unknown).
      per_dataset: for mixtures, ``{dataset_index: {"steps": n, "episodes": n}}`` over all
        epochs: steps served, and the distinct episodes of each epoch summed over epochs.
    """

    batches: int
    samples: int
    elapsed_s: float
    samples_per_s: float
    wait_s: float
    wait_fraction: float
    epoch: int
    epoch_steps: int
    epoch_episodes: int
    episodes_per_epoch: int | None
    per_dataset: dict[int, dict[str, int]]

    @property
    def epoch_progress(self) -> float | None:
        """Fraction of this process's episodes of the current epoch touched so far."""
        if not self.episodes_per_epoch:
            return None
        return min(1.0, self.epoch_episodes / self.episodes_per_epoch)


class MetricsTracker:
    """Accumulates :class:`LoaderMetrics` from the batches a loader hands out. Not thread-safe:
    the thread that iterates the loader updates it."""

    def __init__(self, episodes_per_epoch: int | None = None) -> None:
        self.episodes_per_epoch = episodes_per_epoch
        self.reset()

    def reset(self) -> None:
        """Start counting afresh."""
        self._start: float | None = None
        self.batches = 0
        self.samples = 0
        self.wait_s = 0.0
        self.epoch = -1
        self._epoch_steps = 0
        self._epoch_episodes: set[tuple[int, int]] = set()
        self._datasets: dict[int, dict[str, Any]] = {}

    def started(self) -> float:
        """Mark a ``next()`` call; returns its start time."""
        now = time.perf_counter()
        if self._start is None:
            self._start = now
        return now

    def served(self, batch: Any, started: float) -> None:
        """Account for ``batch``, requested at ``started``."""
        self.wait_s += time.perf_counter() - started
        self.batches += 1
        meta = batch.get("meta") if isinstance(batch, dict) else None
        if not isinstance(meta, dict) or "episode_index" not in meta:
            self.samples += _batch_len(batch)
            return
        episodes = np.asarray(meta["episode_index"]).reshape(-1).tolist()
        n = len(episodes)
        epochs = _column(meta.get("epoch"), n)
        datasets = _column(meta.get("dataset_index"), n)
        self.samples += n
        newest = max(epochs, default=self.epoch)
        if newest > self.epoch:
            self.epoch, self._epoch_steps, self._epoch_episodes = newest, 0, set()
            for folded in self._datasets.values():
                _fold(folded, newest)  # keeps the newest epoch and the one before it
        for d, epoch, episode in zip(datasets, epochs, episodes):
            if epoch == self.epoch:
                self._epoch_steps += 1
                self._epoch_episodes.add((d, episode))
            entry = self._datasets.get(d)
            if entry is None:
                entry = self._datasets[d] = {"steps": 0, "folded": 0, "recent": {}}
            entry["steps"] += 1
            if epoch < self.epoch - 1:
                continue  # an epoch already folded into a count
            seen = entry["recent"].get(epoch)
            if seen is None:
                seen = entry["recent"][epoch] = set()
            seen.add(episode)

    def snapshot(self) -> LoaderMetrics:
        """The figures so far."""
        elapsed = 0.0 if self._start is None else time.perf_counter() - self._start
        return LoaderMetrics(
            batches=self.batches,
            samples=self.samples,
            elapsed_s=elapsed,
            samples_per_s=self.samples / elapsed if elapsed > 0 else 0.0,
            wait_s=self.wait_s,
            wait_fraction=self.wait_s / elapsed if elapsed > 0 else 0.0,
            epoch=max(self.epoch, 0),
            epoch_steps=self._epoch_steps,
            epoch_episodes=len(self._epoch_episodes),
            episodes_per_epoch=self.episodes_per_epoch,
            per_dataset={d: {"steps": v["steps"], "episodes": v["folded"] + sum(
                map(len, v["recent"].values()))} for d, v in sorted(self._datasets.items())},
        )


def _column(values: Any, n: int) -> list[int]:
    """A meta column as a list (zeros where the batch has none)."""
    if values is None:
        return [0] * n
    return np.asarray(values).reshape(-1).tolist()


def _fold(entry: dict[str, Any], newest: int) -> None:
    """Keep the distinct episodes of the newest epoch and the one before it (workers may still
    hand out the end of the previous epoch); older epochs become a count, so that a long run
    keeps no set of everything it served."""
    for epoch in [e for e in entry["recent"] if e < newest - 1]:
        entry["folded"] += len(entry["recent"].pop(epoch))


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            return _batch_len(value)
    if hasattr(batch, "shape") and len(batch.shape):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)):
        return len(batch)
    return 1
