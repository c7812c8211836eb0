"""Random access to the records of TFRecord shards, through an offset index cached on disk.

A TFRecord file is a run of records, each laid out as::

    uint64 length        little-endian payload length L
    uint32 length_crc    masked CRC32C of the 8 length bytes
    bytes  payload       L bytes
    uint32 payload_crc   masked CRC32C of the payload

The format has no index, so reading record ``i`` needs the byte offset of every record. This
module builds that index by hopping from header to header (12 bytes read per record, payloads
never read), keeps it in the torch_rlds cache folder (never inside the dataset folder, which may
be read-only or on GCS; where the cache cannot be written the index lives in memory) and reads
any record back with one ``pread`` call, checking both CRCs. Local shards are read through the
process's bounded set of shared descriptors (:mod:`torch_rlds._files`).

Remote shards (``gs://``...) are read by exact byte ranges, one request each, never through a
buffered file's blocks: a header hop is one 12-byte request (each waits for the one before: the
format forces it), shards are indexed in parallel (:func:`build_indexes`, up to
:func:`torch_rlds._files.remote_requests` requests in flight), a record is one request of its
bytes, and :func:`read_records` / :func:`read_ranges` read a batch of them concurrently. A remote
shard is known by its size and generation from one listing of its folder
(:class:`torch_rlds._paths.ObjectInfo`), so a warm start makes no request per shard.

Error messages name files, offsets and sizes, never bytes of the file: a file that is not a
TFRecord file (or one that changed) says so without showing what it holds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import operator
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeAlias, cast

import crc32c
import numpy as np
from etils import epath
from tqdm import tqdm

from torch_rlds import _files, _paths
from torch_rlds._cache import cache_root
from torch_rlds._paths import ObjectInfo

__all__ = [
    "CorruptRecordError",
    "RecordIndex",
    "TFRecordError",
    "TruncatedShardError",
    "build_index",
    "build_indexes",
    "masked_crc",
    "read_ranges",
    "read_records",
    "write_tfrecord",
]

_MASK_DELTA = 0xA282EAD8
# A shard opened for reading: a local file, or a remote one read range by range.
ShardFile: TypeAlias = "BinaryIO | _RemoteRanges"
_HEADER = struct.Struct("<QI")  # payload length, masked crc of the length
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEADER_SIZE = _HEADER.size  # 12
_FOOTER_SIZE = _CRC.size  # 4
_OVERHEAD = _HEADER_SIZE + _FOOTER_SIZE
# Bumped when the cached index format or its key changes, so that old cache files are never read.
_CACHE_VERSION = "tfrecord-index-v3"
_PROGRESS_DELAY_S = 1.0
# Bytes at each end of a shard whose CRC joins its cache key: a shard rewritten with the same
# size and mtime (``cp -p``, ``tar -x``) but other records almost always differs there.
_FINGERPRINT_BYTES = 4096
# The largest header np.save writes for the 1-D array cached here, with room to spare.
_NPY_HEADER_MAX = 4096


class TFRecordError(ValueError):
    """A TFRecord shard could not be read; the message names the file, the byte offset and the
    value found against the value expected."""


class CorruptRecordError(TFRecordError):
    """A record's header or payload does not match its CRC, or its stored length does not match
    the index."""


class TruncatedShardError(TFRecordError):
    """The shard ends inside a record: the message names the file, the record's offset, the
    bytes the record needs and the size of the file."""


def masked_crc(data: bytes | bytearray | memoryview) -> int:
    """The masked CRC32C that TFRecord stores: the CRC rotated right by 15 bits plus a constant,
    modulo 2**32."""
    crc = crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def write_tfrecord(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Write ``records`` to a TFRecord file at ``path`` (local or any etils.epath location such as
    gs://), replacing it. Returns the number of bytes written."""
    written = 0
    with epath.Path(path).open("wb") as f:
        for i, record in enumerate(records):
            try:
                view = memoryview(record).cast("B")
            except TypeError as e:
                raise TypeError(
                    f"record {i} for {os.fspath(path)} must be bytes-like (got {type(record)})"
                ) from e
            length = _LENGTH.pack(view.nbytes)
            f.write(length)
            f.write(_CRC.pack(masked_crc(length)))
            f.write(view)
            f.write(_CRC.pack(masked_crc(view)))
            written += view.nbytes + _OVERHEAD
    return written


def build_index(
    f: ShardFile, file_size: int, name: str, *, progress: tqdm | None = None
) -> np.ndarray:
    """The offsets of every record in the open TFRecord file ``f`` of ``file_size`` bytes.

    Reads only the 12-byte header of each record and seeks past the payloads, which are never
    read or checked here (``RecordIndex.read`` checks them). Verifies every length CRC. Returns an
    int64 array of length num_records + 1: ``offsets[i]`` is where record i starts and
    ``offsets[-1] == file_size``. ``name`` is the shard's name for error messages; ``progress``,
    if given, is advanced by the bytes indexed.

    Raises CorruptRecordError on a bad length CRC and TruncatedShardError when a header or a
    record runs past ``file_size``.
    """
    walk = _walk(file_size, name, progress)
    try:
        position = next(walk)
        while True:
            f.seek(position)
            position = walk.send(f.read(_HEADER_SIZE))
    except StopIteration as done:
        return done.value


def _walk(file_size: int, name: str, progress: tqdm | None
          ) -> Generator[int, bytes, np.ndarray]:
    """The header hops of :func:`build_index`, for any way of reading: yields the position of
    each header to read, is sent its bytes, and returns the offsets."""
    offsets: list[int] = []
    pos = 0
    pending = 0  # bytes indexed but not yet reported to the progress bar
    while pos < file_size:
        if file_size - pos < _HEADER_SIZE:
            raise TruncatedShardError(
                f"{name}: truncated header of record {len(offsets)} at offset {pos}: needs "
                f"{_HEADER_SIZE} bytes, the file (size {file_size}) has {file_size - pos} left"
            )
        header = yield pos
        if len(header) != _HEADER_SIZE:
            raise TruncatedShardError(
                f"{name}: truncated header of record {len(offsets)} at offset {pos}: needs "
                f"{_HEADER_SIZE} bytes, read {len(header)}; the file is shorter than the "
                f"{file_size} bytes expected"
            )
        length, length_crc = _HEADER.unpack(header)
        if length_crc != masked_crc(header[:8]):
            raise CorruptRecordError(
                f"{name}: bad length CRC of record {len(offsets)} at offset {pos}: the 12-byte "
                "header does not match the CRC expected of it (not a TFRecord file, or "
                "damaged here)"
            )
        end = pos + length + _OVERHEAD
        if end > file_size:
            raise TruncatedShardError(
                f"{name}: truncated record {len(offsets)} at offset {pos}: needs "
                f"{length + _OVERHEAD} bytes (payload {length}), the file (size {file_size}) "
                f"has {file_size - pos} left"
            )
        offsets.append(pos)
        if progress is not None:
            pending += end - pos
            if pending >= 1 << 24 or (len(offsets) & 1023) == 0:
                progress.update(pending)
                pending = 0
        pos = end
    offsets.append(file_size)
    if progress is not None and pending:
        progress.update(pending)
    return np.asarray(offsets, dtype=np.int64)


async def _walk_remote(fs: Any, inner: str, file_size: int, name: str, slots: Any
                       ) -> np.ndarray:
    """:func:`build_index` of a remote shard as a coroutine on its filesystem's event loop:
    one exact 12-byte request per header, each holding one of ``slots``."""
    walk = _walk(file_size, name, None)
    try:
        position = next(walk)
        while True:
            async with slots:
                header = await fs._cat_file(inner, start=position,
                                            end=position + _HEADER_SIZE)
            position = walk.send(bytes(header))
    except StopIteration as done:
        return done.value


def _is_local(path: str) -> bool:
    return "://" not in path


# What a published index may know of a shard: given (path, size, generation), its offsets or
# None (see torch_rlds._shared_index).
PublishedOffsets = Callable[[str, int, str], "np.ndarray | None"]


def _local_key(path: str, f: BinaryIO) -> tuple[str, int, str]:
    """(absolute path, size, generation) of the local shard at ``path``, open as ``f`` (from
    ``fstat`` of that very file): its generation is its mtime in ns and a CRC of its ends."""
    st = os.fstat(f.fileno())
    return (os.path.abspath(path), st.st_size,
            f"{st.st_mtime_ns}:{_fingerprint(f, st.st_size)}")


def _remote_key(path: str, stat: ObjectInfo | None) -> tuple[str, int, str]:
    """(path, size, generation) of the remote shard at ``path`` from what a listing said of it
    (``stat``; one request asks when it is ``None``). A store that gives no generation or ETag
    has its objects known by mtime and a CRC of their ends (two more requests)."""
    if stat is None:
        stat = _paths.stat_object(path)
    if stat.generation is not None:
        return path, stat.size, f"gen:{stat.generation}"
    with _RemoteRanges(path, stat.size) as f:
        return path, stat.size, f"mtime:{stat.mtime}:{_fingerprint(f, stat.size)}"


def _fingerprint(f: ShardFile, size: int) -> str:
    """CRC32C of the first and the last few KiB of a shard of ``size`` bytes, read from ``f``."""
    head = min(size, _FINGERPRINT_BYTES)
    f.seek(0)
    crc = crc32c.crc32c(f.read(head))
    if size > head:
        tail = min(size - head, _FINGERPRINT_BYTES)
        f.seek(size - tail)
        crc = crc32c.crc32c(f.read(tail), crc)
    return f"{crc:08x}"


def _cache_file(folder: Path, absolute: str, size: int, generation: str) -> Path:
    key = hashlib.sha256(f"{_CACHE_VERSION}\0{absolute}\0{size}\0{generation}".encode()
                         ).hexdigest()
    # The shard's name is only there for people looking at the folder; the key decides.
    label = re.sub(r"[^A-Za-z0-9._-]", "_", absolute.rsplit("/", 1)[-1])[:80]
    return folder / f"{label}.{key}.npy"


def _folder(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root(create=False) / "index"


def _known_offsets(cache_file: Path, path: str, size: int, generation: str,
                   published: PublishedOffsets | None) -> np.ndarray | None:
    """The offsets of a shard from the cache, else from ``published`` (checked against the
    shard's size), else ``None``: the shard is to be indexed."""
    offsets = _load_cached(cache_file, size, path)
    if offsets is not None or published is None:
        return offsets
    offsets = published(path, size, generation)
    if offsets is None:
        return None
    try:
        _check_offsets(offsets, size, path)
    except ValueError:
        return None
    return offsets


def _check_offsets(offsets: np.ndarray, file_size: int, name: str) -> None:
    """Raise ValueError unless ``offsets`` is a well-formed index of a file of ``file_size``."""
    if offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.size == 0:
        raise ValueError(
            f"{name}: record offsets must be a non-empty 1-D int64 array "
            f"(got dtype {offsets.dtype}, shape {offsets.shape})"
        )
    if offsets[0] != 0 or offsets[-1] != file_size:
        raise ValueError(
            f"{name}: record offsets must run from 0 to the file size {file_size} "
            f"(got {offsets[0]} to {offsets[-1]})"
        )
    if offsets.size > 1 and np.diff(offsets).min() < _OVERHEAD:
        raise ValueError(f"{name}: record offsets must grow by at least {_OVERHEAD} bytes each")


# The header np.save writes for a 1-D little-endian int64 array, the only layout cached here.
_NPY_MAGIC = b"\x93NUMPY"
_NPY_HEADER = re.compile(r"\{'descr': '<i8', 'fortran_order': False, 'shape': \((\d+),\), \} *\n")


def _read_npy_offsets(data: bytes) -> np.ndarray | None:
    """The int64 array in ``data`` as ``np.save`` writes one, or None for anything else.

    Parsed here rather than by ``np.load``, which reads the header with ``ast.literal_eval``:
    CPython's AST constructor keeps one recursion count per interpreter, and threads compiling
    at once (``build_indexes`` loads shards in threads) make it fail at random with
    ``SystemError: AST constructor recursion depth mismatch`` (CPython gh-106905, still seen
    on 3.11.7)."""
    if len(data) < 10 or not data.startswith(_NPY_MAGIC):
        return None
    if data[6] == 1:
        (header_size,), start = struct.unpack_from("<H", data, 8), 10
    elif data[6] in (2, 3) and len(data) >= 12:
        (header_size,), start = struct.unpack_from("<I", data, 8), 12
    else:
        return None
    match = _NPY_HEADER.fullmatch(data[start:start + header_size].decode("latin-1"))
    body = memoryview(data)[start + header_size:]
    if match is None or body.nbytes != 8 * int(match.group(1)):
        return None
    return np.frombuffer(body, dtype="<i8").astype(np.int64)


def _load_cached(cache_file: Path, file_size: int, name: str) -> np.ndarray | None:
    """The cached offsets, or None when there are none or they do not fit the shard.

    Reads at most what an index of a shard of ``file_size`` bytes can take (a record is at
    least 16 bytes), and only from a regular file."""
    limit = _NPY_HEADER_MAX + 8 * (file_size // _OVERHEAD + 2)
    try:
        data = _files.read_regular(os.fspath(cache_file), limit)
        offsets = None if data is None else _read_npy_offsets(data)
        if offsets is None:
            return None
        _check_offsets(offsets, file_size, name)
    except (OSError, ValueError):  # missing, unreadable, a FIFO or device, stale: rebuilt
        return None
    return offsets


_unwritable: set[str] = set()  # cache folders already warned about, once each per process
_unwritable_lock = threading.Lock()


def _save_atomic(cache_file: Path, offsets: np.ndarray) -> None:
    """Write ``offsets`` so that readers see either the whole file or none of it; where the
    cache cannot be written, warn once per folder (the index then lives in memory only)."""
    data = io.BytesIO()
    np.save(data, offsets, allow_pickle=False)
    try:
        _files.write_atomic(cache_file, data.getvalue())
    except OSError as e:
        folder = os.fspath(cache_file.parent)
        with _unwritable_lock:
            if folder in _unwritable:
                return
            _unwritable.add(folder)
        warnings.warn(
            f"torch_rlds: cannot write record indexes to the cache folder {folder} ({e}); "
            f"they are kept in memory and rebuilt in each new process (set "
            f"TORCH_RLDS_CACHE to a writable folder to keep them)",
            stacklevel=3,
        )


def _open_local(path: str) -> BinaryIO:
    # Unbuffered: each read is one read(2) straight into the returned bytes, and a 12-byte
    # header read does not pull a whole buffer in. Regular files only: never waits on a FIFO.
    try:
        fd, _ = _files.open_regular(path)
    except _files.SpecialFileError as e:
        raise TFRecordError(f"{e}; a shard must be a regular file") from None
    return os.fdopen(fd, "rb", buffering=0)


class _RemoteRanges(io.RawIOBase):
    """A remote shard of known ``size`` as a file: each ``read(n)`` is one request for exactly
    those bytes at the position (:func:`torch_rlds._files.read_remote`), never a block."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__()
        self.path, self.size, self._pos = path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        if end <= self._pos:
            return b""
        data = _files.read_remote(self.path, self._pos, end)
        self._pos += len(data)
        return data


class RecordIndex:
    """The offsets of every record of one TFRecord shard, cached on disk.

    Build one with ``RecordIndex.load(path)``: the first load of a shard reads its headers and
    writes the offsets to ``<cache>/index`` (see ``torch_rlds._cache.cache_root``), keyed by the
    shard's absolute path, size and generation (local: its modification time and a CRC of its
    first and last 4 KiB; remote: the store's generation or ETag); later loads read the cached
    ``.npy`` file, or take the offsets a published index holds for that very size and
    generation. A changed shard gets a new key and is indexed again; a
    cached index that does not end at the shard's size is rebuilt; ``load(..., rebuild=True)``
    ignores the cache (what a reader does once when a record does not match its offset). Where
    the cache folder cannot be written, the index lives in memory (one warning per folder).

    The index is immutable (``offsets`` is read-only) and so thread-safe; a file object passed
    to ``read`` must not be shared between threads (without one, reads go through the process's
    shared descriptors, or are one exact-range request for a remote shard, see
    :mod:`torch_rlds._files`). Every read checks the record's stored
    length and both CRCs, so a shard changed behind the index's back raises instead of
    returning wrong bytes.
    """

    def __init__(self, path: str | os.PathLike, offsets: np.ndarray) -> None:
        """Wrap ``offsets`` (as returned by ``build_index``) of the shard at ``path``; the caller
        must not change the array afterwards."""
        self.path: str = os.fspath(path)
        offsets = np.asarray(offsets)
        _check_offsets(offsets, int(offsets[-1]) if offsets.size else 0, self.path)
        offsets = offsets.view()  # a read-only view: this object never changes its offsets
        offsets.flags.writeable = False
        self.offsets: np.ndarray = offsets
        self.file_size: int = int(offsets[-1])
        # What the cache knows this shard by (a digest of its path, size and generation) and
        # the generation itself; set by load.
        self.cache_key: str | None = None
        self.generation: str | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        rebuild: bool = False,
        stat: ObjectInfo | None = None,
        published: PublishedOffsets | None = None,
    ) -> RecordIndex:
        """The index of the shard at ``path`` (local or any etils.epath location such as gs://),
        from the cache in ``cache_dir`` (default ``cache_root() / "index"``), else from
        ``published(path, size, generation)`` (offsets a published index holds for exactly this
        shard; cached then), else built and cached; with ``rebuild``, built and cached whatever
        the cache holds. ``stat``: what a listing said of a remote shard (its size and
        generation; without it, one request asks). With ``progress``, a build that takes more
        than a second shows a progress bar. Raises TFRecordError for a local path that is not
        a regular file (a FIFO, a device), before reading from it."""
        path = os.fspath(path)
        folder = _folder(cache_dir)
        with contextlib.ExitStack() as stack:
            if _is_local(path):
                local = stack.enter_context(_open_local(path))
                absolute, size, generation = _local_key(path, local)
                f: ShardFile = local
            else:
                absolute, size, generation = _remote_key(path, stat)
                f = stack.enter_context(_RemoteRanges(path, size))
            cache_file = _cache_file(folder, absolute, size, generation)
            offsets = None if rebuild else _known_offsets(cache_file, path, size, generation,
                                                          published)
            if offsets is not None:
                return cls._keyed(path, offsets, cache_file, generation)
            with tqdm(
                total=size,
                desc=f"Indexing {absolute.rsplit('/', 1)[-1]}",
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                delay=_PROGRESS_DELAY_S,
                leave=False,
                disable=not progress,
            ) as bar:
                offsets = build_index(f, size, path, progress=bar)
        _save_atomic(cache_file, offsets)
        return cls._keyed(path, offsets, cache_file, generation)

    @classmethod
    def _keyed(cls, path: str, offsets: np.ndarray, cache_file: Path,
               generation: str) -> RecordIndex:
        index = cls(path, offsets)
        index.cache_key = cache_file.name.rsplit(".", 2)[-2]
        index.generation = generation
        return index

    @property
    def num_records(self) -> int:
        """The number of records in the shard."""
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        return (
            f"RecordIndex({self.path!r}, num_records={self.num_records}, "
            f"file_size={self.file_size})"
        )

    def _bounds(self, i: int) -> tuple[int, int, int]:
        i = operator.index(i)
        n = len(self.offsets) - 1
        if not 0 <= i < n:
            raise IndexError(
                f"record index {i} out of range for {self.path}: it has {n} records "
                f"(valid indices 0 to {n - 1})"
            )
        return i, int(self.offsets[i]), int(self.offsets[i + 1])

    def record_size(self, i: int) -> int:
        """The payload length of record ``i`` in bytes."""
        _, start, end = self._bounds(i)
        return end - start - _OVERHEAD

    def payload_offset(self, i: int) -> int:
        """Where the payload of record ``i`` starts in the shard."""
        return self._bounds(i)[1] + _HEADER_SIZE

    def read_range(self, i: int, offset: int, size: int) -> bytes:
        """``size`` bytes of the payload of record ``i`` from ``offset`` on, read in one call
        and not checked (the record's CRCs cover its whole payload; a caller reading part of
        it checks what it read itself, as the step index does). Raises ``IndexError`` for a
        range outside the payload and TruncatedShardError when the file ends early."""
        return self._fetch(i, *self._range(i, offset, size))

    def _range(self, i: int, offset: int, size: int) -> tuple[int, int]:
        """Where ``size`` bytes of the payload of record ``i`` from ``offset`` on lie in the
        shard (checked as ``read_range`` checks them)."""
        i, start, end = self._bounds(i)
        if offset < 0 or size < 0 or offset + size > end - start - _OVERHEAD:
            raise IndexError(f"{self.path}: bytes {offset}..{offset + size} are outside the "
                             f"{end - start - _OVERHEAD}-byte payload of record {i}")
        first = start + _HEADER_SIZE + offset
        return first, first + size

    def open(self) -> ShardFile:
        """Open the shard for reading, in the mode ``read`` works best with (local: unbuffered;
        remote: every read one exact-range request); close it after use."""
        if _is_local(self.path):
            return _open_local(self.path)
        return _RemoteRanges(self.path, self.file_size)

    def read(self, i: int, f: ShardFile | None = None) -> bytes:
        """The payload of record ``i``, read from ``f`` (an open file of this shard, used by
        one thread at a time) or, when None, through the process's shared descriptors (local
        shards) or its pool of open files (remote ones), see :mod:`torch_rlds._files`.

        One read call of exactly the record's bytes (``pread`` for a local shard); checks both
        CRCs and the stored length against the index. Raises IndexError when ``i`` is out of
        range, CorruptRecordError on a mismatch and TruncatedShardError when the file ends
        before the record does.
        """
        return bytes(self.read_view(i, f))

    def read_view(self, i: int, f: ShardFile | None = None) -> memoryview:
        """Like ``read``, but returns a memoryview of the payload inside the buffer read, without
        copying it."""
        i, start, end = self._bounds(i)
        buf = self._read_at(f, i, start, end) if f is not None else self._fetch(i, start, end)
        return self._payload(i, start, end, buf)

    def _fetch(self, i: int, start: int, end: int) -> bytes:
        """Bytes ``start..end`` of the shard (inside record ``i``): one ``pread`` of a shared
        descriptor (local) or one exact-range request (remote)."""
        if _is_local(self.path):
            return self._pread(i, start, end)
        buf = _files.read_remote(self.path, start, end)
        if len(buf) != end - start:
            raise self._truncated(i, start, end - start, len(buf))
        return buf

    def _payload(self, i: int, start: int, end: int, buf: bytes | memoryview) -> memoryview:
        """The payload of record ``i`` (bytes ``start..end`` of the shard, read as ``buf``),
        once its stored length and both CRCs are checked."""
        view = memoryview(buf)
        length, length_crc = _HEADER.unpack_from(view)
        # The length CRC first: until it matches, the length is bytes of unknown meaning.
        if length_crc != masked_crc(view[:8]):
            raise CorruptRecordError(
                f"{self.path}: bad length CRC of record {i} at offset {start}: the 12-byte "
                "header does not match the CRC expected of it (the shard changed after it was "
                "indexed, or is damaged here)"
            )
        expected_length = end - start - _OVERHEAD
        if length != expected_length:
            raise CorruptRecordError(
                f"{self.path}: record {i} at offset {start} has stored length {length}, the index "
                f"expects {expected_length}; the shard changed after it was indexed"
            )
        payload = view[_HEADER_SIZE : _HEADER_SIZE + length]
        (payload_crc,) = _CRC.unpack_from(view, _HEADER_SIZE + length)
        if payload_crc != masked_crc(payload):
            raise CorruptRecordError(
                f"{self.path}: bad payload CRC of record {i} at offset {start} "
                f"(payload of {length} bytes at offset {start + _HEADER_SIZE}): the stored CRC "
                "does not match the one expected of the payload"
            )
        return payload

    def _pread(self, i: int, start: int, end: int) -> bytes:
        pool = _files.descriptors()
        try:
            fd = pool.acquire(self.path)
        except _files.SpecialFileError as e:
            raise TFRecordError(f"{e}; a shard must be a regular file") from None
        try:
            buf = _files.pread_exact(fd, end - start, start)
        finally:
            pool.release(self.path, fd)
        if len(buf) != end - start:
            raise self._truncated(i, start, end - start, len(buf))
        return buf

    def _truncated(self, i: int, start: int, size: int, got: int) -> TruncatedShardError:
        return TruncatedShardError(
            f"{self.path}: truncated record {i} at offset {start}: needs {size} bytes, "
            f"the file ends after {got} (at offset {start + got}; it was {self.file_size} "
            f"bytes when indexed)"
        )

    def _read_at(self, f: ShardFile, i: int, start: int, end: int) -> bytes:
        size = end - start
        f.seek(start)
        buf = f.read(size)
        if len(buf) == size:
            return buf
        # A raw file may return fewer bytes than asked for before its end; only an empty read
        # means the file ends here.
        parts = [buf]
        got = len(buf)
        while got < size:
            more = f.read(size - got)
            if not more:
                raise self._truncated(i, start, size, got)
            parts.append(more)
            got += len(more)
        return b"".join(parts)


def _on_one_loop(paths: Sequence[str], stats: Sequence[ObjectInfo | None]) -> bool:
    """Whether every shard of ``paths`` can be indexed as a coroutine on one event loop: all
    remote, on asynchronous filesystems sharing that loop, their generations known from a
    listing."""
    if not paths or any(_is_local(p) for p in paths):
        return False
    if any(st is None or st.generation is None for st in stats):
        return False
    loops = set()
    for path in paths:
        fs, _ = _paths.filesystem(path)
        if not _files.is_async(fs):
            return False
        loops.add(id(fs.loop))
    return len(loops) == 1


def _build_on_loop(paths: Sequence[str], stats: Sequence[ObjectInfo], folder: Path,
                   published: PublishedOffsets | None, progress: bool) -> list[RecordIndex]:
    """``build_indexes`` of remote shards on asynchronous filesystems: keys from the listing,
    the cache and the published index looked at first, then every header hop of every shard
    still to index a coroutine on the filesystems' event loop (up to
    :func:`torch_rlds._files.remote_requests` requests in flight, no thread per request)."""
    keys = [_remote_key(p, st) for p, st in zip(paths, stats)]
    files = [_cache_file(folder, *key) for key in keys]
    offsets = [_known_offsets(file, path, size, generation, published)
               for file, path, (_, size, generation) in zip(files, paths, keys)]
    todo = [k for k, found in enumerate(offsets) if found is None]
    if todo:
        # resolved here: nothing on the event loop may wait for the loop itself
        located = {k: _paths.filesystem(paths[k]) for k in todo}
        with tqdm(total=len(todo), desc="Indexing shards", unit="shard",
                  delay=_PROGRESS_DELAY_S, leave=False, disable=not progress) as bar:

            async def one(k: int, slots: Any) -> np.ndarray:
                built = await _walk_remote(*located[k], keys[k][1], paths[k], slots)
                bar.update(1)
                return built

            fs = located[todo[0]][0]
            built = _files.run_concurrently(fs, lambda slots: [one(k, slots) for k in todo])
        for k, found in zip(todo, built):
            offsets[k] = found
            _save_atomic(files[k], found)
    # every shard's offsets are known or built by now
    return [RecordIndex._keyed(path, cast(np.ndarray, found), file, key[2])
            for path, found, file, key in zip(paths, offsets, files, keys)]


def read_records(items: Sequence[tuple[RecordIndex, int]]) -> list[memoryview]:
    """The payloads of every ``(index, record)``, in the order given, each checked as
    :meth:`RecordIndex.read_view` checks it.

    Remote records are read concurrently, one exact-range request each (up to
    :func:`torch_rlds._files.remote_requests` in flight): a window of episodes costs one
    round trip, not one per episode. Local ones are read one after another (a ``pread`` each).
    What it holds at most is the records asked for. The first error of a record is raised.
    """
    bounds = [index._bounds(record) for index, record in items]
    remote = [k for k, (index, _) in enumerate(items) if not _is_local(index.path)]
    fetched = dict(zip(remote, _read_remote([(items[k][0], bounds[k][0], bounds[k][1],
                                              bounds[k][2]) for k in remote])))
    out = []
    for k, (index, _) in enumerate(items):
        i, start, end = bounds[k]
        buf = fetched[k] if k in fetched else index._fetch(i, start, end)
        out.append(index._payload(i, start, end, buf))
    return out


def read_ranges(items: Sequence[tuple[RecordIndex, int, int, int]]) -> list[memoryview]:
    """``read_range(record, offset, size)`` of every ``(index, record, offset, size)``, in the
    order given (unchecked, as ``read_range``), remote ones concurrently as in
    :func:`read_records`; ranges of one shard that touch or overlap are one request."""
    spans = [(index, record, *index._range(record, offset, size))
             for index, record, offset, size in items]
    remote = [k for k, span in enumerate(spans) if not _is_local(span[0].path)]
    fetched = dict(zip(remote, _read_remote([spans[k] for k in remote])))
    return [fetched[k] if k in fetched else memoryview(index._fetch(i, start, end))
            for k, (index, i, start, end) in enumerate(spans)]


def _read_remote(spans: Sequence[tuple[RecordIndex, int, int, int]]) -> list[memoryview]:
    """Bytes ``start..end`` of each ``(index, record, start, end)`` of remote shards,
    concurrently; a shard that ends early raises TruncatedShardError."""
    if not spans:
        return []
    data = _files.read_remote_many([(index.path, start, end) for index, _, start, end in spans])
    for (index, i, start, end), buf in zip(spans, data):
        if len(buf) != end - start:
            raise index._truncated(i, start, end - start, len(buf))
    return data


def build_indexes(
    paths: Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
    progress: bool = True,
    stats: Sequence[ObjectInfo | None] | None = None,
    published: PublishedOffsets | None = None,
) -> list[RecordIndex]:
    """``RecordIndex.load`` for every path, ``num_threads`` shards at a time (default: 8 for
    local shards; :func:`torch_rlds._files.remote_threads` for remote ones, whose header hops
    wait on the network), returned in the order of ``paths``. Remote shards on asynchronous
    filesystems whose generations ``stats`` gives are indexed as coroutines instead (all at
    once, up to :func:`torch_rlds._files.remote_requests` requests in flight). ``stats`` (one per path, from a
    listing) and ``published`` are passed on to each load. With ``progress``, one bar over
    shards shows when loading takes more than a second. The first error raised by a shard is
    raised here; shards not yet started are cancelled."""
    names = [os.fspath(p) for p in paths]
    if num_threads is None:
        remote = any(not _is_local(p) for p in names)
        num_threads = _files.remote_threads() if remote else 8
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 (got {num_threads})")
    stats = list(stats) if stats is not None else [None] * len(names)
    if len(stats) != len(names):
        raise ValueError(f"stats must give one entry per path ({len(names)} paths, "
                         f"{len(stats)} stats)")
    if _on_one_loop(names, stats):  # then every shard has its stat
        return _build_on_loop(names, cast(list[ObjectInfo], stats), _folder(cache_dir),
                              published, progress)
    with (
        tqdm(
            total=len(names),
            desc="Indexing shards",
            unit="shard",
            delay=_PROGRESS_DELAY_S,
            leave=False,
            disable=not progress,
        ) as bar,
        concurrent.futures.ThreadPoolExecutor(
            max_workers=min(num_threads, max(len(names), 1)), thread_name_prefix="torch_rlds-index"
        ) as pool,
    ):
        futures = [
            pool.submit(RecordIndex.load, p, cache_dir=cache_dir, progress=False, stat=st,
                        published=published)
            for p, st in zip(names, stats)
        ]
        try:
            for future in concurrent.futures.as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return [future.result() for future in futures]
