"""Worker memory: what each DataLoader worker holds privately while it serves batches.

A worker's own cost is its USS (the pages only it maps: what the machine gets back when it
exits) and its PSS (USS plus its share of the pages it shares: the read-only data it was
forked with, the memory-mapped step index, the batch buffers of shared memory). The global
order should hold the index and the samples in flight, nothing that grows with the number of
episodes or with their size; the window order holds two windows of encoded episodes.

Each figure is the peak over the batches handed out, sampled after every batch with psutil
(``memory_full_info``, which reads ``/proc/PID/smaps``).
"""

from __future__ import annotations

import os
import time
from typing import Any

from tqdm import tqdm

from torch_rlds._torchdata import worker_processes
from torch_rlds.bench._settings import BenchSettings
from torch_rlds.bench._torch import make_loader

_MB = 1024 * 1024


def worker_memory(settings: dict[str, Any], dataset: str, order: str,
                  workers: int) -> dict[str, Any]:
    """Peak USS and PSS of each of ``workers`` workers of a loader of ``dataset`` in ``order``
    over ``memory_batches`` batches (MiB), and the dataset's mean episode size. The step index
    is built first, so that the global order reads steps by byte range from its first batch."""
    import psutil

    from torch_rlds.source import RLDSSource

    s = BenchSettings.from_dict(settings)
    source = RLDSSource(dataset, "train")
    _build_step_index(source)
    loader = make_loader(s, dataset, workers, order=order, cameras=("image",))
    iterator = iter(loader)
    pids = [w.pid for w in worker_processes(iterator)]
    processes = [psutil.Process(pid) for pid in pids]
    uss = [0] * len(processes)
    pss = [0] * len(processes)
    start = time.perf_counter()
    for _ in tqdm(range(s.memory_batches), desc=f"worker memory ({order} order)", unit="batch",
                  leave=False):
        next(iterator)
        for i, process in enumerate(processes):
            info = process.memory_full_info()
            uss[i] = max(uss[i], info.uss)
            pss[i] = max(pss[i], getattr(info, "pss", 0))
    seconds = time.perf_counter() - start
    size = sum(os.path.getsize(os.fspath(p)) for p in source.info.splits["train"].shard_paths)
    return {
        "order": loader.dataset.order,
        "workers": len(processes),
        "episodes": len(source),
        "episode_mb": size / len(source) / _MB,
        "batches": s.memory_batches,
        "seconds": seconds,
        "uss_mb": [round(x / _MB, 1) for x in uss],
        "pss_mb": [round(x / _MB, 1) for x in pss],
        "max_uss_mb": round(max(uss, default=0) / _MB, 1),
        "max_pss_mb": round(max(pss, default=0) / _MB, 1),
    }


def _build_step_index(source: Any) -> None:
    """The step index of ``source``, built now where missing (cached: once per dataset)."""
    from torch_rlds._step_reader import IndexBuilder, StepFiles

    files = StepFiles(source)
    files.lengths(progress=False)
    if files.missing():
        IndexBuilder(files, progress=False).start().join()
