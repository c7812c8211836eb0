"""What a TFDS dataset directory says about itself: ``dataset_info.json`` and its shards."""

from __future__ import annotations

import dataclasses
import os
import string
from typing import Any

from etils import epath

from torch_rlds import _files, _paths
from torch_rlds._paths import ObjectInfo, to_path
from torch_rlds._state_file import loads_strict

_INFO_FILE = "dataset_info.json"
_FEATURES_FILE = "features.json"
_DEFAULT_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
FILE_FORMATS = ("tfrecord", "array_record")
# dataset_info.json and features.json of the largest published RLDS datasets are below 1 MiB.
MAX_METADATA_BYTES = 64 << 20
# The fields TFDS fills in a filepathTemplate; shard numbers have at least 5 digits.
_TEMPLATE_FIELDS = frozenset(
    ("DATASET", "SPLIT", "FILEFORMAT", "SHARD_INDEX", "NUM_SHARDS", "SHARD_X_OF_Y"))
_MIN_SHARD_DIGITS = 5
_MAX_TEMPLATE_CHARS = 1024
_MAX_COUNT = (1 << 63) - 1


class DatasetFormatError(ValueError):
    """A dataset directory that is missing files or describes itself inconsistently."""


def read_metadata_json(path: epath.Path) -> Any:
    """The JSON document in the metadata file ``path`` (``dataset_info.json``, ``features.json``),
    read strictly (see :func:`torch_rlds._state_file.loads_strict`) from a regular file of at
    most :data:`MAX_METADATA_BYTES`; anything else raises :class:`DatasetFormatError`."""
    try:
        if _paths.is_remote(path):
            data = _paths.read_object(path, MAX_METADATA_BYTES)  # one request
        else:
            data = _files.read_regular(os.fspath(path), MAX_METADATA_BYTES)
    except _files.SpecialFileError as e:
        raise DatasetFormatError(f"{e}; dataset metadata must be a regular file") from None
    if data is None:
        raise DatasetFormatError(f"{path}: larger than {MAX_METADATA_BYTES} bytes; not dataset "
                                 "metadata")
    try:
        return loads_strict(data)
    except ValueError as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e})") from None


def shard_names(template: str, dataset: str, split: str, file_format: str, num_shards: int,
                where: str) -> list[str]:
    """The shard file names, relative to the version directory, that a TFDS
    ``filepathTemplate`` gives (TFDS's own rule: shard numbers padded to at least 5 digits).

    Only TFDS's fields (``{DATASET}``, ``{SPLIT}``, ``{SHARD_X_OF_Y}``...) are filled in, with no
    format spec; each name must stay inside the directory (no ``..``, not absolute). Anything
    else raises :class:`DatasetFormatError` naming ``where``.
    """
    if len(template) > _MAX_TEMPLATE_CHARS:
        raise DatasetFormatError(f"{where}: longer than {_MAX_TEMPLATE_CHARS} characters")
    pieces = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise DatasetFormatError(f"{where}: not a TFDS file name template ({e})") from None
    for literal, field, spec, conversion in parsed:
        pieces.append((literal, field))
        if field is None:
            continue
        if field not in _TEMPLATE_FIELDS or spec or conversion:
            raise DatasetFormatError(
                f"{where}: field {{{_clip(field, 40)}}} is not one TFDS fills in (expected "
                f"plain {{...}} fields among {sorted(_TEMPLATE_FIELDS)})")
    digits = max(len(str(num_shards)), _MIN_SHARD_DIGITS)
    names = []
    for shard in range(num_shards):
        values = {"DATASET": dataset, "SPLIT": split, "FILEFORMAT": file_format,
                  "SHARD_INDEX": f"{shard:0{digits}d}", "NUM_SHARDS": f"{num_shards:0{digits}d}",
                  "SHARD_X_OF_Y": f"{shard:0{digits}d}-of-{num_shards:0{digits}d}"}
        name = "".join(literal + (values[field] if field else "") for literal, field in pieces)
        _check_inside(name, where)
        names.append(name)
    return names


def _check_inside(name: str, where: str) -> None:
    parts = name.split("/")
    if not name or name.startswith("/") or ".." in parts or "\0" in name or "://" in name:
        raise DatasetFormatError(
            f"{where}: shard path {_clip(name)} leaves the dataset directory (shards must be "
            "named relative to it, without '..')")


def _string(raw: dict, key: str, where: Any) -> str:
    value = raw.get(key)
    if not value:
        raise DatasetFormatError(f"{where}: field {key!r} is missing")
    if not isinstance(value, str):
        raise DatasetFormatError(f"{where}: field {key!r} must be a string (found "
                                 f"{_type_name(value)})")
    if "\0" in value:
        raise DatasetFormatError(f"{where}: field {key!r} holds a NUL character")
    return value


def _count(value: Any, where: str) -> int:
    """A non-negative int64 as TFDS writes one: a JSON number or a decimal string."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 19:
        number = int(value)
    else:
        raise DatasetFormatError(f"{where}: expected a count (a non-negative integer), found "
                                 f"{_clip(value)}")
    if not 0 <= number <= _MAX_COUNT:
        raise DatasetFormatError(f"{where}: {number} is not a count between 0 and 2**63-1")
    return number


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


def _clip(value: Any, limit: int = 80) -> str:
    """``repr`` of a value from a metadata file, shortened for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


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
      objects: for a remote directory, what one listing of it said of each object in it
        (name -> :class:`~torch_rlds._paths.ObjectInfo`: size, generation); ``None`` for a
        local one.
    """

    path: epath.Path
    name: str
    version: str
    file_format: str
    splits: dict[str, SplitInfo]
    objects: dict[str, ObjectInfo] | None = dataclasses.field(default=None, repr=False,
                                                              compare=False)

    @classmethod
    def load(cls, path: str | os.PathLike, *,
             objects: dict[str, ObjectInfo] | None = None) -> DatasetInfo:
        """Read ``dataset_info.json`` of the version directory ``path``.

        The file is untrusted: anything but a JSON object of the fields TFDS writes, of their
        types, raises :class:`DatasetFormatError` naming the file and the field; shard paths
        must stay inside ``path``. A remote directory is listed once (unless ``objects`` is
        that listing) and its ``dataset_info.json`` read in one request: two requests.
        """
        folder = epath.Path(path)
        info_path = folder / _INFO_FILE
        if _paths.is_remote(folder) and objects is None:
            try:
                objects = _paths.list_folder(folder)
            except FileNotFoundError:
                objects = {}

        def exists(name: str) -> bool:
            if objects is not None:
                return name in objects and objects[name].is_file
            return (folder / name).exists()

        if not exists(_INFO_FILE):
            raise FileNotFoundError(
                f"{info_path}: no {_INFO_FILE}; expected a TFDS dataset version directory "
                f"(.../name/version/ holding {_INFO_FILE}, {_FEATURES_FILE} and shards)"
            )
        if not exists(_FEATURES_FILE):
            raise FileNotFoundError(
                f"{folder / _FEATURES_FILE}: no {_FEATURES_FILE}; torch_rlds decodes episodes "
                "with the feature specification TFDS writes beside dataset_info.json"
            )
        info = cls._from_json(folder, info_path, read_metadata_json(info_path))
        return dataclasses.replace(info, objects=objects)

    @classmethod
    def _from_json(cls, path: epath.Path, info_path: epath.Path, raw: Any) -> DatasetInfo:
        if not isinstance(raw, dict):
            raise DatasetFormatError(f"{info_path}: expected a JSON object, found "
                                     f"{_type_name(raw)}")
        name = _string(raw, "name", info_path)
        version = raw.get("version", path.name)
        if isinstance(version, bool) or not isinstance(version, (str, int)):
            raise DatasetFormatError(f"{info_path}: field 'version' must be a string (found "
                                     f"{_type_name(version)})")
        version = str(version)
        file_format = raw.get("fileFormat") or "tfrecord"
        if file_format not in FILE_FORMATS:
            raise DatasetFormatError(
                f"{info_path}: fileFormat is {_clip(file_format)}; torch_rlds reads "
                f"{FILE_FORMATS}"
            )
        entries = raw.get("splits", [])
        if not isinstance(entries, list):
            raise DatasetFormatError(f"{info_path}: field 'splits' must be a list (found "
                                     f"{_type_name(entries)})")
        splits = {}
        for k, entry in enumerate(entries):
            where = f"{info_path}: splits[{k}]"
            if not isinstance(entry, dict):
                raise DatasetFormatError(f"{where} must be an object (found {_type_name(entry)})")
            split = _string(entry, "name", where)
            if split in splits:
                raise DatasetFormatError(f"{where}: split {_clip(split)} is listed twice")
            lengths = entry.get("shardLengths")
            if lengths is None:
                raise DatasetFormatError(
                    f"{where}: split {_clip(split)} has no 'shardLengths'; episodes cannot be "
                    "located without the number of episodes per shard"
                )
            if not isinstance(lengths, list):
                raise DatasetFormatError(f"{where}: 'shardLengths' must be a list (found "
                                         f"{_type_name(lengths)})")
            lengths = tuple(_count(n, f"{where}: shardLengths[{i}]")
                            for i, n in enumerate(lengths))
            num_bytes = _count(entry.get("numBytes", 0), f"{where}: numBytes")
            template = entry.get("filepathTemplate") or _DEFAULT_TEMPLATE
            if not isinstance(template, str):
                raise DatasetFormatError(f"{where}: 'filepathTemplate' must be a string (found "
                                         f"{_type_name(template)})")
            relative = shard_names(template, name, split, file_format, len(lengths),
                                   f"{where}: filepathTemplate")
            paths = tuple(path / r for r in relative)
            splits[split] = SplitInfo(split, lengths, num_bytes, paths)
        if not splits:
            raise DatasetFormatError(f"{info_path}: no splits recorded")
        return cls(path, name, version, file_format, splits)

    @property
    def features_path(self) -> epath.Path:
        """The ``features.json`` beside ``dataset_info.json``."""
        return self.path / _FEATURES_FILE


def load_dataset_info(path_or_name: str | os.PathLike,
                      data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """:meth:`DatasetInfo.load` of the directory :func:`resolve_dataset_dir` finds; a remote
    version directory is listed once for both (one listing and one read in all)."""
    path = _named_path(path_or_name, data_dir)
    if _paths.is_remote(path):
        try:
            objects = _paths.list_folder(path)
        except FileNotFoundError:
            objects = {}
        if _INFO_FILE in objects:
            return DatasetInfo.load(path, objects=objects)
    return DatasetInfo.load(resolve_dataset_dir(path_or_name, data_dir))


def _named_path(path_or_name: str | os.PathLike, data_dir: str | os.PathLike | None
                ) -> epath.Path:
    if data_dir is None:
        return to_path(path_or_name)
    name, _, version = str(path_or_name).partition(":")
    path = to_path(data_dir) / name
    return path / version if version else path


def resolve_dataset_dir(path_or_name: str | os.PathLike, data_dir: str | os.PathLike | None = None
                        ) -> epath.Path:
    """Find the version directory of a dataset.

    ``path_or_name`` is either a version directory (holding ``dataset_info.json``), a dataset
    directory holding version subdirectories (the newest is taken), or, with ``data_dir``, a
    TFDS name such as ``bridge`` or ``bridge:0.1.0`` looked up as ``data_dir/name/version``.
    """
    path = _named_path(path_or_name, data_dir)
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
