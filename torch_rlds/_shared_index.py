"""A dataset's index published once, so that a thousand hosts read one object instead of indexing.

``torch-rlds index PATH --publish [DEST]`` (:func:`publish`) writes, beside the data or under
``DEST/<name>/<version>/``:

* ``torch_rlds.index``: for every shard of every split, its name (relative to the version
  directory), size and generation (the object store's generation or ETag; for a local file its
  mtime and a CRC of its ends, as the record-index cache knows it), its record offsets and, for
  tfrecord datasets the step index covers, the steps of every record;
* ``torch_rlds.steps/<shard>.<key>.<features>.trsi``: each shard's step index
  (:class:`~torch_rlds._step_index.ShardStepIndex`), read by a host only for the shards it
  reads, when it would otherwise build it.

A source (:class:`SharedIndex`) looks for ``torch_rlds.index`` in the configured place
(``RLDSSource(index_dir=...)``, else ``$TORCH_RLDS_INDEX_DIR``) and beside the data, and only
when a shard misses the local cache: a warm host reads nothing. Beside remote data, the listing
the source makes anyway says whether the object is there: no request when it is not, one read
when it is. Every entry is verified on use: a shard whose size or generation differs from its
entry is indexed here, and the source says in one line how many it indexed so.

The object is untrusted input: :meth:`PublishedIndex.from_bytes` checks every field, the
offsets of every shard and the lengths before anything is used, and reads at most
:data:`MAX_PUBLISHED_BYTES`. Nothing in it runs code.

Layout of ``torch_rlds.index``: the 8 bytes ``TRLDSIDX``, a little-endian uint32 format version,
a uint64 header length, a uint32 CRC32C of everything after these 24 bytes, the header (UTF-8 JSON: ``dataset``, ``version``, ``digest`` of the
features the lengths are for, and ``shards``: ``name``, ``size``, ``generation``, ``records``,
``lengths`` (bool), ``steps`` (object name or null)), then for each shard in order its
``records + 1`` offsets and, where ``lengths``, its ``records`` step counts, all int64
little-endian.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import struct
import threading
from typing import Any

import crc32c
import numpy as np

from torch_rlds import _files, _paths
from torch_rlds._info import DatasetFormatError, DatasetInfo, _check_inside
from torch_rlds._state_file import loads_strict
from torch_rlds._tfrecord import RecordIndex, _check_offsets

logger = logging.getLogger(__name__)

PUBLISHED_NAME = "torch_rlds.index"
STEPS_FOLDER = "torch_rlds.steps"
INDEX_DIR_ENV = "TORCH_RLDS_INDEX_DIR"
FORMAT_VERSION = 1
# 1 GiB holds the offsets and lengths of 60M episodes; the largest OXE dataset has ~100k.
MAX_PUBLISHED_BYTES = 1 << 30
_MAGIC = b"TRLDSIDX"
_PREFIX = struct.Struct("<8sIQI")
_STEP_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_MAX_STEP_INDEX_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class PublishedShard:
    """What a published index holds of one shard.

    Attributes:
      name: the shard's path relative to the dataset's version directory.
      size, generation: the shard the entry was made from (see the module).
      offsets: its record offsets (``records + 1``, read-only).
      lengths: the steps of each record, or ``None``.
      steps: the object name of its step index in ``torch_rlds.steps/``, or ``None``.
    """

    name: str
    size: int
    generation: str
    offsets: np.ndarray
    lengths: np.ndarray | None
    steps: str | None

    def matches(self, size: int, generation: str | None) -> bool:
        """Whether the entry was made from a shard of this size and generation."""
        return self.size == size and self.generation == generation


@dataclasses.dataclass(frozen=True)
class PublishedIndex:
    """The contents of a ``torch_rlds.index`` object (see the module for its layout).

    Attributes:
      dataset, version: the dataset it was published for.
      digest: the features digest its lengths and step indexes were made for (``None`` when
        it holds none).
      shards: shard name -> :class:`PublishedShard`.
    """

    dataset: str
    version: str
    digest: str | None
    shards: dict[str, PublishedShard]

    def to_bytes(self) -> bytes:
        """The object's bytes."""
        entries, arrays = [], []
        for shard in self.shards.values():
            entries.append({"name": shard.name, "size": shard.size,
                            "generation": shard.generation, "records": len(shard.offsets) - 1,
                            "lengths": shard.lengths is not None, "steps": shard.steps})
            arrays.append(np.asarray(shard.offsets, dtype="<i8").tobytes())
            if shard.lengths is not None:
                arrays.append(np.asarray(shard.lengths, dtype="<i8").tobytes())
        header = json.dumps({"dataset": self.dataset, "version": self.version,
                             "digest": self.digest, "shards": entries},
                            separators=(",", ":")).encode()
        body = b"".join([header, *arrays])
        return _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header), crc32c.crc32c(body)) + body

    @classmethod
    def from_bytes(cls, data: bytes | memoryview, where: str) -> PublishedIndex:
        """Parse and check the object ``data`` (named ``where`` in errors); raises
        :class:`~torch_rlds.DatasetFormatError` naming the field for anything amiss."""
        view = memoryview(data).cast("B")
        if view.nbytes < _PREFIX.size:
            raise DatasetFormatError(f"{where}: {view.nbytes} bytes, too short for a published "
                                     "index")
        magic, version, header_size, crc = _PREFIX.unpack_from(view)
        if magic != _MAGIC:
            raise DatasetFormatError(f"{where}: not a torch_rlds published index (no "
                                     f"{_MAGIC.decode()} magic)")
        if version != FORMAT_VERSION:
            raise DatasetFormatError(f"{where}: format version {version}; this torch_rlds "
                                     f"reads version {FORMAT_VERSION}")
        body = _PREFIX.size + header_size
        if header_size > view.nbytes - _PREFIX.size:
            raise DatasetFormatError(f"{where}: header of {header_size} bytes runs past the "
                                     f"end of the object ({view.nbytes} bytes)")
        if crc32c.crc32c(view[_PREFIX.size:]) != crc:
            raise DatasetFormatError(f"{where}: CRC mismatch: the object is damaged or was "
                                     "cut short")
        try:
            header = loads_strict(bytes(view[_PREFIX.size:body]))
        except ValueError as e:
            raise DatasetFormatError(f"{where}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise DatasetFormatError(f"{where}: header must be a JSON object")
        dataset = _field(header, "dataset", str, where)
        version_name = _field(header, "version", str, where)
        digest = _field(header, "digest", (str, type(None)), where)
        entries = _field(header, "shards", list, where)
        shards: dict[str, PublishedShard] = {}
        pos = body
        for k, entry in enumerate(entries):
            at = f"{where}: shards[{k}]"
            if not isinstance(entry, dict):
                raise DatasetFormatError(f"{at} must be an object")
            name = _field(entry, "name", str, at)
            _check_inside(name, at)
            if name in shards:
                raise DatasetFormatError(f"{at}: shard {name!r} is listed twice")
            size = _field(entry, "size", int, at)
            records = _field(entry, "records", int, at)
            generation = _field(entry, "generation", str, at)
            has_lengths = _field(entry, "lengths", bool, at)
            steps = _field(entry, "steps", (str, type(None)), at)
            if steps is not None and (not _STEP_NAME.fullmatch(steps) or steps in (".", "..")):
                raise DatasetFormatError(f"{at}: steps must be a plain object name (got "
                                         f"{steps[:80]!r})")
            if size < 0 or not 0 <= records <= size // 16:
                raise DatasetFormatError(f"{at}: {records} records cannot fill a shard of "
                                         f"{size} bytes")
            need = 8 * (records + 1 + (records if has_lengths else 0))
            if pos + need > view.nbytes:
                raise DatasetFormatError(f"{at}: its arrays need {need} bytes at byte {pos}, "
                                         f"the object ends at {view.nbytes}")
            offsets = _array(view[pos:pos + 8 * (records + 1)])
            pos += 8 * (records + 1)
            try:
                _check_offsets(offsets, size, f"{at} ({name})")
            except ValueError as e:
                raise DatasetFormatError(str(e)) from None
            lengths = None
            if has_lengths:
                lengths = _array(view[pos:pos + 8 * records])
                pos += 8 * records
                # a step holds at least one byte of the record's payload
                if (lengths < 0).any() or (lengths > np.diff(offsets) - 16).any():
                    raise DatasetFormatError(f"{at} ({name}): step counts must lie between 0 "
                                             "and the size of their record")
            shards[name] = PublishedShard(name, size, generation, offsets, lengths, steps)
        if pos != view.nbytes:
            raise DatasetFormatError(f"{where}: {view.nbytes - pos} bytes after the last "
                                     "shard's arrays")
        return cls(dataset, version_name, digest, shards)


def _field(raw: dict, key: str, kind: Any, where: str) -> Any:
    if key not in raw:
        raise DatasetFormatError(f"{where}: field {key!r} is missing")
    value = raw[key]
    bad_bool = isinstance(value, bool) and kind is int
    if bad_bool or not isinstance(value, kind):
        raise DatasetFormatError(f"{where}: field {key!r} has the wrong type "
                                 f"({type(value).__name__})")
    return value


def _array(view: memoryview) -> np.ndarray:
    array = np.frombuffer(view, dtype="<i8").astype(np.int64)
    array.flags.writeable = False
    return array


def _join(folder: str, *names: str) -> str:
    return "/".join([folder.rstrip("/"), *names])


def shard_name(info: DatasetInfo, path: str | os.PathLike) -> str:
    """The name of the shard at ``path`` relative to the version directory of ``info``."""
    prefix, path = os.fspath(info.path).rstrip("/") + "/", os.fspath(path)
    return path[len(prefix):] if path.startswith(prefix) else path


def published_folder(info: DatasetInfo, dest: str | os.PathLike | None) -> str:
    """Where :func:`publish` puts a dataset's index: its version directory when ``dest`` is
    ``None``, else ``dest/<name>/<version>``."""
    if dest is None:
        return os.fspath(info.path)
    return _join(os.fspath(dest), info.name, info.version)


def _read(path: str, limit: int) -> bytes | None:
    if _paths.is_remote(path):
        return _paths.read_object(path, limit)
    return _files.read_regular(path, limit)


def _write(path: str, data: bytes) -> None:
    """Write the object ``path`` whole: one upload, or a local file renamed into place."""
    if _paths.is_remote(path):
        _paths.write_object(path, data)
        return
    _files.write_atomic(path, data)


class SharedIndex:
    """The published index a source may use, read on first need, and what it was used for.

    Args:
      info: the dataset.
      index_dir: a folder of published indexes (``<index_dir>/<name>/<version>/``), looked in
        before the data's own folder; default ``$TORCH_RLDS_INDEX_DIR``.

    Thread-safe (shards are indexed in threads). Pickles without what it read: a process it
    is sent to reads it again if it needs it.
    """

    def __init__(self, info: DatasetInfo, index_dir: str | os.PathLike | None = None) -> None:
        self.info = info
        where = index_dir if index_dir is not None else os.environ.get(INDEX_DIR_ENV) or None
        self.candidates: list[str] = []
        if where is not None:
            self.candidates.append(_join(published_folder(info, where), PUBLISHED_NAME))
        beside = _join(os.fspath(info.path), PUBLISHED_NAME)
        if info.objects is not None:  # remote: the listing says whether it is there
            if PUBLISHED_NAME in info.objects:
                self.candidates.append(beside)
        elif os.path.isfile(beside):
            self.candidates.append(beside)
        self.url: str | None = None
        self._index: PublishedIndex | None = None
        self._looked = False
        self._lock = threading.Lock()
        self.used: set[str] = set()
        self.stale: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_index=None, _looked=False, url=None, used=set(), stale=set())
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def index(self) -> PublishedIndex | None:
        """The first candidate that exists and parses (read once), or ``None``; one that does
        not parse is skipped with a warning."""
        with self._lock:
            if self._looked:
                return self._index
            for url in self.candidates:
                try:
                    data = _read(url, MAX_PUBLISHED_BYTES)
                except (FileNotFoundError, NotADirectoryError, _files.SpecialFileError):
                    continue
                try:
                    if data is None:
                        raise DatasetFormatError(f"{url}: larger than {MAX_PUBLISHED_BYTES} "
                                                 "bytes")
                    index = PublishedIndex.from_bytes(data, url)
                except DatasetFormatError as e:
                    logger.warning("torch_rlds: ignoring the published index %s", e)
                    continue
                if (index.dataset, index.version) != (self.info.name, self.info.version):
                    logger.warning("torch_rlds: ignoring the published index %s: it is for "
                                   "%s %s, not %s %s", url, index.dataset, index.version,
                                   self.info.name, self.info.version)
                    continue
                self._index, self.url = index, url
                break
            self._looked = True
            return self._index

    def name_of(self, path: str) -> str:
        """A shard's name relative to the version directory."""
        return shard_name(self.info, path)

    def offsets(self, path: str, size: int, generation: str) -> np.ndarray | None:
        """The published offsets of the shard at ``path`` if its entry was made from this very
        size and generation; else ``None``, and the shard is counted as stale (the
        :data:`~torch_rlds._tfrecord.PublishedOffsets` callable of ``build_indexes``)."""
        index = self.index()
        if index is None:
            return None
        name = self.name_of(path)
        entry = index.shards.get(name)
        with self._lock:
            if entry is None or not entry.matches(size, generation):
                self.stale.add(name)
                return None
            self.used.add(name)
        return entry.offsets

    def shard(self, record_index: RecordIndex) -> PublishedShard | None:
        """The entry of the shard ``record_index`` was loaded for, if it was made from that
        very size and generation."""
        index = self.index()
        entry = None if index is None else index.shards.get(self.name_of(record_index.path))
        if entry is None or not entry.matches(record_index.file_size, record_index.generation):
            return None
        return entry

    def read_steps(self, entry: PublishedShard) -> bytes | None:
        """The bytes of ``entry``'s published step index (one read), or ``None`` when it has
        none or it cannot be read."""
        if entry.steps is None or self.url is None:
            return None
        url = _join(self.url.rsplit("/", 1)[0], STEPS_FOLDER, entry.steps)
        try:
            return _read(url, _MAX_STEP_INDEX_BYTES)
        except (OSError, _files.SpecialFileError) as e:
            logger.warning("torch_rlds: cannot read the published step index %s (%s)", url, e)
            return None

    def report(self, total: int) -> None:
        """Say in one line how many of ``total`` shards were indexed here because their
        published entry did not match them (nothing when none was)."""
        if self.stale:
            logger.warning(
                "torch_rlds: the published index %s does not match %d of %d shards of %s %s "
                "(changed or added since it was published); indexed those %d here",
                self.url, len(self.stale), total, self.info.name, self.info.version,
                len(self.stale))


@dataclasses.dataclass
class PublishReport:
    """What :func:`publish` wrote.

    Attributes:
      url: the ``torch_rlds.index`` object.
      shards, records: shards and records it covers.
      bytes: its size.
      lengths: whether it holds the steps of every record.
      step_indexes: step index objects written beside it.
      note: why lengths or step indexes are missing, or ``""``.
    """

    url: str
    shards: int
    records: int
    bytes: int
    lengths: bool
    step_indexes: int
    note: str = ""


def publish(source: Any, dest: str | os.PathLike | None = None, *, step_index: bool = True,
            num_threads: int | None = None, progress: bool = True) -> PublishReport:
    """Publish the index of ``source`` (an :class:`~torch_rlds.RLDSSource`, whose record
    indexes are built) beside its data or under ``dest`` (see the module).

    For tfrecord datasets the step index covers, the steps of every record are counted (or
    taken from the cache) and, with ``step_index``, each shard's step index is built (or taken
    from the cache) and written beside the index. The step index objects are written first, the
    index last, so a host never finds an index naming objects that are not there yet.
    """
    from tqdm import tqdm

    info: DatasetInfo = source.info
    folder = published_folder(info, dest)
    indexes: list[RecordIndex] = source.record_indexes()
    lengths: dict[str, np.ndarray] = {}
    steps: dict[str, str] = {}
    digest, note = None, ""
    if info.file_format == "tfrecord":
        digest, note = _publish_steps(source, folder, lengths, steps, step_index=step_index,
                                      num_threads=num_threads, progress=progress, tqdm=tqdm)
    else:
        note = "array_record shards are read by record: no lengths or step indexes"
    shards = {}
    for index in indexes:
        name = shard_name(info, index.path)
        if index.generation is None:
            raise ValueError(f"{index.path}: its index was not loaded from the shard "
                             "(RecordIndex.load), so its generation is unknown")
        shards[name] = PublishedShard(name, index.file_size, index.generation, index.offsets,
                                      lengths.get(index.path), steps.get(index.path))
    data = PublishedIndex(info.name, info.version, digest, shards).to_bytes()
    url = _join(folder, PUBLISHED_NAME)
    _write(url, data)
    return PublishReport(url, len(shards), sum(len(i) for i in indexes), len(data),
                     bool(lengths), len(steps), note)


def _publish_steps(source: Any, folder: str, lengths: dict[str, np.ndarray],
                   steps: dict[str, str], *, step_index: bool, num_threads: int | None,
                   progress: bool, tqdm: Any) -> tuple[str | None, str]:
    """Fill ``lengths`` and ``steps`` (by shard path) and write the step index objects;
    returns the features digest and a note on what is missing."""
    from torch_rlds._step_index import NotStepAddressable
    from torch_rlds._step_reader import StepFiles

    try:
        files = StepFiles(source)
    except NotStepAddressable as e:
        return None, f"no lengths or step indexes: {e}"
    shard_ids = range(files.num_shards)
    remote = any(_paths.is_remote(files.shard(s).path) for s in shard_ids)
    threads = num_threads or (_files.remote_threads() if remote else os.cpu_count() or 1)

    def one(shard: int) -> tuple[int, np.ndarray, bytes | None]:
        counts = files.shard_lengths(shard)
        if not step_index:
            return shard, counts, None
        built = files.load_index(shard)
        if built is None:
            built = files.build_index(shard)
        return shard, counts, built.to_bytes()

    failed: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(shard_ids)))) as pool:
        done = tqdm(pool.map(_guarded(one, failed), shard_ids), total=len(shard_ids),
                    desc="Counting steps" + (" and building step indexes" if step_index else ""),
                    unit="shard", delay=1.0, leave=False, disable=not progress)
        results = [r for r in done if r is not None]
    if failed:
        return None, f"no lengths or step indexes: {failed[0]}"
    writes = []
    for shard, counts, blob in results:
        index = files.shard(shard)
        lengths[index.path] = counts
        if blob is not None:
            label = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(index.path))[:80]
            name = f"{label}.{index.cache_key}.{files._digest}.trsi"
            steps[index.path] = name
            writes.append((_join(folder, STEPS_FOLDER, name), blob))
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(writes) or 1))) as pool:
        list(pool.map(lambda item: _write(*item), writes))
    return files._digest, ""


def _guarded(function: Any, failed: list[str]) -> Any:
    from torch_rlds._features import EpisodeDecodeError

    def run(shard: int) -> Any:
        try:
            return function(shard)
        except (EpisodeDecodeError, ValueError) as e:
            failed.append(f"{type(e).__name__}: {e}")
            return None

    return run

