"""Paths to datasets, states and statistics: local, or on an object store through an extra.

``etils.epath`` reads ``gs://`` and ``s3://`` through fsspec (gcsfs, s3fs), without TensorFlow.
Those filesystems are optional installs; :func:`to_path` names the torch_rlds extra that
brings the one a path needs before anything tries to open it. A filesystem registered with
fsspec for a scheme (the simulated bucket of :mod:`torch_rlds._simbucket`, a user's own) serves
it without that extra.

What torch_rlds asks of an object store goes through fsspec directly, one request at a time
that it chooses: :func:`list_folder` (the names, sizes and generations of a folder's objects,
one listing for all of them) and :func:`read_object` (a whole small object, one request).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from etils import epath

# scheme -> (the module fsspec needs for it, the extra of torch-rlds that installs it)
REMOTE_SCHEMES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}
# What an object store calls the version of an object's contents, in the order trusted: each
# changes whenever the object is rewritten (a GCS generation, an S3 or Azure ETag).
_GENERATION_FIELDS = ("generation", "etag", "ETag", "VersionId", "version_id")
_MTIME_FIELDS = ("mtime", "updated", "LastModified", "last_modified")


def scheme(path: str | os.PathLike) -> str | None:
    """The ``gs`` of ``gs://bucket/x``; ``None`` for a local path."""
    text = os.fspath(path)
    name, sep, _ = text.partition("://")
    return name if sep and name.isidentifier() else None


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store (it has a scheme)."""
    return scheme(path) is not None


def _served(kind: str) -> bool:
    """Whether fsspec has a filesystem for ``kind`` loaded (registered) already."""
    import fsspec

    if kind in fsspec.registry:
        return True
    from torch_rlds import _simbucket

    return _simbucket.install_from_environment() and kind in fsspec.registry


def to_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``; raises ``ImportError`` naming the extra to install when
    its scheme needs a filesystem package that is missing (``pip install 'torch-rlds[gcs]'``
    for ``gs://``) and no filesystem is registered with fsspec for it. Schemes other than
    those of :data:`REMOTE_SCHEMES` are left to fsspec."""
    _require_filesystem(path)
    return epath.Path(path)


def _require_filesystem(path: str | os.PathLike) -> None:
    kind = scheme(path)
    if kind in REMOTE_SCHEMES and not _served(kind):
        module, extra = REMOTE_SCHEMES[kind]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"{os.fspath(path)}: {kind}:// paths need {module}, which is not "
                              f"installed: pip install 'torch-rlds[{extra}]'")


# path -> (filesystem, the name it knows the object by, the implementation fsspec had
# registered for its scheme): resolving a URL costs more than a request's own work, and every
# header hop of an index build asks for it. An entry whose scheme has another implementation
# registered since (a simulated bucket installed or removed) is resolved again; the cache is
# dropped in a forked child (an async filesystem's event loop does not cross a fork).
_filesystems: dict[str, tuple[Any, str, Any]] = {}
_MAX_CACHED = 1 << 16


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
    """The fsspec filesystem of the remote ``path`` and the name it knows the object by."""
    import fsspec.core
    from fsspec.registry import registry

    text = os.fspath(path)
    kind = scheme(text)
    found = _filesystems.get(text)
    if found is not None and registry.get(kind) is found[2]:
        return found[0], found[1]
    _require_filesystem(text)
    fs, name = fsspec.core.url_to_fs(text)
    if len(_filesystems) >= _MAX_CACHED:
        _filesystems.clear()
    _filesystems[text] = (fs, name, registry.get(kind))
    return fs, name


def forget_filesystems() -> None:
    """Resolve paths to filesystems anew (after a filesystem is registered or removed)."""
    _filesystems.clear()


os.register_at_fork(after_in_child=forget_filesystems)


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """What one listing says of an object.

    Attributes:
      size: bytes.
      generation: the store's version of its contents (a GCS generation, an ETag), or ``None``
        where the store gives none (then ``mtime`` is all there is).
      mtime: modification time as the store reports it, as text (``""`` when unknown).
      is_file: ``False`` for a folder (a prefix).
    """

    size: int
    generation: str | None
    mtime: str
    is_file: bool


def object_info(entry: dict[str, Any]) -> ObjectInfo:
    """:class:`ObjectInfo` of one fsspec ``info``/``ls`` entry."""
    generation = next((str(entry[k]) for k in _GENERATION_FIELDS if entry.get(k)), None)
    mtime = next((str(entry[k]) for k in _MTIME_FIELDS if entry.get(k) is not None), "")
    return ObjectInfo(int(entry.get("size") or 0), generation, mtime,
                      entry.get("type", "file") != "directory")


def list_folder(folder: str | os.PathLike) -> dict[str, ObjectInfo]:
    """Name -> :class:`ObjectInfo` of everything directly in the remote ``folder``: one
    listing (one request per page of the store). Raises ``FileNotFoundError`` when the folder
    holds nothing."""
    fs, inner = filesystem(folder)
    prefix = inner.rstrip("/") + "/"
    try:
        # refresh: gcsfs and s3fs keep listings for the life of a process, and a shard
        # rewritten since must show its new generation
        entries = fs.ls(inner, detail=True, refresh=True)
    except TypeError:
        entries = fs.ls(inner, detail=True)
    out = {}
    for entry in entries:
        name = str(entry.get("name", "")).rstrip("/")
        if name.startswith(prefix):
            name = name[len(prefix):]
        if name and "/" not in name:
            out[name] = object_info(entry)
    return out


def stat_object(path: str | os.PathLike) -> ObjectInfo:
    """:class:`ObjectInfo` of the remote object ``path`` (one request)."""
    fs, inner = filesystem(path)
    return object_info(fs.info(inner))


def read_object(path: str | os.PathLike, limit: int) -> bytes | None:
    """The whole remote object ``path`` in one request, or ``None`` when it holds more than
    ``limit`` bytes (at most ``limit + 1`` are moved). Raises ``FileNotFoundError``."""
    fs, inner = filesystem(path)
    data = fs.cat_file(inner, start=0, end=limit + 1)
    return None if len(data) > limit else bytes(data)


def write_object(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` as the remote object ``path`` in one upload (an object store shows the
    whole object or the one before, never a part)."""
    fs, inner = filesystem(path)
    fs.pipe_file(inner, bytes(data))
