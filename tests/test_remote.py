"""Datasets on an object store, through the simulated ``gs://`` bucket (torch_rlds._simbucket):
what start-up asks of the store (as formulas of shards and records), the published index,
exact-range reads, and exact resume. Latency is 0 except in one small test."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _files, _paths, cli
from torch_rlds._info import DatasetFormatError
from torch_rlds._shared_index import PUBLISHED_NAME, PublishedIndex, SharedIndex
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


def test_a_second_host_uses_the_published_index_with_no_index_request(bucket, tmp_path,
                                                                       capsys):
    url = _scaled(bucket, 12, 40)
    assert cli.main(["index", url, "--publish"]) == 0
    assert f"published {url}/{PUBLISHED_NAME}: 12 shards, 40 records" in capsys.readouterr().out
    bucket.reset_counts()

    # another host: a fresh source with its own empty cache
    source = _source(url, tmp_path, "host2")
    counts = bucket.reset_counts()
    assert _shard_reads(counts) == []
    assert (counts.list, counts.read) == (1, 2)  # dataset_info.json and torch_rlds.index
    assert source.shared.used == {p.name for p in source.info.splits["train"].shard_paths}

    # the global order's step counts come from it too: no record is probed
    from torch_rlds._step_reader import StepFiles

    lengths = StepFiles(source, cache_dir=tmp_path / "steps").lengths(progress=False)
    assert lengths.tolist() == [2] * 40 and _shard_reads(bucket.reset_counts()) == []

    # a fresh process, which finds the bucket through the environment
    script = textwrap.dedent(f"""
        import json, os, torch_rlds
        from torch_rlds import _simbucket
        source = torch_rlds.RLDSSource({url!r})
        bucket = _simbucket._buckets["data"]
        print(json.dumps([len(source), bucket.counts.snapshot(), bucket.counts.reads]))
    """)
    env = {**os.environ, "TORCH_RLDS_CACHE": str(tmp_path / "host3")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    episodes, snapshot, reads = json.loads(out.strip().splitlines()[-1])
    assert episodes == 40 and snapshot["read"] == 2 and snapshot["list"] == 1
    assert not [r for r in reads if ".tfrecord-" in r[0]]


def test_a_published_index_in_a_cache_bucket_found_through_the_environment(
        bucket, tmp_path, monkeypatch):
    url = _scaled(bucket, 4, 9)
    with simulated_bucket(tmp_path / "cache-bucket", "index-cache") as cache:
        assert cli.main(["index", url, "--publish", "gs://index-cache/oxe"]) == 0
        assert (tmp_path / "cache-bucket" / "oxe" / "scaled4" / "1.0.0" / PUBLISHED_NAME).exists()
        monkeypatch.setenv("TORCH_RLDS_INDEX_DIR", "gs://index-cache/oxe")
        bucket.reset_counts(), cache.reset_counts()
        source = _source(url, tmp_path, "host2")
        assert _shard_reads(bucket.reset_counts()) == []
        assert cache.reset_counts().read == 1
        assert source.shared.url == f"gs://index-cache/oxe/scaled4/1.0.0/{PUBLISHED_NAME}"
        # an argument beats the environment; a place with nothing there costs one read
        _source(url, tmp_path, "host3", index_dir="gs://index-cache/elsewhere")
        assert cache.reset_counts().read == 1
        assert len(_shard_reads(bucket.reset_counts())) == 9


def test_a_stale_published_index_is_rebuilt_for_the_changed_shard_only(bucket, tmp_path,
                                                                       caplog):
    url = _scaled(bucket, 4, 10)
    assert cli.main(["index", url, "--publish", "--no-step-index"]) == 0
    folder = os.path.join(bucket.root, "scaled4", "1.0.0")
    changed = "scaled4-train.tfrecord-00002-of-00004"
    path = os.path.join(folder, changed)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    with open(path, "wb") as f:  # the same bytes, written anew: a new generation
        f.write(data)
    bucket.reset_counts()
    with caplog.at_level(logging.WARNING, logger="torch_rlds._shared_index"):
        source = _source(url, tmp_path, "host2")
    reads = _shard_reads(bucket.reset_counts())
    assert {os.path.basename(r[0]) for r in reads} == {changed}
    assert len(reads) == source.info.splits["train"].shard_lengths[2]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "does not match 1 of 4 shards" in lines[0]
    assert "indexed those 1 here" in lines[0]
    assert [len(i) for i in source.record_indexes()] == [3, 3, 2, 2]


def test_a_damaged_published_index_is_ignored_and_the_shards_indexed(bucket, tmp_path,
                                                                      caplog):
    url = _scaled(bucket, 2, 4)
    assert cli.main(["index", url, "--publish", "--no-step-index"]) == 0
    target = os.path.join(bucket.root, "scaled2", "1.0.0", PUBLISHED_NAME)
    with open(target, "rb") as f:
        blob = bytearray(f.read())
    blob[-3] ^= 0xFF  # inside the last shard's arrays
    with open(target, "wb") as f:
        f.write(bytes(blob))
    bucket.reset_counts()
    with caplog.at_level(logging.WARNING, logger="torch_rlds._shared_index"):
        source = _source(url, tmp_path, "host2")
    assert len(source) == 4 and len(_shard_reads(bucket.counts)) == 4
    assert any("ignoring the published index" in r.getMessage() and "CRC mismatch" in
               r.getMessage() for r in caplog.records)


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
        assert data.order == "window"
        return torch_rlds.DataLoader(data, batch_size=4, num_workers=1)

    reference = assert_resumes_exactly(make, 6, restore_points=[0, 2, 5])
    # A bucket's dataset reads in the window order by default (order="auto"): so does this.
    local_data = torch_rlds.RLDSDataset(local, obs_window=2, action_horizon=3,
                                        shuffle_window=2, order="window")
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


def test_shared_index_pickles_without_what_it_read(bucket, tmp_path):
    import pickle

    url = _scaled(bucket, 2, 4)
    assert cli.main(["index", url, "--publish", "--no-step-index"]) == 0
    source = _source(url, tmp_path, "host2")
    assert source.shared.index() is not None
    copy = pickle.loads(pickle.dumps(source.shared))
    assert copy._index is None and copy.candidates == source.shared.candidates
    assert isinstance(copy, SharedIndex) and copy.index().shards.keys() == \
        source.shared.index().shards.keys()


def _copy_into(bucket: SimulatedBucket, local) -> str:
    """Copy the local dataset version directory ``local`` into the bucket's folder."""
    import shutil

    target = os.path.join(bucket.root, "copied", os.path.basename(os.fspath(local)))
    shutil.copytree(os.fspath(local), target)
    return target


def test_published_lengths_match_probed_ones(bucket, tmp_path, write_dataset):
    local = write_dataset(num_episodes=5, num_shards=2, min_steps=2, max_steps=9)
    url = bucket.url(_copy_into(bucket, local))
    assert cli.main(["index", url, "--publish"]) == 0
    from torch_rlds._step_reader import StepFiles

    fresh = StepFiles(_source(url, tmp_path, "host2"), cache_dir=tmp_path / "steps2")
    probed = StepFiles(torch_rlds.RLDSSource(local, cache_dir=tmp_path / "local"),
                       cache_dir=tmp_path / "steps3")
    assert np.array_equal(fresh.lengths(progress=False), probed.lengths(progress=False))
    bucket.reset_counts()
    built = fresh.build_index(0)
    reads = bucket.reset_counts().reads
    assert len(reads) == 1 and reads[0][0].endswith(".trsi")  # fetched, not built
    assert built.to_bytes() == probed.build_index(0).to_bytes()


def test_a_local_dataset_publishes_beside_itself(tmp_path, write_dataset, capsys):
    import shutil

    local = tmp_path / "data"
    shutil.copytree(write_dataset(num_episodes=4, num_shards=2, min_steps=2, max_steps=5),
                    local)
    assert cli.main(["index", str(local), "--publish", "--no-step-index"]) == 0
    assert "2 shards, 4 records" in capsys.readouterr().out
    source = _source(local, tmp_path, "host2")
    assert source.shared.url == os.path.join(local, PUBLISHED_NAME)
    assert len(source.shared.used) == 2 and not source.shared.stale
    # a shard copied anew (another mtime) no longer matches its entry
    shard = source.info.splits["train"].shard_paths[1]
    os.utime(shard, ns=(1, 1))
    again = _source(local, tmp_path, "host3")
    assert again.shared.stale == {shard.name} and len(again) == 4
