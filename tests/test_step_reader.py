"""Reading steps: lengths probed and cached per shard, the step index built in the background,
and reads by byte range and by whole record giving the decoder's values."""

from __future__ import annotations

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _published, synthetic
from torch_rlds._features import iter_leaves
from torch_rlds._step_reader import IndexBuilder, StepFiles, StepReader


@pytest.fixture(scope="module", params=["synthetic", "bridge", "droid"])
def dataset(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("step_reader")
    if request.param == "synthetic":
        spec = synthetic.SyntheticSpec(
            num_episodes=6, val_episodes=0, min_steps=1, max_steps=40, num_shards=3,
            texture=False, cameras=(synthetic.Camera("image", 32, 32), synthetic.Camera(
                "depth", 32, 32, format="png", dtype="uint16", channels=1)))
        return synthetic.write_dataset(root, spec)
    return _published.write_published(root, request.param, num_episodes=4)


def _compare_rows(got, full, first, last, path=""):
    if isinstance(got, dict):
        assert set(got) == set(full), path
        for key in got:
            _compare_rows(got[key], full[key], first, last, f"{path}/{key}")
    elif hasattr(got, "encoded"):
        assert len(got.encoded) == len(full.encoded)
        assert got.encoded[first:last + 1] == full.encoded[first:last + 1], path
        assert (got.shape, got.dtype, got.format) == (full.shape, full.dtype, full.format)
    elif path.startswith("/steps"):
        got, full = np.asarray(got), np.asarray(full)
        assert (got.shape, got.dtype) == (full.shape, full.dtype), path
        assert np.array_equal(got[first:last + 1], full[first:last + 1]), path
    else:
        assert type(got) is type(full) and np.array_equal(np.asarray(got), np.asarray(full))


@pytest.mark.parametrize("indexed", [True, False])
def test_reads_equal_the_decoded_episode(dataset, indexed, tmp_path):
    source = torch_rlds.RLDSSource(dataset)
    files = StepFiles(source, tmp_path / "steps")
    lengths = files.lengths(progress=False)
    if indexed:
        builder = IndexBuilder(files, progress=False).start()
        assert builder.join(60) and builder.failed == {}
        assert files.missing() == []
    reader = StepReader(files, lengths)
    names = [leaf.name for leaf in iter_leaves(source.features)]
    for e in range(len(source)):
        full = source.episode(e)
        steps = int(lengths[e])
        assert steps == len(full["steps"]["is_first"])
        first, last = max(0, steps // 2 - 1), min(steps - 1, steps // 2 + 1)
        assert reader.indexed(e) is indexed
        got = reader.read(e, {name: (steps // 2 - 1, steps // 2 + 1) for name in names})
        _compare_rows(got, full, first, last)


def test_lengths_are_cached_per_shard_and_follow_the_shard(dataset, tmp_path):
    source = torch_rlds.RLDSSource(dataset)
    files = StepFiles(source, tmp_path / "steps")
    lengths = files.lengths(progress=False)
    assert all(files.lengths_path(s).exists() for s in range(files.num_shards))
    probed = []
    files.probe = lambda shard: probed.append(shard)  # the cache answers now
    assert np.array_equal(StepFiles.lengths(files, progress=False), lengths)
    assert probed == []


def test_an_unwritable_cache_keeps_lengths_and_indexes_in_memory(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    source = torch_rlds.RLDSSource(dataset)
    files = StepFiles(source, blocker / "steps")
    with pytest.warns(UserWarning, match="cannot write step lengths and indexes"):
        lengths = files.lengths(progress=False)
    assert lengths.sum() > 0
