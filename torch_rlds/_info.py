"""What a TFDS dataset directory says about itself: ``dataset_info.json`` and its shards."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from etils import epath

from torch_rlds._paths import to_path

_INFO_FILE = "dataset_info.json"
_FEATURES_FILE = "features.json"
_DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
FILE_FORMATS = ("tfrecord", "array_record")


class DatasetFormatError(ValueError):
    """A dataset directory that is missing files or describes itself inconsistently."""


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One split as ``dataset_info.json`` records it.

    Attributes:
      name: the split name (``train``).
      shard_lengths: episodes in each shard, in shard order.
      num_bytes: serialized size of all episodes, as TFDS records it (0 when unknown).
      shard_paths: the shard files, in shard order.
    """

    name: str
    shard_lengths: tuple[int, ...]
    num_bytes: int
    shard_paths: tuple[epath.Path, ...]

    @property
    def num_episodes(self) -> int:
        """Number of episodes in the split."""
        return sum(self.shard_lengths)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A dataset version directory and what its ``dataset_info.json`` declares.

    Attributes:
      path: the version directory (``.../bridge/0.1.0``).
      name: dataset name.
      version: dataset version string.
      file_format: ``tfrecord`` or ``array_record``.
      splits: split name -> :class:`SplitInfo`.
    """

    path: epath.Path
    name: str
    version: str
    file_format: str
    splits: dict[str, SplitInfo]

    @classmethod
    def load(cls, path: str | os.PathLike) -> DatasetInfo:
        """Read ``dataset_info.json`` of the version directory ``path``."""
        path = epath.Path(path)
        info_path = path / _INFO_FILE
        if not info_path.exists():
            raise FileNotFoundError(
                f"{info_path}: no {_INFO_FILE}; expected a TFDS dataset version directory "
                f"(.../name/version/ holding {_INFO_FILE}, {_FEATURES_FILE} and shards)"
            )
        if not (path / _FEATURES_FILE).exists():
            raise FileNotFoundError(
                f"{path / _FEATURES_FILE}: no {_FEATURES_FILE}; torch_rlds decodes episodes with "
                "the feature specification TFDS writes beside dataset_info.json"
            )
        try:
            raw = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{info_path}: not valid JSON ({e})") from e
        return cls._from_json(path, info_path, raw)

    @classmethod
    def _from_json(cls, path: epath.Path, info_path: epath.Path, raw: dict[str, Any]) -> DatasetInfo:
        from tensorflow_datasets.core import naming

        name = raw.get("name")
        if not name:
            raise DatasetFormatError(f"{info_path}: field 'name' is missing")
        version = str(raw.get("version", path.name))
        file_format = raw.get("fileFormat") or "tfrecord"
        if file_format not in FILE_FORMATS:
            raise DatasetFormatError(
                f"{info_path}: fileFormat is {file_format!r}; torch_rlds reads {FILE_FORMATS}"
            )
        splits = {}
        for entry in raw.get("splits", []):
            split = entry.get("name", "")
            lengths = entry.get("shardLengths")
            if lengths is None:
                raise DatasetFormatError(
                    f"{info_path}: split {split!r} has no 'shardLengths'; episodes cannot be "
                    "located without the number of episodes per shard"
                )
            lengths = tuple(int(n) for n in lengths)
            template = naming.ShardedFileTemplate(
                data_dir=path,
                template=entry.get("filepathTemplate") or _DEFAULT_TEMPLATE,
                dataset_name=name,
                split=split,
                filetype_suffix=file_format,
            )
            paths = tuple(epath.Path(p) for p in template.sharded_filepaths(len(lengths)))
            splits[split] = SplitInfo(split, lengths, int(entry.get("numBytes", 0)), paths)
        if not splits:
            raise DatasetFormatError(f"{info_path}: no splits recorded")
        return cls(path, name, version, file_format, splits)

    @property
    def features_path(self) -> epath.Path:
        """The ``features.json`` beside ``dataset_info.json``."""
        return self.path / _FEATURES_FILE


def resolve_dataset_dir(path_or_name: str | os.PathLike, data_dir: str | os.PathLike | None = None
                        ) -> epath.Path:
    """Find the version directory of a dataset.

    ``path_or_name`` is either a version directory (holding ``dataset_info.json``), a dataset
    directory holding version subdirectories (the newest is taken), or, with ``data_dir``, a
    TFDS name such as ``bridge`` or ``bridge:0.1.0`` looked up as ``data_dir/name/version``.
    """
    if data_dir is not None:
        name, _, version = str(path_or_name).partition(":")
        path = to_path(data_dir) / name
        if version:
            path = path / version
    else:
        path = to_path(path_or_name)
    if (path / _INFO_FILE).exists():
        return path
    if path.is_dir():
        versions = sorted(
            (p for p in path.iterdir() if (p / _INFO_FILE).exists()),
            key=lambda p: _version_key(p.name),
        )
        if versions:
            return versions[-1]
    raise FileNotFoundError(
        f"{path}: no {_INFO_FILE} there nor in a version subdirectory; expected a TFDS dataset "
        f"directory such as data_dir/name/1.0.0/. {_what_is_there(path)}"
    )


# How much of a folder the "what is there" hint looks at: enough for a TFDS data directory,
# little enough to stay quick on an object store.
_LIST_DIRS = 200
_LIST_SHOWN = 20


def _what_is_there(path: epath.Path) -> str:
    """The datasets and versions under the nearest existing folder at or above ``path``
    (``data_dir/bridge_dataset/1.0.0``...), for the message of a path that holds none."""
    folder = path
    try:
        while not folder.is_dir():
            if folder.parent == folder:
                return "No folder of that path exists."
            folder = folder.parent
        if folder != path and folder.parent == folder:
            return "No folder of that path exists."
        found = []
        children = sorted(p for _, p in zip(range(_LIST_DIRS), folder.iterdir()) if p.is_dir())
        for child in children:
            if (child / _INFO_FILE).exists():
                found.append(child)
                continue
            for _, version in zip(range(_LIST_DIRS), child.iterdir()):
                if (version / _INFO_FILE).exists():
                    found.append(version)
    except OSError as e:
        return f"(could not list {folder}: {e})"
    if not found:
        return f"{folder} holds no TFDS dataset, nor do its subfolders."
    names = sorted(os.fspath(p)[len(os.fspath(folder)):].lstrip("/") or "." for p in found)
    more = f" and {len(names) - _LIST_SHOWN} more" if len(names) > _LIST_SHOWN else ""
    return f"Datasets found under {folder}: {', '.join(names[:_LIST_SHOWN])}{more}."


def _version_key(version: str) -> tuple:
    parts = []
    for part in version.split("."):
        parts.append((0, int(part), "") if part.isdigit() else (1, 0, part))
    return tuple(parts)
