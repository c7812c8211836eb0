"""State files: JSON written atomically (locally or on an object store) and read back
strictly."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
from typing import Any

from etils import epath

from torch_rlds._paths import to_path

_TMP_MARK = ".tmp-"
# A state is a few hundred bytes per worker; a file far larger is not one, and is not read.
MAX_STATE_BYTES = 16 << 20


def write_json_atomic(path: epath.Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename.

    Removes the temporary files that earlier writes to ``path`` left behind when they were
    killed. On a local disk the file is flushed to disk before the rename and the folder after
    it, so the new state survives a power cut once this returns; an object store (``gs://``)
    makes the whole object visible at once.
    """
    data = json.dumps(obj, sort_keys=True, allow_nan=False)
    path = to_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{_TMP_MARK}"
    for stale in path.parent.glob(glob.escape(prefix) + "*"):
        with contextlib.suppress(FileNotFoundError):  # another save removed it first
            stale.unlink()
    tmp = path.parent / f"{prefix}{uuid.uuid4().hex}"
    if "://" in os.fspath(tmp):  # object stores have no fsync; the rename is a copy there
        tmp.write_text(data)
        tmp.replace(path)
        return
    try:
        with open(os.fspath(tmp), "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(os.fspath(tmp), os.fspath(path))  # atomic on a local disk
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(os.fspath(tmp))
        raise
    _fsync_folder(os.fspath(path.parent))


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse to fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON state file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
    anything that is not one whole JSON document: truncated, not UTF-8, NaN or Infinity,
    duplicate keys, nesting too deep, or larger than :data:`MAX_STATE_BYTES`.
    """
    path = to_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no state file")
    with path.open("rb") as f:
        data = f.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"{path}: not a JSON state (larger than {MAX_STATE_BYTES} bytes)")
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys,
                          parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{path}: not a JSON state ({type(e).__name__}: {e})") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate!r}")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a state holds")
