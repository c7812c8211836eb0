"""Opening dataset files safely, and the bounded set of handles a process keeps open.

**Regular files only.** A shard or a cached index is opened with ``O_NONBLOCK`` (opening a
FIFO never waits for a writer) and checked with ``fstat`` on the descriptor it got, so a FIFO,
a device such as ``/dev/zero`` or a folder is refused whatever the path pointed to when it was
listed. Reads of files whose size says what they can hold are bounded by that size.

**Bounded handles.** However many shards, datasets of a mixture and reading threads there are, a
process keeps at most :func:`max_open_files` idle handles of each kind:

* local files: one descriptor per file, shared by every thread, read with ``os.pread`` (no
  seek, so threads never disturb each other), the least recently used closed first; a
  descriptor in use is closed only once its last reader is done;
* array_record readers (objects with a position or state of their own): a handle is lent to
  one thread at a time and returned to a small idle list afterwards.

**Remote files** hold no handle at all: every read is one request for exactly the bytes asked
(:func:`read_remote`, fsspec's ``cat_file(path, start, end)``), never a block of a buffered
file, and at most :func:`remote_requests` of them are in flight in a process at once, however
many threads ask (:func:`read_remote_many` reads a batch of ranges concurrently).

Handles never cross a fork: in a forked child the sets start empty and the parent's handles are
closed there (never used), so no C++ reader object of the parent is read through in a child;
so does the bound on remote requests and the threads that make them. All of it is thread-safe.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import mmap
import os
import stat
import threading
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any

MAX_OPEN_ENV = "TORCH_RLDS_MAX_OPEN_FILES"
DEFAULT_MAX_OPEN = 64
REMOTE_REQUESTS_ENV = "TORCH_RLDS_REMOTE_REQUESTS"
# Requests in flight per process: at 30 ms each, 512 of them index a bridge-sized dataset
# (60k records, one 12-byte header hop each) in about 6 s (256: about 9 s). Each is a
# coroutine waiting on the network (a thread where the filesystem is not asynchronous).
DEFAULT_REMOTE_REQUESTS = 512
# Where a filesystem is not asynchronous, each request in flight is a thread: fewer of them.
_MAX_REMOTE_THREADS = 128


class SpecialFileError(ValueError):
    """A path that names a FIFO, a device, a socket or a folder where a regular file belongs."""


def _positive_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be an integer >= 1 (got {raw!r})") from None
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1 (got {raw!r})")
    return value


def max_open_files() -> int:
    """Idle handles a process keeps per kind: ``$TORCH_RLDS_MAX_OPEN_FILES``, default 64."""
    return _positive_env(MAX_OPEN_ENV, DEFAULT_MAX_OPEN)


def remote_requests() -> int:
    """Remote requests a process keeps in flight at most: ``$TORCH_RLDS_REMOTE_REQUESTS``,
    default 512."""
    return _positive_env(REMOTE_REQUESTS_ENV, DEFAULT_REMOTE_REQUESTS)


def remote_threads() -> int:
    """Threads that make remote requests on a filesystem that is not asynchronous: at most
    :func:`remote_requests`, and 128."""
    return min(remote_requests(), _MAX_REMOTE_THREADS)


def kind_of(mode: int) -> str:
    """What a ``st_mode`` names, in words, for messages."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "folder"),
                       (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def check_regular(path: str, mode: int) -> None:
    """Raise :class:`SpecialFileError` unless ``mode`` is that of a regular file."""
    if not stat.S_ISREG(mode):
        raise SpecialFileError(f"{path}: a {kind_of(mode)}, not a regular file")


def open_regular(path: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at ``path`` and its ``fstat``.

    Never blocks on a FIFO; raises :class:`SpecialFileError` for anything but a regular file
    and ``OSError`` when it cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        check_regular(path, st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def map_regular(path: str, limit: int) -> memoryview | bytes | None:
    """The whole regular file at ``path``, if it holds between 1 and ``limit`` bytes, as a
    read-only memory map (else ``None``): its pages are the page cache's, shared by every
    process that maps the file, so a worker's private memory does not grow with it, and the
    map holds no file descriptor (a dataset of thousands of shards maps thousands of files).
    The map is released when the last view of it goes. Where the C library cannot map files
    the bytes are read instead. Raises :class:`SpecialFileError` and ``OSError`` as
    :func:`open_regular`. For files replaced by a rename, never rewritten in place (a map of
    a file truncated under it would fault)."""
    fd, st = open_regular(path)
    try:
        if not 0 < st.st_size <= limit:
            return None
        mapped = _map(fd, st.st_size)
        return mapped if mapped is not None else _read_fd(fd, limit)
    finally:
        os.close(fd)


def _map(fd: int, size: int) -> memoryview | None:
    """``size`` bytes of ``fd`` mapped read-only through the C library's ``mmap`` (Python's own
    ``mmap`` keeps a duplicate of the descriptor open for the life of the map), unmapped by a
    finalizer; ``None`` where that is not available."""
    libc = _libc()
    if libc is None:
        return None
    address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    buffer = (ctypes.c_char * size).from_address(address)
    weakref.finalize(buffer, libc.munmap, address, size)
    return memoryview(buffer).cast("B").toreadonly()


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def read_regular(path: str, limit: int) -> bytes | None:
    """The whole regular file at ``path`` if it holds at most ``limit`` bytes, else ``None``.

    Reads at most ``limit + 1`` bytes, so a sparse or endless file costs no more than a file of
    the right size. Raises :class:`SpecialFileError` and ``OSError`` as :func:`open_regular`.
    """
    fd, st = open_regular(path)
    try:
        return None if st.st_size > limit else _read_fd(fd, limit)
    finally:
        os.close(fd)


def _read_fd(fd: int, limit: int) -> bytes | None:
    """Every byte of ``fd`` from its start, or ``None`` past ``limit`` (reads ``limit + 1`` at
    most)."""
    parts, got = [], 0
    while got <= limit:
        part = os.pread(fd, limit + 1 - got, got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return None if got > limit else b"".join(parts)


def write_atomic(path: str | os.PathLike, data: bytes, *,
                 temporary: str | os.PathLike | None = None) -> None:
    """Write ``data`` to the local file ``path`` (its folder made if need be) so that readers
    see the whole file or the one before it, never a part, and so that the new file survives a
    power cut once this returns: a temporary file beside it, flushed to disk, renamed into
    place, and the folder flushed after the rename.

    ``temporary``: the temporary file's path, in ``path``'s folder (created with the process's
    umask); by default a fresh ``.tmp-*`` name, readable by all (what is cached holds nothing
    secret). Raises ``OSError`` where it cannot be written, and leaves no temporary file then.
    """
    import tempfile

    folder = os.path.dirname(os.fspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    if temporary is None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        mode: int | None = 0o644  # mkstemp makes it private
    else:
        tmp = os.fspath(temporary)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        mode = None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)  # atomic on a local disk
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_folder(folder)


def fsync_folder(folder: str) -> None:
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


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset`` (one ``pread`` call unless the kernel returns fewer), or
    fewer where the file ends."""
    data = os.pread(fd, size, offset)
    if len(data) == size or not data:
        return data
    parts, got = [data], len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class SharedDescriptors:
    """Descriptors of local regular files, one per file, shared by threads (see the module).

    ``acquire(path)`` returns a descriptor to ``pread`` from; ``release(path)`` must follow.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        # path -> [descriptor, readers now using it], least recently used first
        self._open: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._retired: dict[int, list[int]] = {}  # evicted while in use: closed when released

    def acquire(self, path: str) -> int:
        """A descriptor of ``path`` (opened if none is open); pass ``path`` to ``release``."""
        with self._lock:
            entry = self._open.get(path)
            if entry is not None:
                entry[1] += 1
                self._open.move_to_end(path)
                return entry[0]
        fd, _ = open_regular(path)  # outside the lock: an open may be slow (network disks)
        with self._lock:
            entry = self._open.get(path)
            if entry is None:
                self._open[path] = entry = [fd, 0]
                fd = -1
            entry[1] += 1
            self._open.move_to_end(path)
            self._evict()
        if fd >= 0:
            os.close(fd)  # another thread opened it meanwhile
        return entry[0]

    def release(self, path: str, fd: int) -> None:
        """Done reading ``fd`` (as ``acquire(path)`` returned it)."""
        with self._lock:
            entry = self._open.get(path)
            if entry is not None and entry[0] == fd:
                entry[1] -= 1
                self._evict()
                return
            retired = self._retired.get(fd)
            if retired is not None:
                retired[1] -= 1
                if retired[1] == 0:
                    del self._retired[fd]
                    os.close(fd)

    def _evict(self) -> None:
        while len(self._open) > self.capacity:
            path, entry = next(iter(self._open.items()))
            del self._open[path]
            if entry[1] == 0:
                os.close(entry[0])
            else:
                self._retired[entry[0]] = entry

    def open_count(self) -> int:
        """Descriptors held now (idle, in use, and evicted but still in use)."""
        with self._lock:
            return len(self._open) + len(self._retired)

    def discard(self) -> None:
        """Close every descriptor (a forked child's inherited ones: nothing uses them)."""
        for fd, _ in [*self._open.values(), *self._retired.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open.clear()
        self._retired.clear()


class HandlePool:
    """Handles that one thread uses at a time (array_record readers).

    ``acquire(key, opener)`` lends an idle handle of ``key`` or opens one with ``opener()``;
    ``release(key, handle)`` returns it. At most ``capacity`` idle handles stay open; each
    is closed with ``closer(handle)``.
    """

    def __init__(self, capacity: int, closer: Callable[[Any], None]) -> None:
        self.capacity = capacity
        self._closer = closer
        self._lock = threading.Lock()
        self._idle: collections.OrderedDict[tuple[Hashable, int], Any] = (
            collections.OrderedDict())
        self._lent = 0
        self._serial = 0

    def acquire(self, key: Hashable, opener: Callable[[], Any]) -> Any:
        """An idle handle of ``key``, or a new one from ``opener()``."""
        with self._lock:
            for slot in reversed(self._idle):
                if slot[0] == key:
                    self._lent += 1
                    return self._idle.pop(slot)
        handle = opener()
        with self._lock:
            self._lent += 1
        return handle

    def release(self, key: Hashable, handle: Any, *, broken: bool = False) -> None:
        """Give ``handle`` (of ``key``) back; the least recently used idle ones beyond the
        capacity are closed, and so is a ``broken`` one (a read through it failed)."""
        closing = [handle] if broken else []
        with self._lock:
            self._lent -= 1
            if not broken:
                self._serial += 1
                self._idle[(key, self._serial)] = handle
            while len(self._idle) > self.capacity:
                closing.append(self._idle.popitem(last=False)[1])
        for old in closing:
            self._close(old)

    def _close(self, handle: Any) -> None:
        with contextlib.suppress(Exception):  # a handle that fails to close is gone anyway
            self._closer(handle)

    def open_count(self) -> int:
        """Handles held now: idle and lent."""
        with self._lock:
            return len(self._idle) + self._lent

    def discard(self) -> None:
        """Drop every handle unread (a forked child's inherited ones; lent ones belong to
        threads that do not exist there)."""
        self._idle.clear()
        self._lent = 0


_descriptors: SharedDescriptors | None = None
_handles: HandlePool | None = None
_slots: threading.BoundedSemaphore | None = None
_remote_pool: concurrent.futures.ThreadPoolExecutor | None = None
_setup_lock = threading.Lock()


def descriptors() -> SharedDescriptors:
    """This process's shared descriptors of local files."""
    global _descriptors
    if _descriptors is None:
        with _setup_lock:
            if _descriptors is None:
                _descriptors = SharedDescriptors(max_open_files())
    return _descriptors


def handles() -> HandlePool:
    """This process's pool of one-thread-at-a-time handles."""
    global _handles
    if _handles is None:
        with _setup_lock:
            if _handles is None:
                _handles = HandlePool(max_open_files(), _close_handle)
    return _handles


def _close_handle(handle: Any) -> None:
    handle.close()


def _request_slots() -> threading.BoundedSemaphore:
    global _slots
    if _slots is None:
        with _setup_lock:
            if _slots is None:
                _slots = threading.BoundedSemaphore(remote_requests())
    return _slots


def read_remote(path: str, start: int, end: int) -> bytes:
    """Bytes ``start`` to ``end`` of the remote object ``path``: one request for exactly
    those bytes (fewer where the object ends first), waiting for a free slot among the
    process's :func:`remote_requests`."""
    from torch_rlds._paths import filesystem

    fs, inner = filesystem(path)
    with _request_slots():
        return bytes(fs.cat_file(inner, start=start, end=end))


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _remote_pool
    if _remote_pool is None:
        with _setup_lock:
            if _remote_pool is None:
                _remote_pool = concurrent.futures.ThreadPoolExecutor(
                    remote_threads(), thread_name_prefix="torch_rlds-remote")
    return _remote_pool


def read_remote_many(ranges: Sequence[tuple[str, int, int]]) -> list[memoryview]:
    """:func:`read_remote` of every ``(path, start, end)``, concurrently, in the order given
    (views of the bytes read, not copies).

    Ranges of one object that touch or overlap are read in one request. On an asynchronous
    filesystem (gcsfs, s3fs, the simulated bucket) the requests are coroutines on its event
    loop, at most :func:`remote_requests` in flight for the batch; on another, the threads of
    a pool of :func:`remote_threads`. The first error raised by a request is raised here.
    """
    from torch_rlds._paths import filesystem

    spans: list[tuple[str, int, int]] = []  # sorted, merged
    for path, start, end in sorted(set(ranges)):
        if spans and spans[-1][0] == path and start <= spans[-1][2]:
            spans[-1] = (path, spans[-1][1], max(spans[-1][2], end))
        else:
            spans.append((path, start, end))
    located = [(filesystem(path), start, end) for path, start, end in spans]
    if len(spans) == 1:
        parts = [read_remote(*spans[0])]
    elif all(is_async(fs) for (fs, _), _, _ in located):
        parts = run_concurrently(located[0][0][0], lambda slots: [
            _cat(fs, inner, start, end, slots) for (fs, inner), start, end in located])
    else:
        parts = [f.result() for f in _gather([_pool().submit(read_remote, *s) for s in spans])]
    out = []
    for path, start, end in ranges:
        # the merged span of this path that starts at or before ``start``
        k = bisect.bisect_right(spans, (path, start, float("inf"))) - 1
        first = spans[k][1]
        out.append(memoryview(parts[k])[start - first:end - first])
    return out


def is_async(fs: Any) -> bool:
    """Whether the fsspec filesystem ``fs`` makes its requests as coroutines (gcsfs, s3fs)."""
    return bool(getattr(fs, "async_impl", False)) and not getattr(fs, "asynchronous", False)


async def _cat(fs: Any, inner: str, start: int, end: int, slots: Any) -> bytes:
    async with slots:
        return bytes(await fs._cat_file(inner, start=start, end=end))


def run_concurrently(fs: Any, make: Callable[[Any], Sequence[Any]]) -> list[Any]:
    """Run the coroutines ``make(slots)`` returns on the event loop of the asynchronous
    filesystem ``fs`` and return their results in order; ``slots`` is an
    ``asyncio.Semaphore`` of :func:`remote_requests` that each holds around a request. The
    first error is raised once the others are cancelled."""
    import asyncio

    from fsspec.asyn import sync

    async def run() -> list[Any]:
        tasks = [asyncio.ensure_future(c) for c in make(asyncio.Semaphore(remote_requests()))]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    return sync(fs.loop, run)


def _gather(futures: list[concurrent.futures.Future]) -> list[concurrent.futures.Future]:
    concurrent.futures.wait(futures)
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error
    return futures


def _after_fork_in_child() -> None:
    global _descriptors, _handles, _setup_lock, _slots, _remote_pool
    _setup_lock = threading.Lock()
    # The parent's request threads do not exist here; its pool object is dropped unused.
    _slots = _remote_pool = None
    if _descriptors is not None:
        _descriptors.discard()
    # The parent's remote files and array_record readers are dropped unread: they may hold
    # state of the parent's threads, which do not exist here. (array_record readers are opened
    # without readahead or parallel reads, so dropping one waits for nothing.)
    if _handles is not None:
        _handles.discard()
    _descriptors = _handles = None


os.register_at_fork(after_in_child=_after_fork_in_child)
