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
from torch_rlds._global_order import GlobalOrder


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
    """Episode of every sample of epoch 0 of the global order (the dataset's own
    :class:`~torch_rlds._global_order.GlobalOrder`)."""
    order = GlobalOrder(lengths, seed=seed, shuffle=True)
    _, episodes, _ = order.locate(np.arange(order.num_steps, dtype=np.int64))
    return episodes


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


def run(*, steps: int = 600_000, droid_steps: int = 4_000_000, batch_size: int = 256,
        buffer: int = 250_000, shuffle_window: int = 16, topology: tuple[int, int] = (8, 32),
        seed: int = 0) -> dict[str, Any]:
    """Every order on every profile: ``{profile: {"episodes", "steps", "orders": {order:
    score}}}``; the DROID-like profile gets ``droid_steps`` steps, the others ``steps``."""
    hosts, workers = topology
    out: dict[str, Any] = {}
    for profile in PROFILES:
        episode_lengths = lengths(profile, droid_steps if profile.name == DROID else steps, seed)
        rows = {
            GLOBAL: global_order(episode_lengths, seed),
            f"torch_rlds window {shuffle_window}, one worker": window_order(
                episode_lengths, shuffle_window=shuffle_window, hosts=1, workers=1,
                batch_size=batch_size, seed=seed),
            f"torch_rlds window {shuffle_window}, {hosts} hosts x {workers} workers":
                window_order(episode_lengths, shuffle_window=shuffle_window, hosts=hosts,
                             workers=workers, batch_size=batch_size, seed=seed),
            TFDATA: tfdata_order(episode_lengths, buffer=buffer, seed=seed),
            IID: iid_order(episode_lengths, int(episode_lengths.sum()), seed),
        }
        out[profile.name] = {"episodes": len(episode_lengths),
                             "steps": int(episode_lengths.sum()),
                             "orders": {name: score(e, batch_size) for name, e in rows.items()}}
    return out


GLOBAL = "torch_rlds global order (any hosts x workers)"
TFDATA = "tf.data shuffle buffer"
IID = "i.i.d."
DROID = "droid-like"


def shuffle_quality(settings: dict[str, Any]) -> dict[str, Any]:
    """The bench task: :func:`run` at the sizes of ``settings`` (a
    :class:`~torch_rlds.bench.BenchSettings` dict), with the buffer size in the result."""
    s = settings
    return {"batch_size": s["shuffle_batch"], "buffer": s["shuffle_buffer"],
            "shuffle_window": s["shuffle_window"], "topology": list(s["shuffle_topology"]),
            "profiles": run(steps=s["shuffle_steps"], droid_steps=s["shuffle_droid_steps"],
                            batch_size=s["shuffle_batch"], buffer=s["shuffle_buffer"],
                            shuffle_window=s["shuffle_window"],
                            topology=tuple(s["shuffle_topology"]), seed=s["seed"])}
