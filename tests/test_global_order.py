"""The global order: every step once per epoch, host slices that tile each global batch, the
round robin of workers, and mixture draws that are a function of the sample alone."""

from __future__ import annotations

import numpy as np
import pytest

from torch_rlds._global_order import GlobalOrder, MixtureDraws, host_samples, worker_batches


def _lengths():
    return np.array([3, 0, 7, 1, 12, 5, 0, 9], dtype=np.int64)


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_epoch_is_every_step_once(shuffle):
    lengths = _lengths()
    order = GlobalOrder(lengths, seed=4, shuffle=shuffle)
    n = order.num_steps
    assert n == lengths.sum()
    for epoch in range(3):
        e, episode, step = order.locate(np.arange(epoch * n, (epoch + 1) * n))
        assert (e == epoch).all()
        pairs = sorted(zip(episode.tolist(), step.tolist()))
        assert pairs == [(ep, t) for ep, length in enumerate(lengths) for t in range(length)]
    if not shuffle:
        _, episode, step = order.locate(np.arange(n))
        assert episode.tolist() == sorted(episode.tolist())


def test_epochs_and_seeds_reorder():
    order = GlobalOrder(np.full(50, 20), seed=0, shuffle=True)
    n = order.num_steps
    first = order.locate(np.arange(n))[1:]
    second = order.locate(np.arange(n, 2 * n))[1:]
    other_seed = GlobalOrder(np.full(50, 20), seed=1, shuffle=True).locate(np.arange(n))[1:]
    assert not np.array_equal(first[0], second[0])
    assert not np.array_equal(first[0], other_seed[0])


def test_an_empty_split_has_no_samples():
    with pytest.raises(ValueError, match="no steps"):
        GlobalOrder(np.zeros(3), seed=0, shuffle=True).locate(np.arange(2))


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_host_slices_tile_each_global_batch(hosts):
    batch_size, start = 8, 13
    for batch in range(3):
        parts = [host_samples(start, batch, batch_size, p, hosts) for p in range(hosts)]
        together = np.concatenate(parts)
        assert together.tolist() == list(range(start + batch * batch_size,
                                               start + (batch + 1) * batch_size))


def test_workers_take_host_batches_in_turn():
    assert [worker_batches(0, w, 3) for w in range(3)] == [0, 1, 2]
    assert [worker_batches(7, w, 3) for w in range(3)] == [9, 7, 8]
    assert worker_batches(7, 0, 0) == 7 and worker_batches(7, 0, 1) == 7


def test_mixture_draws_follow_the_weights_and_count_exactly():
    draws = MixtureDraws(np.array([3.0, 1.0]), seed=2)
    picked = draws.datasets(np.arange(200_000))
    assert abs((picked == 0).mean() - 0.75) < 0.01
    assert draws.counts(1000, 51_000, chunk=7_000).tolist() == np.bincount(
        draws.datasets(np.arange(1000, 51_000)), minlength=2).tolist()
    # A function of the sample alone: the same sample draws the same dataset, asked alone.
    assert [int(draws.datasets(np.array([k]))[0]) for k in (5, 77, 123_456)] == \
        picked[[5, 77, 123_456]].tolist()
    with pytest.raises(ValueError, match="weights must be > 0"):
        MixtureDraws(np.array([1.0, 0.0]), seed=0)
