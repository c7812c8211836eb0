"""Genuine TFDS RLDS datasets written without TensorFlow, for tests, the demo and benchmarks.

:func:`write_dataset` writes ``dataset_info.json``, ``features.json`` and tfrecord or
array_record shards that ``tfds.builder_from_directory`` opens. Every value says where it came
from, so a test can tell from any sample exactly which step of which episode it holds:

* ``observation/state[t]`` is ``[episode, t, 2, 3, ...]`` and ``action[t]`` is
  ``[episode, t, -2, -3, ...]`` (float32);
* each camera image carries four horizontal bands of gray levels spelling the episode and step
  (read them back with :func:`image_ids`); the rest of the frame is a textured pattern so that
  JPEG sizes and decode cost resemble real robot footage (``texture=True``);
* depth images (uint16 PNG) hold ``episode`` at pixel (0, 0) and ``t`` at pixel (0, 1);
* ``language_instruction`` is ``"task {episode % 5}: episode {episode}"`` on every step;
* ``episode_metadata`` holds ``episode_id`` and ``file_path``.

Episode ids run over the splits in order: ``train`` holds ids ``0..n_train-1``, ``val`` the next.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from torch_rlds._cache import cache_root
from torch_rlds._tfrecord import write_tfrecord

_BANDS = 4
_LEVEL = 4  # gray levels are multiples of 4 so JPEG rounding never changes the decoded id


@dataclasses.dataclass(frozen=True)
class Camera:
    """One camera of a synthetic dataset.

    Attributes:
      name: the observation key (``image``, ``wrist_image``...).
      height, width: frame size in pixels (at least 32 for JPEG so the id bands survive).
      format: ``jpeg`` or ``png``.
      dtype: ``uint8`` (RGB or gray) or ``uint16`` (1-channel PNG depth).
      channels: 3 or 1.
    """

    name: str
    height: int = 64
    width: int = 64
    format: str = "jpeg"
    dtype: str = "uint8"
    channels: int = 3

    def __post_init__(self) -> None:
        if self.format not in ("jpeg", "png"):
            raise ValueError(f"Camera {self.name}: format must be 'jpeg' or 'png' (got "
                             f"{self.format!r})")
        if self.dtype not in ("uint8", "uint16"):
            raise ValueError(f"Camera {self.name}: dtype must be 'uint8' or 'uint16' (got "
                             f"{self.dtype!r})")
        if self.dtype == "uint16" and (self.format != "png" or self.channels != 1):
            raise ValueError(f"Camera {self.name}: uint16 images must be 1-channel png")
        if self.channels not in (1, 3):
            raise ValueError(f"Camera {self.name}: channels must be 1 or 3 (got {self.channels})")
        if min(self.height, self.width) < 32:
            raise ValueError(f"Camera {self.name}: height and width must be >= 32 (got "
                             f"{self.height}x{self.width})")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`write_dataset` writes.

    Attributes:
      name, version: the TFDS dataset name and version.
      num_episodes: episodes in ``train``.
      val_episodes: episodes in ``val`` (no ``val`` split when 0).
      min_steps, max_steps: episode lengths are drawn uniformly in this range (seeded).
      episode_lengths: explicit lengths for every episode (train, then val); overrides the range.
      cameras: the image observations.
      state_dim, action_dim: sizes of ``observation/state`` and ``action``.
      num_shards: shards per split.
      file_format: ``tfrecord`` or ``array_record``.
      zlib_tensor: add ``observation/joint_zlib``, a float64 ``[3]`` tensor stored zlib-encoded
        (``[episode, t, 0.5]``), to exercise TFDS tensor encodings.
      texture: textured frames (realistic JPEG size and decode cost) rather than flat ones.
      seed: seeds the lengths and textures.
    """

    name: str = "synthetic_rlds"
    version: str = "1.0.0"
    num_episodes: int = 8
    val_episodes: int = 0
    min_steps: int = 5
    max_steps: int = 20
    episode_lengths: tuple[int, ...] | None = None
    cameras: tuple[Camera, ...] = (Camera("image"), Camera("wrist_image"))
    state_dim: int = 7
    action_dim: int = 7
    num_shards: int = 2
    file_format: str = "tfrecord"
    zlib_tensor: bool = False
    texture: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_episodes < 1:
            raise ValueError(f"num_episodes must be >= 1 (got {self.num_episodes})")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps (got {self.min_steps}, "
                             f"{self.max_steps})")
        if self.state_dim < 2 or self.action_dim < 2:
            raise ValueError("state_dim and action_dim must be >= 2 (they carry episode and step)")
        if self.file_format not in ("tfrecord", "array_record"):
            raise ValueError(f"file_format must be 'tfrecord' or 'array_record' (got "
                             f"{self.file_format!r})")
        total = self.num_episodes + self.val_episodes
        if self.episode_lengths is not None and len(self.episode_lengths) != total:
            raise ValueError(f"episode_lengths has {len(self.episode_lengths)} entries, expected "
                             f"{total} (num_episodes + val_episodes)")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1 (got {self.num_shards})")

    def lengths(self) -> list[int]:
        """The number of steps of every episode, by episode id."""
        if self.episode_lengths is not None:
            return [int(n) for n in self.episode_lengths]
        rng = np.random.default_rng(self.seed)
        total = self.num_episodes + self.val_episodes
        return [int(n) for n in rng.integers(self.min_steps, self.max_steps + 1, size=total)]


def features_dict(spec: SyntheticSpec):
    """The TFDS ``FeaturesDict`` of an RLDS dataset written from ``spec``."""
    import tensorflow_datasets as tfds

    F = tfds.features
    observation = {
        "state": F.Tensor(shape=(spec.state_dim,), dtype=np.float32),
    }
    for cam in spec.cameras:
        observation[cam.name] = F.Image(
            shape=(cam.height, cam.width, cam.channels), dtype=np.dtype(cam.dtype),
            encoding_format=cam.format,
        )
    if spec.zlib_tensor:
        observation["joint_zlib"] = F.Tensor(shape=(3,), dtype=np.float64, encoding="zlib")
    return F.FeaturesDict({
        "steps": F.Dataset({
            "observation": F.FeaturesDict(observation),
            "action": F.Tensor(shape=(spec.action_dim,), dtype=np.float32),
            "reward": F.Scalar(dtype=np.float32),
            "discount": F.Scalar(dtype=np.float32),
            "is_first": F.Scalar(dtype=np.bool_),
            "is_last": F.Scalar(dtype=np.bool_),
            "is_terminal": F.Scalar(dtype=np.bool_),
            "language_instruction": F.Text(),
        }),
        "episode_metadata": F.FeaturesDict({
            "episode_id": F.Scalar(dtype=np.int64),
            "file_path": F.Text(),
        }),
    })


def state_value(spec: SyntheticSpec, episode: int, t: int) -> np.ndarray:
    """``observation/state`` of step ``t`` of ``episode``."""
    value = np.arange(spec.state_dim, dtype=np.float32)
    value[0], value[1] = episode, t
    return value


def action_value(spec: SyntheticSpec, episode: int, t: int) -> np.ndarray:
    """``action`` of step ``t`` of ``episode``."""
    value = -np.arange(spec.action_dim, dtype=np.float32)
    value[0], value[1] = episode, t
    return value


def instruction(episode: int) -> str:
    """The language instruction of every step of ``episode``."""
    return f"task {episode % 5}: episode {episode}"


def image_ids(image: np.ndarray) -> tuple[int, int]:
    """The ``(episode, step)`` a synthetic camera frame ``[H, W, C]`` was drawn for."""
    height, width = image.shape[:2]
    band = height // _BANDS
    digits = []
    for b in range(_BANDS):
        patch = image[b * band + 2:(b + 1) * band - 2, 1:max(2, width // 4 - 4)]
        digits.append(int(round(float(np.median(patch)) / _LEVEL)))
    return digits[0] + 64 * digits[1], digits[2] + 64 * digits[3]


def depth_ids(image: np.ndarray) -> tuple[int, int]:
    """The ``(episode, step)`` a synthetic uint16 depth frame was drawn for."""
    return int(image[0, 0, 0]), int(image[0, 1, 0])


class _Painter:
    """Draws camera frames: id bands on the left quarter, a fixed texture elsewhere."""

    def __init__(self, cam: Camera, texture: bool, seed: int) -> None:
        self.cam = cam
        rng = np.random.default_rng([seed, cam.height, cam.width, len(cam.name)])
        if texture:
            coarse = rng.integers(0, 256, size=(cam.height // 16 + 1, cam.width // 16 + 1, 3))
            smooth = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:cam.height, :cam.width]
            noise = rng.normal(0, 12, size=(cam.height, cam.width, 3))
            self.base = np.clip(smooth + noise, 0, 255).astype(np.uint8)
        else:
            self.base = np.full((cam.height, cam.width, 3), 128, np.uint8)

    def frame(self, episode: int, t: int) -> bytes:
        cam = self.cam
        if cam.dtype == "uint16":
            depth = np.full((cam.height, cam.width), 1000 + episode * 7 + t, np.uint16)
            depth[0, 0], depth[0, 1] = episode, t
            return _encode_png(depth)
        image = np.roll(self.base, shift=3 * t, axis=1).copy()
        band = cam.height // _BANDS
        digits = (episode % 64, episode // 64 % 64, t % 64, t // 64 % 64)
        for b, digit in enumerate(digits):
            image[b * band:(b + 1) * band, :cam.width // 4] = digit * _LEVEL
        if cam.channels == 1:
            image = image[:, :, :1]
        if cam.format == "png":
            return _encode_png(image if cam.channels == 3 else image[:, :, 0])
        import simplejpeg

        colorspace = "RGB" if cam.channels == 3 else "GRAY"
        return simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=90,
                                      colorspace=colorspace, colorsubsampling="420")


def _encode_png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def episode_example(spec: SyntheticSpec, episode: int, num_steps: int,
                    painters: Sequence[_Painter]) -> dict:
    """The example dict of one episode, images already encoded, for ``encode_example``."""
    steps = []
    for t in range(num_steps):
        observation: dict[str, Any] = {"state": state_value(spec, episode, t)}
        for painter in painters:
            observation[painter.cam.name] = painter.frame(episode, t)
        if spec.zlib_tensor:
            observation["joint_zlib"] = np.array([episode, t, 0.5], np.float64)
        last = t == num_steps - 1
        steps.append({
            "observation": observation,
            "action": action_value(spec, episode, t),
            "reward": np.float32(1.0 if last else 0.0),
            "discount": np.float32(1.0),
            "is_first": t == 0,
            "is_last": last,
            "is_terminal": last,
            "language_instruction": instruction(episode),
        })
    return {
        "steps": steps,
        "episode_metadata": {"episode_id": episode, "file_path": f"episode_{episode}.npz"},
    }


def write_dataset(root: str | os.PathLike, spec: SyntheticSpec | None = None, *,
                  progress: bool = False, **overrides) -> epath.Path:
    """Write a synthetic RLDS dataset under ``root/name/version`` and return that directory.

    ``overrides`` replace fields of ``spec`` (``write_dataset(tmp, num_episodes=3)``).
    """
    from google.protobuf import json_format
    from tensorflow_datasets.core import example_serializer
    from tensorflow_datasets.core.proto import dataset_info_pb2
    from tqdm import tqdm

    spec = dataclasses.replace(spec or SyntheticSpec(), **overrides)
    out = epath.Path(root) / spec.name / spec.version
    out.mkdir(parents=True, exist_ok=True)
    features = features_dict(spec)
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    painters = [_Painter(cam, spec.texture, spec.seed) for cam in spec.cameras]
    lengths = spec.lengths()
    info = dataset_info_pb2.DatasetInfo(
        name=spec.name, version=spec.version, file_format=spec.file_format,
        description="Synthetic RLDS episodes written by torch_rlds.synthetic.",
        module_name="torch_rlds.synthetic",
    )
    splits = [("train", range(spec.num_episodes))]
    if spec.val_episodes:
        splits.append(("val", range(spec.num_episodes, spec.num_episodes + spec.val_episodes)))
    bar = tqdm(total=len(lengths), desc=f"writing {spec.name}", unit="episode",
               disable=not progress)
    for split, ids in splits:
        shards = [list(chunk) for chunk in np.array_split(np.asarray(ids), spec.num_shards)]
        num_bytes = 0
        for s, shard_ids in enumerate(shards):
            records = []
            for e in shard_ids:
                example = episode_example(spec, int(e), lengths[int(e)], painters)
                records.append(serializer.serialize_example(features.encode_example(example)))
                bar.update(1)
            num_bytes += sum(len(r) for r in records)
            path = out / (f"{spec.name}-{split}.{spec.file_format}-"
                          f"{s:05d}-of-{len(shards):05d}")
            _write_shard(path, records, spec.file_format)
        info.splits.add(name=split, shard_lengths=[len(ids) for ids in shards],
                        num_bytes=num_bytes,
                        filepath_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    bar.close()
    features.save_config(os.fspath(out))
    (out / "dataset_info.json").write_text(json_format.MessageToJson(info, sort_keys=True))
    return out


def write_dataset_once(root: str | os.PathLike, spec: SyntheticSpec, *,
                       progress: bool = False) -> epath.Path:
    """``root/name/version`` of ``spec``, written there first unless it is already complete.

    The dataset is written into a staging folder beside it and renamed into place, so
    concurrent first uses, or a run killed while writing, never leave a half-written dataset
    that a later run would take for complete.
    """
    root = pathlib.Path(root)
    path = root / spec.name / spec.version
    if (path / "dataset_info.json").exists():
        return epath.Path(path)
    root.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        written = pathlib.Path(write_dataset(staging, spec, progress=progress))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(written, path)
        except OSError:  # another process renamed its copy first
            if not (path / "dataset_info.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return epath.Path(path)


def _write_shard(path: epath.Path, records: list[bytes], file_format: str) -> None:
    if file_format == "tfrecord":
        write_tfrecord(path, records)
        return
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()



# -- the demo dataset ----------------------------------------------------------------------------
DEMO_SPEC = SyntheticSpec(
    name="torch_rlds_demo", version="1.0.0", num_episodes=24, val_episodes=4, min_steps=20,
    max_steps=60, num_shards=4, state_dim=7, action_dim=7,
    cameras=(Camera("image", 64, 64), Camera("wrist_image", 64, 64)),
)


def demo_dataset() -> epath.Path:
    """The demo dataset's version directory (the ``demo`` config's data), written into the
    cache on first use."""
    return write_dataset_once(cache_root() / "demo", DEMO_SPEC, progress=True)

__all__ = [
    "Camera",
    "SyntheticSpec",
    "action_value",
    "depth_ids",
    "features_dict",
    "image_ids",
    "instruction",
    "state_value",
    "write_dataset",
    "write_dataset_once",
]

