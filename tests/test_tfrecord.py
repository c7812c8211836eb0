"""Tests for torch_rlds._tfrecord: writing, indexing, caching and checked reads of TFRecord."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

import crc32c
import numpy as np
import pytest
from tqdm import tqdm

from torch_rlds import _tfrecord
from torch_rlds._tfrecord import (
    CorruptRecordError,
    RecordIndex,
    TFRecordError,
    TruncatedShardError,
    build_index,
    build_indexes,
    masked_crc,
    write_tfrecord,
)

MB = 1 << 20


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the torch_rlds cache at a temporary folder so no test touches ~/.cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("TORCH_RLDS_CACHE", str(folder))
    return folder


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "dataset"
    folder.mkdir()
    return folder


def _records(sizes: list[int], seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]


def _reference_masked_crc(data: bytes) -> int:
    """The TFRecord masked CRC written out from its definition, independent of the module."""
    crc = crc32c.crc32c(data)
    rotated = ((crc >> 15) | (crc << 17)) % 2**32
    return (rotated + 0xA282EAD8) % 2**32


def _reference_parse(path: Path) -> list[bytes]:
    """A minimal TFRecord reader that checks every field, sharing no code with the module."""
    data = path.read_bytes()
    records, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == _reference_masked_crc(data[pos : pos + 8])
        payload = data[pos + 12 : pos + 12 + length]
        assert len(payload) == length
        (payload_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert payload_crc == _reference_masked_crc(payload)
        records.append(payload)
        pos += 16 + length
    assert pos == len(data)
    return records


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


class CountingFile:
    """Wraps a binary file and counts the bytes its read() calls return."""

    def __init__(self, f) -> None:
        self._f = f
        self.bytes_read = 0
        self.read_calls = 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.bytes_read += len(data)
        self.read_calls += 1
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)


def test_masked_crc_matches_definition_and_known_crc32c_vectors() -> None:
    # CRC-32C check values (RFC 3720 B.4 and the standard "123456789" check value) pin the
    # underlying CRC, so the masked values below do not just restate the module's formula.
    assert crc32c.crc32c(b"123456789") == 0xE3069283
    assert crc32c.crc32c(bytes(32)) == 0x8A9136AA
    for data in [b"", b"123456789", bytes(32), b"\xff" * 32, struct.pack("<Q", 100_000)]:
        assert masked_crc(data) == _reference_masked_crc(data)
    assert masked_crc(b"123456789") == ((0xE3069283 >> 15 | 0xE3069283 << 17) + 0xA282EAD8) % 2**32
    assert masked_crc(memoryview(b"123456789")) == masked_crc(b"123456789")


def test_written_file_parses_with_independent_reader(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord-00000-of-00001"
    records = _records([0, 1, 5, 1000])
    written = write_tfrecord(path, records)
    assert written == path.stat().st_size == sum(len(r) + 16 for r in records)
    assert _reference_parse(path) == records
    # The header of the empty record: eight zero length bytes, then their masked CRC.
    head = path.read_bytes()[:16]
    assert head[:8] == bytes(8)
    assert struct.unpack("<I", head[8:12])[0] == _reference_masked_crc(bytes(8))
    assert struct.unpack("<I", head[12:16])[0] == _reference_masked_crc(b"")


def test_round_trip_of_varied_sizes(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    records = _records([0, 1, 100 * 1024, 0, 7, 3])
    write_tfrecord(path, records)
    index = RecordIndex.load(path)
    assert len(index) == index.num_records == len(records)
    assert index.file_size == path.stat().st_size
    assert index.offsets.dtype == np.int64
    assert index.offsets[-1] == index.file_size
    assert [index.record_size(i) for i in range(len(records))] == [len(r) for r in records]
    with index.open() as f:
        assert [index.read(i, f) for i in range(len(records))] == records
    with path.open("rb") as f:  # a buffered file works as well as the raw one from open()
        assert [index.read(i, f) for i in reversed(range(len(records)))] == records[::-1]
    assert index.read(2) == records[2]  # opens the file itself
    assert isinstance(index.read(0), bytes)
    assert bytes(index.read_view(2)) == records[2]


def test_empty_shard(dataset_dir: Path) -> None:
    path = dataset_dir / "empty.tfrecord"
    assert write_tfrecord(path, []) == 0
    index = RecordIndex.load(path)
    assert index.num_records == 0
    assert index.offsets.tolist() == [0]


def test_build_index_reads_only_headers(dataset_dir: Path) -> None:
    path = dataset_dir / "big.tfrecord"
    num_records = 8
    write_tfrecord(path, (bytes([i]) * MB for i in range(num_records)))
    size = path.stat().st_size
    with open(path, "rb") as raw:
        f = CountingFile(raw)
        offsets = build_index(f, size, str(path))
    assert f.bytes_read == 12 * num_records
    assert f.read_calls == num_records
    assert offsets.tolist() == [i * (MB + 16) for i in range(num_records + 1)]


def test_read_is_one_read_call_of_the_whole_record(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    records = _records([10, 5000, 0])
    write_tfrecord(path, records)
    index = RecordIndex.load(path)
    with index.open() as raw:
        f = CountingFile(raw)
        for i, record in enumerate(records):
            before_calls, before_bytes = f.read_calls, f.bytes_read
            assert index.read(i, f) == record
            assert f.read_calls - before_calls == 1
            assert f.bytes_read - before_bytes == len(record) + 16


def test_index_is_cached_and_reused(
    dataset_dir: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = dataset_dir / "data.tfrecord"
    records = _records([3, 30, 300])
    write_tfrecord(path, records)
    first = RecordIndex.load(path)

    def fail(*args, **kwargs):
        raise AssertionError("build_index called although the index is cached")

    monkeypatch.setattr(_tfrecord, "build_index", fail)
    second = RecordIndex.load(path)
    np.testing.assert_array_equal(first.offsets, second.offsets)
    assert second.read(1) == records[1]
    # The cache lives in the configured folder, and the dataset folder is left untouched.
    cached = list((cache_dir / "index").glob("*.npy"))
    assert len(cached) == 1
    assert sorted(p.name for p in dataset_dir.iterdir()) == ["data.tfrecord"]
    assert np.load(cached[0], allow_pickle=False).tolist() == first.offsets.tolist()


def test_cache_dir_argument_overrides_the_default(
    dataset_dir: Path, tmp_path: Path, cache_dir: Path
) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([1, 2]))
    own = tmp_path / "own_cache"
    RecordIndex.load(path, cache_dir=own)
    assert len(list(own.glob("*.npy"))) == 1
    assert not (cache_dir / "index").exists() or not list((cache_dir / "index").iterdir())
    assert sorted(p.name for p in dataset_dir.iterdir()) == ["data.tfrecord"]


def test_index_is_rebuilt_when_the_shard_changes(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([10, 20]))
    assert RecordIndex.load(path).num_records == 2
    new_records = _records([1, 2, 3, 4], seed=1)
    write_tfrecord(path, new_records)
    index = RecordIndex.load(path)
    assert index.num_records == 4
    assert index.offsets.tolist() == [0, 17, 35, 54, 74]
    assert [index.read(i) for i in range(4)] == new_records


def test_index_is_rebuilt_when_size_matches_but_mtime_differs(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([10, 10]))
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert RecordIndex.load(path).offsets.tolist() == [0, 26, 52]
    write_tfrecord(path, _records([4, 16]))  # same total size, different layout
    os.utime(path, ns=(2_000_000_000, 2_000_000_000))
    assert RecordIndex.load(path).offsets.tolist() == [0, 20, 52]


def test_stale_or_broken_cache_file_is_rebuilt(dataset_dir: Path, cache_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([10, 10]))
    RecordIndex.load(path)
    (cached,) = (cache_dir / "index").glob("*.npy")
    # Well formed, but its last offset is not the file size: the shard grew since.
    np.save(cached, np.array([0, 26], dtype=np.int64))
    assert RecordIndex.load(path).offsets.tolist() == [0, 26, 52]
    cached.write_bytes(b"not a numpy file")
    assert RecordIndex.load(path).offsets.tolist() == [0, 26, 52]
    assert np.load(cached, allow_pickle=False).tolist() == [0, 26, 52]


def test_flipped_payload_byte_raises_corrupt_record(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([50, 60]))
    index = RecordIndex.load(path)
    _flip_byte(path, 66 + 12 + 5)  # inside the payload of record 1, which starts at 66
    assert index.read(0) is not None
    with pytest.raises(CorruptRecordError) as info:
        index.read(1)
    message = str(info.value)
    assert path.name in message
    assert "record 1" in message and "offset 66" in message
    assert "payload CRC" in message and "expected" in message
    assert isinstance(info.value, TFRecordError) and isinstance(info.value, ValueError)


def test_flipped_payload_crc_byte_raises_corrupt_record(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([50]))
    index = RecordIndex.load(path)
    _flip_byte(path, 12 + 50 + 1)
    with pytest.raises(CorruptRecordError, match="payload CRC of record 0 at offset 0"):
        index.read(0)


@pytest.mark.parametrize("byte", [0, 3, 8, 11], ids=["length0", "length3", "crc0", "crc3"])
def test_flipped_header_byte_fails_indexing(dataset_dir: Path, byte: int) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([50, 60]))
    _flip_byte(path, 66 + byte)
    with pytest.raises(CorruptRecordError) as info:
        RecordIndex.load(path)
    message = str(info.value)
    assert path.name in message and "offset 66" in message and "length CRC" in message


def test_header_changed_after_indexing_raises_on_read(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([50, 60]))
    index = RecordIndex.load(path)
    original = path.read_bytes()
    # A well-formed header (its CRC matches) whose length no longer matches the index.
    length = struct.pack("<Q", 59)
    with open(path, "r+b") as f:
        f.seek(66)
        f.write(length + struct.pack("<I", masked_crc(length)))
    with pytest.raises(CorruptRecordError, match="record 1 at offset 66 has stored length 59, "
                                                 "the index expects 60"):
        index.read(1)
    path.write_bytes(original)
    _flip_byte(path, 66)  # the length, which its CRC no longer matches: checked first
    with pytest.raises(CorruptRecordError, match="length CRC of record 1 at offset 66") as info:
        index.read(1)
    assert "stored length" not in str(info.value)  # an unchecked length is not reported
    _flip_byte(path, 66)
    _flip_byte(path, 66 + 9)  # now the length CRC
    with pytest.raises(CorruptRecordError, match="length CRC of record 1 at offset 66"):
        index.read(1)


@pytest.mark.parametrize(
    ("cut", "where"),
    [
        (5, "inside the first header"),
        (11, "inside the first header"),
        (12 + 20, "inside the first payload"),
        (66 + 12 + 59, "inside the last payload"),
        (66 + 16 + 60 - 1, "inside the last CRC"),
        (66 + 3, "inside the second header"),
    ],
)
def test_truncated_shard_fails_indexing(dataset_dir: Path, cut: int, where: str) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([50, 60]))
    with open(path, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(TruncatedShardError) as info:
        RecordIndex.load(path)
    message = str(info.value)
    record_offset = 0 if cut < 66 else 66
    assert path.name in message, where
    assert f"offset {record_offset}" in message, where
    assert f"size {cut}" in message, where


def test_truncation_after_indexing_raises_on_read(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    records = _records([50, 60, 70])
    write_tfrecord(path, records)
    index = RecordIndex.load(path)
    with open(path, "r+b") as f:
        f.truncate(66 + 40)  # inside record 1
    assert index.read(0) == records[0]
    with pytest.raises(TruncatedShardError, match=r"record 1 at offset 66: needs 76 bytes"):
        index.read(1)
    with pytest.raises(TruncatedShardError, match=r"record 2 at offset 142: needs 86 bytes"):
        index.read(2)
    with index.open() as f, pytest.raises(TruncatedShardError, match=path.name):
        index.read(1, f)


def test_out_of_range_index_raises_index_error(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([1, 2, 3]))
    index = RecordIndex.load(path)
    for bad in [3, 100, -1]:
        with pytest.raises(IndexError, match=rf"record index {bad} out of range .* 3 records"):
            index.read(bad)
        with pytest.raises(IndexError, match="valid indices 0 to 2"):
            index.record_size(bad)
    assert index.read(np.int64(2)) == _records([1, 2, 3])[2]


def test_build_indexes_returns_shards_in_order(dataset_dir: Path) -> None:
    paths, expected = [], []
    for shard in range(7):
        path = dataset_dir / f"data.tfrecord-{shard:05d}-of-00007"
        records = _records([shard + 1] * (shard + 1), seed=shard)
        write_tfrecord(path, records)
        paths.append(path)
        expected.append(records)
    indexes = build_indexes(paths, num_threads=3)
    assert [index.path for index in indexes] == [str(p) for p in paths]
    assert [index.num_records for index in indexes] == [len(r) for r in expected]
    assert [index.read(len(r) - 1) for index, r in zip(indexes, expected)] == [
        r[-1] for r in expected
    ]
    assert build_indexes([]) == []


def test_build_indexes_raises_the_first_error(dataset_dir: Path) -> None:
    good = dataset_dir / "good.tfrecord"
    bad = dataset_dir / "bad.tfrecord"
    write_tfrecord(good, _records([5]))
    write_tfrecord(bad, _records([5]))
    with open(bad, "r+b") as f:
        f.truncate(10)
    with pytest.raises(TruncatedShardError, match="bad.tfrecord"):
        build_indexes([good, bad], num_threads=2)
    with pytest.raises(ValueError, match=r"num_threads must be >= 1 \(got 0\)"):
        build_indexes([good], num_threads=0)


def test_offsets_are_read_only(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    write_tfrecord(path, _records([1, 2]))
    index = RecordIndex.load(path)
    with pytest.raises(ValueError, match="read-only"):
        index.offsets[0] = 5


def test_build_index_advances_progress_by_bytes(dataset_dir: Path) -> None:
    path = dataset_dir / "data.tfrecord"
    size = write_tfrecord(path, _records([100] * 3000))
    with open(path, "rb") as f, tqdm(total=size, file=io.StringIO(), mininterval=0) as bar:
        build_index(f, size, str(path), progress=bar)
        assert bar.n == size


def test_a_synchronous_store_without_generations_is_read_by_exact_ranges_in_threads(
        cache_dir: Path) -> None:
    """fsspec's memory filesystem stands for a store that is not asynchronous and lists no
    generation: its shards are known by their mtime and a CRC of their ends, indexed in
    threads, and read in one request per record."""
    import fsspec

    from torch_rlds._tfrecord import read_ranges, read_records

    fs = fsspec.filesystem("memory")
    records = [_records([30, 5, 70], seed=s) for s in range(3)]
    paths = []
    for s, recs in enumerate(records):
        buf = io.BytesIO()
        for r in recs:
            buf.write(struct.pack("<Q", len(r)))
            buf.write(struct.pack("<I", masked_crc(struct.pack("<Q", len(r)))))
            buf.write(r)
            buf.write(struct.pack("<I", masked_crc(r)))
        fs.pipe_file(f"/torch-rlds-test/shard{s}", buf.getvalue())
        paths.append(f"memory://torch-rlds-test/shard{s}")
    try:
        indexes = build_indexes(paths, progress=False)
        assert [i.generation.startswith("mtime:") for i in indexes] == [True] * 3
        assert [len(i) for i in indexes] == [3, 3, 3]
        items = [(indexes[s], r) for s in (2, 0, 1) for r in (2, 0)]
        assert [bytes(v) for v in read_records(items)] == [records[s][r] for s in (2, 0, 1)
                                                          for r in (2, 0)]
        assert [bytes(v) for v in read_ranges([(indexes[1], 2, 10, 5),
                                               (indexes[0], 0, 0, 3)])] == [
            records[1][2][10:15], records[0][0][:3]]
        again = build_indexes(paths, progress=False)  # from the cache, under the same key
        assert [i.cache_key for i in again] == [i.cache_key for i in indexes]
    finally:
        fs.rm("/torch-rlds-test", recursive=True)
