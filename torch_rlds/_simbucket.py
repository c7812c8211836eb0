"""A simulated object store: local folders served as ``gs://`` buckets, with latency and counts.

Every remote behaviour of torch_rlds (start-up requests, bytes moved, read-ahead, the published
index) is tested and benchmarked through this filesystem, without a network. It is an fsspec
filesystem registered for the ``gs`` and ``gcs`` protocols in the process that installs it (so
``etils.epath`` and :mod:`torch_rlds._paths` route ``gs://`` paths to it, gcsfs installed or
not), and it behaves as gcsfs does where torch_rlds can tell:

* ``ls(folder, detail=True)`` is one **list** request per page of :attr:`SimulatedBucket.page_size`
  objects (GCS pages 1000); entries carry ``size``, ``generation`` (changes whenever the file
  is rewritten) and ``mtime``;
* ``info`` (and so ``exists``, ``isdir``) is one **info** request;
* ``cat_file(path, start, end)`` is one **read** request of exactly those bytes;
* ``open(path, "rb")`` costs an info request and then one read per block that its cache
  fetches: by default the readahead cache with 5 MiB blocks of older gcsfs releases, which is
  what a reader that seeks from header to header pays on a real bucket;
* writes (``open(path, "wb")``, ``pipe_file``) are one **write** request each, visible whole or
  not at all, as an object upload is.

Each request sleeps :attr:`SimulatedBucket.latency_s` first (outside every lock, so concurrent
requests overlap as they do on a real store). Counts are per process: a forked DataLoader
worker counts its own requests.

Use :func:`torch_rlds.testing.simulated_bucket` (a context manager). A process started later
(a spawned worker, a second "host") finds the buckets of :data:`ENV` in its environment, which
``install`` sets, the first time it resolves a ``gs://`` path.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import dataclasses
import json
import math
import os
import tempfile
import threading
import time
from typing import Any

import fsspec
from fsspec.asyn import AsyncFileSystem
from fsspec.spec import AbstractBufferedFile

ENV = "TORCH_RLDS_SIMULATED_BUCKETS"
PROTOCOLS = ("gs", "gcs")
DEFAULT_PAGE_SIZE = 1000
# What older gcsfs releases read per fetch of a file opened for reading (readahead cache).
GCSFS_BLOCK_SIZE = 5 * 2**20

_buckets: dict[str, SimulatedBucket] = {}
_lock = threading.Lock()
_saved: dict[str, Any] = {}  # protocol -> the implementation registered before ours


@dataclasses.dataclass
class RequestCounts:
    """Requests a simulated bucket answered, by kind, and the bytes they moved.

    Attributes:
      list, info, read, write, delete: requests of each kind.
      bytes_read, bytes_written: payload bytes moved by read and write requests.
      peak_in_flight: the most requests that were waiting on their latency at once.
      reads: ``(object, start, end)`` of every read request, in the order they were made.
    """

    list: int = 0
    info: int = 0
    read: int = 0
    write: int = 0
    delete: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    peak_in_flight: int = 0
    reads: builtins.list[tuple[str, int, int]] = dataclasses.field(
        default_factory=builtins.list)

    @property
    def requests(self) -> int:
        """All requests of every kind."""
        return self.list + self.info + self.read + self.write + self.delete

    def snapshot(self) -> dict[str, int]:
        """The counters (not the read log) as a dict."""
        return {k: getattr(self, k) for k in ("list", "info", "read", "write", "delete",
                                              "bytes_read", "bytes_written", "peak_in_flight",
                                              "requests")}


class SimulatedBucket:
    """The folder ``root`` served as ``gs://name/``, once installed.

    Args:
      root: the local folder holding the bucket's objects (``gs://name/a/b`` is
        ``root/a/b``).
      name: the bucket name.
      latency_s: seconds every request waits before it is answered.
      page_size: objects per page of a listing (one list request per page).

    Thread-safe: counts are kept under a lock; latency is spent outside it.
    """

    def __init__(self, root: str | os.PathLike, name: str = "torch-rlds-sim", *,
                 latency_s: float = 0.0, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if not name or "/" in name or ":" in name:
            raise ValueError(f"bucket name must be non-empty, without '/' or ':' (got {name!r})")
        if not latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0 (got {latency_s!r})")
        if type(page_size) is not int or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1 (got {page_size!r})")
        self.root = os.path.abspath(os.fspath(root))
        self.name = name
        self.latency_s = float(latency_s)
        self.page_size = page_size
        self.counts = RequestCounts()
        self._lock = threading.Lock()
        self._in_flight = 0

    # -- set-up ---------------------------------------------------------------------------------
    def url(self, *parts: str | os.PathLike) -> str:
        """``gs://name/part/...``; a part may be a local path inside :attr:`root`."""
        relative = []
        for part in parts:
            text = os.fspath(part)
            if os.path.isabs(text):
                text = os.path.relpath(text, self.root)
                if text == os.curdir:
                    continue
                if text.startswith(os.pardir):
                    raise ValueError(f"{os.fspath(part)} is not inside the bucket's folder "
                                     f"{self.root}")
            relative.append(text.strip("/"))
        return "/".join([f"gs://{self.name}", *[r for r in relative if r]])

    def install(self) -> SimulatedBucket:
        """Serve this bucket in this process (and, through :data:`ENV`, in processes it starts
        later); returns ``self``."""
        with _lock:
            _buckets[self.name] = self
            _register()
            _export()
        return self

    def uninstall(self) -> None:
        """Stop serving this bucket; the last one out restores the ``gs`` filesystem that was
        registered before."""
        with _lock:
            if _buckets.get(self.name) is self:
                del _buckets[self.name]
            if not _buckets:
                _unregister()
            _export()

    def __enter__(self) -> SimulatedBucket:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    def reset_counts(self) -> RequestCounts:
        """Start counting from zero; returns the counts up to now."""
        with self._lock:
            old, self.counts = self.counts, RequestCounts()
        return old

    # -- requests -------------------------------------------------------------------------------
    def _begin(self, kind: str, pages: int) -> None:
        with self._lock:
            setattr(self.counts, kind, getattr(self.counts, kind) + pages)
            self._in_flight += 1
            self.counts.peak_in_flight = max(self.counts.peak_in_flight, self._in_flight)

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _request(self, kind: str, pages: int = 1) -> None:
        """Count a request of ``kind`` (``pages`` of a listing) and sleep its latency."""
        self._begin(kind, pages)
        try:
            if self.latency_s:
                time.sleep(self.latency_s * pages)
        finally:
            self._end()

    async def _wait(self, kind: str, pages: int = 1) -> None:
        """``_request`` on the event loop: the latency is awaited, not slept."""
        import asyncio

        self._begin(kind, pages)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s * pages)
        finally:
            self._end()

    def _moved(self, kind: str, key: str, start: int, end: int) -> None:
        with self._lock:
            if kind == "read":
                self.counts.bytes_read += end - start
                self.counts.reads.append((key, start, end))
            else:
                self.counts.bytes_written += end - start

    def local(self, key: str) -> str:
        """The local path of object ``key`` (``a/b`` of ``gs://name/a/b``)."""
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise FileNotFoundError(f"gs://{self.name}/{key}: no such object")
        return os.path.join(self.root, *parts)

    def describe(self, key: str) -> dict[str, Any]:
        """What a listing says of ``key``, as gcsfs says it (no request is counted)."""
        local = self.local(key)
        st = os.stat(local)
        name = f"{self.name}/{key}".rstrip("/")
        if os.path.isdir(local):
            return {"name": name, "size": 0, "type": "directory"}
        return {"name": name, "size": st.st_size, "type": "file",
                "generation": f"{st.st_mtime_ns}{st.st_ino}",
                "mtime": st.st_mtime, "storageClass": "STANDARD"}


def _register() -> None:
    for protocol in PROTOCOLS:
        if protocol not in _saved:
            _saved[protocol] = fsspec.registry.get(protocol)
        fsspec.register_implementation(protocol, SimulatedFileSystem, clobber=True)
    _forget_cached_filesystems()


def _unregister() -> None:
    import importlib

    # fsspec's package exports the registry mapping under the module's own name
    registry_module = importlib.import_module("fsspec.registry")
    for protocol, previous in _saved.items():
        if previous is None:
            registry_module._registry.pop(protocol, None)
        else:
            fsspec.register_implementation(protocol, previous, clobber=True)
    _saved.clear()
    _forget_cached_filesystems()


def _forget_cached_filesystems() -> None:
    """etils.epath keeps the filesystem it found for ``gs://``; make it ask fsspec again
    (torch_rlds's own cache sees the registration change by itself)."""
    with contextlib.suppress(ImportError, AttributeError):
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()


def _export() -> None:
    if _buckets:
        os.environ[ENV] = json.dumps({b.name: {"root": b.root, "latency_s": b.latency_s,
                                               "page_size": b.page_size}
                                      for b in _buckets.values()})
    else:
        os.environ.pop(ENV, None)


def install_from_environment() -> bool:
    """Install the buckets :data:`ENV` describes, if any and not installed yet (a process
    started by one that installed them); ``True`` when one was installed."""
    raw = os.environ.get(ENV)
    if not raw:
        return False
    try:
        described = json.loads(raw)
        buckets = [SimulatedBucket(spec["root"], name, latency_s=spec["latency_s"],
                                   page_size=spec["page_size"])
                   for name, spec in described.items()]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{ENV} does not describe simulated buckets ({e})") from None
    installed = False
    for bucket in buckets:
        if bucket.name not in _buckets:
            bucket.install()
            installed = True
    return installed


def _split(path: str) -> tuple[SimulatedBucket, str]:
    text = SimulatedFileSystem._strip_protocol(path)
    name, _, key = text.partition("/")
    bucket = _buckets.get(name)
    if bucket is None:
        raise FileNotFoundError(f"gs://{text}: no simulated bucket {name!r} is installed "
                                f"(installed: {sorted(_buckets)})")
    return bucket, key


class SimulatedFileSystem(AsyncFileSystem):
    """The fsspec face of the installed :class:`SimulatedBucket` objects (see the module).

    Asynchronous, as gcsfs and s3fs are: its requests are coroutines on fsspec's event loop,
    so many of them wait on their latency at once without a thread each; the usual
    synchronous methods (``ls``, ``info``, ``cat_file``...) run them there.
    """

    protocol = PROTOCOLS
    root_marker = ""
    cachable = False

    def __init__(self, *args: Any, asynchronous: bool = False, loop: Any = None,
                 **storage_options: Any) -> None:
        # gcsfs options (finalize_on_close, token...) mean nothing here.
        super().__init__(asynchronous=asynchronous, loop=loop)

    async def _ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        bucket, key = _split(path)
        local = bucket.local(key)
        try:
            names = sorted(os.listdir(local))
        except (FileNotFoundError, NotADirectoryError):
            await bucket._wait("list")
            if os.path.isfile(local):
                entry = bucket.describe(key)
                return [entry] if detail else [entry["name"]]
            raise FileNotFoundError(f"gs://{bucket.name}/{key}: no such object or prefix"
                                    ) from None
        await bucket._wait("list", max(1, math.ceil(len(names) / bucket.page_size)))
        prefix = f"{key.strip('/')}/" if key.strip("/") else ""
        entries = []
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # removed while listing
                entries.append(bucket.describe(prefix + name))
        return entries if detail else [e["name"] for e in entries]

    async def _info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        bucket, key = _split(path)
        await bucket._wait("info")
        try:
            return bucket.describe(key)
        except FileNotFoundError:
            raise FileNotFoundError(f"gs://{bucket.name}/{key}: no such object") from None

    async def _cat_file(self, path: str, start: int | None = None, end: int | None = None,
                        **kwargs: Any) -> bytes:
        bucket, key = _split(path)
        await bucket._wait("read")
        return _read(bucket, key, start, end)

    async def _pipe_file(self, path: str, value: bytes, mode: str = "overwrite",
                         **kwargs: Any) -> None:
        bucket, key = _split(path)
        upload = _Upload(bucket, key)
        try:
            upload.write(value)
        except BaseException:
            upload.discard()
            raise
        await bucket._wait("write")
        upload.commit()

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        bucket, key = _split(path)
        await bucket._wait("delete")
        local = bucket.local(key)
        if os.path.isdir(local):
            os.rmdir(local)
        else:
            os.unlink(local)

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        # An object store has no folders; the local folder is made for the objects to come.
        bucket, key = _split(path)
        os.makedirs(bucket.local(key), exist_ok=True)

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        await self._mkdir(path)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None,
              autocommit: bool = True, cache_options: Any = None, **kwargs: Any) -> Any:
        bucket, key = _split(path)
        if "r" in mode:
            kwargs.setdefault("cache_type", "readahead")
            return _ReadFile(self, path, mode, block_size=block_size or GCSFS_BLOCK_SIZE,
                             cache_options=cache_options, **kwargs)
        if mode.strip("b") not in ("w", "x"):
            raise ValueError(f"gs://{bucket.name}/{key}: mode {mode!r} is not supported "
                             "(objects are read or written whole)")
        return _Upload(bucket, key)

    def created(self, path: str) -> Any:
        import datetime

        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], datetime.timezone.utc)

    modified = created


def _read(bucket: SimulatedBucket, key: str, start: int | None, end: int | None) -> bytes:
    local = bucket.local(key)
    try:
        with open(local, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = 0 if start is None else (max(0, size + start) if start < 0 else start)
            last = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
            f.seek(first)
            data = f.read(max(0, last - first))
    except (FileNotFoundError, IsADirectoryError):
        raise FileNotFoundError(f"gs://{bucket.name}/{key}: no such object") from None
    bucket._moved("read", key, first, first + len(data))
    return data


class _ReadFile(AbstractBufferedFile):
    """A file opened for reading: every block its cache fetches is one read request."""

    def _fetch_range(self, start: int, end: int) -> bytes:
        bucket, key = _split(self.path)
        bucket._request("read")
        return _read(bucket, key, start, end)


class _Upload:
    """An object being written: a temporary file beside its place, renamed into place on
    close (one write request), dropped on an error."""

    def __init__(self, bucket: SimulatedBucket, key: str) -> None:
        self.bucket, self.key = bucket, key
        self._target = bucket.local(key)
        os.makedirs(os.path.dirname(self._target), exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=".upload-", dir=os.path.dirname(self._target))
        self._file = os.fdopen(fd, "wb")
        self.closed = False

    def write(self, data: Any) -> int:
        return self._file.write(data)

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self.closed:
            self.bucket._request("write")
            self.commit()

    def commit(self) -> None:
        """Put the object in place (its write request has been counted)."""
        if self.closed:
            return
        self.closed = True
        self._file.close()
        size = os.stat(self._tmp).st_size
        os.replace(self._tmp, self._target)
        self.bucket._moved("write", self.key, 0, size)

    def discard(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)

    def __enter__(self) -> _Upload:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()


def reads_by_object(counts: RequestCounts) -> dict[str, list[tuple[int, int]]]:
    """The read log of ``counts`` grouped by object: ``{key: [(start, end), ...]}``."""
    out: dict[str, list[tuple[int, int]]] = collections.defaultdict(list)
    for key, start, end in counts.reads:
        out[key].append((start, end))
    return dict(out)
