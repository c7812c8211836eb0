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
  Beside it, the time to read one window of ``shuffle_window`` episodes one request after
  another (what the window order does today) and all at once (``RLDSSource.read_many``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

# (label, shards, episodes): bridge is 1024 shards of 60,064 episodes, DROID 2048 of 92,233;
# the first three keep bridge's density (about 58.7 episodes per shard).
SIZES = (("10 shards", 10, 587), ("100 shards", 100, 5_866), ("1000 shards", 1000, 58_656),
         ("bridge", 1024, 60_064), ("droid", 2048, 92_233))
QUICK_SIZES = (("10 shards", 10, 40), ("100 shards", 100, 400))
LATENCY_S = 0.03


def sizes_for(episodes: int) -> tuple[tuple[str, int, int], ...]:
    """The start-up sizes of a run whose bench dataset has ``episodes`` episodes: a quick run
    (fewer than 100) measures two small ones only."""
    return QUICK_SIZES if episodes < 100 else SIZES


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


def startup(sizes: list[list[Any]], latency_s: float, work: str) -> dict[str, Any]:
    """Cold, warm and published-index start-up of each ``(label, shards, episodes)`` of
    ``sizes`` (see the module)."""
    from torch_rlds._shared_index import publish
    from torch_rlds._simbucket import SimulatedBucket
    from torch_rlds.source import RLDSSource

    out: dict[str, Any] = {"latency_s": latency_s, "sizes": {}}
    for label, shards, episodes in sizes:
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
        result["window_reads"] = window_reads(bucket.url(dataset),
                                              settings["shuffle_window"])
    result["latency_s"] = latency_s
    return result


def window_reads(url: str, window: int, windows: int = 4) -> dict[str, Any]:
    """Seconds to read ``windows`` windows of ``window`` episodes of the source at ``url``,
    episode after episode and with ``read_many``, and the bytes of one window."""
    from torch_rlds.source import RLDSSource

    source = RLDSSource(url, cache_dir=tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    chosen = [rng.choice(len(source), size=min(window, len(source)), replace=False).tolist()
              for _ in range(windows)]
    start = time.perf_counter()
    for episodes in chosen:
        for e in episodes:
            source.read(e)
    serial = (time.perf_counter() - start) / windows
    start = time.perf_counter()
    for episodes in chosen:
        data = source.read_many(episodes)
    together = (time.perf_counter() - start) / windows
    return {"episodes": len(chosen[0]), "serial_s": serial, "read_many_s": together,
            "bytes": sum(len(d) for d in data)}


def report_lines(results: dict[str, Any]) -> list[str]:
    """The section's tables for ``results.md``."""
    from torch_rlds.bench._cells import error as _error
    from torch_rlds.bench._cells import fmt as _fmt
    from torch_rlds.bench._cells import memory as _memory
    from torch_rlds.bench._cells import ok as _ok
    from torch_rlds.bench._cells import paired_ratio
    from torch_rlds.bench._cells import rates as _rates

    remote = results.get("remote") or {}
    record = remote.get("startup")
    r = _ok(record) or {}
    ms = _fmt(1e3 * r["latency_s"], 0) if "latency_s" in r else "?"
    lines = ["", f"## From a bucket: start-up at {ms} ms per request (simulated gs://)", "",
             "Requests per host; a cold host has an empty cache, a warm one indexed the dataset "
             "before, a published one finds `torch_rlds.index` beside the data. "
             "Reads: header hops, dataset_info.json, features.json, the published index.", "",
             "| dataset | shards | episodes | host | seconds | requests | reads | listings | "
             "peak in flight |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for label, row in (r.get("sizes") or {}).items():
        for host in ("cold", "warm", "published"):
            m = row[host]
            lines.append(f"| {label} | {_fmt(row['shards'])} | {_fmt(m['episodes'])} | {host} | "
                         f"{_fmt(m['seconds'])} | {_fmt(m['requests'])} | {_fmt(m['read'])} | "
                         f"{_fmt(m['list'])} | {_fmt(m['peak_in_flight'])} |")
    if not r:
        lines.append(f"| - | | | | | | | | {_error(record)} |")
    through = remote.get("throughput")
    t = _ok(through) or {}
    local = results.get("throughput", {}).get("torch_rlds", {}).get(str(t.get("workers")))
    lines += ["", "## From a bucket: throughput (window order, existing DataLoader)", "",
              "| source | num_workers | samples/s | / local disk | first batch s | peak RSS | "
              "peak PSS | |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| simulated gs:// at {ms} ms | {_fmt(t.get('workers'))} | "
                 f"{_fmt(t.get('samples_per_s'), 0)} | "
                 f"{_fmt(paired_ratio(_rates(through), _rates(local)))} | "
                 f"{_fmt(t.get('first_batch_s'))} | {' | '.join(_memory(through))} | "
                 f"{_error(through)} |")
    if local is not None:
        lo = _ok(local) or {}
        lines.append(f"| local disk (throughput section) | {_fmt(lo.get('workers'))} | "
                     f"{_fmt(lo.get('samples_per_s'), 0)} | 1.00 | "
                     f"{_fmt(lo.get('first_batch_s'))} | {' | '.join(_memory(local))} | "
                     f"{_error(local)} |")
    reads = t.get("window_reads")
    if reads:
        lines += ["", f"One window of {reads['episodes']} episodes "
                      f"({reads['bytes'] / 2**20:.1f} MiB): {reads['serial_s']:.2f} s read "
                      f"episode after episode (the window order today), "
                      f"{reads['read_many_s']:.2f} s with RLDSSource.read_many.", ""]
    return lines
