"""Normalization statistics of state and action, computed by streaming a dataset once.

:func:`compute_stats` reads every episode of a source (images stay encoded: nothing is decoded
but the tensors), maps it with a :class:`~torch_rlds.keymap.KeyMap` and accumulates, per
dimension, the mean, standard deviation (population, as ``np.std``), min, max and the 1st and
99th percentiles of the per-step state and action.

Mean, std, min and max are exact (float64 accumulation). Quantiles come from a histogram of
:data:`NUM_BINS` bins per dimension that widens by merging bin pairs when a value falls
outside it, so memory is fixed whatever the dataset size; each quantile is within one bin width
(``Stats.quantile_tolerance``, at most about 4 (max - min) / NUM_BINS) of ``np.quantile``'s
default (linear) interpolation.

:func:`load_or_compute_stats` caches the result in the torch_rlds cache folder, keyed by a hash
of the dataset (name, version, split expression, every split's shard lengths and byte count) and
the key map's state and action keys. ``norm_stats.json`` uses openpi's layout::

    {"norm_stats": {"state": {"mean": [...], "std": [...], "q01": [...], "q99": [...]},
                    "actions": {...}}}

``torch-rlds stats --config-name NAME`` is :func:`main`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from torch_rlds._cache import cache_root
from torch_rlds._state_file import read_json, write_json_atomic
from torch_rlds.keymap import ACTION, STATE, KeyMap

NUM_BINS = 10_000
STATS_VERSION = 1
NORM_STATS_FILE = "norm_stats.json"
STATS_FILE = "stats.json"
_FLUSH_ROWS = 65_536


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-dimension statistics of one feature (float64 arrays of shape ``[D]``).

    ``min``, ``max``, ``count`` and ``quantile_tolerance`` are ``None`` when read from a
    ``norm_stats.json``, which holds only what normalization needs.
    """

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    count: int | None = None
    quantile_tolerance: np.ndarray | None = None

    def to_json(self, *, full: bool = True) -> dict[str, Any]:
        """JSON form: the four normalization fields, plus the rest when ``full``."""
        out: dict[str, Any] = {k: _list(getattr(self, k)) for k in ("mean", "std", "q01", "q99")}
        if full:
            for k in ("min", "max", "quantile_tolerance"):
                if getattr(self, k) is not None:
                    out[k] = _list(getattr(self, k))
            if self.count is not None:
                out["count"] = self.count
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = "stats") -> Stats:
        """Read :meth:`to_json`'s form; raises ``ValueError`` naming the missing field."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where} must be a mapping (got {type(raw).__name__})")
        values: dict[str, Any] = {}
        for k in ("mean", "std", "q01", "q99", "min", "max", "quantile_tolerance"):
            if k in raw:
                values[k] = np.asarray(raw[k], dtype=np.float64).reshape(-1)
            elif k in ("mean", "std", "q01", "q99"):
                raise ValueError(f"{where}: field {k!r} is missing (fields: {sorted(raw)})")
        dims = {v.shape for v in values.values()}
        if len(dims) > 1:
            raise ValueError(f"{where}: fields have different lengths "
                             f"{ {k: len(v) for k, v in values.items()} }")
        if "count" in raw:
            values["count"] = int(raw["count"])
        return cls(**values)


def _list(a: np.ndarray) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64)]


class RunningStats:
    """Streaming statistics of rows ``[N, D]`` (see the module docstring for the accuracy).

    ``update`` merges a batch with Chan's parallel formulas for mean and variance, so feeding
    the same rows in the same batches gives bit-identical results. Not thread-safe.
    """

    def __init__(self, num_bins: int = NUM_BINS) -> None:
        if type(num_bins) is not int or num_bins < 2 or num_bins % 2:
            raise ValueError(f"num_bins must be an even int >= 2 (got {num_bins!r})")
        self.num_bins = num_bins
        self.count = 0
        # Per dimension; empty until the first rows (their number of dimensions) are seen.
        self._mean = self._m2 = self._min = self._max = np.empty(0)
        self._lo = self._width = np.empty(0)
        self._hist = np.empty((0, num_bins), np.int64)

    @property
    def dims(self) -> int | None:
        """The number of dimensions, once a batch has been seen."""
        return None if self.count == 0 else len(self._mean)

    def update(self, rows: np.ndarray) -> None:
        """Add ``rows`` ``[N, D]`` (or ``[N]`` for one dimension)."""
        x = np.asarray(rows, dtype=np.float64)
        x = x.reshape(len(x), -1) if x.ndim != 2 else x
        n = len(x)
        if n == 0:
            return
        if self.dims is not None and x.shape[1] != self.dims:
            raise ValueError(f"rows have {x.shape[1]} dimensions, earlier rows {self.dims}")
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"row {bad[0]} dimension {bad[1]} is {x[tuple(bad)]}; statistics "
                             "need finite values")
        batch_mean = x.mean(axis=0)
        batch_m2 = ((x - batch_mean) ** 2).sum(axis=0)
        batch_min, batch_max = x.min(axis=0), x.max(axis=0)
        if self.count == 0:
            self._mean, self._m2 = batch_mean, batch_m2
            self._min, self._max = batch_min, batch_max
            self._lo = batch_min.copy()
            span = batch_max - batch_min
            tiny = np.maximum(np.abs(batch_min), 1.0) * 1e-9
            self._width = np.where(span > 0, span / self.num_bins, tiny)
            self._hist = np.zeros((x.shape[1], self.num_bins), np.int64)
        else:
            total = self.count + n
            delta = batch_mean - self._mean
            self._mean = self._mean + delta * (n / total)
            self._m2 = self._m2 + batch_m2 + delta ** 2 * (self.count * n / total)
            self._min = np.minimum(self._min, batch_min)
            self._max = np.maximum(self._max, batch_max)
        self.count += n
        self._widen(batch_min, batch_max)
        index = np.floor((x - self._lo) / self._width).astype(np.int64)
        np.clip(index, 0, self.num_bins - 1, out=index)
        index += np.arange(x.shape[1], dtype=np.int64) * self.num_bins
        self._hist += np.bincount(index.ravel(), minlength=self._hist.size).reshape(
            self._hist.shape)

    def _widen(self, low: np.ndarray, high: np.ndarray) -> None:
        # Doubling the bin width merges bin pairs exactly, so counts never get redistributed.
        bins, half = self.num_bins, self.num_bins // 2
        for d in range(len(low)):
            while low[d] < self._lo[d] or high[d] > self._lo[d] + bins * self._width[d]:
                merged = self._hist[d].reshape(half, 2).sum(axis=1)
                self._hist[d] = 0
                if high[d] > self._lo[d] + bins * self._width[d]:
                    self._hist[d, :half] = merged
                else:
                    self._hist[d, half:] = merged
                    self._lo[d] -= bins * self._width[d]
                self._width[d] *= 2.0

    def _order_statistic(self, k: int) -> np.ndarray:
        # The k-th smallest value (0-based) of every dimension, placed evenly inside its bin.
        cumulative = np.cumsum(self._hist, axis=1)
        b = (cumulative <= k).sum(axis=1)
        rows = np.arange(len(b))
        in_bin = self._hist[rows, b]
        before = cumulative[rows, b] - in_bin
        return self._lo + (b + (k - before + 0.5) / in_bin) * self._width

    def quantile(self, q: float) -> np.ndarray:
        """The ``q`` quantile of every dimension (linear interpolation, as ``np.quantile``)."""
        if self.count == 0:
            raise ValueError("no rows were added")
        rank = q * (self.count - 1)
        k = int(np.floor(rank))
        low = self._order_statistic(k)
        high = self._order_statistic(min(k + 1, self.count - 1))
        value = low + (rank - k) * (high - low)
        return np.clip(value, self._min, self._max)

    def result(self) -> Stats:
        """The statistics of every row added so far."""
        if self.count == 0:
            raise ValueError("no rows were added")
        return Stats(mean=self._mean.copy(), std=np.sqrt(self._m2 / self.count),
                     q01=self.quantile(0.01), q99=self.quantile(0.99), min=self._min.copy(),
                     max=self._max.copy(), count=self.count,
                     quantile_tolerance=self._width.copy())


def compute_stats(source: Any, key_map: KeyMap, *, progress: bool = True,
                  num_bins: int = NUM_BINS, plan: Any = None) -> dict[str, Stats]:
    """``{"state": Stats, "actions": Stats}`` of every step of ``source`` (an
    :class:`~torch_rlds.RLDSSource`) under ``key_map`` (``state`` only when it has state
    keys). Validates the key map first; shows a tqdm bar over episodes when ``progress``.

    With a ``plan`` (a dataset's trajectory transforms and filters,
    :class:`torch_rlds._plan.EpisodePlan`) the statistics are those of the steps the dataset
    samples: of the transformed trajectories (as epoch 0 makes them), kept steps only."""
    from tqdm import tqdm

    key_map.validate(source)
    parts = {"state": STATE, "actions": ACTION} if key_map.state_keys else {"actions": ACTION}
    running = {name: RunningStats(num_bins) for name in parts}
    pending: dict[str, list[np.ndarray]] = {name: [] for name in parts}
    rows = 0

    def flush() -> None:
        for name, chunks in pending.items():
            if chunks:
                running[name].update(np.concatenate(chunks))
                chunks.clear()

    info = source.info
    bar = tqdm(range(len(source)), desc=f"stats {info.name}", unit="episode",
               disable=not progress)
    for i in bar:
        where = source.describe(i)
        if plan is not None:
            traj = plan.trajectory(source.episode(i), i, 0, where)
            kept = plan.judge(traj)[1]
            values = {name: traj.numeric[key][kept] for name, key in parts.items()}
        else:
            steps = key_map.apply(source.episode(i), name=where)["steps"]
            values = {name: steps["observation"][STATE] if key == STATE else steps[ACTION]
                      for name, key in parts.items()}
        for name, value in values.items():
            if not np.isfinite(value).all():
                raise ValueError(f"{where}: {name} holds non-finite values; statistics need "
                                 "finite values")
            pending[name].append(value)
        rows += len(values["actions"])
        if rows >= _FLUSH_ROWS:
            flush()
            rows = 0
    flush()
    for name, r in running.items():
        if r.count == 0:
            raise ValueError(f"{info.name} split {source.split!r}: no steps, so no {name} "
                             "statistics")
    return {name: r.result() for name, r in running.items()}


# -- cache and files -----------------------------------------------------------------------------
def cache_key(source: Any, key_map: KeyMap, num_bins: int = NUM_BINS, plan: Any = None) -> str:
    """The hash the statistics of ``source`` under ``key_map`` (and ``plan``) are cached by."""
    info = source.info
    identity = {
        "format": STATS_VERSION,
        "dataset": info.name,
        "version": info.version,
        "split": source.split,
        "splits": {name: {"shard_lengths": list(s.shard_lengths), "num_bytes": s.num_bytes}
                   for name, s in sorted(info.splits.items())},
        "state_keys": list(key_map.state_keys),
        "action_keys": list(key_map.action_keys),
        "num_bins": num_bins,
    }
    if plan is not None:
        identity["plan"] = plan.digest
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_dir(source: Any, key_map: KeyMap, num_bins: int = NUM_BINS, plan: Any = None) -> Path:
    """The cache folder of the statistics of ``source`` under ``key_map`` (and ``plan``)."""
    info = source.info
    key = cache_key(source, key_map, num_bins, plan)[:20]
    return cache_root(create=False) / "stats" / f"{info.name}-{info.version}-{key}"


def write_norm_stats(stats: Mapping[str, Stats], path: str | os.PathLike) -> epath.Path:
    """Write ``stats`` as openpi's ``norm_stats.json`` (a folder gets ``norm_stats.json``
    inside it); returns the file."""
    file = epath.Path(path)
    if file.is_dir() or not file.name.endswith(".json"):
        file = file / NORM_STATS_FILE
    write_json_atomic(file, {"norm_stats": {k: v.to_json(full=False) for k, v in stats.items()}},
                      indent=2)
    return file


def read_norm_stats(path: str | os.PathLike) -> dict[str, Stats]:
    """Read a ``norm_stats.json`` (openpi's layout; a folder means the file inside it) or a
    torch_rlds ``stats.json``."""
    file = epath.Path(path)
    if file.is_dir():
        file = file / NORM_STATS_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file}: no normalization statistics there; write them with "
                                "`torch-rlds stats --config-name NAME --output PATH`")
    raw = read_json(file, "statistics")
    table = raw.get("norm_stats") if isinstance(raw, dict) else None
    if not isinstance(table, dict):
        raise ValueError(f"{file}: expected {{'norm_stats': {{'state': ..., 'actions': ...}}}} "
                         f"(found keys {sorted(raw) if isinstance(raw, dict) else raw!r:.100})")
    return {k: Stats.from_json(v, f"{file}: norm_stats.{k}") for k, v in table.items()}


def load_or_compute_stats(source: Any, key_map: KeyMap, *, recompute: bool = False,
                          progress: bool = True, num_bins: int = NUM_BINS, plan: Any = None
                          ) -> tuple[dict[str, Stats], Path | None]:
    """The statistics of ``source`` under ``key_map`` and their cache folder: read from the
    cache, or computed (one pass over the dataset) and cached as ``stats.json`` (everything)
    and ``norm_stats.json`` (openpi's layout). Where the cache cannot be written the
    statistics are still returned, with a warning, and the folder is ``None``. ``plan``: see
    :func:`compute_stats`."""
    folder = cache_dir(source, key_map, num_bins, plan)
    full = folder / STATS_FILE
    if full.exists() and not recompute:
        return read_norm_stats(full), folder
    stats = compute_stats(source, key_map, progress=progress, num_bins=num_bins, plan=plan)
    info = source.info
    try:
        write_norm_stats(stats, folder / NORM_STATS_FILE)
        # stats.json last: its presence is what marks the cache entry complete.
        write_json_atomic(epath.Path(full), {
            "version": STATS_VERSION,
            "dataset": {"name": info.name, "version": info.version, "split": source.split},
            "key_map": {"state": list(key_map.state_keys), "action": list(key_map.action_keys)},
            "num_bins": num_bins,
            "norm_stats": {k: v.to_json() for k, v in stats.items()},
        }, indent=2)
    except OSError as e:
        warnings.warn(f"could not cache the statistics in {folder}: {e}; they will be "
                      "computed again next time", stacklevel=2)
        return stats, None
    return stats, folder


# -- the command ---------------------------------------------------------------------------------
def dimension_labels(source: Any, key_map: KeyMap) -> dict[str, list[str]]:
    """A label per dimension of ``state`` and ``actions``: the key it came from, indexed
    (``state[3]``, ``action/world_vector[0]``; a scalar key stands alone). A key whose size the
    dataset leaves open is labelled ``key[?]``."""
    leaves = {"/".join(leaf.path[1:]): leaf for leaf in source.leaves() if leaf.per_step}
    out = {}
    parts = {"state": key_map.state_keys, "actions": key_map.action_keys}
    for name, keys in parts.items():
        labels = []
        for key in keys:
            shape = tuple(leaves[key].shape) if key in leaves else (None,)
            short = key[len("observation/"):] if key.startswith("observation/") else key
            if shape == ():
                labels.append(short)
            elif None in shape:
                labels.append(f"{short}[?]")
            else:
                labels.extend(f"{short}[{i}]" for i in range(int(np.prod(shape))))
        out[name] = labels
    return out


def format_table(name: str, stats: Stats, labels: Sequence[str]) -> str:
    """``stats`` as aligned columns, one row per dimension labelled by ``labels``."""
    fields = [f for f in ("mean", "std", "min", "max", "q01", "q99")
              if getattr(stats, f) is not None]
    dims = len(stats.mean)
    labels = list(labels) if len(labels) == dims else [f"{name}[{i}]" for i in range(dims)]
    cells = [[f"{float(getattr(stats, f)[d]):.5g}" for f in fields] for d in range(dims)]
    label_width = max(len("dimension"), *(len(label) for label in labels))
    widths = [max(len(f), *(len(row[i]) for row in cells)) for i, f in enumerate(fields)]
    lines = [f"{name} ({dims} dims)",
             "  " + "dimension".ljust(label_width) + "".join(
                 f"  {f:>{w}}" for f, w in zip(fields, widths))]
    for label, row in zip(labels, cells):
        lines.append("  " + label.ljust(label_width) + "".join(
            f"  {c:>{w}}" for c, w in zip(row, widths)))
    return "\n".join(lines)


__all__ = [
    "NUM_BINS",
    "RunningStats",
    "Stats",
    "cache_key",
    "compute_stats",
    "dimension_labels",
    "format_table",
    "load_or_compute_stats",
    "read_norm_stats",
    "write_norm_stats",
]
