"""Datasets on an object store, through the simulated ``gs://`` bucket (torch_rlds._simbucket):
what start-up asks of the store (as formulas of shards and records), the published index,
exact-range reads, and exact resume. Latency is 0 except in one small test."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _files, _paths
from torch_rlds._info import DatasetFormatError
from torch_rlds._shared_index import PublishedIndex
from torch_rlds._simbucket import SimulatedBucket
from torch_rlds.bench._remote import write_scaled_dataset
from torch_rlds.testing import assert_resumes_exactly, simulated_bucket

PAGE = 1000  # objects per page of a listing, as GCS pages them


@pytest.fixture
def bucket(tmp_path):
    with simulated_bucket(tmp_path / "bucket", "data") as b:
        yield b


def _scaled(bucket: SimulatedBucket, shards: int, episodes: int) -> str:
    path = write_scaled_dataset(bucket.root, shards, episodes, name=f"scaled{shards}")
    return bucket.url(path)


def _source(url, tmp_path, name="cache", **options):
    return torch_rlds.RLDSSource(url, cache_dir=tmp_path / name, **options)


def _shard_reads(counts) -> list[tuple[str, int, int]]:
    return [r for r in counts.reads if ".tfrecord-" in r[0]]


@pytest.mark.parametrize("shards", [10, 100, 1000])
def test_start_up_requests_are_a_formula_of_shards_and_records(bucket, tmp_path, shards):
    episodes = 2 * shards + 3
    url = _scaled(bucket, shards, episodes)
    pages = math.ceil((shards + 2) / PAGE)  # the shards, dataset_info.json, features.json
    bucket.reset_counts()

    source = _source(url, tmp_path)
    cold = bucket.reset_counts()
    # one listing for every shard's size and generation, one read of dataset_info.json, and
    # one exact 12-byte read per record header: nothing per shard beyond its records
    assert (cold.list, cold.info, cold.read) == (pages, 0, 1 + episodes)
    assert len(source) == episodes
    headers = _shard_reads(cold)
    assert len(headers) == episodes and all(end - start == 12 for _, start, end in headers)

    _source(url, tmp_path)
    warm = bucket.reset_counts()
    assert (warm.list, warm.info, warm.read, warm.requests) == (pages, 0, 1, pages + 1)
    source.features  # noqa: B018 - features.json: one more read, whatever the size
    assert bucket.reset_counts().snapshot()["requests"] == 1


def test_bytes_moved_per_episode_equal_its_record_size(bucket, tmp_path, write_dataset):
    local = write_dataset(num_episodes=5, num_shards=2, min_steps=2, max_steps=6)
    url = bucket.url(_copy_into(bucket, local))
    source = _source(url, tmp_path)
    for i in range(len(source)):
        bucket.reset_counts()
        data = source.read(i)
        counts = bucket.reset_counts()
        name, episode = source.locate(i)
        reader = source._readers[name]
        shard, record = reader._shard_of(episode)
        index = reader.indexes[shard]
        record_bytes = int(index.offsets[record + 1] - index.offsets[record])
        assert (counts.read, counts.bytes_read) == (1, record_bytes)
        assert len(data) == record_bytes - 16  # the payload, framing and CRCs checked

    # a window of episodes: one request per run of adjacent records, the same bytes in all
    order = [4, 0, 2, 1, 3]
    bucket.reset_counts()
    window = source.read_many(order)
    counts = bucket.reset_counts()
    assert [bytes(w) for w in window] == [bytes(source.read(i)) for i in order]
    assert counts.bytes_read == sum(len(w) + 16 for w in window)
    assert counts.read == 2  # episodes 0-2 and 3-4 lie back to back in their shards


def test_reads_of_a_buffered_file_cost_blocks_that_exact_ranges_do_not(bucket, tmp_path):
    url = _scaled(bucket, 1, 50)
    shard = url + "/scaled1-train.tfrecord-00000-of-00001"
    fs, inner = _paths.filesystem(shard)
    size = fs.info(inner)["size"]
    bucket.reset_counts()
    with fs.open(inner, "rb") as f:  # what a reader through gcsfs's readahead file pays
        f.seek(0)
        f.read(12)
        f.seek(size // 2)
        f.read(12)
    buffered = bucket.reset_counts()
    assert buffered.info == 1 and buffered.bytes_read == size  # a 5 MiB block holds it all

    _source(url, tmp_path)
    exact = bucket.reset_counts()
    assert exact.bytes_read == 12 * 50 + os.path.getsize(
        os.path.join(bucket.root, "scaled1", "1.0.0", "dataset_info.json"))


def _changed(index: PublishedIndex, **fields) -> PublishedIndex:
    import dataclasses

    shard = next(iter(index.shards.values()))
    changed = dataclasses.replace(shard, **fields)
    return dataclasses.replace(index, shards={**index.shards, shard.name: changed} if
                               changed.name == shard.name else {changed.name: changed})


@pytest.mark.parametrize("damage, message", [
    (lambda i, b: b[:10], "too short"),
    (lambda i, b: b"XXXXXXXX" + b[8:], "no TRLDSIDX magic"),
    (lambda i, b: b[:-8], "CRC mismatch"),
    (lambda i, b: _changed(i, size=10**6).to_bytes(),
     r"record offsets must run from 0 to the file size 1000000"),
    (lambda i, b: _changed(i, name="../../etc/x").to_bytes(), "leaves the dataset directory"),
    (lambda i, b: _changed(i, lengths=np.array([10**9, 1])).to_bytes(),
     "step counts must lie between 0 and the size of their record"),
    (lambda i, b: _changed(i, steps="../x.trsi").to_bytes(), "steps must be a plain object"),
])
def test_a_published_index_is_checked_before_use(bucket, tmp_path, damage, message):
    url = _scaled(bucket, 2, 4)
    source = _source(url, tmp_path)
    from torch_rlds._shared_index import publish

    done = publish(source, tmp_path / "published", step_index=False, progress=False)
    with open(done.url, "rb") as f:
        blob = f.read()
    index = PublishedIndex.from_bytes(blob, "x")
    assert len(index.shards) == 2 and index.to_bytes() == blob
    with pytest.raises(DatasetFormatError, match=message):
        PublishedIndex.from_bytes(damage(index, blob), "x")


def test_a_shard_missing_from_the_listing_is_named(bucket, tmp_path):
    url = _scaled(bucket, 3, 6)
    os.unlink(os.path.join(bucket.root, "scaled3", "1.0.0",
                           "scaled3-train.tfrecord-00001-of-00003"))
    with pytest.raises(FileNotFoundError, match=r"tfrecord-00001-of-00003: shard listed in "
                                                r"dataset_info.json \(split 'train', 3 shards\) "
                                                r"is missing"):
        _source(url, tmp_path)


def test_a_registered_filesystem_serves_gs_without_gcsfs(bucket, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gcsfs" else real(name, *a))
    assert os.fspath(_paths.to_path("gs://data/x")) == "gs://data/x"
    bucket.uninstall()
    with pytest.raises(ImportError, match=r"pip install 'torch-rlds\[gcs\]'"):
        _paths.to_path("gs://data/x")


def test_exact_resume_through_the_simulated_bucket(bucket, tmp_path, write_dataset):
    local = write_dataset(num_episodes=5, num_shards=2, min_steps=3, max_steps=8)
    url = bucket.url(_copy_into(bucket, local))

    def make():
        data = torch_rlds.RLDSDataset(url, obs_window=2, action_horizon=3, shuffle_window=2)
        return torch_rlds.DataLoader(data, batch_size=4, num_workers=1)

    reference = assert_resumes_exactly(make, 6, restore_points=[0, 2, 5])
    local_data = torch_rlds.RLDSDataset(local, obs_window=2, action_horizon=3,
                                        shuffle_window=2)
    local_batches = [b for b, _ in zip(torch_rlds.DataLoader(local_data, batch_size=4,
                                                             num_workers=1), range(6))]
    assert [b["action"].tolist() for b in local_batches] == [
        b["action"].tolist() for b in reference]


def test_index_builds_keep_many_requests_in_flight_within_the_bound(tmp_path, monkeypatch):
    # the one test with real latency: 20 shards of 3 records, 8 requests in flight at most
    monkeypatch.setenv(_files.REMOTE_REQUESTS_ENV, "8")
    with simulated_bucket(tmp_path / "bucket", "slow", latency_s=0.02) as slow:
        url = _scaled(slow, 20, 60)
        slow.reset_counts()
        _source(url, tmp_path)
        counts = slow.reset_counts()
        assert counts.read == 61 and counts.peak_in_flight == 8
        source = _source(url, tmp_path, "other")
        slow.reset_counts()
        source.read_many(list(range(0, 60, 3)))  # 20 episodes, one per shard
        counts = slow.reset_counts()
        assert counts.read == 20 and counts.peak_in_flight == 8


def _copy_into(bucket: SimulatedBucket, local) -> str:
    """Copy the local dataset version directory ``local`` into the bucket's folder."""
    import shutil

    target = os.path.join(bucket.root, "copied", os.path.basename(os.fspath(local)))
    shutil.copytree(os.fspath(local), target)
    return target

