"""Reading from a bucket: start-up and throughput through the simulated ``gs://`` store.

Every figure goes through :mod:`torch_rlds._simbucket` (a local folder served as ``gs://``,
each request answered after ``latency_s``, requests counted), so it shows what torch_rlds asks
of an object store, not what a network happens to do:

* **start-up**: ``RLDSSource`` of datasets of 10, 100 and 1000 shards (bridge's density, ~59
  episodes per shard) and of bridge's and DROID's sizes, on a host whose cache is empty
  (cold), that has indexed it before (warm), and that finds the index published beside the
  data (``torch-rlds index --publish``): seconds and requests of each kind. Episodes are small
  real records: indexing reads headers only, so start-up does not depend on episode sizes.
* **throughput**: the bench's own dataset through the existing DataLoader and window order,
  read from the simulated bucket; the paired figure on local disk is the throughput section's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

# (label, shards, episodes): bridge is 1024 shards of 60,064 episodes; DROID 2048 of 92,233.
SIZES = (("10 shards", 10, 587), ("100 shards", 100, 5_866), ("1000 shards", 1000, 58_656),
         ("bridge", 1024, 60_064), ("droid", 2048, 92_233))
QUICK_SIZES = (("10 shards", 10, 40), ("100 shards", 100, 400))


def write_scaled_dataset(root: str | os.PathLike, shards: int, episodes: int, *,
                         name: str = "scaled") -> str:
    """A tfrecord dataset of ``episodes`` small real episodes in ``shards`` shards under
    ``root/name/1.0.0`` (every record the same 2-step episode without images); returns the
    version directory. Written in seconds at bridge's size."""
    from torch_rlds import synthetic
    from torch_rlds._tfrecord import RecordIndex, write_tfrecord

    template = synthetic.write_dataset(
        tempfile.mkdtemp(prefix="torch_rlds_scaled_"), name=name, num_episodes=1, num_shards=1,
        min_steps=2, max_steps=2, cameras=())
    (shard,) = [p for p in template.iterdir() if ".tfrecord-" in p.name]
    record = RecordIndex.load(shard, cache_dir=tempfile.mkdtemp()).read(0)
    out = os.path.join(os.fspath(root), name, "1.0.0")
    os.makedirs(out, exist_ok=True)
    shutil.copy(template / "features.json", os.path.join(out, "features.json"))
    counts = [len(part) for part in np.array_split(np.arange(episodes), shards)]
    for s, n in enumerate(counts):
        write_tfrecord(os.path.join(out, f"{name}-train.tfrecord-{s:05d}-of-{shards:05d}"),
                       [record] * n)
    info = json.loads((template / "dataset_info.json").read_text())
    info["splits"] = [{"name": "train", "shardLengths": [str(n) for n in counts],
                       "numBytes": str(len(record) * episodes),
                       "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"}]
    with open(os.path.join(out, "dataset_info.json"), "w") as f:
        json.dump(info, f)
    shutil.rmtree(os.fspath(template.parent.parent), ignore_errors=True)
    return out


def _timed_start(bucket: Any, url: str, cache: str) -> dict[str, Any]:
    from torch_rlds.source import RLDSSource

    bucket.reset_counts()
    start = time.perf_counter()
    source = RLDSSource(url, cache_dir=cache)
    source.features  # noqa: B018 - a dataset reads features.json at once: part of start-up
    seconds = time.perf_counter() - start
    counts = bucket.reset_counts().snapshot()
    return {"seconds": seconds, "episodes": len(source), **counts}


def startup(quick: bool, latency_s: float, work: str) -> dict[str, Any]:
    """Cold, warm and published-index start-up of each size (see the module)."""
    from torch_rlds._shared_index import publish
    from torch_rlds._simbucket import SimulatedBucket
    from torch_rlds.source import RLDSSource

    out: dict[str, Any] = {"latency_s": latency_s, "sizes": {}}
    for label, shards, episodes in QUICK_SIZES if quick else SIZES:
        root = tempfile.mkdtemp(prefix="torch_rlds_bucket_", dir=work)
        path = write_scaled_dataset(root, shards, episodes)
        with SimulatedBucket(root, "bench-data", latency_s=latency_s) as bucket:
            url = bucket.url(path)
            cache = tempfile.mkdtemp(dir=work)
            row = {"shards": shards, "cold": _timed_start(bucket, url, cache),
                   "warm": _timed_start(bucket, url, cache)}
            bucket.latency_s = 0.0  # published once, by one machine: not part of start-up
            publish(RLDSSource(url, cache_dir=cache), step_index=False, progress=False)
            bucket.latency_s = latency_s
            row["published"] = _timed_start(bucket, url, tempfile.mkdtemp(dir=work))
        out["sizes"][label] = row
        shutil.rmtree(root, ignore_errors=True)
    return out


def throughput(settings: dict[str, Any], dataset: str, workers: int,
               latency_s: float) -> dict[str, Any]:
    """:func:`torch_rlds.bench._torch.throughput` of ``dataset`` read through the simulated
    bucket at ``latency_s`` per request (the DataLoader's workers serve it too)."""
    from torch_rlds._simbucket import SimulatedBucket
    from torch_rlds.bench._torch import throughput as local_throughput

    root = os.path.dirname(os.path.dirname(os.fspath(dataset)))
    with SimulatedBucket(root, "bench-data", latency_s=latency_s) as bucket:
        result = local_throughput(settings, bucket.url(dataset), workers)
        result["parent_requests"] = bucket.counts.snapshot()
    result["latency_s"] = latency_s
    return result
