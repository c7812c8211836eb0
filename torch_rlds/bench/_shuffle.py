"""Shuffle quality, simulated over ids: how many episodes a global batch mixes.

No data is read: each order is computed over (episode, step) ids of datasets whose episode
lengths follow a profile (bridge-like, fractal-like, DROID-like), and each global batch of
``batch_size`` samples is scored by the number of distinct episodes it holds and by the most
samples one episode supplies to it. The orders:

* ``global``: torch_rlds's global order (a keyed bijection over every step of the epoch), the
  same under any number of hosts and workers;
* ``window``: torch_rlds's window order, each reader (host x worker) shuffling the steps of
  ``shuffle_window`` episodes at a time; a global batch joins one host batch per host;
* ``tf.data``: the pipelines of Octo and openpi, which read episodes in a shuffled order,
  flatten them into their steps and pass the steps through a shuffle buffer;
* ``iid``: samples drawn independently, the ideal.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from torch_rlds import _order
from torch_rlds._bijection import KeyedBijection, derive_key


@dataclasses.dataclass(frozen=True)
class Profile:
    """Episode lengths of a dataset: uniform in ``[low, high]``."""

    name: str
    low: int
    high: int


PROFILES = (Profile("bridge-like", 20, 48), Profile("fractal-like", 24, 64),
            Profile("droid-like", 120, 466))


def lengths(profile: Profile, steps: int, seed: int = 0) -> np.ndarray:
    """Episode lengths of the profile adding up to about ``steps``."""
    rng = np.random.default_rng(seed)
    count = max(1, steps // ((profile.low + profile.high) // 2))
    return rng.integers(profile.low, profile.high + 1, size=count).astype(np.int64)


def _episode_of(lengths: np.ndarray, flat: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.searchsorted(starts, flat, side="right") - 1


def global_order(lengths: np.ndarray, seed: int = 0) -> np.ndarray:
    """Episode of every sample of one epoch of the global order."""
    total = int(lengths.sum())
    flat = KeyedBijection(total, derive_key(seed, 0))(np.arange(total))
    return _episode_of(lengths, flat)


def window_order(lengths: np.ndarray, *, shuffle_window: int, hosts: int, workers: int,
                 batch_size: int, seed: int = 0) -> np.ndarray:
    """Episode of every sample of the window order, in global batches: each global batch is
    one host batch (``batch_size / hosts`` samples) from the next reader of every host."""
    readers = hosts * workers
    streams = []
    for reader in range(readers):
        episodes = _order.reader_episodes(len(lengths), seed=seed, epoch=0, shuffle=True,
                                          reader=reader, num_readers=readers)
        out = []
        for w in range(_order.num_windows(len(episodes), shuffle_window)):
            chosen = _order.window_episodes(episodes, w, shuffle_window)
            which, _ = _order.window_steps(lengths[chosen], seed=seed, epoch=0, shuffle=True,
                                           reader=reader, window=w)
            out.append(chosen[which])
        streams.append(np.concatenate(out) if out else np.zeros(0, np.int64))
    local = batch_size // hosts
    batches = []
    for turn in range(min(len(s) for s in streams) // local):
        worker, round_ = turn % workers, turn // workers
        for host in range(hosts):
            stream = streams[host * workers + worker]
            batches.append(stream[round_ * local:(round_ + 1) * local])
    return np.concatenate(batches) if batches else np.zeros(0, np.int64)


def tfdata_order(lengths: np.ndarray, *, buffer: int, seed: int = 0) -> np.ndarray:
    """Episode of every sample a shuffle buffer of ``buffer`` steps emits, fed with the steps
    of the episodes in a shuffled order (the buffer's first fill is left out)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    stream = np.repeat(order, lengths[order])
    size = min(buffer, len(stream))
    pool = stream[:size].copy()
    picks = rng.integers(0, size, size=len(stream))
    out = np.empty(len(stream) - size, dtype=np.int64)
    pool_list, picks_list, stream_list = pool.tolist(), picks.tolist(), stream.tolist()
    for i in range(len(stream) - size):
        j = picks_list[i]
        out[i] = pool_list[j]
        pool_list[j] = stream_list[size + i]
    return out


def iid_order(lengths: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """Episodes of ``samples`` samples drawn independently, each step equally likely."""
    rng = np.random.default_rng(seed)
    return _episode_of(lengths, rng.integers(0, int(lengths.sum()), size=samples))


def score(episodes: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mean distinct episodes per batch and mean most samples from one episode per batch."""
    batches = len(episodes) // batch_size
    if batches == 0:
        return {"distinct_episodes": float("nan"), "largest_share": float("nan"), "batches": 0}
    cut = episodes[:batches * batch_size].reshape(batches, batch_size)
    cut = np.sort(cut, axis=1)
    new = np.ones_like(cut, dtype=bool)
    new[:, 1:] = cut[:, 1:] != cut[:, :-1]
    distinct = new.sum(axis=1)
    largest = np.empty(batches, dtype=np.int64)
    for b in range(batches):
        _, counts = np.unique(cut[b], return_counts=True)
        largest[b] = counts.max()
    return {"distinct_episodes": float(distinct.mean()), "largest_share": float(largest.mean()),
            "batches": batches}


def run(*, steps: int = 600_000, batch_size: int = 256, buffer: int = 250_000,
        shuffle_window: int = 16, seed: int = 0) -> dict[str, Any]:
    """Every order on every profile: ``{profile: {order: score}}``."""
    out: dict[str, Any] = {}
    for profile in PROFILES:
        episode_lengths = lengths(profile, steps, seed)
        rows = {
            "torch_rlds global order (any hosts x workers)": global_order(episode_lengths, seed),
            f"torch_rlds window {shuffle_window}, one worker": window_order(
                episode_lengths, shuffle_window=shuffle_window, hosts=1, workers=1,
                batch_size=batch_size, seed=seed),
            f"torch_rlds window {shuffle_window}, 8 hosts x 32 workers": window_order(
                episode_lengths, shuffle_window=shuffle_window, hosts=8, workers=32,
                batch_size=batch_size, seed=seed),
            f"tf.data, {buffer:,}-step shuffle buffer": tfdata_order(
                episode_lengths, buffer=buffer, seed=seed),
            "i.i.d.": iid_order(episode_lengths, int(episode_lengths.sum()), seed),
        }
        out[profile.name] = {"episodes": len(episode_lengths),
                             "steps": int(episode_lengths.sum()),
                             "orders": {name: score(e, batch_size) for name, e in rows.items()}}
    return out
