"""Row reuse in the compiled engine's forward pass (``Explainer.forward(x, incremental=True)``, used by
deeptaylor.evaluate): a convolution / Dense output pixel whose receptive field holds bitwise the previous
sample's input is copied instead of computed. It is an optimisation only: every output must be bitwise
the plain forward pass's, whatever the geometry, the batch, the tiles, the threads, and whatever the
arena remembers from earlier calls (docs/engine.md "Row reuse")."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from test_engine import conv_nets, dense_nets, lenet_like

import deeptaylor as dt
from deeptaylor.errors import InputError


def _steps(rng: np.random.Generator, x: np.ndarray, per_sample: int, per_step: int) -> np.ndarray:
    """Perturbation-curve batches: for every sample, ``per_sample`` steps, each setting ``per_step``
    more positions (all channels) to 0, sample-major; a step that repeats the previous one and an
    unrelated sample are mixed in."""
    items = []
    for xi in x:
        flat = xi.reshape(xi.shape[0], -1).copy() if xi.ndim == 3 else xi.reshape(1, -1).copy()
        order = rng.permutation(flat.shape[1])
        for k in range(per_sample):
            flat[:, order[k * per_step:(k + 1) * per_step]] = 0.0
            items.append(flat.reshape(xi.shape).copy())
            if k == 1:
                items.append(items[-1].copy())                 # an unchanged step
        items.append(rng.uniform(-1, 1, size=xi.shape))         # an unrelated sample
    return np.stack(items).astype(np.float32)


def _check(net, x, threads, batch_size=None):
    ex = dt.Explainer(net, dt.composites.deep_taylor(), backend="cpu", threads=threads)
    plain = ex.forward(x, batch_size=batch_size)
    again = ex.forward(x, batch_size=batch_size, incremental=True)
    np.testing.assert_array_equal(again, plain)
    # the arena now remembers the last sample: a second call starting from it reuses across calls
    np.testing.assert_array_equal(ex.forward(x, batch_size=batch_size, incremental=True), plain)
    np.testing.assert_array_equal(ex.forward(x[::-1].copy(), incremental=True), plain[::-1])
    return plain


@settings(max_examples=15, deadline=None, derandomize=True)
@given(data=conv_nets())
def test_conv_nets_bitwise(data):
    net, x = data
    rng = np.random.default_rng(0)
    _check(net, _steps(rng, x, 6, 2), threads=2)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=dense_nets())
def test_dense_nets_bitwise(data):
    net, x = data
    rng = np.random.default_rng(1)
    _check(net, _steps(rng, x.astype(np.float32), 4, 1), threads=1)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch_size", [None, 1, 7])
def test_lenet_steps_bitwise(threads, batch_size):
    rng = np.random.default_rng(2)
    net = lenet_like(rng)
    x = rng.uniform(0, 1, size=(5, 1, 12, 12))
    x[x < 0.6] = 0.0                                             # MNIST-like: mostly background
    _check(net, _steps(rng, x, 20, 3), threads, batch_size)


def test_graph_with_residual_bitwise(rng):
    inp = dt.Input((2, 9, 9))
    r1 = dt.ReLU()(dt.Conv2d(rng.normal(size=(3, 2, 3, 3)) * 0.3, rng.normal(size=3) * 0.1, padding=1)(inp))
    c2 = dt.Conv2d(rng.normal(size=(3, 3, 3, 3)) * 0.3, rng.normal(size=3) * 0.1, padding=1)(r1)
    r2 = dt.ReLU()(dt.Add()(c2, r1))
    flat = dt.Flatten()(dt.MaxPool2d(3, stride=2)(r2))
    net = dt.Graph(inp, dt.Dense(rng.normal(size=(4, 48)) * 0.2, rng.normal(size=4) * 0.1)(flat))
    x = rng.uniform(-1, 1, size=(4, 2, 9, 9))
    _check(net, _steps(rng, x, 10, 2), threads=2)


def test_evaluation_curves_do_not_depend_on_reuse(rng):
    # pixel flipping runs its steps with incremental=True: the curves equal a direct loop of plain
    # forward passes, bitwise
    net = lenet_like(rng)
    x = rng.uniform(0, 1, size=(3, 1, 12, 12)).astype(np.float32)
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu")
    e = ex.explain(x)
    res = dt.evaluate.pixel_flipping(ex, x, e, steps=20, features_per_step=5)
    order = np.argsort(-e.relevance.reshape(3, -1), axis=1, kind="stable")
    for n in range(3):
        xs = []
        for k in range(21):
            xk = x[n].reshape(-1).copy()
            xk[order[n, :5 * k]] = 0.0
            xs.append(xk.reshape(x.shape[1:]))
        direct = ex.forward(np.stack(xs))[:, e.target[n]]
        np.testing.assert_array_equal(res.curves[n], direct)


def test_nonfinite_output_is_reported_even_when_copied(rng):
    # The first call computes an overflowing sample; a later call whose first sample is that same
    # input copies its rows from the arena's memory: the overflow must still be reported.
    net = dt.Sequential([dt.Conv2d(np.full((2, 1, 3, 3), 1e30), np.zeros(2), padding=1), dt.ReLU(),
                         dt.Flatten(), dt.Dense(np.ones((2, 2 * 5 * 5)), np.zeros(2))])
    ex = dt.Explainer(net, dt.composites.deep_taylor(), backend="cpu", threads=1)
    bad = np.full((1, 1, 5, 5), 1e10, dtype=np.float32)
    ok = np.zeros((1, 1, 5, 5), dtype=np.float32)
    np.testing.assert_array_equal(ex.forward(ok, incremental=True), ex.forward(ok))
    with pytest.raises(InputError, match="overflowed"):
        ex.forward(np.concatenate([ok, bad]), incremental=True)
    with pytest.raises(InputError, match="overflowed"):
        ex.forward(bad, incremental=True)


def test_numpy_backend_accepts_and_ignores_it(rng):
    net = lenet_like(rng)
    x = rng.uniform(0, 1, size=(4, 1, 12, 12))
    ex = dt.Explainer(net, dt.composites.deep_taylor(), backend="numpy")
    np.testing.assert_array_equal(ex.forward(x, incremental=True), ex.forward(x))
