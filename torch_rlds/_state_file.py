"""State files: JSON written atomically (locally or on an object store) and read back
strictly."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import socket
import time
import uuid
from typing import Any

from etils import epath

from torch_rlds._files import write_atomic
from torch_rlds._paths import to_path

_TMP_MARK = ".tmp-"
# A state is a few hundred bytes per worker; a file far larger is not one, and is not read.
MAX_STATE_BYTES = 16 << 20
# Temporary files are named ``.<name>.tmp-<pid>-<hex>@<host>``: a save removes those of dead
# processes of its own host, and any older than this, whoever wrote them (a save takes
# milliseconds; a temporary this old was left by a process of another host that died).
STALE_TMP_AGE_S = 3600.0
_OWNED_TMP = re.compile(r"(\d+)-[0-9a-f]{32}@(.+)")


def write_json_atomic(path: epath.Path, obj: Any, *, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename.

    Several processes may save to one ``path`` at once: each writes a temporary file of its
    own, and the file at ``path`` is always one whole state, the last one renamed. Removes only
    the temporary files that nobody writes any more: those of processes of this host that are
    gone (a killed save), those older than :data:`STALE_TMP_AGE_S`, and those named as earlier
    versions named them. On a local disk the file is flushed to disk before the rename and the
    folder after it, so the new state survives a power cut once this returns; an object store
    (``gs://``) makes the whole object visible at once.
    """
    data = json.dumps(obj, sort_keys=True, allow_nan=False, indent=indent)
    path = to_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{_TMP_MARK}"
    host = _host()
    for stale in path.parent.glob(glob.escape(prefix) + "*"):
        if _abandoned(stale, stale.name[len(prefix):], host):
            with contextlib.suppress(FileNotFoundError):  # another save removed it first
                stale.unlink()
    tmp = path.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex}@{host}"
    if "://" in os.fspath(tmp):  # object stores have no fsync; the rename is a copy there
        tmp.write_text(data)
        tmp.replace(path)
        return
    write_atomic(os.fspath(path), data.encode(), temporary=os.fspath(tmp))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def _abandoned(tmp: epath.Path, suffix: str, host: str) -> bool:
    """Whether the temporary file ``tmp`` (``suffix`` after the mark) is no save's own."""
    owned = _OWNED_TMP.fullmatch(suffix)
    if owned is None:
        return True  # named by an earlier version: it renames what it writes at once
    pid, where = int(owned.group(1)), owned.group(2)
    if where == host and pid != os.getpid() and not _alive(pid):
        return True
    try:
        age = time.time() - tmp.stat().mtime
    except (FileNotFoundError, OSError):
        return False
    return age > STALE_TMP_AGE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # another user's process
    return True




def read_json(path: str | os.PathLike, what: str = "state") -> Any:
    """Read a JSON file torch_rlds wrote (a state, unless ``what`` says otherwise).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for
    anything that is not one whole JSON document (see :func:`loads_strict`) or is larger than
    :data:`MAX_STATE_BYTES`.
    """
    file = to_path(path)
    if not file.exists():
        raise FileNotFoundError(f"{file}: no {what} file")
    with file.open("rb") as f:
        data = f.read(MAX_STATE_BYTES + 1)
    if len(data) > MAX_STATE_BYTES:
        raise ValueError(f"{file}: not a JSON {what} (larger than {MAX_STATE_BYTES} bytes)")
    try:
        return loads_strict(data)
    except ValueError as e:
        raise ValueError(f"{file}: not a JSON {what} ({e})") from None


def loads_strict(data: bytes | bytearray | memoryview) -> Any:
    """The one JSON document in ``data``, read strictly: every JSON file and checkpoint entry
    torch_rlds reads goes through here.

    Raises ``ValueError`` (its message names the problem, never echoes the input) for
    anything else: truncated or trailing data, not UTF-8, NaN or Infinity, duplicate keys, or
    nesting deeper than the interpreter's recursion limit.
    """
    try:
        return json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_unique_keys,
                          parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise ValueError(f"{type(e).__name__}: {_short(e)}") from None


def _short(error: BaseException) -> str:
    # A UnicodeDecodeError's text quotes the undecodable bytes; its position is enough.
    if isinstance(error, UnicodeDecodeError):
        return f"byte {error.start} is not UTF-8"
    return str(error)[:200]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {duplicate[:80]!r}")
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
