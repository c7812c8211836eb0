"""The baseline: the tf.data pipeline that Octo and openpi build over an RLDS dataset.

``tfds.builder_from_directory(...).as_dataset`` with the steps left encoded (dlimp's
``from_rlds``), ``repeat``, a trajectory map that cuts observation windows and action chunks,
flatten to steps, a shuffle buffer of steps, ``tf.io.decode_jpeg``, batch, prefetch, AUTOTUNE
parallelism everywhere. Octo shuffles before decoding (the buffer holds JPEG bytes), which is
the order used here; openpi's DROID loader decodes first, so its buffer holds pixels.

The sample is the one torch_rlds emits (same keys, shapes, dtypes and padding rule). Both
shuffles are seeded so that ``skip(n)`` replays exactly the stream a checkpoint resumes.

This module never imports torch, so the figures of its process are tf.data's alone; TensorFlow
is imported inside the functions.
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

from tqdm import tqdm

from torch_rlds._trees import batch_digest
from torch_rlds.bench._batches import batch_shapes

_CAMERAS = ("image", "wrist_image")


def make_pipeline(settings: dict[str, Any], dataset: str, shuffle_buffer: int, *,
                  skip_steps: int = 0):
    """The tf.data pipeline of batches; ``skip_steps`` drops that many shuffled steps before
    decoding (the cheapest replay that keeps the stream)."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    tf.config.set_visible_devices([], "GPU")
    autotune = tf.data.AUTOTUNE
    s = settings
    builder = tfds.builder_from_directory(dataset)
    read_config = tfds.ReadConfig(shuffle_seed=s["seed"], skip_prefetch=True,
                                  interleave_cycle_length=autotune,
                                  num_parallel_calls_for_interleave_files=autotune)
    ds = builder.as_dataset(split="train", shuffle_files=True, read_config=read_config,
                            decoders={"steps": tfds.decode.SkipDecoding()})
    ds = ds.repeat()
    ds = ds.map(lambda episode: _episode_samples(episode, s["obs_window"],
                                                  s["action_horizon"]),
                num_parallel_calls=autotune)
    ds = ds.interleave(tf.data.Dataset.from_tensor_slices, cycle_length=autotune,
                       num_parallel_calls=autotune)
    ds = ds.shuffle(shuffle_buffer, seed=s["seed"])
    if skip_steps:
        ds = ds.skip(skip_steps)
    dct = "" if s["fast_jpeg"] else "INTEGER_ACCURATE"
    size = s["image_size"]
    ds = ds.map(lambda sample: _decode(sample, s["obs_window"], size, dct),
                num_parallel_calls=autotune)
    ds = ds.batch(s["batch_size"], drop_remainder=True, num_parallel_calls=autotune)
    return ds.prefetch(autotune)


def _episode_samples(episode: dict[str, Any], obs_window: int, action_horizon: int):
    """Trajectory map: every step's observation window and action chunk, with pad masks."""
    import tensorflow as tf

    steps = episode["steps"]
    length = tf.shape(steps["action"])[0]
    t = tf.range(length)[:, None]
    obs_raw = t + tf.range(1 - obs_window, 1)[None]
    act_raw = t + tf.range(action_horizon)[None]
    obs_idx = tf.clip_by_value(obs_raw, 0, length - 1)
    act_idx = tf.minimum(act_raw, length - 1)
    observation = {key: tf.gather(steps["observation"][key], obs_idx)
                   for key in (*_CAMERAS, "state")}
    return {
        "observation": observation,
        "observation_is_pad": obs_raw < 0,
        "action": tf.gather(steps["action"], act_idx),
        "action_is_pad": act_raw >= length,
        "language_instruction": steps["language_instruction"],
        "meta": {
            "episode_index": tf.fill([length], episode["episode_metadata"]["episode_id"]),
            "step_index": tf.cast(tf.range(length), tf.int64),
        },
    }


def _decode(sample: dict[str, Any], obs_window: int, size: int, dct: str):
    import tensorflow as tf

    observation = dict(sample["observation"])
    for key in _CAMERAS:
        frames = [tf.io.decode_jpeg(observation[key][i], channels=3, dct_method=dct)
                  for i in range(obs_window)]
        image = tf.stack(frames)
        image.set_shape((obs_window, size, size, 3))
        observation[key] = image
    return {**sample, "observation": observation}


def _numpy(batch: Any) -> Any:
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: t.numpy(), batch)


def _import_tf() -> dict[str, str]:
    """Import TensorFlow and TFDS before any timer starts (torch is imported before the
    torch_rlds timers too); returns their versions."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    return {"tensorflow": tf.__version__, "tensorflow_datasets": tfds.__version__}


def throughput(settings: dict[str, Any], dataset: str) -> dict[str, Any]:
    """Samples/s over ``measure_batches`` batches after ``warmup_batches``."""
    versions = _import_tf()
    s = settings
    start = time.perf_counter()
    batches = iter(make_pipeline(s, dataset, s["tf_shuffle_buffer"]))
    batch = _numpy(next(batches))
    first = time.perf_counter() - start
    for _ in range(s["warmup_batches"] - 1):
        _numpy(next(batches))
    timed = time.perf_counter()
    for _ in tqdm(range(s["measure_batches"]), desc="tf.data", unit="batch", leave=False):
        batch = _numpy(next(batches))
    seconds = time.perf_counter() - timed
    return {
        "samples_per_s": s["measure_batches"] * s["batch_size"] / seconds,
        "batches": s["measure_batches"],
        "seconds": seconds,
        "first_batch_s": first,
        "shuffle_buffer": s["tf_shuffle_buffer"],
        "shapes": batch_shapes(batch),
        **versions,
    }


def _checkpoint_bytes(prefix: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(prefix + ".*"))


def save_checkpoints(settings: dict[str, Any], dataset: str, batches: list[int],
                     out_dir: str) -> dict[str, Any]:
    """Iterate one uninterrupted run and write an iterator checkpoint after each count in
    ``batches``: its prefix, size, write time, and the digest of the next batch."""
    _import_tf()
    import tensorflow as tf

    s = settings
    it = iter(make_pipeline(s, dataset, s["tf_shuffle_buffer"]))
    checkpoint = tf.train.Checkpoint(iterator=it)
    wanted = sorted(batches)
    saves: list[dict[str, Any]] = []
    pending: dict[str, Any] | None = None
    for seen in tqdm(range(1, wanted[-1] + 2), desc="tf.data: run to the save points",
                     unit="batch", leave=False):
        batch = _numpy(next(it))
        if pending is not None:
            pending["next_digest"] = batch_digest(batch)
            saves.append(pending)
            pending = None
        if seen in wanted:
            prefix = os.path.join(out_dir, f"tf_b{seen}")
            t = time.perf_counter()
            checkpoint.write(prefix)
            pending = {"batch": seen, "prefix": prefix, "save_s": time.perf_counter() - t,
                       "bytes": _checkpoint_bytes(prefix)}
    return {"shuffle_buffer": s["tf_shuffle_buffer"], "saves": saves}


def resume_checkpoint(settings: dict[str, Any], dataset: str, prefix: str | None,
                      expected_digest: str | None) -> dict[str, Any]:
    """Time to the first batch in a fresh process: build the pipeline, restore the iterator
    checkpoint (none: a fresh start, which fills the shuffle buffer), fetch one batch."""
    _import_tf()
    import tensorflow as tf

    s = settings
    start = time.perf_counter()
    it = iter(make_pipeline(s, dataset, s["tf_shuffle_buffer"]))
    if prefix is not None:
        tf.train.Checkpoint(iterator=it).read(prefix).assert_consumed()
    restored = time.perf_counter() - start
    batch = _numpy(next(it))
    total = time.perf_counter() - start
    return {
        "restore_s": restored,
        "first_batch_s": total,
        "exact": None if expected_digest is None else batch_digest(batch) == expected_digest,
    }


def resume_skip(settings: dict[str, Any], dataset: str, skip_batches: int,
                expected_digest: str | None) -> dict[str, Any]:
    """Time to the first batch when the stream is replayed with ``skip`` over the steps already
    consumed (before decoding, so only reading, chunking and shuffling are repeated)."""
    _import_tf()
    s = settings
    start = time.perf_counter()
    it = iter(make_pipeline(s, dataset, s["tf_shuffle_buffer"],
                            skip_steps=skip_batches * s["batch_size"]))
    batch = _numpy(next(it))
    total = time.perf_counter() - start
    return {
        "skip_batches": skip_batches,
        "first_batch_s": total,
        "exact": None if expected_digest is None else batch_digest(batch) == expected_digest,
    }


def checkpoint_cost(settings: dict[str, Any], dataset: str, buffer: int,
                    out_dir: str) -> dict[str, Any]:
    """Size and write time of an iterator checkpoint with a full shuffle buffer of ``buffer``
    steps (the buffer is full once the first batch is out). The files are removed after."""
    _import_tf()
    import tensorflow as tf

    start = time.perf_counter()
    it = iter(make_pipeline(settings, dataset, buffer))
    next(it)
    fill = time.perf_counter() - start
    prefix = os.path.join(out_dir, f"tf_cost_{buffer}")
    t = time.perf_counter()
    tf.train.Checkpoint(iterator=it).write(prefix)
    save = time.perf_counter() - t
    size = _checkpoint_bytes(prefix)
    for path in glob.glob(prefix + ".*"):
        os.remove(path)
    return {"buffer_steps": buffer, "bytes": size, "save_s": save, "fill_s": fill}
