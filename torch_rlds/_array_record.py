"""Reading array_record shards without making a process unsafe to fork.

Once a process has opened any ``ArrayRecordReader``, the array_record library is no longer safe
in children it forks: a forked DataLoader worker that then reads array_record from any thread
but its main one dies of SIGSEGV (or hangs), whether or not a reader object itself crossed the
fork. So the library is only ever loaded where nothing forks readers off it:

* in a DataLoader worker (a process torch started for reading), shards are read directly,
  through readers lent one thread at a time from the process's bounded pool
  (:func:`torch_rlds._files.handles`), opened without readahead or parallel reads;
* anywhere else (the training process, which forks the workers), every count and read goes to
  a helper process of this process's own, started on first use (``python -c``, importing only
  array_record), over a pipe. It keeps a bounded number of readers open and exits when its
  pipe closes, with the process that started it.

Neither a reader nor the helper's pipe crosses a fork: a forked child drops both unused.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
import sys
import threading
from typing import IO, Any, cast

from torch_rlds import _files

OPTIONS = "readahead_buffer_size:0,max_parallelism:0"

_COUNT, _READ = 0, 1
_REQUEST = struct.Struct("<BIQ")  # op, path length, record
_REPLY = struct.Struct("<BQ")  # 0 ok / 1 error, payload length

# The helper: reads requests from stdin, answers on stdout; imports nothing of torch_rlds.
_HELPER = r'''
import collections, struct, sys
from array_record.python import array_record_module as m
REQUEST, REPLY = struct.Struct("<BIQ"), struct.Struct("<BQ")
inp, out = sys.stdin.buffer, sys.stdout.buffer
capacity = int(sys.argv[1])
readers = collections.OrderedDict()
def reader(path):
    r = readers.pop(path, None)
    if r is None:
        r = m.ArrayRecordReader(path, sys.argv[2])
    readers[path] = r
    while len(readers) > capacity:
        readers.popitem(last=False)[1].close()
    return r
while True:
    head = inp.read(REQUEST.size)
    if len(head) < REQUEST.size:
        break
    op, size, record = REQUEST.unpack(head)
    path = inp.read(size).decode()
    try:
        r = reader(path)
        data = struct.pack("<Q", r.num_records()) if op == 0 else r.read([record])[0]
        status = 0
    except Exception as e:
        readers.pop(path, None)
        data, status = f"{type(e).__name__}: {e}".encode()[:2000], 1
    out.write(REPLY.pack(status, len(data)))
    out.write(data)
    out.flush()
'''


class ArrayRecordError(RuntimeError):
    """array_record could not open or read a shard (the library's own message)."""


class _Helper:
    """This process's helper process, one request at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def request(self, op: int, path: str, record: int = 0) -> bytes:
        encoded = os.fsencode(path)
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                proc = self._proc = subprocess.Popen(
                    [sys.executable, "-c", _HELPER, str(_files.max_open_files()), OPTIONS],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            # Popen with PIPE: both ends are there.
            stdin, stdout = cast(IO[bytes], proc.stdin), cast(IO[bytes], proc.stdout)
            try:
                stdin.write(_REQUEST.pack(op, len(encoded), record) + encoded)
                stdin.flush()
                head = stdout.read(_REPLY.size)
                status, size = _REPLY.unpack(head)
                data = stdout.read(size)
                if len(data) != size:
                    raise struct.error("short reply")
            except (OSError, struct.error):
                proc.kill()
                proc.wait()
                self._proc = None
                raise ArrayRecordError(f"{path}: the array_record reader process ended "
                                       f"(exit code {proc.returncode})") from None
        if status:
            raise ArrayRecordError(data.decode(errors="replace"))
        return data

    def drop(self) -> None:
        """In a forked child: close the inherited pipe ends without touching the helper."""
        proc, self._proc = self._proc, None
        self._lock = threading.Lock()
        if proc is not None:
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError, ValueError):
                    os.close(cast(IO[bytes], pipe).fileno())


_helper = _Helper()


def _direct() -> bool:
    """Whether this process reads array_record itself: inside a DataLoader worker."""
    import torch.utils.data

    return torch.utils.data.get_worker_info() is not None


def _open(path: str) -> Any:
    from array_record.python import array_record_module

    try:
        return array_record_module.ArrayRecordReader(path, OPTIONS)
    except RuntimeError as e:  # array_record reports unreadable files as RuntimeError
        raise ArrayRecordError(str(e)) from e


def num_records(path: str) -> int:
    """The number of records in the array_record shard at ``path``."""
    if not _direct():
        return struct.unpack("<Q", _helper.request(_COUNT, path))[0]
    reader = _open(path)
    try:
        count = reader.num_records()
        reader.close()
    except RuntimeError as e:
        raise ArrayRecordError(str(e)) from e
    return count


def read(path: str, record: int) -> bytes:
    """Record ``record`` of the array_record shard at ``path``."""
    if not _direct():
        return _helper.request(_READ, path, record)
    pool, key = _files.handles(), ("array_record", path)
    reader = pool.acquire(key, lambda: _open(path))
    try:
        data = reader.read([record])[0]
    except BaseException as e:
        pool.release(key, reader, broken=True)
        if isinstance(e, RuntimeError):  # array_record reports corruption as RuntimeError
            raise ArrayRecordError(str(e)) from e
        raise
    pool.release(key, reader)
    return data


os.register_at_fork(after_in_child=_helper.drop)
