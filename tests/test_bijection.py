"""The keyed bijection behind the global order: a permutation of [0, n) for every n and key,
stable across platforms, and as mixed as a random permutation."""

from __future__ import annotations

import numpy as np
import pytest

from torch_rlds._bijection import KeyedBijection, derive_key

_PRIMES = [2, 3, 5, 7, 13, 31, 127, 997, 7919, 65_521]
_SIZES = sorted({0, 1, *_PRIMES, *(2**k + d for k in range(1, 17) for d in (-1, 0, 1))})


@pytest.mark.parametrize("n", _SIZES)
def test_is_a_permutation(n):
    for key in (0, 1, 2**63 + 12345):
        values = KeyedBijection(n, key)(np.arange(n))
        assert values.dtype == np.int64
        assert np.array_equal(np.sort(values), np.arange(n))


def test_large_domain_maps_into_range_without_repeats():
    n = 27_000_000_011  # about DROID's steps x 1000: nothing materialised
    f = KeyedBijection(n, 7)
    positions = np.random.default_rng(0).choice(n, size=200_000, replace=False)
    values = f(positions)
    assert values.min() >= 0 and values.max() < n
    assert len(np.unique(values)) == len(values)


def test_same_key_same_permutation_other_key_another():
    a = KeyedBijection(10_000, derive_key(3, 0))(np.arange(10_000))
    b = KeyedBijection(10_000, derive_key(3, 0))(np.arange(10_000))
    c = KeyedBijection(10_000, derive_key(3, 1))(np.arange(10_000))
    assert np.array_equal(a, b)
    assert (a == c).mean() < 0.01  # about 1/n of the positions agree by chance


def _reference(n: int, key: int, position: int) -> int:
    """The bijection as its docstring specifies it, in plain Python integers."""
    mask = (1 << 64) - 1

    def mix(x: int) -> int:
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    bits = max(2, (n - 1).bit_length())
    bits += bits & 1
    half, low = bits // 2, (1 << (bits // 2)) - 1
    round_keys = [mix((key ^ ((r + 1) * 0x632BE59BD9B4E019)) & mask) for r in range(6)]

    def feistel(x: int) -> int:
        left, right = x >> half, x & low
        for k in round_keys:
            left, right = right, left ^ (mix((right * 0x9E3779B97F4A7C15 + k) & mask) & low)
        return (left << half) | right

    x = feistel(position)
    while x >= n:
        x = feistel(x)
    return x


@pytest.mark.parametrize("n", [2, 1000, 65_537, 10**12 + 39])
def test_vectorised_values_equal_the_scalar_definition(n):
    # Integer arithmetic only, so the order is the same on every platform and numpy version.
    key = derive_key(5, 2)
    positions = np.unique(np.random.default_rng(n).integers(0, n, size=300))
    values = KeyedBijection(n, key)(positions)
    assert values.tolist() == [_reference(n, key, int(p)) for p in positions]


def test_mixing_is_like_a_random_permutation():
    n, trials = 64, 4000
    counts = np.zeros((n, n))
    for key in range(trials):
        counts[np.arange(n), KeyedBijection(n, derive_key(key))(np.arange(n))] += 1
    # Each position lands on each value about trials / n times: a chi-square test per row.
    expected = trials / n
    chi2 = ((counts - expected) ** 2 / expected).sum(axis=1)
    assert np.median(chi2) < 2 * (n - 1)
    # Neighbouring positions are not mapped to neighbouring values.
    f = KeyedBijection(1_000_003, 11)(np.arange(100_000))
    assert abs(np.corrcoef(f[:-1], f[1:])[0, 1]) < 0.02


def test_positions_out_of_range_and_bad_sizes_raise():
    with pytest.raises(IndexError, match=r"positions must be in \[0, 10\)"):
        KeyedBijection(10, 0)(np.array([3, 10]))
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        KeyedBijection(-1, 0)
    with pytest.raises(ValueError, match="key parts must be >= 0"):
        derive_key(-3)
