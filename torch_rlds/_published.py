"""The feature specifications of real RLDS datasets as published, and tiny stand-ins for tests.

:data:`PUBLISHED` holds, for bridge (Open X-Embodiment), fractal20220817_data (RT-1), droid and
LIBERO, the TFDS ``FeaturesDict`` their ``features.json`` declares: key names, shapes, dtypes,
image encodings, and whether strings are ``Text`` or ``Tensor(dtype=string)`` (the OXE
conversions use the latter). Feature descriptions are left out; they do not change decoding.

:func:`write_published` writes a small dataset with exactly those features, so a config's key map
can be checked against the real key names without downloading anything. Its values follow
:mod:`torch_rlds.synthetic`: images carry the ``(episode, step)`` id bands that
:func:`torch_rlds.synthetic.image_ids` reads; every numeric tensor of step ``t`` of ``episode``
holds ``[episode, t, tag + 2, tag + 3, ...]`` flattened (``tag`` is 10 times the leaf's position in
the feature tree), scalars hold ``t``; text holds :func:`torch_rlds.synthetic.instruction`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from etils import epath

from torch_rlds import synthetic
from torch_rlds._features import iter_leaves
from torch_rlds._tfrecord import write_tfrecord


@dataclasses.dataclass(frozen=True)
class PublishedDataset:
    """A published dataset: its TFDS name and version, the config that reads it, its features."""

    name: str
    version: str
    config: str
    features: Callable[[], object]


def _bridge():
    F = _features()
    return F.FeaturesDict({
        "steps": F.Dataset({
            "action": F.FeaturesDict({
                "open_gripper": F.Tensor(shape=(), dtype=np.bool_),
                "rotation_delta": F.Tensor(shape=(3,), dtype=np.float32),
                "terminate_episode": F.Tensor(shape=(), dtype=np.float32),
                "world_vector": F.Tensor(shape=(3,), dtype=np.float32),
            }),
            "is_first": F.Tensor(shape=(), dtype=np.bool_),
            "is_last": F.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
            "observation": F.FeaturesDict({
                "image": F.Image(shape=(480, 640, 3), dtype=np.uint8, encoding_format="jpeg"),
                "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
                "natural_language_instruction": F.Tensor(shape=(), dtype=np.object_),
                "state": F.Tensor(shape=(7,), dtype=np.float32),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _fractal():
    F = _features()
    string = dict(shape=(), dtype=np.object_)
    return F.FeaturesDict({
        "aspects": F.FeaturesDict({
            name: F.Tensor(shape=(), dtype=np.bool_)
            for name in ("already_success", "feasible", "has_aspects", "success", "undesirable")
        }),
        "attributes": F.FeaturesDict({
            **{name: F.Tensor(shape=(), dtype=np.int64)
               for name in ("collection_mode", "data_type", "env", "location", "objects_family",
                            "task_family")},
            **{f"{name}_name": F.Tensor(**string)
               for name in ("collection_mode", "data_type", "env", "location", "objects_family",
                            "task_family")},
        }),
        "steps": F.Dataset({
            "action": F.FeaturesDict({
                "base_displacement_vector": F.Tensor(shape=(2,), dtype=np.float32),
                "base_displacement_vertical_rotation": F.Tensor(shape=(1,), dtype=np.float32),
                "gripper_closedness_action": F.Tensor(shape=(1,), dtype=np.float32),
                "rotation_delta": F.Tensor(shape=(3,), dtype=np.float32),
                "terminate_episode": F.Tensor(shape=(3,), dtype=np.int32),
                "world_vector": F.Tensor(shape=(3,), dtype=np.float32),
            }),
            "is_first": F.Tensor(shape=(), dtype=np.bool_),
            "is_last": F.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
            "observation": F.FeaturesDict({
                "base_pose_tool_reached": F.Tensor(shape=(7,), dtype=np.float32),
                "gripper_closed": F.Tensor(shape=(1,), dtype=np.float32),
                "gripper_closedness_commanded": F.Tensor(shape=(1,), dtype=np.float32),
                "height_to_bottom": F.Tensor(shape=(1,), dtype=np.float32),
                "image": F.Image(shape=(256, 320, 3), dtype=np.uint8, encoding_format="jpeg"),
                "natural_language_embedding": F.Tensor(shape=(512,), dtype=np.float32),
                "natural_language_instruction": F.Tensor(**string),
                "orientation_box": F.Tensor(shape=(2, 3), dtype=np.float32),
                "orientation_start": F.Tensor(shape=(4,), dtype=np.float32),
                "robot_orientation_positions_box": F.Tensor(shape=(3, 3), dtype=np.float32),
                "rotation_delta_to_go": F.Tensor(shape=(3,), dtype=np.float32),
                "src_rotation": F.Tensor(shape=(4,), dtype=np.float32),
                "vector_to_go": F.Tensor(shape=(3,), dtype=np.float32),
                "workspace_bounds": F.Tensor(shape=(3, 3), dtype=np.float32),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _droid():
    F = _features()
    string = dict(shape=(), dtype=np.object_)

    def f64(n: int):
        return F.Tensor(shape=(n,), dtype=np.float64)

    def camera():
        return F.Image(shape=(180, 320, 3), dtype=np.uint8, encoding_format="jpeg")

    return F.FeaturesDict({
        "episode_metadata": F.FeaturesDict({
            "file_path": F.Tensor(**string),
            "recording_folderpath": F.Tensor(**string),
        }),
        "steps": F.Dataset({
            "action": f64(7),
            "action_dict": F.FeaturesDict({
                "cartesian_position": f64(6),
                "cartesian_velocity": f64(6),
                "gripper_position": f64(1),
                "gripper_velocity": f64(1),
                "joint_position": f64(7),
                "joint_velocity": f64(7),
            }),
            "discount": F.Scalar(dtype=np.float32),
            "is_first": F.Tensor(shape=(), dtype=np.bool_),
            "is_last": F.Tensor(shape=(), dtype=np.bool_),
            "is_terminal": F.Tensor(shape=(), dtype=np.bool_),
            "language_instruction": F.Tensor(**string),
            "language_instruction_2": F.Tensor(**string),
            "language_instruction_3": F.Tensor(**string),
            "observation": F.FeaturesDict({
                "cartesian_position": f64(6),
                "exterior_image_1_left": camera(),
                "exterior_image_2_left": camera(),
                "gripper_position": f64(1),
                "joint_position": f64(7),
                "wrist_image_left": camera(),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _libero():
    # The LIBERO suites as converted to RLDS for OpenVLA and openpi (libero_10_no_noops,
    # libero_goal_no_noops, libero_object_no_noops, libero_spatial_no_noops share these features).
    F = _features()
    return F.FeaturesDict({
        "episode_metadata": F.FeaturesDict({"file_path": F.Text()}),
        "steps": F.Dataset({
            "action": F.Tensor(shape=(7,), dtype=np.float32),
            "discount": F.Scalar(dtype=np.float32),
            "is_first": F.Scalar(dtype=np.bool_),
            "is_last": F.Scalar(dtype=np.bool_),
            "is_terminal": F.Scalar(dtype=np.bool_),
            "language_instruction": F.Text(),
            "observation": F.FeaturesDict({
                "image": F.Image(shape=(256, 256, 3), dtype=np.uint8, encoding_format="jpeg"),
                "joint_state": F.Tensor(shape=(7,), dtype=np.float32),
                "state": F.Tensor(shape=(8,), dtype=np.float32),
                "wrist_image": F.Image(shape=(256, 256, 3), dtype=np.uint8,
                                       encoding_format="jpeg"),
            }),
            "reward": F.Scalar(dtype=np.float32),
        }),
    })


def _features():
    import tensorflow_datasets as tfds

    return tfds.features


PUBLISHED: dict[str, PublishedDataset] = {
    "bridge": PublishedDataset("bridge", "0.1.0", "bridge", _bridge),
    "fractal20220817_data": PublishedDataset("fractal20220817_data", "0.1.0", "fractal", _fractal),
    "droid": PublishedDataset("droid", "1.0.0", "droid", _droid),
    "libero_10_no_noops": PublishedDataset("libero_10_no_noops", "1.0.0", "libero", _libero),
}


def published(name: str) -> PublishedDataset:
    """The published dataset ``name`` (a TFDS name or a config name)."""
    for entry in PUBLISHED.values():
        if name in (entry.name, entry.config):
            return entry
    raise KeyError(f"no published dataset {name!r} (known: {sorted(PUBLISHED)}, configs "
                   f"{sorted(e.config for e in PUBLISHED.values())})")


def leaf_value(leaf, tag: int, episode: int, t: int, num_steps: int):
    """The value :func:`write_published` stores in ``leaf`` (a
    :class:`~torch_rlds._features.FeatureLeaf`) for step ``t`` of ``episode``."""
    last = t == num_steps - 1
    name = leaf.path[-1]
    if leaf.kind == "text" or (leaf.kind == "tensor" and leaf.dtype == object):
        if leaf.per_step:
            return synthetic.instruction(episode)
        return f"episode_{episode}/{name}"
    if leaf.dtype == np.bool_ and leaf.shape == ():
        if name == "is_first":
            return t == 0
        if name in ("is_last", "is_terminal"):
            return last
        return t % 2 == 1
    if leaf.shape == ():
        if name == "reward":
            return leaf.dtype.type(1.0 if last else 0.0)
        if name == "discount":
            return leaf.dtype.type(1.0)
        return leaf.dtype.type(t if leaf.per_step else episode)
    size = int(np.prod(leaf.shape))
    flat = np.arange(size, dtype=np.float64) + tag
    flat[0] = episode
    if size > 1:
        flat[1] = t
    return flat.reshape(leaf.shape).astype(leaf.dtype)


def _painter(leaf):
    height, width, channels = leaf.shape
    cam = synthetic.Camera(leaf.name, height, width, format=leaf.encoding,
                           dtype=str(leaf.dtype), channels=channels)
    return synthetic._Painter(cam, texture=False, seed=0)


Values = Mapping[str, Callable[[int, int], Any]]


def published_example(features, episode: int, num_steps: int, painters=None,
                      values: Values | None = None) -> dict:
    """The example dict of one episode of a dataset with ``features`` (see the module
    docstring). ``values`` maps feature paths (``episode_metadata/file_path``,
    ``steps/action``) to ``fn(episode, t)`` giving that leaf's value instead (``t`` is 0 for
    episode-level leaves)."""
    values = values or {}
    leaves = list(iter_leaves(features))
    painters = painters if painters is not None else {
        leaf.path: _painter(leaf) for leaf in leaves
        if leaf.kind == "image" and leaf.name not in values}
    example: dict = {}
    steps = [{} for _ in range(num_steps)]
    for position, leaf in enumerate(leaves):
        tag = 10 * position
        override = values.get(leaf.name)
        if not leaf.per_step:
            value = override(episode, 0) if override else leaf_value(leaf, tag, episode, 0,
                                                                     num_steps)
            _set(example, leaf.path, value)
            continue
        for t in range(num_steps):
            if override is not None:
                value = override(episode, t)
            elif leaf.kind == "image":
                value = painters[leaf.path].frame(episode, t)
            else:
                value = leaf_value(leaf, tag, episode, t, num_steps)
            _set(steps[t], leaf.path[1:], value)
    example["steps"] = steps
    return example


def write_published(root: str | os.PathLike, name: str, *, num_episodes: int = 2,
                    episode_lengths: tuple[int, ...] | None = None, num_shards: int = 1,
                    values: Values | None = None) -> epath.Path:
    """Write a small dataset with the published features of ``name`` (a TFDS name or a config
    name) under ``root/<name>/<version>`` and return that directory. Episode ``e`` has
    ``episode_lengths[e]`` steps (default ``3 + e % 3``); ``values`` overrides leaves (see
    :func:`published_example`)."""
    from google.protobuf import json_format
    from tensorflow_datasets.core import example_serializer
    from tensorflow_datasets.core.proto import dataset_info_pb2

    entry = published(name)
    if episode_lengths is None:
        episode_lengths = tuple(3 + e % 3 for e in range(num_episodes))
    if len(episode_lengths) != num_episodes:
        raise ValueError(f"episode_lengths has {len(episode_lengths)} entries, expected "
                         f"num_episodes={num_episodes}")
    if not 1 <= num_shards <= num_episodes:
        raise ValueError(f"num_shards must be in [1, {num_episodes}] (got {num_shards})")
    features = entry.features()
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    painters = {leaf.path: _painter(leaf) for leaf in iter_leaves(features)
                if leaf.kind == "image" and leaf.name not in (values or {})}
    out = epath.Path(root) / entry.name / entry.version
    out.mkdir(parents=True, exist_ok=True)
    shards = np.array_split(np.arange(num_episodes), num_shards)
    num_bytes = 0
    for s, ids in enumerate(shards):
        records = []
        for e in ids:
            example = published_example(features, int(e), episode_lengths[int(e)], painters,
                                        values)
            records.append(serializer.serialize_example(features.encode_example(example)))
        num_bytes += sum(len(r) for r in records)
        write_tfrecord(out / f"{entry.name}-train.tfrecord-{s:05d}-of-{num_shards:05d}", records)
    info = dataset_info_pb2.DatasetInfo(
        name=entry.name, version=entry.version, file_format="tfrecord",
        description=f"Stand-in with the published features of {entry.name}, written by "
                    "torch_rlds._published.",
    )
    info.splits.add(name="train", shard_lengths=[len(ids) for ids in shards],
                    num_bytes=num_bytes,
                    filepath_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    features.save_config(os.fspath(out))
    (out / "dataset_info.json").write_text(json_format.MessageToJson(info, sort_keys=True))
    return out


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
