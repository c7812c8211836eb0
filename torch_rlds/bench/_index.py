"""The step index: what building it costs, and what a never-seen dataset costs its first batch.

The global order reads a sample's steps by byte range through the step index
(:mod:`torch_rlds._step_reader`), built once per dataset by one pass over its records and
cached. :func:`index_build` times that pass (``StepFiles`` / ``IndexBuilder``, with the record
index and the step counts it needs first) against a plain sequential read of the same shards;
:func:`first_batch` times a fresh loader's first batch with a given cache folder, empty for a
never-seen dataset (the index is then built in the background while whole records are read).

The page cache cannot be emptied here (that needs root), so both reads are of warm shards: the
shards are read once before anything is timed.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from torch_rlds.bench._settings import BenchSettings

_MB = 1024 * 1024
_CHUNK = 16 * _MB


def _use_cache(cache_dir: str, *, empty: bool) -> str:
    """Point this process's torch_rlds cache at ``cache_dir`` (before any dataset is built;
    workers inherit it); with ``empty``, at a new empty folder inside it. Returns the folder."""
    from torch_rlds._cache import CACHE_ENV

    os.makedirs(cache_dir, exist_ok=True)
    if empty:
        cache_dir = tempfile.mkdtemp(prefix="cache_", dir=cache_dir)
    os.environ[CACHE_ENV] = cache_dir
    return cache_dir


def _shards(dataset: str) -> list[str]:
    from torch_rlds._info import DatasetInfo

    return [os.fspath(p) for p in DatasetInfo.load(dataset).splits["train"].shard_paths]


def sequential_read(paths: list[str]) -> tuple[int, float]:
    """``(bytes, seconds)`` of reading ``paths`` start to end in 16 MiB chunks."""
    size = 0
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(_CHUNK):
                size += len(chunk)
    return size, time.perf_counter() - start


def index_build(settings: dict[str, Any], dataset: str, cache_dir: str) -> dict[str, Any]:
    """Time the record index, the step counts and the step index of ``dataset`` built into
    an empty cache (a new folder inside ``cache_dir``, returned as ``cache``), and a
    sequential read of the same (warm) shards."""
    cache_dir = _use_cache(cache_dir, empty=True)
    from torch_rlds._step_reader import IndexBuilder, StepFiles
    from torch_rlds.source import RLDSSource

    paths = _shards(dataset)
    sequential_read(paths)  # warm the page cache for both timings
    size, read_s = sequential_read(paths)
    start = time.perf_counter()
    source = RLDSSource(dataset, "train")
    files = StepFiles(source)
    record_s = time.perf_counter() - start
    start = time.perf_counter()
    files.lengths(progress=False)
    count_s = time.perf_counter() - start
    start = time.perf_counter()
    builder = IndexBuilder(files, progress=False).start()
    builder.join()
    build_s = time.perf_counter() - start
    index_bytes = sum(os.path.getsize(files.index_path(s)) for s in range(files.num_shards)
                      if files.index_path(s).exists())
    return {
        "shards": len(paths),
        "episodes": len(source),
        "bytes": size,
        "read_s": read_s,
        "read_mb_per_s": size / _MB / read_s,
        "record_index_s": record_s,
        "count_steps_s": count_s,
        "build_s": build_s,
        "build_mb_per_s": size / _MB / build_s,
        "total_mb_per_s": size / _MB / (record_s + count_s + build_s),
        "index_bytes": index_bytes,
        "failed_shards": len(builder.failed),
        "cache": cache_dir,
    }


def first_batch(settings: dict[str, Any], dataset: str, workers: int, cache_dir: str,
                fresh: bool) -> dict[str, Any]:
    """Time to the first batch of a fresh loader (``workers`` workers, the default order) with
    the torch_rlds cache at ``cache_dir`` (``fresh``: at a new empty folder inside it), and
    whether a step index build had to start (it runs in the background: the batches do not
    wait for it)."""
    cache_dir = _use_cache(cache_dir, empty=fresh)
    from torch_rlds import dataset as dataset_module
    from torch_rlds.bench._torch import make_loader

    s = BenchSettings.from_dict(settings)
    steps = os.path.join(cache_dir, "steps")
    indexed = os.path.isdir(steps) and any(n.endswith(".trsi") for n in os.listdir(steps))
    start = time.perf_counter()
    loader = make_loader(s, dataset, workers)
    built = time.perf_counter() - start
    batch = next(iter(loader))
    first = time.perf_counter() - start
    return {
        "workers": workers,
        "order": loader.dataset.order,
        "cache_had_index": indexed,
        "loader_s": built,
        "first_batch_s": first,
        "index_build_started": bool(dataset_module._builds),
        "batch_size": len(batch["action"]),
    }
