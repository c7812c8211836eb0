"""Random access to the records of TFRecord shards, through an offset index cached on disk.

A TFRecord file is a run of records, each laid out as::

    uint64 length        little-endian payload length L
    uint32 length_crc    masked CRC32C of the 8 length bytes
    bytes  payload       L bytes
    uint32 payload_crc   masked CRC32C of the payload

The format has no index, so reading record ``i`` needs the byte offset of every record. This
module builds that index by hopping from header to header (12 bytes read per record, payloads
never read), keeps it in the torch_rlds cache folder (never inside the dataset folder, which may
be read-only or on GCS) and reads any record back with one read call, checking both CRCs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import operator
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import crc32c
import numpy as np
from etils import epath
from tqdm import tqdm

from torch_rlds._cache import cache_root

__all__ = [
    "CorruptRecordError",
    "RecordIndex",
    "TFRecordError",
    "TruncatedShardError",
    "build_index",
    "build_indexes",
    "masked_crc",
    "write_tfrecord",
]

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct("<QI")  # payload length, masked crc of the length
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")
_HEADER_SIZE = _HEADER.size  # 12
_FOOTER_SIZE = _CRC.size  # 4
_OVERHEAD = _HEADER_SIZE + _FOOTER_SIZE
# Bumped when the cached index format changes, so that old cache files are never read.
_CACHE_VERSION = "tfrecord-index-v1"
_PROGRESS_DELAY_S = 1.0


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
    f: BinaryIO, file_size: int, name: str, *, progress: tqdm | None = None
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
    offsets: list[int] = []
    pos = 0
    pending = 0  # bytes indexed but not yet reported to the progress bar
    while pos < file_size:
        if file_size - pos < _HEADER_SIZE:
            raise TruncatedShardError(
                f"{name}: truncated header of record {len(offsets)} at offset {pos}: needs "
                f"{_HEADER_SIZE} bytes, the file (size {file_size}) has {file_size - pos} left"
            )
        f.seek(pos)
        header = f.read(_HEADER_SIZE)
        if len(header) != _HEADER_SIZE:
            raise TruncatedShardError(
                f"{name}: truncated header of record {len(offsets)} at offset {pos}: needs "
                f"{_HEADER_SIZE} bytes, read {len(header)}; the file is shorter than the "
                f"{file_size} bytes expected"
            )
        length, length_crc = _HEADER.unpack(header)
        expected_crc = masked_crc(header[:8])
        if length_crc != expected_crc:
            raise CorruptRecordError(
                f"{name}: bad length CRC of record {len(offsets)} at offset {pos}: found "
                f"{length_crc:#010x}, expected {expected_crc:#010x} (stored length {length})"
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


def _is_local(path: str) -> bool:
    return "://" not in path


def _stat(path: str) -> tuple[str, int, int]:
    """(absolute path, size in bytes, mtime in ns) of a shard; remote mtimes have 1 s resolution."""
    if _is_local(path):
        absolute = os.path.abspath(path)
        st = os.stat(absolute)
        return absolute, st.st_size, st.st_mtime_ns
    p = epath.Path(path)
    st = p.stat()
    return os.fspath(p.absolute()), int(st.length), int(st.mtime) * 1_000_000_000


def _cache_file(folder: Path, absolute: str, size: int, mtime_ns: int) -> Path:
    key = hashlib.sha256(f"{_CACHE_VERSION}\0{absolute}\0{size}\0{mtime_ns}".encode()).hexdigest()
    # The shard's name is only there for people looking at the folder; the key decides.
    label = re.sub(r"[^A-Za-z0-9._-]", "_", absolute.rsplit("/", 1)[-1])[:80]
    return folder / f"{label}.{key}.npy"


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
    """The cached offsets, or None when there are none or they do not fit the shard."""
    try:
        with open(cache_file, "rb") as f:
            offsets = _read_npy_offsets(f.read())
        if offsets is None:
            return None
        _check_offsets(offsets, file_size, name)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # an unreadable or stale cache file is rebuilt, never trusted
    return offsets


def _save_atomic(cache_file: Path, offsets: np.ndarray) -> None:
    """Write ``offsets`` so that readers see either the whole file or none of it."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=cache_file.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, offsets, allow_pickle=False)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the index holds nothing secret
            os.replace(tmp, cache_file)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(
            f"could not cache the record index in {cache_file}: {e}; it will be rebuilt next time",
            stacklevel=3,
        )


def _open(path: str) -> BinaryIO:
    if _is_local(path):
        # Unbuffered: each read is one read(2) straight into the returned bytes, and a 12-byte
        # header read does not pull a whole buffer in.
        return open(path, "rb", buffering=0)
    return epath.Path(path).open("rb")


class RecordIndex:
    """The offsets of every record of one TFRecord shard, cached on disk.

    Build one with ``RecordIndex.load(path)``: the first load of a shard reads its headers and
    writes the offsets to ``<cache>/index`` (see ``torch_rlds._cache.cache_root``), keyed by the
    shard's absolute path, size and modification time; later loads read the cached ``.npy`` file.
    A changed shard gets a new key and is indexed again; a cached index that does not end at the
    shard's size is rebuilt.

    The index is immutable (``offsets`` is read-only) and so thread-safe; a file object passed
    to ``read`` must not be shared between threads. Every read checks the record's stored length
    and both CRCs, so a shard changed behind the index's back raises instead of returning
    wrong bytes.
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

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> RecordIndex:
        """The index of the shard at ``path`` (local or any etils.epath location such as gs://),
        from the cache in ``cache_dir`` (default ``cache_root() / "index"``) or built and cached.
        With ``progress``, a build that takes more than a second shows a progress bar."""
        path = os.fspath(path)
        absolute, size, mtime_ns = _stat(path)
        folder = Path(cache_dir) if cache_dir is not None else cache_root() / "index"
        cache_file = _cache_file(folder, absolute, size, mtime_ns)
        offsets = _load_cached(cache_file, size, path)
        if offsets is None:
            with (
                _open(path) as f,
                tqdm(
                    total=size,
                    desc=f"Indexing {absolute.rsplit('/', 1)[-1]}",
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    delay=_PROGRESS_DELAY_S,
                    leave=False,
                    disable=not progress,
                ) as bar,
            ):
                offsets = build_index(f, size, path, progress=bar)
            _save_atomic(cache_file, offsets)
        return cls(path, offsets)

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

    def open(self) -> BinaryIO:
        """Open the shard for reading, in the mode ``read`` works best with; close it after use."""
        return _open(self.path)

    def read(self, i: int, f: BinaryIO | None = None) -> bytes:
        """The payload of record ``i``, read from ``f`` (an open file of this shard; callers that
        read many records should pass one from ``open()``) or, when None, from a file opened and
        closed here.

        One read call of exactly the record's bytes; checks its stored length against the index
        and both CRCs. Raises IndexError when ``i`` is out of range, CorruptRecordError on a
        mismatch and TruncatedShardError when the file ends before the record does.
        """
        return bytes(self.read_view(i, f))

    def read_view(self, i: int, f: BinaryIO | None = None) -> memoryview:
        """Like ``read``, but returns a memoryview of the payload inside the buffer read, without
        copying it."""
        i, start, end = self._bounds(i)
        if f is None:
            with self.open() as own:
                buf = self._read_at(own, i, start, end)
        else:
            buf = self._read_at(f, i, start, end)
        view = memoryview(buf)
        length, length_crc = _HEADER.unpack_from(view)
        expected_length = end - start - _OVERHEAD
        if length != expected_length:
            raise CorruptRecordError(
                f"{self.path}: record {i} at offset {start} has stored length {length}, the index "
                f"expects {expected_length}; the shard changed after it was indexed"
            )
        expected_crc = masked_crc(view[:8])
        if length_crc != expected_crc:
            raise CorruptRecordError(
                f"{self.path}: bad length CRC of record {i} at offset {start}: found "
                f"{length_crc:#010x}, expected {expected_crc:#010x}"
            )
        payload = view[_HEADER_SIZE : _HEADER_SIZE + length]
        (payload_crc,) = _CRC.unpack_from(view, _HEADER_SIZE + length)
        expected_crc = masked_crc(payload)
        if payload_crc != expected_crc:
            raise CorruptRecordError(
                f"{self.path}: bad payload CRC of record {i} at offset {start} "
                f"(payload of {length} bytes at offset {start + _HEADER_SIZE}): found "
                f"{payload_crc:#010x}, expected {expected_crc:#010x}"
            )
        return payload

    def _read_at(self, f: BinaryIO, i: int, start: int, end: int) -> bytes:
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
                raise TruncatedShardError(
                    f"{self.path}: truncated record {i} at offset {start}: needs {size} bytes, "
                    f"the file ends after {got} (at offset {start + got}; it was {self.file_size} "
                    f"bytes when indexed)"
                )
            parts.append(more)
            got += len(more)
        return b"".join(parts)


def build_indexes(
    paths: Sequence[str | os.PathLike],
    *,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int = 8,
    progress: bool = True,
) -> list[RecordIndex]:
    """``RecordIndex.load`` for every path, ``num_threads`` shards at a time, returned in the
    order of ``paths``. With ``progress``, one bar over shards shows when loading takes more than
    a second. The first error raised by a shard is raised here; shards not yet started are
    cancelled."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 (got {num_threads})")
    paths = list(paths)
    with (
        tqdm(
            total=len(paths),
            desc="Indexing shards",
            unit="shard",
            delay=_PROGRESS_DELAY_S,
            leave=False,
            disable=not progress,
        ) as bar,
        concurrent.futures.ThreadPoolExecutor(
            max_workers=min(num_threads, max(len(paths), 1)), thread_name_prefix="torch_rlds-index"
        ) as pool,
    ):
        futures = [
            pool.submit(RecordIndex.load, p, cache_dir=cache_dir, progress=False) for p in paths
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
