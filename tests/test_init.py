"""Weight initialisers (Keras formulas): statistics on large draws, limits, seeding and fans."""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import init

TRUNC = 0.87962566103423978      # std of a standard normal truncated to [-2, 2] (Keras' correction)

SHAPES = [(300, 700), (64, 32, 5, 5)]    # a dense and a conv weight, >= 200k draws each


def expected(name, fan_in, fan_out):
    """(kind, variance, bound) from the Keras formulas: bound is the uniform limit, or the truncation
    point 2 * stddev with stddev = sqrt(variance) / 0.8796 for the truncated normals."""
    var = {"glorot": 2.0 / (fan_in + fan_out), "he": 2.0 / fan_in, "lecun": 1.0 / fan_in}[name.split("_")[0]]
    if name.endswith("uniform"):
        return "uniform", var, np.sqrt(3.0 * var)     # U(-l, l) has variance l² / 3
    return "normal", var, 2.0 * np.sqrt(var) / TRUNC


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                                  "lecun_uniform", "lecun_normal"])
def test_statistics(name, shape):
    w = getattr(init, name)(shape, np.random.default_rng(2024))
    assert w.shape == shape
    assert w.dtype == np.float64
    fan_in, fan_out = init.fans(shape)
    kind, var, bound = expected(name, fan_in, fan_out)
    n = w.size
    # mean 0 within 6 standard errors; variance within 2 % (the sampling error is ~0.3 % here)
    assert abs(w.mean()) < 6 * np.sqrt(var / n)
    assert w.var() == pytest.approx(var, rel=0.02)
    # limits respected, and reached
    assert np.max(np.abs(w)) <= bound
    assert np.max(np.abs(w)) > 0.99 * bound
    if kind == "uniform":   # flat histogram: each tenth of [-l, l] holds about a tenth of the draws
        hist, _ = np.histogram(w, bins=10, range=(-bound, bound))
        assert np.all(np.abs(hist / n - 0.1) < 0.005)
    else:                   # truncated normal: share within one stddev of the untruncated normal
        inside = np.mean(np.abs(w) <= bound / 2)
        assert inside == pytest.approx(0.6827 / 0.9545, abs=0.005)


def test_formulas_by_hand():
    # Dense (out=4, in=6): glorot limit sqrt(6 / 10); conv (8, 3, 5, 5): fan_in 75, fan_out 200
    assert init.fans((4, 6)) == (6, 4)
    assert init.fans((8, 3, 5, 5)) == (75, 200)
    assert init.fans((8, 3, 1, 7)) == (21, 56)
    w = init.glorot_uniform((4, 6), 0)
    assert np.max(np.abs(w)) <= np.sqrt(6 / 10)
    w = init.he_uniform((8, 3, 5, 5), 0)
    assert np.max(np.abs(w)) <= np.sqrt(6 / 75)
    w = init.lecun_uniform((8, 3, 5, 5), 0)
    assert np.max(np.abs(w)) <= np.sqrt(3 / 75)
    with pytest.raises(ValueError, match=">= 2 positive dimensions"):
        init.fans((5,))
    with pytest.raises(ValueError, match=">= 2 positive dimensions"):
        init.fans((5, 0))


@pytest.mark.parametrize("name", ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                                  "lecun_uniform", "lecun_normal"])
def test_seeding(name):
    f = getattr(init, name)
    a, b = f((7, 5), 123), f((7, 5), 123)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, f((7, 5), 124))
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    np.testing.assert_array_equal(f((3, 4, 2, 2), g1), f((3, 4, 2, 2), g2))
    # a Generator advances: two draws from one generator differ, and match a fresh one's sequence
    g = np.random.default_rng(5)
    first, second = f((6, 6), g), f((6, 6), g)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, f((6, 6), np.random.default_rng(5)))


def test_aliases_and_constants():
    assert init.xavier_uniform is init.glorot_uniform
    assert init.xavier_normal is init.glorot_normal
    assert init.kaiming_uniform is init.he_uniform
    assert init.kaiming_normal is init.he_normal
    np.testing.assert_array_equal(init.zeros((2, 3)), np.zeros((2, 3)))
    np.testing.assert_array_equal(init.constant((4,), -0.1), np.full(4, -0.1))
    # the initialisers build layers directly
    layer = dt.Conv2d(init.he_normal((4, 3, 3, 3), 0), init.constant((4,), -0.01))
    assert layer.out_channels == 4
    assert np.all(layer.bias == -0.01)
