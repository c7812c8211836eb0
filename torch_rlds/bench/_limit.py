"""The decode limit: the benchmark's JPEG frames decoded with simplejpeg and nothing else.

No pipeline that decodes every frame on the same cores can beat this figure, so
``pipeline / limit`` says how much of the machine a pipeline spends on anything but decoding.
The frames are exported once by the parent (:func:`export_frames`) into a flat file, so the
measuring process reads no dataset and imports neither torch nor TensorFlow.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

import numpy as np

_FRAMES = "frames.bin"
_OFFSETS = "frames_offsets.npy"


def export_frames(dataset: str, episodes: int, cameras: tuple[str, ...], out_dir: str) -> int:
    """Write the encoded frames of every camera of the first ``episodes`` episodes into
    ``out_dir``, step by step (camera order inside a step); returns the number of steps."""
    from torch_rlds.source import RLDSSource

    source = RLDSSource(dataset, "train")
    offsets = [0]
    steps = 0
    with open(os.path.join(out_dir, _FRAMES), "wb") as f:
        for index in range(min(episodes, len(source))):
            observation = source.episode(index)["steps"]["observation"]
            frames = [observation[cam].encoded for cam in cameras]
            for step in zip(*frames):
                for data in step:
                    f.write(data)
                    offsets.append(offsets[-1] + len(data))
                steps += 1
    np.save(os.path.join(out_dir, _OFFSETS), np.asarray(offsets, np.int64))
    return steps


def decode_limit(settings: dict[str, Any], frames_dir: str, cameras: int) -> dict[str, Any]:
    """Decode the exported frames ``limit_rounds`` times in ``limit_processes`` processes.

    ``cameras`` is the number of frames per step in the export. Each process takes an equal
    share of the steps and decodes every frame into one preallocated array (``buffer=``), so
    what is timed is the decoder alone. The wall time runs from the moment all processes are
    ready to the moment the last one finishes.
    """
    data = np.fromfile(os.path.join(frames_dir, _FRAMES), dtype=np.uint8)
    offsets = np.load(os.path.join(frames_dir, _OFFSETS))
    frames = [data[offsets[i]:offsets[i + 1]].tobytes() for i in range(len(offsets) - 1)]
    steps = len(frames) // cameras
    processes = settings["limit_processes"]
    shares = [frames[s * cameras:e * cameras] for s, e in _ranges(steps, processes)]
    size = settings["image_size"]
    ctx = multiprocessing.get_context()
    barrier = ctx.Barrier(processes)
    queue = ctx.Queue()
    workers = [ctx.Process(target=_decode_share,
                           args=(share, size, settings["fast_jpeg"], settings["limit_rounds"],
                                 barrier, queue))
               for share in shares]
    for w in workers:
        w.start()
    reports = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    start = min(r["start"] for r in reports)
    end = max(r["end"] for r in reports)
    images = sum(r["images"] for r in reports)
    seconds = end - start
    images_per_sample = cameras * settings["obs_window"]
    return {
        "processes": processes,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "samples_per_s": images / images_per_sample / seconds,
        "us_per_image": 1e6 * sum(r["end"] - r["start"] for r in reports) / images,
        "fast_jpeg": settings["fast_jpeg"],
    }


def _ranges(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _decode_share(frames: list[bytes], size: int, fast: bool, rounds: int, barrier: Any,
                  queue: Any) -> None:
    import simplejpeg

    out = np.empty((size, size, 3), np.uint8)
    barrier.wait()
    start = time.monotonic()
    for _ in range(rounds):
        for data in frames:
            # The upsampling both pipelines use (tf.io.decode_jpeg's fancy_upscaling default):
            # the fast one is cheaper but gives other pixels.
            simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=False,
                                   buffer=out)
    queue.put({"start": start, "end": time.monotonic(), "images": rounds * len(frames)})
