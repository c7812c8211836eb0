"""Normalization statistics: equal to numpy's on the same data, cached, openpi's file layout.

Tolerances: mean and std within 1e-9 relative of numpy's float64 results, min and max exact,
q01 and q99 within one histogram bin width (``Stats.quantile_tolerance``) of ``np.quantile``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import torch_rlds
from torch_rlds import _images, stats, synthetic
from torch_rlds._stats_command import main as stats_main
from torch_rlds.config import DataConfig
from torch_rlds.keymap import KeyMap, key_map_from_config
from torch_rlds.stats import RunningStats

KEY_MAP = KeyMap(state_keys=("observation/state",), action_keys=("action",))


def assert_matches_numpy(result: stats.Stats, x: np.ndarray) -> None:
    np.testing.assert_allclose(result.mean, x.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.std, x.std(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(result.min, x.min(0))
    np.testing.assert_array_equal(result.max, x.max(0))
    assert result.count == len(x)
    for q, got in ((0.01, result.q01), (0.99, result.q99)):
        error = np.abs(got - np.quantile(x, q, axis=0))
        assert (error <= result.quantile_tolerance * 1.000001 + 1e-12).all(), (q, error)
    span = x.max(0) - x.min(0)
    assert (result.quantile_tolerance <= 4 * span / stats.NUM_BINS + 1e-6).all()


def test_running_stats_match_numpy():
    rng = np.random.default_rng(0)
    # Batches whose ranges grow in both directions, so the histogram widens both ways.
    batches = [rng.normal(0, 1, (500, 4)), rng.normal(5, 3, (1000, 4)),
               rng.uniform(-40, -10, (300, 4)), rng.exponential(2.0, (2000, 4)),
               np.array([[1e3, -1e3, 0.5, 0.0]])]
    running = RunningStats()
    for b in batches:
        running.update(b)
    assert_matches_numpy(running.result(), np.concatenate(batches))


def test_running_stats_constant_and_discrete_dims():
    x = np.zeros((1000, 3))
    x[:, 0] = 2.5  # constant
    x[:, 1] = np.arange(1000) % 2  # a gripper: 0 / 1
    x[:, 2] = np.repeat(np.arange(10), 100)
    running = RunningStats()
    for chunk in np.array_split(x, 7):
        running.update(chunk)
    result = running.result()
    assert_matches_numpy(result, x)
    assert result.q01[0] == result.q99[0] == 2.5 and result.std[0] == 0
    np.testing.assert_allclose(result.q99[1:], [1, 9], atol=1e-3)


def test_running_stats_rejects_bad_rows():
    running = RunningStats()
    running.update(np.ones((3, 2)))
    with pytest.raises(ValueError, match="rows have 3 dimensions, earlier rows 2"):
        running.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="row 1 dimension 0 is nan"):
        running.update(np.array([[0.0, 0.0], [np.nan, 1.0]]))


def _synthetic_arrays(spec):
    lengths = spec.lengths()[:spec.num_episodes]
    state = np.concatenate([[synthetic.state_value(spec, e, t) for t in range(n)]
                            for e, n in enumerate(lengths)]).astype(np.float64)
    action = np.concatenate([[synthetic.action_value(spec, e, t) for t in range(n)]
                             for e, n in enumerate(lengths)]).astype(np.float64)
    return state, action


def test_dataset_stats_equal_numpy_without_decoding_images(small_dataset, small_spec,
                                                           monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(_images, "decode_image", no_decoding)
    monkeypatch.setattr(_images.EncodedImages, "decode", no_decoding)
    source = torch_rlds.RLDSSource(small_dataset)
    result = stats.compute_stats(source, KEY_MAP, progress=False)
    state, action = _synthetic_arrays(small_spec)
    assert sorted(result) == ["actions", "state"]
    assert_matches_numpy(result["state"], state)
    assert_matches_numpy(result["actions"], action)
    only_actions = stats.compute_stats(source, KeyMap(action_keys=("action",)), progress=False)
    assert sorted(only_actions) == ["actions"]


def test_cache_and_norm_stats_layout(small_dataset, monkeypatch):
    source = torch_rlds.RLDSSource(small_dataset)
    first, folder = stats.load_or_compute_stats(source, KEY_MAP, progress=False)
    layout = json.loads((folder / stats.NORM_STATS_FILE).read_text())
    assert list(layout) == ["norm_stats"]
    assert sorted(layout["norm_stats"]) == ["actions", "state"]
    for part in layout["norm_stats"].values():
        assert sorted(part) == ["mean", "q01", "q99", "std"]
        assert all(len(v) == 7 for v in part.values())
    full = json.loads((folder / stats.STATS_FILE).read_text())
    assert full["norm_stats"]["state"]["count"] == first["state"].count
    assert {"min", "max", "quantile_tolerance"} <= set(full["norm_stats"]["state"])

    monkeypatch.setattr(stats, "compute_stats", lambda *a, **k: pytest.fail("recomputed"))
    again, same = stats.load_or_compute_stats(source, KEY_MAP, progress=False)
    assert same == folder
    for name in first:
        for field in ("mean", "std", "q01", "q99", "min", "max"):
            np.testing.assert_array_equal(getattr(again[name], field), getattr(first[name], field))
    monkeypatch.undo()
    stats.load_or_compute_stats(source, KEY_MAP, recompute=True, progress=False)  # overwrites
    other = KeyMap(state_keys=("observation/state",), action_keys=("observation/state",))
    assert stats.cache_dir(source, other) != folder
    assert stats.cache_dir(torch_rlds.RLDSSource(small_dataset, "train[:3]"), KEY_MAP) != folder


def test_read_norm_stats_errors(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text(json.dumps({"norm_stats": {"state": {"mean": [0], "std": [1], "q01": [0]}}}))
    with pytest.raises(ValueError, match=r"norm_stats.state: field 'q99' is missing"):
        stats.read_norm_stats(path)
    path.write_text(json.dumps({"mean": [0]}))
    with pytest.raises(ValueError, match="expected"):
        stats.read_norm_stats(path)
    with pytest.raises(FileNotFoundError, match="torch-rlds stats"):
        stats.read_norm_stats(tmp_path / "nothing.json")


def test_stats_command(small_dataset, small_spec, tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  path: {small_dataset}\n")
    out = tmp_path / "assets"
    out.mkdir()
    assert stats_main(["--config-name", str(config), "--output", str(out),
                       "data.split=train[:4]"]) == 0
    captured = capsys.readouterr()
    assert "stats synthetic_rlds" in captured.err  # the progress bar
    assert "state (7 dims)" in captured.out and "q99" in captured.out
    assert stats_main(["--config-name", str(config), "--output", str(out), "--no-progress",
                       "--recompute", "data.split=train[:4]"]) == 0  # over the files of the first
    written = stats.read_norm_stats(out)
    state, _ = _synthetic_arrays(small_spec)
    lengths = small_spec.lengths()[:4]
    np.testing.assert_allclose(written["state"].mean, state[:sum(lengths)].mean(0), rtol=1e-9)
    assert written["state"].min is None  # norm_stats.json holds the four normalization fields


def test_an_unwritable_cache_still_gives_the_statistics(small_dataset, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TORCH_RLDS_CACHE", str(blocker / "cache"))
    with pytest.warns(UserWarning) as warned:
        source = torch_rlds.RLDSSource(small_dataset, "train[:2]")
        computed, folder = stats.load_or_compute_stats(
            source, key_map_from_config(DataConfig()), progress=False)
    assert any("could not cache the statistics" in str(w.message) for w in warned)
    assert folder is None and computed["actions"].count > 0


def test_statistics_files_are_read_strictly(tmp_path):
    path = tmp_path / "norm_stats.json"
    path.write_text('{"norm_stats": {"actions": {"mean": [0], "mean": [1]}}}')
    with pytest.raises(ValueError, match=r"norm_stats.json: not a JSON statistics .*duplicate"):
        stats.read_norm_stats(path)
