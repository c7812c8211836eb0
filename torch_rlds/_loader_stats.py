"""What a loader has served, for ``DataLoader.stats()``: the figures people look at when
accelerators starve (throughput, time the caller waited for data, epoch progress)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class LoaderStats:
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
      per_dataset: for mixtures, ``{dataset_index: {"steps": n, "episodes": n}}`` over all epochs.
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


class StatsTracker:
    """Accumulates :class:`LoaderStats` from the batches a loader hands out. Not thread-safe:
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
        episodes = np.asarray(meta["episode_index"]).reshape(-1)
        epochs = np.asarray(meta.get("epoch", np.zeros_like(episodes))).reshape(-1)
        datasets = np.asarray(meta.get("dataset_index", np.zeros_like(episodes))).reshape(-1)
        self.samples += len(episodes)
        newest = int(epochs.max()) if len(epochs) else self.epoch
        if newest > self.epoch:
            self.epoch, self._epoch_steps, self._epoch_episodes = newest, 0, set()
        current = epochs == self.epoch
        self._epoch_steps += int(current.sum())
        self._epoch_episodes.update(zip(datasets[current].tolist(), episodes[current].tolist()))
        for d in np.unique(datasets).tolist():
            entry = self._datasets.setdefault(int(d), {"steps": 0, "episodes": set()})
            mask = datasets == d
            entry["steps"] += int(mask.sum())
            entry["episodes"].update(zip(epochs[mask].tolist(), episodes[mask].tolist()))

    def snapshot(self) -> LoaderStats:
        """The figures so far."""
        elapsed = 0.0 if self._start is None else time.perf_counter() - self._start
        return LoaderStats(
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
            per_dataset={d: {"steps": v["steps"], "episodes": len(v["episodes"])}
                         for d, v in sorted(self._datasets.items())},
        )


def _batch_len(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            return _batch_len(value)
    if hasattr(batch, "shape") and len(batch.shape):
        return int(batch.shape[0])
    if isinstance(batch, (list, tuple)):
        return len(batch)
    return 1
