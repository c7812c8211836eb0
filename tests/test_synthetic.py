"""The synthetic writer's write-once helper used by the demo and the benchmarks."""

from __future__ import annotations

from torch_rlds import synthetic


def test_write_dataset_once_writes_then_reuses(tmp_path, monkeypatch):
    spec = synthetic.SyntheticSpec(num_episodes=2, num_shards=1, texture=False)
    path = synthetic.write_dataset_once(tmp_path, spec)
    assert (path / "dataset_info.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == [spec.name]  # no staging folder left

    def fail(*args, **kwargs):
        raise AssertionError("a complete dataset must not be written again")

    monkeypatch.setattr(synthetic, "write_dataset", fail)
    assert synthetic.write_dataset_once(tmp_path, spec) == path
