"""The torch_rlds measurements: throughput, resume, and the cost of a state.

Every function runs in its own process (see :mod:`torch_rlds.bench._subprocess`) and uses only
the public API (:class:`torch_rlds.RLDSDataset`, :class:`torch_rlds.DataLoader`,
``save_state`` / ``load_state``), so it measures whatever the loader does today.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

from tqdm import tqdm

from torch_rlds._trees import batch_digest
from torch_rlds.bench._batches import batch_shapes
from torch_rlds.bench._settings import CAMERAS, BenchSettings


def make_loader(settings: BenchSettings, dataset: str, workers: int, *,
                shuffle_window: int | None = None, order: str = "auto", process_index: int = 0,
                process_count: int = 1, cameras: tuple[str, ...] = CAMERAS,
                resize: str | None = None):
    """The torch_rlds DataLoader of the benchmark sample (see :class:`BenchSettings`) in
    ``order`` (``"auto"``: the dataset's default), for host ``process_index`` of
    ``process_count`` (its share of the global batch ``batch_size``). ``resize``: ``"full"``
    or ``"reduced"``: the cameras resized to half their size (stretch, bilinear) after a
    full decode, or decoded at libjpeg's half scale (``decode_sizes``)."""
    from torch_rlds import DataLoader, RLDSDataset
    from torch_rlds.transforms import Resize

    half = (settings.image_size // 2, settings.image_size // 2)
    extra: dict[str, Any] = {}
    if resize is not None:
        extra["sample_transform"] = Resize(half, "stretch", keys=cameras)
        if resize == "reduced":
            extra["decode_sizes"] = {camera: half for camera in cameras}

    data = RLDSDataset(
        dataset, "train", obs_window=settings.obs_window,
        action_horizon=settings.action_horizon, observation_keys=(*cameras, "state"),
        shuffle=True, seed=settings.seed,
        shuffle_window=shuffle_window or settings.shuffle_window, repeat=True,
        fast_jpeg=settings.fast_jpeg, order=order, process_index=process_index,
        process_count=process_count, **extra,
    )
    options: dict[str, Any] = {"batch_size": settings.batch_size // process_count,
                               "num_workers": workers}
    if workers:
        options.update(prefetch_factor=2, persistent_workers=True)
    return DataLoader(data, **options)


def make_hosts(settings: BenchSettings, dataset: str, hosts: int, workers: int, *,
               shuffle_window: int | None = None, order: str = "auto") -> list[Any]:
    """The loaders of ``hosts`` hosts of one job, each with ``workers`` workers, built in this
    process as each host would build its own."""
    return [make_loader(settings, dataset, workers, shuffle_window=shuffle_window, order=order,
                        process_index=p, process_count=hosts) for p in range(hosts)]


def global_batch(parts: list[Any]) -> Any:
    """The global batch that the hosts' batches ``parts`` make together (host order)."""
    import torch

    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, dict):
        return {key: global_batch([p[key] for p in parts]) for key in first}
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return [item for part in parts for item in part]


def throughput(settings: dict[str, Any], dataset: str, workers: int,
               order: str = "auto", resize: str | None = None) -> dict[str, Any]:
    """Samples/s over ``measure_batches`` batches after ``warmup_batches`` (``resize``: see
    :func:`make_loader`)."""
    s = BenchSettings.from_dict(settings)
    start = time.perf_counter()
    loader = make_loader(s, dataset, workers, order=order, resize=resize)
    batches = iter(loader)
    batch = next(batches)
    first = time.perf_counter() - start
    for _ in range(s.warmup_batches - 1):
        next(batches)
    timed = time.perf_counter()
    for _ in tqdm(range(s.measure_batches), desc=f"torch_rlds num_workers={workers}",
                  unit="batch", leave=False):
        batch = next(batches)
    seconds = time.perf_counter() - timed
    return {
        "workers": workers,
        "order": loader.dataset.order,
        "resize": resize,
        "samples_per_s": s.measure_batches * s.batch_size / seconds,
        "batches": s.measure_batches,
        "seconds": seconds,
        "first_batch_s": first,
        "shapes": batch_shapes(batch),
        "metrics": loader_metrics(loader),
    }


def save_states(settings: dict[str, Any], dataset: str, workers: int, shuffle_window: int,
                batches: list[int], out_dir: str, order: str = "auto") -> dict[str, Any]:
    """Iterate one uninterrupted run and save the state after each count in ``batches``.

    For each save: the file, its size, the time ``save_state`` took, and the digest of the next
    batch, which a resumed run must reproduce.
    """
    s = BenchSettings.from_dict(settings)
    loader = make_loader(s, dataset, workers, shuffle_window=shuffle_window, order=order)
    wanted = sorted(batches)
    saves: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    it = iter(loader)
    for seen in tqdm(range(1, wanted[-1] + 2), desc="torch_rlds: run to the save points",
                     unit="batch", leave=False):
        batch = next(it)
        if pending is not None:
            pending["next_digest"] = batch_digest(batch)
            saves.append(pending)
            pending = None
        if seen in wanted:
            path = os.path.join(out_dir, f"torch_rlds_{order}_w{shuffle_window}_b{seen}.json")
            if os.path.exists(path):  # a redone run; save_state over a file fails in 0.1.0
                os.remove(path)
            t = time.perf_counter()
            loader.save_state(path)
            pending = {"batch": seen, "path": path, "bytes": os.path.getsize(path),
                       "save_s": time.perf_counter() - t}
    return {"workers": workers, "shuffle_window": shuffle_window, "order": loader.dataset.order,
            "saves": saves}


def resume(settings: dict[str, Any], dataset: str, workers: int, shuffle_window: int,
           state_path: str | None, expected_digest: str | None, order: str = "auto",
           hosts: int = 1) -> dict[str, Any]:
    """Time to the first global batch in a fresh process: build the loader of each of
    ``hosts`` hosts (one host saved the state; the global order resumes it under any hosts and
    workers), load the state (none: a fresh start), fetch one batch from each. ``exact``
    compares the global batch with the uninterrupted run's."""
    s = BenchSettings.from_dict(settings)
    start = time.perf_counter()
    loaders = make_hosts(s, dataset, hosts, workers, shuffle_window=shuffle_window, order=order)
    if state_path is not None:
        for loader in loaders:
            loader.load_state(state_path)
    restored = time.perf_counter() - start
    batch = global_batch([next(iter(loader)) for loader in loaders])
    total = time.perf_counter() - start
    return {
        "hosts": hosts,
        "workers": workers,
        "shuffle_window": shuffle_window,
        "restore_s": restored,
        "first_batch_s": total,
        "exact": None if expected_digest is None else batch_digest(batch) == expected_digest,
    }


def state_cost(settings: dict[str, Any], dataset: str, workers: int,
               buffers: list[int], out_dir: str) -> list[dict[str, Any]]:
    """Size and save time of the loader state: under the global order (which mixes every step
    of the epoch), then under the window order at windows that mix as many steps as each
    tf.data shuffle buffer in ``buffers``."""
    s = BenchSettings.from_dict(settings)
    rows = []
    shuffles = [("global", s.epoch_steps(), s.shuffle_window)]
    shuffles += [("window", b, s.window_for_buffer(b)) for b in buffers]
    for order, buffer, window in shuffles:
        loader = make_loader(s, dataset, workers, shuffle_window=window, order=order)
        it = iter(loader)
        for _ in range(2):
            next(it)
        dict_times, save_times = [], []
        for repeat in range(s.save_repeats):
            t = time.perf_counter()
            state = loader.state_dict()
            dict_times.append(time.perf_counter() - t)
            # a new file each time: save_state over an existing file fails in torch_rlds 0.1.0
            path = os.path.join(out_dir, f"torch_rlds_cost_{order}_w{window}_{repeat}.json")
            t = time.perf_counter()
            loader.save_state(path)
            save_times.append(time.perf_counter() - t)
        size = len(json.dumps(state, sort_keys=True).encode())
        rows.append({
            "order": order,
            "buffer_steps": buffer,
            "shuffle_window": window if order == "window" else None,
            "workers": workers,
            "bytes": size,
            "bytes_per_worker": size / max(workers, 1),
            "file_bytes": os.path.getsize(path),
            "state_dict_s": statistics.median(dict_times),
            "save_s": statistics.median(save_times),
        })
        del it, loader
    return rows


def loader_metrics(loader: Any) -> Any:
    """``loader.metrics()`` where the loader has it (JSON-safe), else ``None``."""
    stats = getattr(loader, "metrics", None)
    return _plain(stats()) if callable(stats) else None


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch scalars and arrays
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "__dict__"):  # a dataclass or plain object of figures
        return _plain(vars(value))
    return str(value)
