"""The order of an epoch: a pure function of (seed, epoch, reader, window).

Readers are the ``R = process_count * W`` consumers of one epoch (``W`` is the DataLoader's
worker count, 1 without workers); reader ``r = process_index * W + worker_index`` takes every
R-th episode of the epoch's permutation, starting at the r-th, cuts its share into windows of ``shuffle_window`` episodes and emits all
steps of a window in a seeded permutation. Nothing here depends on how far anybody got, so a
cursor ``(epoch, window, position)`` per reader names exactly which steps were consumed: every
window before ``window`` and the first ``position`` steps of the window's permutation.

Permutations come from a splitmix64 hash sorted with a stable sort, so they are the same on every
platform and numpy version (numpy's generators promise no stream stability across versions).
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_EPISODES = 0x45504953  # tags keep the episode and step permutations of one key unrelated
_STEPS = 0x53544550


def _mix_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 30
    x = (x * _M1) & _MASK
    x ^= x >> 27
    x = (x * _M2) & _MASK
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    h = 0
    for part in parts:
        h = _mix_int(h ^ _mix_int((int(part) + _GOLDEN) & _MASK))
    return h


def permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` (int64) determined by the integers ``key``."""
    x = np.arange(n, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(_key(*key))
    x ^= x >> np.uint64(30)
    x *= np.uint64(_M1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_M2)
    x ^= x >> np.uint64(31)
    return np.argsort(x, kind="stable").astype(np.int64)


def reader_episodes(num_episodes: int, *, seed: int, epoch: int, shuffle: bool, reader: int,
                    num_readers: int) -> np.ndarray:
    """The episodes reader ``reader`` of ``num_readers`` takes in ``epoch``, in its order."""
    if shuffle:
        order = permutation(num_episodes, seed, epoch, _EPISODES)
    else:
        order = np.arange(num_episodes, dtype=np.int64)
    return order[reader::num_readers]


def share_size(num_episodes: int, reader: int, num_readers: int) -> int:
    """How many episodes reader ``reader`` of ``num_readers`` takes per epoch (every epoch)."""
    return max(0, -(-(num_episodes - reader) // num_readers))


def num_windows(num_reader_episodes: int, shuffle_window: int) -> int:
    """How many windows a reader's share of ``num_reader_episodes`` episodes makes."""
    return -(-num_reader_episodes // shuffle_window)


def window_episodes(episodes: np.ndarray, window: int, shuffle_window: int) -> np.ndarray:
    """The episodes of window ``window`` of a reader's share ``episodes``, in window order."""
    return episodes[window * shuffle_window:(window + 1) * shuffle_window]


def window_steps(lengths: np.ndarray | list[int], *, seed: int, epoch: int, shuffle: bool,
                 reader: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The emission order of one window: ``(which, step)`` arrays of equal length.

    ``which[k]`` is the position of the episode within the window and ``step[k]`` the step index
    of the k-th sample; ``lengths`` are the window's episode lengths in window order.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = (permutation(total, seed, epoch, reader, window, _STEPS) if shuffle
            else np.arange(total, dtype=np.int64))
    which = np.searchsorted(starts, flat, side="right") - 1
    # Episodes of length 0 share a start with their successor; searchsorted(side="right")
    # already skips them because it returns the last start <= flat.
    return which.astype(np.int64), flat - starts[which]
