"""Random access to the episodes of one split of an RLDS dataset, without TensorFlow."""

from __future__ import annotations

import bisect
import os
import stat
import threading
import types
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from etils import epath

from torch_rlds import _array_record, _files, _paths
from torch_rlds._features import EpisodeDecoder, iter_leaves, load_features
from torch_rlds._info import DatasetFormatError, DatasetInfo, SplitInfo, load_dataset_info
from torch_rlds._paths import ObjectInfo
from torch_rlds._shared_index import PublishedShard, SharedIndex
from torch_rlds._tfrecord import RecordIndex, TFRecordError, build_indexes, read_records


class RLDSSource:
    """Episodes of one split (or TFDS split expression) of a TFDS dataset, by index.

    ``source[i]`` (or ``source.episode(i)``) decodes episode ``i`` through the dataset's own
    ``features.json``: step features stacked on a time axis, text as ``str``, images left encoded
    (:class:`~torch_rlds.EncodedImages`) unless ``decode_images=True``.

    On construction it checks the shards against ``dataset_info.json`` (each present; for
    tfrecord, each record count and the split's byte count; for array_record, each record count)
    and, for tfrecord, loads the byte offset of every record from the cache, else from a
    published index (``torch-rlds index PATH --publish``, see ``torch_rlds._shared_index``)
    made from that very shard, else builds it (headers only, see
    :class:`torch_rlds._tfrecord.RecordIndex`). Every tfrecord read verifies both CRCs.

    From an object store (``gs://``...) it starts with a constant number of requests: one
    listing of the version directory gives every shard's size and generation, then
    ``dataset_info.json`` and ``features.json`` are one read each; a host whose cache has the
    indexes makes no request per shard, one with a published index one read in all, and one
    that indexes makes one 12-byte request per record, shards in parallel. Episodes are read
    by exact byte range, one request each (:meth:`read_many` reads a batch concurrently).

    Reads are deterministic. One source may be used from several threads; it holds no open file
    (reads go through a bounded set of handles per process, see ``torch_rlds._files``), so it
    pickles, forks and is sent to worker processes as it is. A tfrecord record that does not
    match its cached offset makes the source index that shard again, once, before the error
    stands.

    Args:
      path: a dataset version directory, a dataset directory (newest version), or, with
        ``data_dir``, a TFDS name (``bridge`` or ``bridge:0.1.0``).
      split: a TFDS split expression: ``train``, ``train[:90%]``, ``train[10:20]``, ``train+val``.
      data_dir: the TFDS data directory when ``path`` is a name.
      cache_dir: where record indexes are cached (default ``$TORCH_RLDS_CACHE/index``).
      index_dir: a folder of published indexes (``<index_dir>/<name>/<version>/``) to look in
        before the data's own folder (default ``$TORCH_RLDS_INDEX_DIR``); either is read only
        when a shard misses the cache.

    Attributes:
      info: the dataset's :class:`~torch_rlds.DatasetInfo`.
      shared: the published index this source may use (``torch_rlds._shared_index
        .SharedIndex``: where it looks, the shards it took from it, those that did not match);
        ``None`` for array_record datasets.
    """

    def __init__(self, path: str | os.PathLike, split: str = "train", *,
                 data_dir: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 index_dir: str | os.PathLike | None = None) -> None:
        self.info = load_dataset_info(path, data_dir)
        self.split = split
        self._cache_dir = cache_dir
        self._ranges = _resolve_split(self.info, split)
        self._starts = list(np.cumsum([0] + [stop - start for _, start, stop in self._ranges]))
        self.shared = (SharedIndex(self.info, index_dir)
                       if self.info.file_format == "tfrecord" else None)
        names = sorted({r[0] for r in self._ranges}, key=list(self.info.splits).index)
        self._readers = {name: _open_reader(self.info, self.info.splits[name], cache_dir,
                                            self.shared) for name in names}
        if self.shared is not None:
            self.shared.report(sum(len(self.info.splits[n].shard_paths) for n in names))
        self._decoder: EpisodeDecoder | None = None
        self._features = None

    # -- pickling: workers reopen files and rebuild the decoder from features.json
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decoder"] = None
        state["_features"] = None
        return state

    @property
    def features(self):
        """The dataset's TFDS ``FeaturesDict``, read from ``features.json``."""
        if self._features is None:
            self._features = load_features(self.info.path)
        return self._features

    @property
    def decoder(self) -> EpisodeDecoder:
        """The :class:`EpisodeDecoder` for this dataset's features."""
        if self._decoder is None:
            self._decoder = EpisodeDecoder(self.features)
        return self._decoder

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def ranges(self) -> tuple[tuple[str, int, int], ...]:
        """``(split name, first episode, end)`` of each part of the split expression, in the
        order the source numbers its episodes."""
        return tuple(self._ranges)

    def locate(self, index: int) -> tuple[str, int]:
        """The split name and the episode index within that whole split for ``index``."""
        n = len(self)
        if not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            raise IndexError(f"episode index {index} out of range: {self.split!r} has {n} episodes")
        r = bisect.bisect_right(self._starts, int(index)) - 1
        name, start, _ = self._ranges[r]
        return name, start + int(index) - int(self._starts[r])

    def read(self, index: int) -> bytes | memoryview:
        """The serialized ``tf.train.Example`` of episode ``index`` (CRC-checked for tfrecord)."""
        name, episode = self.locate(index)
        return self._readers[name].read(episode)

    def read_many(self, indices: Sequence[int]) -> list[bytes | memoryview]:
        """``read`` of every episode in ``indices``, in that order: from an object store
        concurrently, one exact-range request per episode (what a window of the window order
        needs next costs one round trip, not one per episode); locally one after another.
        Holds at most the episodes asked for."""
        located = [self.locate(i) for i in indices]
        if self.info.file_format != "tfrecord":
            return [self._readers[name].read(e) for name, e in located]
        items = []
        for name, episode in located:
            reader = cast(_TFRecordReader, self._readers[name])  # tfrecord: checked above
            shard, record = reader._shard_of(episode)
            items.append((reader.indexes[shard], record))
        try:
            return list(read_records(items))
        except TFRecordError:
            # One of them does not match its index: read one by one, so that the shard is
            # indexed again once (see the class docstring) and the error names the record.
            return [self._readers[name].read(e) for name, e in located]

    def record_indexes(self) -> list[RecordIndex]:
        """The record index of every shard of the splits this source reads (tfrecord), in
        split and shard order, empty shards included."""
        out: list[RecordIndex] = []
        for reader in self._readers.values():
            out.extend(getattr(reader, "indexes", ()))
        return out

    def published_shard(self, index: RecordIndex) -> PublishedShard | None:
        """What the published index holds of the shard of ``index``, when it was made from that
        very shard (its size and generation), else ``None``."""
        return None if self.shared is None else self.shared.shard(index)

    def tfrecord_shards(self) -> tuple[list[tuple[str, int]], np.ndarray, np.ndarray]:
        """The shards holding this source's episodes, as ``(split name, shard)`` (see
        :meth:`record_index`), and for each episode ``(shard, record)``: its shard's position
        in that list and its record there. Raises ``ValueError`` for array_record datasets
        (their records are no byte ranges of a file)."""
        if self.info.file_format != "tfrecord":
            raise ValueError(f"{self.info.path}: {self.info.file_format} shards are read by "
                             "record, not by byte range")
        shards: list[tuple[str, int]] = []
        position: dict[tuple[str, int], int] = {}
        shard_of = np.empty(len(self), dtype=np.int64)
        record_of = np.empty(len(self), dtype=np.int64)
        first = 0
        for name, start, stop in self._ranges:
            reader = self._readers[name]
            for episode in range(start, stop):
                shard, record = reader._shard_of(episode)
                if (name, shard) not in position:
                    position[name, shard] = len(shards)
                    shards.append((name, shard))
                shard_of[first], record_of[first] = position[name, shard], record
                first += 1
        return shards, shard_of, record_of

    def record_index(self, split: str, shard: int) -> RecordIndex:
        """The record index of shard ``shard`` of split ``split`` as it is now (a reader
        replaces an index it found stale: see :meth:`read`)."""
        return cast(_TFRecordReader, self._readers[split]).indexes[shard]

    def describe(self, index: int) -> str:
        """``file @ offset`` (tfrecord) or ``file #record`` of episode ``index``, for messages."""
        name, episode = self.locate(index)
        return self._readers[name].describe(episode)

    def episode(self, index: int, *, decode_images: bool = False) -> dict[str, Any]:
        """Episode ``index`` as a nested dict (see the class docstring)."""
        data = self.read(index)
        return self.decoder.decode(data, name=self.describe(index), decode_images=decode_images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.episode(index)

    def leaves(self):
        """The feature leaves (:class:`torch_rlds._features.FeatureLeaf`), in key order."""
        return tuple(iter_leaves(self.features))

    def __repr__(self) -> str:
        return (f"RLDSSource({self.info.name}:{self.info.version}, split={self.split!r}, "
                f"episodes={len(self)}, format={self.info.file_format})")


def _resolve_split(info: DatasetInfo, split: str) -> list[tuple[str, int, int]]:
    import tensorflow_datasets as tfds

    counts = {name: types.SimpleNamespace(num_examples=s.num_episodes)
              for name, s in info.splits.items()}
    try:
        instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(counts)
    except (ValueError, AssertionError) as e:
        raise ValueError(
            f"split {split!r} of {info.path}: {e} (splits: "
            + ", ".join(f"{n} ({s.num_episodes} episodes)" for n, s in info.splits.items()) + ")"
        ) from e
    ranges = []
    for ins in instructions:
        n = info.splits[ins.splitname].num_episodes
        start = 0 if ins.from_ is None else ins.from_
        stop = n if ins.to is None else ins.to
        ranges.append((ins.splitname, start, stop))
    return ranges


class _ShardedReader:
    """Maps an episode index of one split to a shard and reads it.

    Holds no open file: reads go through the process's bounded handles (``torch_rlds._files``),
    which a forked child never inherits, so a reader is safe to fork, pickle and share between
    threads.
    """

    def __init__(self, split: SplitInfo) -> None:
        self.split = split
        self._ends = list(np.cumsum(split.shard_lengths))

    def read(self, episode: int) -> bytes | memoryview:
        """The serialized record of ``episode`` of the split."""
        raise NotImplementedError

    def describe(self, episode: int) -> str:
        """Where ``episode`` lies (its shard and record), for messages."""
        raise NotImplementedError

    def _shard_of(self, episode: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self._ends, episode)
        return shard, episode - (self._ends[shard - 1] if shard else 0)

    def _check_shards(self, info: DatasetInfo) -> list[ObjectInfo] | None:
        """Raise unless every shard exists and is a regular file (an object); for remote
        shards, returns what the listings said of each (their folders listed once each)."""
        if not _paths.is_remote(info.path):
            for path in self.split.shard_paths:
                _check_shard_file(path, self.split)
            return None
        listings: dict[str, dict[str, ObjectInfo]] = {}
        out = []
        for path in self.split.shard_paths:
            folder = os.fspath(path.parent)
            if folder not in listings:
                same = folder.rstrip("/") == os.fspath(info.path).rstrip("/")
                listings[folder] = (info.objects if same and info.objects is not None
                                    else _listing(folder))
            entry = listings[folder].get(path.name)
            if entry is None:
                raise FileNotFoundError(f"{path}: {_where(self.split)} is missing")
            if not entry.is_file:
                raise DatasetFormatError(f"{path}: {_where(self.split)} is a folder, not an "
                                         "object")
            out.append(entry)
        return out


def _listing(folder: str) -> dict[str, ObjectInfo]:
    try:
        return _paths.list_folder(folder)
    except FileNotFoundError:
        return {}


def _where(split: SplitInfo) -> str:
    return (f"shard listed in dataset_info.json (split {split.name!r}, "
            f"{len(split.shard_paths)} shards)")


def _check_shard_file(path: epath.Path, split: SplitInfo) -> None:
    """Raise unless the local shard at ``path`` exists and is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {_where(split)} is missing") from None
    if not stat.S_ISREG(mode):
        raise DatasetFormatError(f"{path}: {_where(split)} is a {_files.kind_of(mode)}, not a "
                                 "regular file")


class _TFRecordReader(_ShardedReader):
    def __init__(self, split: SplitInfo, cache_dir, info: DatasetInfo,
                 shared: SharedIndex | None) -> None:
        super().__init__(split)
        stats = self._check_shards(info)
        self._cache_dir = None if cache_dir is None else epath.Path(cache_dir)
        self.indexes: list[RecordIndex] = build_indexes(
            list(split.shard_paths), cache_dir=self._cache_dir, stats=stats,
            published=shared.offsets if shared is not None and shared.candidates else None,
        )
        payload = 0
        for shard, index in enumerate(self.indexes):
            self._check_count(shard, index)
            payload += index.file_size - 16 * index.num_records
        if split.num_bytes and payload != split.num_bytes:
            raise DatasetFormatError(
                f"split {split.name!r}: shards hold {payload} bytes of records, dataset_info.json "
                f"records numBytes={split.num_bytes} (files: {split.shard_paths[0].parent})"
            )
        # Shards whose index was rebuilt because a record did not match its offset: once each.
        self._rebuilt: set[int] = set()
        self._rebuild_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_rebuild_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._rebuild_lock = threading.Lock()

    def _check_count(self, shard: int, index: RecordIndex) -> None:
        expected = self.split.shard_lengths[shard]
        if index.num_records != expected:
            raise DatasetFormatError(
                f"{self.split.shard_paths[shard]}: {index.num_records} records, "
                f"dataset_info.json records {expected} for this shard"
            )

    def read(self, episode: int) -> memoryview:
        shard, record = self._shard_of(episode)
        index = self.indexes[shard]
        try:
            return index.read_view(record)
        except TFRecordError as error:
            fresh = self._reindex(shard, index, error)
        return fresh.read_view(record)

    def _reindex(self, shard: int, index: RecordIndex, error: TFRecordError) -> RecordIndex:
        """The shard's index built anew from the file, once per shard, when a record did not
        match its offset (a shard rewritten with the same size, mtime and ends as the one the
        cached index was built from); re-raises ``error`` when that changes nothing."""
        with self._rebuild_lock:
            current = self.indexes[shard]
            if current is not index:  # another thread rebuilt it meanwhile
                return current
            if shard in self._rebuilt:
                raise error
            self._rebuilt.add(shard)
            try:
                fresh = RecordIndex.load(index.path, cache_dir=self._cache_dir, progress=False,
                                         rebuild=True)
            except TFRecordError:
                raise error from None  # the shard itself is damaged: the first error stands
            if np.array_equal(fresh.offsets, index.offsets):
                raise error
            self._check_count(shard, fresh)
            self.indexes[shard] = fresh
            return fresh

    def describe(self, episode: int) -> str:
        shard, record = self._shard_of(episode)
        offset = int(self.indexes[shard].offsets[record])
        return f"{self.split.shard_paths[shard]} record {record} @ byte {offset}"


class _ArrayRecordReader(_ShardedReader):
    """Reads through :mod:`torch_rlds._array_record`, which keeps the array_record library out
    of every process that forks DataLoader workers."""

    def __init__(self, split: SplitInfo, info: DatasetInfo) -> None:
        super().__init__(split)
        self._check_shards(info)
        for path, expected in zip(split.shard_paths, split.shard_lengths):
            try:
                found = _array_record.num_records(os.fspath(path))
            except _array_record.ArrayRecordError as e:
                raise DatasetFormatError(f"{path}: not a readable array_record shard ({e})") from e
            if found != expected:
                raise DatasetFormatError(
                    f"{path}: {found} records, dataset_info.json records {expected} for this shard"
                )

    def read(self, episode: int) -> bytes:
        shard, record = self._shard_of(episode)
        path = self.split.shard_paths[shard]
        try:
            return _array_record.read(os.fspath(path), record)
        except _array_record.ArrayRecordError as e:
            raise DatasetFormatError(f"{path} record {record}: unreadable ({e})") from e

    def describe(self, episode: int) -> str:
        shard, record = self._shard_of(episode)
        return f"{self.split.shard_paths[shard]} record {record}"


def _open_reader(info: DatasetInfo, split: SplitInfo, cache_dir,
                 shared: SharedIndex | None) -> _ShardedReader:
    if info.file_format == "array_record":
        return _ArrayRecordReader(split, info)
    return _TFRecordReader(split, cache_dir, info, shared)
