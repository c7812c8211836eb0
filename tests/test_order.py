"""The order of an epoch (torch_rlds._order): permutations, reader shares, window steps."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from torch_rlds import _order


@pytest.mark.parametrize("n", [0, 1, 2, 17, 1000])
def test_permutation_is_a_permutation(n):
    p = _order.permutation(n, 3, 1)
    assert p.dtype == np.int64 and p.shape == (n,)
    assert sorted(p.tolist()) == list(range(n))


def test_permutation_is_deterministic_and_depends_on_every_key_part():
    base = _order.permutation(200, 7, 2, 5)
    np.testing.assert_array_equal(base, _order.permutation(200, 7, 2, 5))
    for other in [(8, 2, 5), (7, 3, 5), (7, 2, 6), (7, 2), (2, 7, 5)]:
        assert not np.array_equal(base, _order.permutation(200, *other)), other
    assert not np.array_equal(base, np.arange(200))


def test_permutation_is_pinned():
    # The order is part of every saved state: a change here would make old checkpoints resume
    # into another stream. Only change these values together with the state version.
    assert _order.permutation(10, 0, 0).tolist() == [5, 7, 0, 4, 6, 8, 2, 9, 3, 1]
    assert _order.reader_episodes(10, seed=1, epoch=2, shuffle=True, reader=1,
                                  num_readers=3).tolist() == [1, 5, 7]


@pytest.mark.parametrize("num_episodes, num_readers", [(1, 1), (10, 1), (10, 3), (7, 7),
                                                       (5, 8), (23, 6)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_reader_shares_are_disjoint_and_cover(num_episodes, num_readers, shuffle):
    for epoch in range(3):
        shares = [_order.reader_episodes(num_episodes, seed=11, epoch=epoch, shuffle=shuffle,
                                         reader=r, num_readers=num_readers)
                  for r in range(num_readers)]
        together = np.concatenate(shares)
        assert sorted(together.tolist()) == list(range(num_episodes))  # each exactly once
        for r, share in enumerate(shares):
            assert len(share) == _order.share_size(num_episodes, r, num_readers)
        if not shuffle:
            assert [s.tolist() for s in shares] == [list(range(r, num_episodes, num_readers))
                                                    for r in range(num_readers)]


def test_episode_order_changes_with_epoch_and_seed_when_shuffled():
    def order(seed, epoch):
        return _order.reader_episodes(50, seed=seed, epoch=epoch, shuffle=True, reader=0,
                                      num_readers=1).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


@pytest.mark.parametrize("share, window, expected", [(0, 4, 0), (1, 4, 1), (8, 4, 2),
                                                     (9, 4, 3), (5, 1, 5)])
def test_num_windows(share, window, expected):
    assert _order.num_windows(share, window) == expected


def test_window_episodes_cut_the_share_in_order():
    share = np.array([5, 3, 9, 1, 0])
    windows = [_order.window_episodes(share, w, 2).tolist() for w in range(3)]
    assert windows == [[5, 3], [9, 1], [0]]


@pytest.mark.parametrize("lengths", [[3], [4, 1, 7], [0, 5, 0, 2, 0], [0, 0], []])
@pytest.mark.parametrize("shuffle", [True, False])
def test_window_steps_emit_every_step_once(lengths, shuffle):
    which, steps = _order.window_steps(lengths, seed=1, epoch=2, shuffle=shuffle, reader=0,
                                       window=3)
    assert len(which) == len(steps) == sum(lengths)
    pairs = sorted(zip(which.tolist(), steps.tolist()))
    assert pairs == [(e, t) for e, n in enumerate(lengths) for t in range(n)]
    if not shuffle:
        assert list(zip(which.tolist(), steps.tolist())) == pairs


def test_window_steps_depend_on_the_key():
    lengths = [10, 10, 10]

    def emitted(**key):
        which, steps = _order.window_steps(lengths, shuffle=True, **{
            "seed": 0, "epoch": 0, "reader": 0, "window": 0, **key})
        return list(zip(which.tolist(), steps.tolist()))

    base = emitted()
    assert base == emitted()
    for change in [{"seed": 1}, {"epoch": 1}, {"reader": 1}, {"window": 1}]:
        assert emitted(**change) != base, change


def test_window_steps_mix_episodes():
    # Not an episode after another: among the first third of a 3-episode window, every episode
    # appears (a fixed seed, so this is deterministic, not flaky).
    which, _ = _order.window_steps([30, 30, 30], seed=0, epoch=0, shuffle=True, reader=0,
                                   window=0)
    assert set(which[:30].tolist()) == {0, 1, 2}
    runs = [len(list(g)) for _, g in itertools.groupby(which.tolist())]
    assert max(runs) < 10
