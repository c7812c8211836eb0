"""Reading the steps a sample needs: from the step index where it is built, else whole records.

The global order needs, before its first batch, the number of steps of every episode; a sample
needs a few steps of one episode. Both come per tfrecord shard from the torch_rlds cache:

* **lengths**: the steps of every record of a shard, probed from a few feature headers per
  record (:func:`torch_rlds._step_index.probe_steps`) the first time a shard is seen, and
  cached (``<cache>/steps/*.lengths``): seconds for a dataset of thousands of shards;
* **the step index** (:class:`~torch_rlds._step_index.ShardStepIndex`): built by a
  background thread (one pass reading every record whole, its CRC checked) and cached
  (``<cache>/steps/*.trsi``); shards are picked up as they are done.

Both are keyed by the record index's cache key (the shard's path, size, modification time and
a CRC of its ends) and the features, so a changed shard is probed and indexed anew. A reader
(:class:`StepReader`) reads the byte ranges of the steps it is asked for where its shard's
index exists, and otherwise the whole record; both give the same values, so what a sample holds
never depends on how far the build got. Where the cache cannot be written, lengths and indexes
live in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from torch_rlds import _files
from torch_rlds._cache import cache_root
from torch_rlds._features import EpisodeDecodeError, FeatureLeaf
from torch_rlds._images import EncodedImages
from torch_rlds._step_index import (
    RecordBlocks,
    ShardStepIndex,
    decode_values,
    index_record,
    indexed_features,
    probe_steps,
    verify_blocks,
)
from torch_rlds._tfrecord import CorruptRecordError

logger = logging.getLogger(__name__)

# How often a reader looks again for the step index of a shard it found none for.
_RECHECK_S = 10.0
_MAX_LENGTHS_BYTES = 1 << 30


def _folder(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root(create=False) / "steps"


def _digest(features: Sequence[Any]) -> str:
    import hashlib

    text = "\n".join(f"{f.name}:{f.kind}:{int(f.per_step)}:{f.values_per_step}:{f.width}"
                     for f in features)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StepFiles:
    """Where the lengths and step index of each shard of a source live in the cache.

    Args:
      source: an :class:`~torch_rlds.RLDSSource` of tfrecord shards.
      cache_dir: the folder (default ``<cache>/steps``).
    """

    _probed: tuple[int, np.ndarray] | None = None  # (shard, its probed lengths), the last one

    def __init__(self, source: Any, cache_dir: str | os.PathLike | None = None) -> None:
        self.source = source
        self.features = indexed_features(source.features)
        self._shards, self.shard_of, self.record_of = source.tfrecord_shards()
        self._folder = _folder(cache_dir)
        self._digest = _digest(self.features)

    @property
    def num_shards(self) -> int:
        """The shards holding the source's episodes."""
        return len(self._shards)

    def shard(self, shard: int) -> Any:
        """The record index of ``shard`` as the source holds it now."""
        return self.source.record_index(*self._shards[shard])

    def _sizes(self, shard: int) -> np.ndarray:
        offsets = self.shard(shard).offsets
        return np.diff(offsets) - 16  # payload sizes: each record has 16 bytes of framing

    def _path(self, shard: int, suffix: str) -> Path:
        index = self.shard(shard)
        label = os.path.basename(index.path)[:80]
        return self._folder / f"{label}.{index.cache_key}.{self._digest}.{suffix}"

    def index_path(self, shard: int) -> Path:
        """The step index file of ``shard``."""
        return self._path(shard, "trsi")

    def lengths_path(self, shard: int) -> Path:
        """The lengths file of ``shard``."""
        return self._path(shard, "lengths")

    def load_index(self, shard: int) -> ShardStepIndex | None:
        """The step index of ``shard`` from the cache, or ``None`` (none yet, or unreadable: an
        index that does not fit its shard is left for the builder to replace)."""
        path = self.index_path(shard)
        records = self.shard(shard).num_records
        try:
            # Mapped, not read: every worker of every loader on this host shares its pages.
            data = _files.map_regular(os.fspath(path), 64 * (1 << 20) + records * 4096)
        except (OSError, _files.SpecialFileError):
            return None
        if data is None:
            return None
        try:
            index = ShardStepIndex.from_bytes(data, os.fspath(path))
        except ValueError as e:
            logger.warning("torch_rlds: ignoring the step index %s (%s)", path, e)
            return None
        if (len(index) != records or index.features != self.features
                or not np.array_equal(index.sizes, self._sizes(shard))):
            return None  # of another version of the shard: rebuilt by the builder
        return index

    def discard_index(self, shard: int) -> None:
        """Remove the step index file of ``shard`` (found stale: a range did not match its
        CRC), for the builder to build again."""
        with contextlib.suppress(OSError):
            os.unlink(self.index_path(shard))

    def save(self, path: Path, data: bytes) -> bool:
        """Write ``data`` to ``path`` atomically; ``False`` (with one warning per folder) where
        the cache cannot be written."""
        try:
            _files.write_atomic(path, data)
        except OSError as e:
            _warn_once(path.parent, e)
            return False
        return True

    # -- lengths --------------------------------------------------------------------------------
    def shard_lengths(self, shard: int) -> np.ndarray:
        """The steps of every record of ``shard``: from its step index or lengths file, else
        probed (and cached)."""
        index = self.load_index(shard)
        if index is not None and (index.num_steps >= 0).all():
            return np.asarray(index.num_steps, dtype=np.int64)
        path = self.lengths_path(shard)
        sizes = self._sizes(shard)
        records = len(sizes)
        try:
            data = _files.read_regular(os.fspath(path), 16 * records + 64)
        except (OSError, _files.SpecialFileError):
            data = None
        if data is not None and len(data) == 16 * records:
            both = np.frombuffer(data, dtype="<i8").astype(np.int64).reshape(2, records)
            # The payload sizes it was probed from, then the lengths: of this shard, or stale.
            if np.array_equal(both[0], sizes) and (both[1] >= -1).all():
                return both[1]
        lengths = self.published_lengths(shard)
        if lengths is None:
            lengths = self.probe(shard)
        self.save(path, np.concatenate([sizes, lengths]).astype("<i8").tobytes())
        return lengths

    def probe(self, shard: int) -> np.ndarray:
        """The steps of every record of ``shard``, probed from their headers; -1 for a record
        whose headers do not parse (a corrupt one: see :meth:`lengths`)."""
        from torch_rlds._corrupt import CORRUPT_ERRORS

        index = self.shard(shard)
        out = np.empty(index.num_records, dtype=np.int64)
        for record in range(index.num_records):
            size = index.record_size(record)
            try:
                out[record], _ = probe_steps(
                    lambda offset, length, r=record: index.read_range(r, offset, length), size,
                    self.features, name=f"{index.path} record {record}")
            except CORRUPT_ERRORS as e:
                logger.warning("torch_rlds: %s record %d: its steps cannot be counted (%s)",
                               index.path, record, e)
                out[record] = -1
        return out

    def lengths(self, *, progress: bool = True) -> np.ndarray:
        """The steps of every episode of the source, in source order; -1 for an episode whose
        record's headers do not parse (which the dataset refuses, or skips with
        ``on_corrupt="skip"``)."""
        from tqdm import tqdm

        per_shard = [self.shard_lengths(s) for s in tqdm(
            range(self.num_shards), desc="Counting steps", unit="shard", delay=1.0,
            leave=False, disable=not progress)]
        return np.asarray([per_shard[s][r] for s, r in zip(self.shard_of.tolist(),
                                                           self.record_of.tolist())],
                          dtype=np.int64)

    # -- building -------------------------------------------------------------------------------
    def build_index(self, shard: int) -> ShardStepIndex:
        """The step index of ``shard``, saved: every record is read whole (its CRCs checked)
        and decoded (every feature, image headers too), so a corrupt record is found here and
        marked to be read whole, where it raises as it would without an index. Taken from the
        published index instead where it holds one for this very shard."""
        from torch_rlds._corrupt import CORRUPT_ERRORS
        from torch_rlds._images import EncodedImages

        published = self.published_index(shard)
        if published is not None:
            return published
        index = self.shard(shard)
        decoder = self.source.decoder
        records, problems = [], {}
        for record in range(index.num_records):
            name = f"{index.path} record {record}"
            try:
                payload = index.read_view(record)
                episode = decoder.decode(payload, name=name)
                for leaf in decoder.leaves:
                    if leaf.kind == "image":
                        value: Any = episode
                        for part in leaf.path:
                            value = value[part]
                        if isinstance(value, EncodedImages):
                            value.check_headers()
                records.append(index_record(payload, self.features, name=name))
            except CORRUPT_ERRORS as e:
                problems[record] = f"{type(e).__name__}: {e}"
                records.append(RecordBlocks.whole(len(self.features),
                                                  int(self.shard_lengths_probed(shard)[record])))
        built = ShardStepIndex.from_records(self.features, records, self._sizes(shard), problems)
        self.save(self.index_path(shard), built.to_bytes())
        return built

    def shard_lengths_probed(self, shard: int) -> np.ndarray:
        """The probed steps of every record of ``shard`` (the lengths file, else a probe)."""
        if self._probed is None or self._probed[0] != shard:
            path = self.lengths_path(shard)
            sizes = self._sizes(shard)
            try:
                data = _files.read_regular(os.fspath(path), 16 * len(sizes) + 64)
            except (OSError, _files.SpecialFileError):
                data = None
            if data is not None and len(data) == 16 * len(sizes):
                lengths = np.frombuffer(data, dtype="<i8").astype(np.int64)[len(sizes):]
            else:
                lengths = self.probe(shard)
            self._probed = (shard, lengths)
        return self._probed[1]

    def missing(self) -> list[int]:
        """The shards without a step index file."""
        return [s for s in range(self.num_shards) if not self.index_path(s).exists()]

    # -- the published index (torch-rlds index --publish, torch_rlds._shared_index) -------------
    def _published(self, shard: int) -> Any:
        """The source's published entry of ``shard`` when it was made from this very shard and
        for these features, else ``None``."""
        lookup = getattr(self.source, "published_shard", None)
        entry = None if lookup is None else lookup(self.shard(shard))
        shared = getattr(self.source, "shared", None)
        published = None if shared is None else shared.index()
        if entry is None or published is None or published.digest != self._digest:
            return None
        return entry

    def published_lengths(self, shard: int) -> np.ndarray | None:
        """The steps of every record of ``shard`` from the published index, or ``None``."""
        entry = self._published(shard)
        if entry is None or entry.lengths is None:
            return None
        if len(entry.lengths) != self.shard(shard).num_records:
            return None
        return np.array(entry.lengths, dtype=np.int64)

    def published_index(self, shard: int) -> ShardStepIndex | None:
        """The step index of ``shard`` read from the published index (one read) and saved to
        the cache, or ``None`` where it holds none for this shard or it does not fit."""
        entry = self._published(shard)
        data = None if entry is None else self.source.shared.read_steps(entry)
        if data is None:
            return None
        where = f"published step index of {self.shard(shard).path}"
        try:
            index = ShardStepIndex.from_bytes(data, where)
        except ValueError as e:
            logger.warning("torch_rlds: ignoring the %s (%s)", where, e)
            return None
        if (len(index) != self.shard(shard).num_records or index.features != self.features
                or not np.array_equal(index.sizes, self._sizes(shard))):
            logger.warning("torch_rlds: ignoring the %s: it does not fit the shard", where)
            return None
        self.save(self.index_path(shard), data)
        return index


_warned: set[str] = set()


def _warn_once(folder: Path, error: OSError) -> None:
    import warnings

    if os.fspath(folder) not in _warned:
        _warned.add(os.fspath(folder))
        warnings.warn(f"torch_rlds: cannot write step lengths and indexes to {folder} ({error}); "
                      "they stay in memory (set TORCH_RLDS_CACHE to a writable folder to keep "
                      "them)", stacklevel=3)


class IndexBuilder:
    """Builds the missing step indexes of a source in one background thread, shard by shard.

    A shard that does not index (a record the index does not cover, or a damaged one) is left
    to whole-record reads; the reason is logged once. :meth:`join` waits for the end.
    """

    def __init__(self, files: StepFiles, *, progress: bool = True) -> None:
        self.files = files
        self.failed: dict[int, str] = {}
        self._stop = threading.Event()
        self._progress = progress
        self._thread = threading.Thread(target=self._run, name="torch_rlds-step-index",
                                        daemon=True)

    def start(self) -> IndexBuilder:
        """Start building (if any shard lacks its index); returns ``self``."""
        self._thread.start()
        return self

    def _run(self) -> None:
        from tqdm import tqdm

        missing = self.files.missing()
        with tqdm(total=len(missing), desc="Step index (background)", unit="shard", delay=5.0,
                  leave=False, disable=not self._progress or not missing) as bar:
            for shard in missing:
                if self._stop.is_set():
                    return
                try:
                    built = self.files.build_index(shard)
                except (ValueError, OSError) as e:  # the shard itself does not read
                    self.failed[shard] = f"{type(e).__name__}: {e}"
                    logger.warning("torch_rlds: shard %s keeps whole-record reads (%s)",
                                   self.files.shard(shard).path, e)
                else:
                    for record, why in built.problems.items():
                        logger.warning("torch_rlds: %s record %d is read whole: %s",
                                       self.files.shard(shard).path, record, why)
                bar.update(1)

    def stop(self) -> None:
        """Stop after the shard being built."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the build; ``True`` once it has ended."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()


class StepReader:
    """Reads steps of episodes of a source, as the decoder would give them (a thread-safe,
    picklable view: each process loads the indexes it needs on first use).

    :meth:`read` returns the episode's features for the steps asked, in the layout of
    :class:`~torch_rlds._features.EpisodeDecoder` but *sparse*: every step feature spans the
    episode's ``num_steps`` and only the rows asked for hold values (the rest are zeros, empty
    strings or ``None`` frames). Episode-level features are whole.
    """

    def __init__(self, files: StepFiles, lengths: np.ndarray) -> None:
        self.files = files
        self.lengths = lengths
        self._indexes: dict[int, ShardStepIndex] = {}
        self._absent: dict[int, float] = {}
        self._lock = threading.Lock()
        self._leaves: dict[str, FeatureLeaf] | None = None
        self._dtypes: dict[str, np.dtype] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_indexes={}, _absent={}, _leaves=None, _dtypes=None)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _index(self, shard: int) -> ShardStepIndex | None:
        index = self._indexes.get(shard)
        if index is not None:
            return index
        seen = self._absent.get(shard)
        if seen is not None and time.monotonic() - seen < _RECHECK_S:
            return None
        index = self.files.load_index(shard)
        with self._lock:
            if index is None:
                self._absent[shard] = time.monotonic()
            else:
                self._indexes[shard] = index
                self._absent.pop(shard, None)
        return index

    def _specs(self) -> tuple[dict[str, FeatureLeaf], dict[str, np.dtype]]:
        if self._leaves is None:
            from tensorflow_datasets.core import utils

            from torch_rlds._features import iter_leaves

            source = self.files.source
            flat = utils.flatten_nest_dict(source.features.get_serialized_info())
            self._dtypes = {name: np.dtype(info.np_dtype) if info.np_dtype is not None
                            else np.dtype(object) for name, info in flat.items()}
            self._leaves = {leaf.name: leaf for leaf in iter_leaves(source.features)}
        return self._leaves, cast(dict[str, np.dtype], self._dtypes)  # set with _leaves

    def leaf(self, name: str) -> FeatureLeaf:
        """The feature ``name`` (``steps/observation/image``) of the source."""
        return self._specs()[0][name]

    def indexed(self, episode: int) -> bool:
        """Whether reads of ``episode`` go by byte range (its shard's index is loaded)."""
        return self._index(int(self.files.shard_of[episode])) is not None

    def read(self, episode: int, wants: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
        """Features of ``episode``: ``wants`` maps a feature name (``steps/action``) to the
        first and last step to read (ignored for episode-level features)."""
        shard = int(self.files.shard_of[episode])
        record = int(self.files.record_of[episode])
        steps = int(self.lengths[episode])
        index = self._index(shard)
        name = self.files.source.describe(episode)
        if index is None or index.whole(record):
            return self._from_record(episode, wants, steps, name)
        if int(index.num_steps[record]) != steps:
            raise EpisodeDecodeError(f"{name}: {int(index.num_steps[record])} steps in the step "
                                     f"index, {steps} counted (the shard changed)")
        try:
            return self._by_range(index, shard, record, wants, steps, name)
        except (CorruptRecordError, IndexError) as error:
            # The index does not fit the shard as it is now (rewritten behind the cache):
            # read the record whole, which checks its CRCs, and have the index built again.
            logger.warning("torch_rlds: the step index of %s does not fit it (%s); reading "
                           "whole records until it is built again",
                           self.files.shard(shard).path, error)
            with self._lock:
                self._indexes.pop(shard, None)
                self._absent[shard] = time.monotonic()
            self.files.discard_index(shard)
            return self._from_record(episode, wants, steps, name)

    def _by_range(self, index: ShardStepIndex, shard: int, record: int,
                  wants: Mapping[str, tuple[int, int]], steps: int,
                  name: str) -> dict[str, Any]:
        leaves, dtypes = self._specs()
        shard_index = self.files.shard(shard)
        episode_tree: dict[str, Any] = {}
        for key, (first, last) in wants.items():
            f = index.feature(key)
            feature = index.features[f]
            if feature.per_step:
                first, last = max(0, first), min(steps - 1, last)
                if first > last:
                    continue
            start, end, blocks = index.byte_range(record, f, first, last)
            data = memoryview(shard_index.read_range(record, start, end - start))
            verify_blocks(data, start, blocks, name)
            values = decode_values(feature, data)
            held_first, held_last = index.steps_of(record, f, first, last)
            _place(episode_tree, leaves[key], dtypes[key], values, held_first, held_last, steps,
                   feature.per_step, name, self.files.source.decoder)
        return episode_tree

    def _from_record(self, episode: int, wants: Mapping[str, tuple[int, int]], steps: int,
                     name: str) -> dict[str, Any]:
        decoded = self.files.source.episode(episode)
        out: dict[str, Any] = {}
        leaves, _ = self._specs()
        for key in wants:
            leaf = leaves[key]
            value: Any = decoded
            for part in leaf.path:
                value = value[part]
            if leaf.per_step and len(value) != steps:
                raise EpisodeDecodeError(f"{name}: feature {key} has {len(value)} steps, the "
                                         f"cached step count is {steps} (the shard changed)")
            _set(out, leaf.path, value)
        return out


def _place(tree: dict[str, Any], leaf: FeatureLeaf, dtype: np.dtype, values: Any, first: int,
           last: int, steps: int, per_step: bool, name: str, decoder: Any) -> None:
    """Decode ``values`` of steps ``first..last`` of ``leaf`` as the decoder would, and set
    them into ``tree`` at the leaf's path, spread over the episode's ``steps``."""
    raw = values if leaf.kind == "image" or dtype.kind == "O" else np.array(values, dtype=dtype)
    if not per_step:
        raw = raw[0] if isinstance(raw, list) else (raw.reshape(leaf.shape) if leaf.shape
                                                    else raw.reshape(()).item())
        _set(tree, leaf.path, decoder._decode_leaf(leaf, raw, name))
        return
    if isinstance(raw, np.ndarray) and leaf.shape and None not in leaf.shape:
        raw = raw.reshape((-1, *leaf.shape))  # as the parser shapes a step feature
    decoded = decoder._decode_leaf(leaf, raw, name)
    count = last - first + 1
    if isinstance(decoded, EncodedImages):
        frames: list[Any] = [None] * steps
        frames[first:last + 1] = decoded.encoded
        full: Any = EncodedImages(frames, decoded.shape, decoded.dtype, name=decoded.name,
                                  format=decoded.format)
    else:
        if len(decoded) != count:
            raise EpisodeDecodeError(f"{name}: feature {leaf.name}: {len(decoded)} steps read, "
                                     f"{count} expected")
        if decoded.dtype == object:
            full = np.full(steps, "", dtype=object)
        else:
            full = np.zeros((steps, *decoded.shape[1:]), dtype=decoded.dtype)
        full[first:last + 1] = decoded
    _set(tree, leaf.path, full)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
