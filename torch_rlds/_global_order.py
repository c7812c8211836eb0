"""The global order: every step of a split in one seeded sequence, cut into global batches.

Sample ``k`` of the stream is step ``p_e(k mod N)`` of epoch ``e = k // N``, where ``N`` is the
number of steps of the split and ``p_e`` the keyed bijection of ``[0, N)`` for ``(seed, e)``
(:class:`~torch_rlds._bijection.KeyedBijection`: i.i.d.-like, O(1) memory). A step id maps to
``(episode, step)`` through the episodes' step counts. Global batch ``j`` of a stream that
starts at sample ``k0`` is samples ``k0 + j G .. k0 + (j + 1) G - 1`` (``G`` the global batch
size); host ``p`` of ``P`` takes its ``G / P`` consecutive samples of it, and worker ``w`` of
``W`` makes the host batches ``j = w, w + W, ...``, the round-robin order in which
``StatefulDataLoader`` hands them out.

Nothing depends on the number of hosts or workers but the slicing, so the position in the
stream is one number, the next sample ``k``: a state saved under any topology resumes under any
other, with bit-identical global batches when ``G`` stays, and from the next unconsumed sample
when it changes.

A mixture draws the dataset of global sample ``k`` from ``(seed, k)`` and the weights alone
(:class:`MixtureDraws`); each dataset keeps its own order and counter.
"""

from __future__ import annotations

import numpy as np

from torch_rlds._bijection import KeyedBijection, derive_key

_ORDER_TAG = 0x474C4F42  # "GLOB": keeps the global order's keys apart from other uses of a seed
_MIXTURE_TAG = 0x4D495854
_MASK64 = np.uint64((1 << 64) - 1)


class GlobalOrder:
    """The steps of one split in the global order.

    Args:
      lengths: steps of each episode, in source order (episodes of 0 steps have none).
      seed: the order's seed.
      shuffle: ``False`` keeps episodes and their steps in source order.

    Immutable and thread-safe; the bijection of an epoch is made on first use and kept for
    the last epoch asked for.
    """

    def __init__(self, lengths: np.ndarray, *, seed: int, shuffle: bool) -> None:
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.ndim != 1 or (lengths < 0).any():
            raise ValueError("episode lengths must be a 1-d array of counts >= 0")
        self.lengths = lengths
        self.starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.num_steps = int(self.starts[-1])
        self.seed = seed
        self.shuffle = shuffle
        self._epoch: tuple[int, KeyedBijection] | None = None

    def _bijection(self, epoch: int) -> KeyedBijection:
        cached = self._epoch
        if cached is None or cached[0] != epoch:
            cached = (epoch, KeyedBijection(self.num_steps,
                                            derive_key(self.seed, epoch, _ORDER_TAG)))
            self._epoch = cached
        return cached[1]

    def locate(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(epoch, episode, step)`` of each stream position in ``samples`` (int64 arrays)."""
        samples = np.asarray(samples, dtype=np.int64)
        if self.num_steps == 0:
            raise ValueError("the split has no steps")
        epoch, position = np.divmod(samples, self.num_steps)
        flat = np.empty_like(position)
        for e in np.unique(epoch).tolist():
            where = epoch == e
            flat[where] = self._bijection(e)(position[where]) if self.shuffle else position[where]
        episode = np.searchsorted(self.starts, flat, side="right") - 1
        return epoch, episode, flat - self.starts[episode]


def host_samples(start: int, batch: int, batch_size: int, process_index: int,
                 process_count: int) -> np.ndarray:
    """The stream positions of host ``process_index``'s part of global batch ``batch`` of a
    stream starting at sample ``start`` (``batch_size`` divides among ``process_count``)."""
    local = batch_size // process_count
    first = start + batch * batch_size + process_index * local
    return np.arange(first, first + local, dtype=np.int64)


def worker_batches(done: int, worker: int, num_workers: int) -> int:
    """The first host batch ``>= done`` that worker ``worker`` of ``num_workers`` makes (with
    no workers, ``done`` itself)."""
    if num_workers <= 1:
        return done
    return done + (worker - done) % num_workers


def _uniform(seed: int, samples: np.ndarray) -> np.ndarray:
    """A number in ``[0, 1)`` per stream position, from ``(seed, position)``."""
    from torch_rlds._bijection import _mix

    key = np.uint64(derive_key(seed, _MIXTURE_TAG))
    x = _mix(samples.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + key)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class MixtureDraws:
    """Which dataset each global sample of a mixture comes from: dataset ``d`` with probability
    ``weights[d] / sum(weights)``, drawn from ``(seed, k)`` alone."""

    def __init__(self, weights: np.ndarray, seed: int) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or len(weights) == 0 or not (weights > 0).all():
            raise ValueError(f"mixture weights must be > 0 (got {weights.tolist()})")
        self.seed = seed
        self.cumulative = np.cumsum(weights / weights.sum())
        self.cumulative[-1] = 1.0

    def datasets(self, samples: np.ndarray) -> np.ndarray:
        """The dataset index of each stream position in ``samples``."""
        return np.searchsorted(self.cumulative, _uniform(self.seed, np.asarray(samples)),
                               side="right").astype(np.int64)

    def counts(self, start: int, stop: int, chunk: int = 1 << 20) -> np.ndarray:
        """How many of the stream positions ``start .. stop - 1`` each dataset gets."""
        out = np.zeros(len(self.cumulative), dtype=np.int64)
        for a in range(start, stop, chunk):
            drawn = self.datasets(np.arange(a, min(stop, a + chunk), dtype=np.int64))
            out += np.bincount(drawn, minlength=len(out))
        return out
