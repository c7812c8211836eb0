"""Where each step's values sit inside an episode's record: reading a few steps, not the episode.

An RLDS episode is one ``tf.train.Example`` record. TFDS stores each step feature as one list
of the episode's values (``steps/observation/image``: a list of ``T`` encoded frames;
``steps/action``: ``T * 7`` packed floats), so the values of steps ``a..b`` of a feature are
one contiguous run of bytes inside the record. The step index records, per record and feature,
where those runs start, cut into **blocks** of consecutive steps with a CRC32C each:

* a block holds one step of a feature whose values are large (an image frame) and up to 64
  steps of one whose values are small (a state vector), about :data:`BLOCK_BYTES` at most;
* reading steps ``a..b`` of a feature reads the blocks that cover them in one ``pread`` and
  checks each block's CRC, so a partial read is verified as the whole record's CRC would be;
* features outside ``steps`` (``episode_metadata``) are one block each.

The index is built by one pass over the records (each read whole, its record CRC checked) and
stored per shard as one file: a JSON header naming the features, then numpy arrays (see
:class:`ShardStepIndex`). It reads what TFDS writes (lists as single packed or length-delimited
runs, the layout protobuf serialises); a record laid out otherwise is reported as not
step-addressable and the dataset is read whole-record instead.

array_record shards keep whole-record reads: their records sit in compressed chunks, so a byte
range of a record is not a byte range of the file.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Sequence
from typing import Any

import crc32c
import numpy as np

from torch_rlds._features import EpisodeDecodeError

# A block of a small-valued feature holds as many steps as fit in this many bytes (at most
# _MAX_BLOCK_STEPS): a sample's action chunk or state window is then one or two blocks, and
# the index stays about 8 bytes per block.
BLOCK_BYTES = 2048
_MAX_BLOCK_STEPS = 64
INDEX_VERSION = 2
_MAGIC = b"TRSI"  # torch_rlds step index
_MAX_PROBLEM = 300  # characters of a record's problem kept in the index

# Wire kinds of a tf.train.Feature (its oneof field numbers).
BYTES, FLOATS, INT64S = 1, 2, 3
_KIND_NAMES = {BYTES: "bytes_list", FLOATS: "float_list", INT64S: "int64_list"}


class NotStepAddressable(EpisodeDecodeError):
    """A record whose layout the step index does not cover (the dataset is read whole)."""


@dataclasses.dataclass(frozen=True)
class IndexedFeature:
    """One serialized feature of the dataset, as the index covers it.

    Attributes:
      name: the key in the ``tf.train.Example`` (``steps/observation/image``).
      kind: :data:`BYTES`, :data:`FLOATS` or :data:`INT64S`.
      per_step: whether it lives under ``steps``.
      values_per_step: values each step holds (1 for bytes; ``prod(shape)`` for tensors).
      width: bytes per value when fixed (4 for floats, 1 for booleans, stored as 0 or 1);
        0 for varying (other integers, bytes).
    """

    name: str
    kind: int
    per_step: bool
    values_per_step: int
    width: int = 0


def indexed_features(features: Any) -> tuple[IndexedFeature, ...]:
    """The features a dataset's records hold, from its TFDS ``FeaturesDict``, in key order.

    Raises :class:`NotStepAddressable` for a feature whose per-step size is not fixed (a
    ragged tensor, or a tensor with an open dimension): its values cannot be cut by step.
    """
    from tensorflow_datasets.core import utils

    flat = utils.flatten_nest_dict(features.get_serialized_info())
    out = []
    for name in sorted(flat):
        info = flat[name]
        dtype = np.dtype(info.np_dtype) if info.np_dtype is not None else np.dtype(object)
        per_step = name.startswith("steps/")
        shape = tuple(info.shape)[1:] if per_step else tuple(info.shape)
        if dtype.kind in "OSU":
            kind = BYTES
        elif dtype.kind == "f":
            kind = FLOATS
        elif dtype.kind in "biu":
            kind = INT64S
        else:
            raise NotStepAddressable(f"feature {name}: dtype {dtype} has no tf.train.Feature kind")
        if any(d is None for d in shape) or (kind == BYTES and shape):
            raise NotStepAddressable(f"feature {name}: shape {shape} per step is not fixed")
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        width = 4 if kind == FLOATS else 1 if dtype == np.bool_ else 0
        out.append(IndexedFeature(name, kind, per_step, size, width))
    return tuple(out)


# -- protobuf wire format --------------------------------------------------------------------------
def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise NotStepAddressable(f"varint runs past its field at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """``(field number, wire type, value start, value end)`` of the length-delimited fields of
    a message in ``buf[start:end]``; other wire types raise :class:`NotStepAddressable`."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if tag & 7 != 2:
            raise NotStepAddressable(f"field {tag >> 3} at byte {pos} has wire type {tag & 7}, "
                                     "expected a length-delimited field")
        length, pos = _varint(buf, pos, end)
        if pos + length > end:
            raise NotStepAddressable(f"field {tag >> 3} at byte {pos} runs {length} bytes past "
                                     f"its message's end ({end})")
        yield tag >> 3, pos, pos + length
        pos += length


def feature_spans(record: memoryview) -> dict[str, tuple[int, int, int]]:
    """``key -> (kind, list start, list end)`` of every feature of a serialized
    ``tf.train.Example``: where the content of its ``BytesList``/``FloatList``/``Int64List``
    message lies in ``record``."""
    spans = {}
    end = len(record)
    for number, start, stop in _fields(record, 0, end):
        if number != 1:
            continue  # Example.features
        for entry_number, entry_start, entry_stop in _fields(record, start, stop):
            if entry_number != 1:
                continue  # Features.feature (map entries)
            key = value = None
            for field, a, b in _fields(record, entry_start, entry_stop):
                if field == 1:
                    key = bytes(record[a:b]).decode("utf-8", errors="replace")
                elif field == 2:
                    value = (a, b)
            if key is None or value is None:
                raise NotStepAddressable(f"map entry at byte {entry_start} lacks its key or "
                                         "value")
            kinds = list(_fields(record, *value))
            if len(kinds) != 1:
                raise NotStepAddressable(f"feature {key} holds {len(kinds)} lists, expected 1")
            kind, list_start, list_stop = kinds[0]
            spans[key] = (kind, list_start, list_stop)
    return spans


def _value_bounds(record: memoryview, feature: IndexedFeature, start: int, stop: int
                  ) -> tuple[np.ndarray, int]:
    """The byte offset where each value of the list ``record[start:stop]`` starts (its end
    last), and how many values it holds.

    A bytes value starts at its field tag; a packed numeric list's values lie in its single
    packed field (several packed runs or unpacked values raise :class:`NotStepAddressable`).
    """
    if feature.kind == BYTES:
        bounds = [a for a, _ in _tagged(record, start, stop)]
        bounds.append(stop)
        return np.asarray(bounds, dtype=np.int64), len(bounds) - 1
    runs = list(_fields(record, start, stop)) if stop > start else []
    if not runs:
        return np.asarray([stop], dtype=np.int64), 0
    if len(runs) != 1 or runs[0][0] != 1:
        raise NotStepAddressable(f"feature {feature.name}: {len(runs)} value runs, expected one "
                                 "packed run")
    _, a, b = runs[0]
    if feature.kind == FLOATS:
        if (b - a) % 4:
            raise NotStepAddressable(f"feature {feature.name}: {b - a} bytes of floats")
        return np.arange(a, b + 1, 4, dtype=np.int64), (b - a) // 4
    return _varint_bounds(record, a, b), -1


def _tagged(record: memoryview, start: int, stop: int):
    """``(field start, payload end)`` of each value of a BytesList's content."""
    pos = start
    while pos < stop:
        field = pos
        tag, pos = _varint(record, pos, stop)
        if tag != 0x0A:
            raise NotStepAddressable(f"bytes value at byte {field}: tag {tag}, expected 10")
        length, pos = _varint(record, pos, stop)
        pos += length
        if pos > stop:
            raise NotStepAddressable(f"bytes value at byte {field} runs past its list")
        yield field, pos


def _varint_bounds(record: memoryview, start: int, stop: int) -> np.ndarray:
    data = np.frombuffer(record, dtype=np.uint8, count=stop - start, offset=start)
    ends = np.flatnonzero(data < 0x80) + 1 + start
    if data.size and data[-1] >= 0x80:
        raise NotStepAddressable(f"packed varints at byte {start} end inside a value")
    return np.concatenate([[start], ends]).astype(np.int64)


def decode_values(feature: IndexedFeature, data: memoryview | bytes) -> Any:
    """The values a run of blocks of ``feature`` holds, as ``ExampleParserNp`` would give them
    before its dtype conversion: a list of bytes, a float32 array or an int64 array."""
    data = memoryview(data)
    if feature.kind == BYTES:
        return [bytes(data[a:b]) for a, b in _payloads(data)]
    if feature.kind == FLOATS:
        if data.nbytes % 4:
            raise EpisodeDecodeError(f"feature {feature.name}: {data.nbytes} bytes of floats")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    raw = np.frombuffer(data, dtype=np.uint8)
    if not (raw >= 0x80).any():  # every value below 128 (flags, small ints): one byte each
        return raw.astype(np.int64)
    ends = np.flatnonzero(raw < 0x80)
    values = np.zeros(len(ends), dtype=np.uint64)
    start = 0
    for i, end in enumerate(ends.tolist()):
        value = 0
        for shift, byte in enumerate(raw[start:end + 1].tolist()):
            value |= (byte & 0x7F) << (7 * shift)
        values[i] = value & ((1 << 64) - 1)
        start = end + 1
    return values.view(np.int64)


def _payloads(data: memoryview):
    pos, stop = 0, data.nbytes
    while pos < stop:
        tag, pos = _varint(data, pos, stop)
        if tag != 0x0A:
            raise EpisodeDecodeError(f"bytes value at byte {pos}: tag {tag}, expected 10")
        length, pos = _varint(data, pos, stop)
        if pos + length > stop:
            raise EpisodeDecodeError(f"bytes value at byte {pos} runs past its range")
        yield pos, pos + length
        pos += length


# -- the number of steps, from a few headers --------------------------------------------------------
# Bytes read at each map entry a probe visits: its key, and the headers of its list.
_PROBE_READ = 256


def probe_steps(read: Any, size: int, features: Sequence[IndexedFeature], *,
                name: str = "record") -> tuple[int, int]:
    """The number of steps of a record of ``size`` bytes, from the headers of its features.

    ``read(offset, length)`` returns bytes of the record. The map entries are visited in the
    record's order until one is a packed fixed-width step feature (floats, or booleans stored
    one byte each), whose byte length gives the count; a record without one counts the values
    of its first bytes step feature instead. Returns ``(steps, reads)``. A few reads of
    :data:`_PROBE_READ` bytes per record, wherever the images lie: what the global order needs
    before the step index is built.
    """
    widths = {f.name: f.width * f.values_per_step for f in features if f.per_step and f.width}
    counted = {f.name: f for f in features if f.per_step and f.kind == BYTES}
    reads = 0

    def window(offset: int) -> memoryview:
        nonlocal reads
        reads += 1
        return memoryview(read(offset, min(_PROBE_READ, size - offset))).cast("B")

    head = window(0)
    tag, pos = _varint(head, 0, len(head))
    length, pos = _varint(head, pos, len(head))
    if tag != 0x0A or pos + length > size:
        raise NotStepAddressable(f"{name}: not a tf.train.Example of {size} bytes")
    end, entry = pos + length, pos
    fallback = None
    while entry < end:
        buf = window(entry)
        tag, p = _varint(buf, 0, len(buf))
        entry_length, p = _varint(buf, p, len(buf))
        entry_end = entry + p + entry_length
        key_tag, p = _varint(buf, p, len(buf))
        key_length, p = _varint(buf, p, len(buf))
        key = bytes(buf[p:p + key_length]).decode("utf-8", errors="replace")
        p += key_length
        if tag != 0x0A or key_tag != 0x0A or p > len(buf):
            raise NotStepAddressable(f"{name}: map entry at byte {entry} does not parse")
        if key in widths or (key in counted and fallback is None):
            _, p = _varint(buf, p, len(buf))  # Feature's tag
            _, p = _varint(buf, p, len(buf))  # Feature's length
            kind_tag, p = _varint(buf, p, len(buf))
            list_length, p = _varint(buf, p, len(buf))
            if key in widths and kind_tag >> 3 in (FLOATS, INT64S):
                if list_length == 0:
                    return 0, reads
                packed_tag, p = _varint(buf, p, len(buf))
                packed_length, p = _varint(buf, p, len(buf))
                if packed_tag == 0x0A and packed_length % widths[key] == 0:
                    return packed_length // widths[key], reads
            elif key in counted and kind_tag >> 3 == BYTES:
                fallback = (entry + p, entry + p + list_length)
        entry = entry_end
    if fallback is None:
        raise NotStepAddressable(f"{name}: no step feature to count the steps by")
    steps, pos = 0, fallback[0]
    while pos < fallback[1]:
        buf = window(pos)
        _, p = _varint(buf, 0, len(buf))
        value_length, p = _varint(buf, p, len(buf))
        pos += p + value_length
        steps += 1
    return steps, reads


# -- one record ------------------------------------------------------------------------------------
@dataclasses.dataclass
class RecordBlocks:
    """The blocks of one record: per feature, the block size in steps, the block start offsets
    (the run's end last) and each block's CRC32C."""

    num_steps: int
    block_steps: list[int]
    offsets: list[np.ndarray]
    crcs: list[np.ndarray]

    @classmethod
    def whole(cls, num_features: int, num_steps: int = -1) -> RecordBlocks:
        """A record the index does not cut into blocks: it is read whole (one that is corrupt,
        or laid out otherwise than the index covers)."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(num_steps, [0] * num_features, [empty] * num_features,
                   [np.zeros(0, dtype=np.uint32)] * num_features)


def index_record(record: memoryview | bytes, features: Sequence[IndexedFeature], *,
                 name: str = "record") -> RecordBlocks:
    """The blocks of a serialized episode. Raises :class:`NotStepAddressable` when a feature
    is missing, has another kind, or a step feature's value count does not divide into the
    episode's steps."""
    record = memoryview(record).cast("B")
    spans = feature_spans(record)
    num_steps = None
    block_steps, offsets, crcs = [], [], []
    for feature in features:
        span = spans.get(feature.name)
        if span is None:
            raise NotStepAddressable(f"{name}: feature {feature.name} is missing")
        kind, start, stop = span
        if kind != feature.kind:
            raise NotStepAddressable(f"{name}: feature {feature.name} is a "
                                     f"{_KIND_NAMES.get(kind, kind)}, expected "
                                     f"{_KIND_NAMES[feature.kind]}")
        bounds, count = _value_bounds(record, feature, start, stop)
        count = len(bounds) - 1 if count < 0 else count
        if feature.per_step:
            steps, extra = divmod(count, feature.values_per_step)
            if extra:
                raise NotStepAddressable(f"{name}: feature {feature.name} holds {count} values, "
                                         f"not a multiple of {feature.values_per_step} per step")
            if num_steps is None:
                num_steps = steps
            elif steps != num_steps:
                raise NotStepAddressable(f"{name}: feature {feature.name} has {steps} steps, "
                                         f"others {num_steps}")
            step_bounds = bounds[::feature.values_per_step] if steps else bounds[-1:]
            size = int(bounds[-1] - bounds[0])
            per_step = size / steps if steps else size
            k = max(1, min(_MAX_BLOCK_STEPS, int(BLOCK_BYTES // max(per_step, 1))))
            starts = step_bounds[:-1][::k] if steps else step_bounds[:0]
            block_offsets = np.concatenate([starts, step_bounds[-1:]]).astype(np.int64)
        else:
            k = 1
            block_offsets = np.asarray([bounds[0], bounds[-1]], dtype=np.int64)
        block_crcs = np.asarray([crc32c.crc32c(record[a:b]) for a, b in
                                 zip(block_offsets[:-1].tolist(), block_offsets[1:].tolist())],
                                dtype=np.uint32)
        block_steps.append(k)
        offsets.append(block_offsets)
        crcs.append(block_crcs)
    return RecordBlocks(num_steps or 0, block_steps, offsets, crcs)


# -- one shard -------------------------------------------------------------------------------------
class ShardStepIndex:
    """The step index of one tfrecord shard: for record ``r`` and feature ``f`` (in the order
    of the index's ``features``), ``num_steps[r]``, the block size ``block_steps[r, f]`` and the
    blocks ``offsets[first[r, f] : first[r, f] + n + 1]`` (payload offsets; the last is the
    run's end) with ``crcs[first[r, f] : ... + n]``, ``n`` blocks. ``sizes[r]`` is the payload
    size the index was built from (an index whose sizes differ from the shard's is stale). A
    record with a block size of 0 is read whole: ``problems`` says why (it is corrupt, or laid
    out otherwise than the index covers).

    Immutable (arrays are read-only, often memory-mapped), so thread-safe.
    """

    def __init__(self, features: Sequence[IndexedFeature], num_steps: np.ndarray,
                 block_steps: np.ndarray, first: np.ndarray, offsets: np.ndarray,
                 crcs: np.ndarray, sizes: np.ndarray,
                 problems: dict[int, str] | None = None) -> None:
        self.features = tuple(features)
        self.num_steps = num_steps
        self.block_steps = block_steps
        self.first = first
        self.offsets = offsets
        self.crcs = crcs
        self.sizes = sizes
        self.problems = dict(problems or {})
        self._position = {f.name: i for i, f in enumerate(self.features)}

    def whole(self, record: int) -> bool:
        """Whether ``record`` is read whole (see the class docstring)."""
        return bool(self.block_steps.shape[1]) and int(self.block_steps[record, 0]) == 0

    @classmethod
    def from_records(cls, features: Sequence[IndexedFeature], records: Sequence[RecordBlocks],
                     sizes: Sequence[int] | np.ndarray, problems: dict[int, str] | None = None
                     ) -> ShardStepIndex:
        """Assemble the index of a shard from its records' blocks and payload sizes, in record
        order (``problems``: why each record built with :meth:`RecordBlocks.whole` is)."""
        num_features = len(features)
        num_steps = np.asarray([r.num_steps for r in records], dtype=np.int64)
        block_steps = np.asarray([r.block_steps for r in records],
                                 dtype=np.int32).reshape(len(records), num_features)
        first = np.zeros((len(records), num_features), dtype=np.int64)
        offsets, crcs = [], []
        cursor = 0
        for r, blocks in enumerate(records):
            for f in range(num_features):
                first[r, f] = cursor
                offsets.append(blocks.offsets[f])
                if len(blocks.offsets[f]):  # the run's end offset has no block, so no CRC
                    crcs.append(np.append(blocks.crcs[f], np.uint32(0)))
                cursor += len(blocks.offsets[f])
        return cls(features, num_steps, block_steps, first, _join(offsets), _join(crcs),
                   np.asarray(sizes, dtype=np.int64), problems)

    # -- reading -------------------------------------------------------------------------------
    def feature(self, name: str) -> int:
        """The position of feature ``name`` in :attr:`features`; ``KeyError`` if not indexed."""
        return self._position[name]

    def byte_range(self, record: int, feature: int, first_step: int, last_step: int
                   ) -> tuple[int, int, list[tuple[int, int, int]]]:
        """``(start, end, blocks)`` of the payload bytes that hold steps
        ``first_step..last_step`` of ``feature`` in ``record``; ``blocks`` lists each covering
        block as ``(start, end, crc)``. An episode-level feature has one block (steps ignored)."""
        k = int(self.block_steps[record, feature])
        base = int(self.first[record, feature])
        if self.features[feature].per_step:
            steps = int(self.num_steps[record])
            if not 0 <= first_step <= last_step < steps:
                raise IndexError(f"steps {first_step}..{last_step} of a record of {steps} steps")
            a, b = first_step // k, last_step // k + 1
        else:
            a, b = 0, 1
        bounds = self.offsets[base + a: base + b + 1].tolist()
        crcs = self.crcs[base + a: base + b].tolist()
        return bounds[0], bounds[-1], list(zip(bounds[:-1], bounds[1:], crcs))

    def steps_of(self, record: int, feature: int, first_step: int, last_step: int
                 ) -> tuple[int, int]:
        """The first and last step the blocks returned by :meth:`byte_range` hold."""
        k = int(self.block_steps[record, feature])
        if not self.features[feature].per_step:
            return 0, 0
        steps = int(self.num_steps[record])
        return (first_step // k) * k, min(steps, (last_step // k + 1) * k) - 1

    # -- storage -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The file form: magic, header length, JSON header, then the arrays."""
        arrays = self._arrays()
        header = json.dumps({
            "version": INDEX_VERSION,
            "features": [dataclasses.asdict(f) for f in self.features],
            "problems": {str(r): why[:_MAX_PROBLEM] for r, why in self.problems.items()},
            "arrays": {name: [str(a.dtype), list(a.shape)] for name, a in arrays.items()},
        }, sort_keys=True).encode()
        pad = (-(len(_MAGIC) + 8 + len(header))) % 8
        parts = [_MAGIC, struct.pack("<Q", len(header) + pad), header, b" " * pad]
        parts += [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
        return b"".join(parts)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"num_steps": self.num_steps, "block_steps": self.block_steps,
                "first": self.first, "offsets": self.offsets, "crcs": self.crcs,
                "sizes": self.sizes}

    @classmethod
    def from_bytes(cls, data: memoryview | bytes, where: str = "step index") -> ShardStepIndex:
        """Read :meth:`to_bytes`' form (``data`` may be a memory map); raises ``ValueError``
        naming ``where`` for anything else."""
        data = memoryview(data).cast("B")
        if data.nbytes < 12 or bytes(data[:4]) != _MAGIC:
            raise ValueError(f"{where}: not a torch_rlds step index")
        (size,) = struct.unpack_from("<Q", data, 4)
        if 12 + size > data.nbytes:
            raise ValueError(f"{where}: header of {size} bytes runs past the file")
        try:
            header = json.loads(bytes(data[12:12 + size]).decode())
            if header.get("version") != INDEX_VERSION:
                raise ValueError(f"version {header.get('version')!r}")
            features = [IndexedFeature(**f) for f in header["features"]]
            layout = header["arrays"]
            problems = {int(r): str(why) for r, why in header.get("problems", {}).items()}
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{where}: unreadable header ({e})") from None
        arrays, pos = {}, 12 + size
        for name in ("num_steps", "block_steps", "first", "offsets", "crcs", "sizes"):
            try:
                dtype, shape = np.dtype(layout[name][0]), tuple(int(d) for d in layout[name][1])
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}: array {name}: {e}") from None
            count = int(np.prod(shape, dtype=np.int64))
            nbytes = count * dtype.itemsize
            if dtype.kind not in "iu" or count < 0 or pos + nbytes > data.nbytes:
                raise ValueError(f"{where}: array {name} ({dtype}, {shape}) does not fit the file")
            arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=pos).reshape(shape)
            pos += nbytes
        if pos != data.nbytes:
            raise ValueError(f"{where}: {data.nbytes - pos} bytes after the arrays")
        index = cls(features, **arrays, problems=problems)
        index._check(where)
        return index

    def _check(self, where: str) -> None:
        records, num_features = self.first.shape if self.first.ndim == 2 else (-1, -1)
        if (num_features != len(self.features) or self.block_steps.shape != self.first.shape
                or self.num_steps.shape != (records,) or self.crcs.shape != self.offsets.shape
                or self.sizes.shape != (records,)):
            raise ValueError(f"{where}: arrays of inconsistent shapes")
        if records and num_features and (
                int(self.first.min()) < 0 or int(self.first.max()) > len(self.offsets)
                or int(self.block_steps.min()) < 0 or int(self.num_steps.min()) < -1):
            raise ValueError(f"{where}: block positions out of range")

    def __len__(self) -> int:
        return len(self.num_steps)


def _join(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.uint32) if parts else np.zeros(0, np.uint32)


def verify_blocks(data: memoryview, start: int, blocks: Sequence[tuple[int, int, int]],
                  where: str) -> None:
    """Check the CRC of every block of a range read from ``start``; raises
    :class:`~torch_rlds.CorruptRecordError` naming ``where`` and the block's offset."""
    from torch_rlds._tfrecord import CorruptRecordError

    for a, b, crc in blocks:
        found = crc32c.crc32c(data[a - start:b - start])
        if found != crc:
            raise CorruptRecordError(f"{where}: bad CRC of bytes {a}..{b} of the record: found "
                                     f"{found:#010x}, the step index expects {crc:#010x}")
