"""DataLoader.metrics(): throughput, waiting time, epoch progress, per-dataset counts."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import torch_rlds
from torch_rlds._loader_metrics import MetricsTracker


def test_metrics_count_what_was_served(small_dataset, small_spec):
    dataset = torch_rlds.RLDSDataset(small_dataset, action_horizon=4, repeat=False, seed=1)
    loader = torch_rlds.DataLoader(dataset, batch_size=5)
    assert loader.metrics().batches == 0 and loader.metrics().samples_per_s == 0.0
    batches = list(loader)
    metrics = loader.metrics()
    total_steps = sum(small_spec.lengths()[:6])
    assert metrics.batches == len(batches)
    assert metrics.samples == total_steps
    assert metrics.epoch == 0 and metrics.epoch_steps == total_steps
    assert metrics.epoch_episodes == 6 and metrics.episodes_per_epoch == 6
    assert metrics.epoch_progress == 1.0
    assert metrics.per_dataset == {0: {"steps": total_steps, "episodes": 6}}
    assert metrics.samples_per_s > 0 and 0 <= metrics.wait_fraction <= 1.0


def test_waiting_time_is_the_time_spent_in_next():
    tracker = MetricsTracker()
    batch = {"meta": {"episode_index": np.array([0, 1]), "epoch": np.array([0, 0])}}
    started = tracker.started()
    time.sleep(0.05)
    tracker.served(batch, started)
    time.sleep(0.05)  # the caller's "training step": not waiting
    metrics = tracker.snapshot()
    assert metrics.wait_s == pytest.approx(0.05, abs=0.03)
    assert metrics.wait_fraction == pytest.approx(0.5, abs=0.25)


def test_new_epoch_restarts_epoch_counts_and_mixtures_are_split():
    tracker = MetricsTracker(episodes_per_epoch=4)
    meta = {"episode_index": np.array([0, 1, 1]), "epoch": np.array([0, 0, 0]),
            "dataset_index": np.array([0, 1, 1])}
    tracker.served({"meta": meta}, tracker.started())
    assert tracker.snapshot().epoch_progress == pytest.approx(2 / 4)
    meta = {"episode_index": np.array([2, 3]), "epoch": np.array([0, 1]),
            "dataset_index": np.array([0, 0])}
    tracker.served({"meta": meta}, tracker.started())
    metrics = tracker.snapshot()
    assert metrics.epoch == 1 and metrics.epoch_steps == 1 and metrics.epoch_episodes == 1
    assert metrics.per_dataset == {0: {"steps": 3, "episodes": 3}, 1: {"steps": 2, "episodes": 1}}


def test_a_long_run_keeps_sets_of_two_epochs_only():
    tracker = MetricsTracker(episodes_per_epoch=5)
    served = set()
    for epoch in range(12):
        for first in (0, 3):
            # the previous epoch's last sample arrives late, after the new epoch began
            late = [] if epoch == 0 or first else [(epoch - 1, 4)]
            pairs = [(epoch, e) for e in range(first, first + 3) if e < 5] + late
            served.update(pairs)
            meta = {"episode_index": torch.tensor([e for _, e in pairs]),
                    "epoch": torch.tensor([p for p, _ in pairs])}
            tracker.served({"meta": meta}, tracker.started())
    metrics = tracker.snapshot()
    assert metrics.per_dataset == {0: {"steps": 5 * 12 + 11, "episodes": len(served)}}
    assert metrics.epoch == 11 and metrics.epoch_episodes == 5 and metrics.epoch_steps == 5
    assert set(tracker._datasets[0]["recent"]) <= {10, 11}


def test_start_method_follows_a_backend_started_later(small_dataset, monkeypatch):
    import multiprocessing
    import sys
    import types

    dataset = torch_rlds.RLDSDataset(small_dataset, action_horizon=4)
    monkeypatch.delitem(sys.modules, "jax._src.xla_bridge", raising=False)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: None)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["fork", "spawn"])
    loader = torch_rlds.DataLoader(dataset, batch_size=2, num_workers=1)
    bridge = types.ModuleType("jax._src.xla_bridge")
    bridge.backends_are_initialized = lambda: True
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", bridge)
    iterator = iter(loader)
    assert [w._start_method for w in iterator._workers] == ["forkserver"]
    assert loader.multiprocessing_context is None
    assert next(iterator)["action"].shape == (2, 4, 7)
