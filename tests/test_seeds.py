"""Output seeds (issue 12, part 2): ``explain(x, seed=S)`` and ``dt.seeds``.

A seed is where the backward pass starts instead of the one-hot target: a one-hot seed must give
exactly the target's explanation, a contrast seed the difference of two targets' explanations (every
rule is linear in its seed), a mask seed on a segmentation-like output (N, C, H, W) the masked sum of
its outputs' explanations; conservation is checked against the seed's total; bad seeds raise the
library's errors.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import deeptaylor as dt

TOL = 1e-6


def _re(s: str) -> str:
    return re.escape(s)


def _maxnorm(a, b) -> float:
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


@pytest.fixture(scope="module")
def net():
    rng = np.random.default_rng(11)
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(4, 2, 3, 3)) * 0.5, -0.05 * rng.random(4), padding=1), dt.ReLU(),
        dt.MaxPool2d(2), dt.Flatten(),
        dt.Dense(rng.normal(size=(10, 4 * 4 * 4)) * 0.3, -0.05 * rng.random(10)), dt.ReLU(),
        dt.Dense(rng.normal(size=(6, 10)) * 0.4, -0.05 * rng.random(6)),
    ])


@pytest.fixture(scope="module")
def unbiased():
    """No biases: every rule listed in the issue (Z, Epsilon, WSquare, Flat) is linear in its seed."""
    rng = np.random.default_rng(12)
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(4, 2, 3, 3)) * 0.5, padding=1), dt.ReLU(), dt.Flatten(),
        dt.Dense(rng.normal(size=(5, 4 * 8 * 8)) * 0.1),
    ])


@pytest.fixture(scope="module")
def segmenter():
    """A conv net without a Dense head: its output is a (2, 4, 4) map per sample (channels-last in the
    engine, so targets and seeds exercise the layout permutation)."""
    rng = np.random.default_rng(13)
    x = dt.Input((2, 8, 8))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(5, 2, 3, 3)) * 0.5, -0.02 * rng.random(5), padding=1)(x))
    h = dt.MaxPool2d(2)(h)
    y = dt.Conv2d(rng.normal(size=(2, 5, 3, 3)) * 0.4, -0.02 * rng.random(2), padding=1)(h)
    return dt.Graph(x, y)


def _x(shape, n=3, seed=0):
    return np.random.default_rng(seed).random((n, *shape))


X8 = (2, 8, 8)
METHODS = [dt.methods.Sensitivity(), dt.methods.GradientXInput(), dt.methods.Gradient()]


@pytest.mark.parametrize("what", ["deep_taylor", "epsilon_gamma_box", "epsilon_alpha2_beta1", *METHODS], ids=str)
def test_one_hot_seed_equals_target(net, backend, what):
    comp = dt.composites.get(what) if isinstance(what, str) else what
    ex = dt.Explainer(net, comp, backend=backend, threads=1)
    x = _x(X8)
    t = np.array([4, 0, 2])
    ref = ex.explain(x, target=t)
    onehot = np.zeros(ref.output.shape)
    onehot[np.arange(3), t] = 1.0
    start = onehot if isinstance(comp, dt.methods.Method) else onehot * ref.output   # as given
    for seed in (start, start.astype(np.float32), dt.seeds.onehot(t)):
        res = ex.explain(x, seed=seed)
        assert res.target is None
        assert res.relevance.shape == x.shape
        assert _maxnorm(res.relevance, ref.relevance) <= TOL
        np.testing.assert_allclose(res.explained, ref.explained, rtol=1e-6)


@pytest.mark.parametrize("rule", [dt.rules.Z(), dt.rules.Epsilon(1e-3), dt.rules.WSquare(), dt.rules.Flat()], ids=str)
def test_contrast_is_the_difference_of_two_targets_linear_rules(unbiased, backend, rule):
    ex = dt.Explainer(unbiased, rule, backend=backend, threads=1)
    x = _x(X8)
    res = ex.explain(x, seed=dt.seeds.contrast(1, 3))
    a, b = ex.explain(x, target=1), ex.explain(x, target=3)
    assert _maxnorm(res.relevance, a.relevance - b.relevance) <= TOL
    np.testing.assert_allclose(res.explained, a.explained - b.explained, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("what", ["deep_taylor", "epsilon_plus_flat", dt.methods.GradientXInput(),
                                  dt.methods.Gradient()], ids=str)
def test_contrast_per_sample_on_every_rule(net, backend, what):
    # every rule of the library (and the gradient) is linear in its seed, not only the four above
    comp = dt.composites.get(what) if isinstance(what, str) else what
    ex = dt.Explainer(net, comp, backend=backend, threads=1)
    x = _x(X8)
    c, d = np.array([0, 5, 2]), np.array([1, 1, 2])         # c == d: a zero seed for the last sample
    res = ex.explain(x, seed=dt.seeds.contrast(c, d))
    diff = ex.explain(x, target=c).relevance - ex.explain(x, target=d).relevance
    assert _maxnorm(res.relevance, diff) <= TOL
    np.testing.assert_allclose(res.explained, res.output[np.arange(3), c] - res.output[np.arange(3), d],
                               rtol=1e-6, atol=1e-9)
    assert np.all(res.relevance[2] == 0)


def test_conservation_against_the_seed(net, backend):
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend=backend)
    x = _x(X8)
    m = np.array([0.5, 0, 2.0, 0, 1.0, 0])
    res = ex.explain(x, seed=dt.seeds.mask(m), return_layers=True)
    y = res.output
    np.testing.assert_allclose(res.explained, (m * y).sum(axis=1), rtol=1e-6)
    pos = (m * y).min(axis=1) >= 0        # z+ conserves a non-negative seed exactly
    rep = dt.checks.conservation(res)
    assert np.all(rep.rel_error[pos] <= 1e-5)
    # an array seed: conservation against its sum, at every layer
    S = np.abs(np.random.default_rng(3).normal(size=y.shape))
    rep = dt.checks.conservation(ex.explain(x, seed=S, return_layers=True))
    np.testing.assert_allclose(rep.explained, S.sum(axis=1), rtol=1e-6)
    assert rep.ok(rtol=1e-5)


def test_mask_seed_on_a_rank_three_output(segmenter, backend):
    x = _x(X8, n=2)
    ex = dt.Explainer(segmenter, dt.composites.epsilon_plus(), backend=backend, threads=1)
    allt = ex.explain(x, target="all")                        # 2 * 4 * 4 = 32 outputs, flat indices
    assert allt.output.shape == (2, 2, 4, 4) and allt.relevance.shape == (2, 32, *X8)
    m = np.zeros((2, 4, 4))
    m[1, 1:3, 0:2] = 1.0                                      # a region of channel 1
    m[0, 3, 3] = -0.5
    res = ex.explain(x, seed=dt.seeds.mask(m))
    want = np.einsum("k,nk...->n...", m.ravel(), allt.relevance)
    assert _maxnorm(res.relevance, want) <= TOL
    np.testing.assert_allclose(res.explained, (m * res.output).reshape(2, -1).sum(axis=1), rtol=1e-6)
    # flat target index c*H*W + h*W + w, as NumPy's reshape
    t = 1 * 16 + 2 * 4 + 1
    one = ex.explain(x, target=t)
    np.testing.assert_allclose(one.explained, res.output[:, 1, 2, 1], rtol=1e-6)
    assert _maxnorm(one.relevance, allt.relevance[:, t]) <= TOL


def test_rank_three_output_cpu_matches_reference(segmenter):
    x = _x(X8, n=2)
    m = np.random.default_rng(4).random((2, 2, 4, 4))        # one mask per sample
    r = {b: dt.Explainer(segmenter, dt.composites.epsilon_plus(), backend=b).explain(x, seed=dt.seeds.mask(m))
         for b in ("cpu", "numpy")}
    assert _maxnorm(r["cpu"].relevance, r["numpy"].relevance) <= 1e-5
    np.testing.assert_allclose(r["cpu"].output, r["numpy"].output, rtol=1e-5, atol=1e-6)


def test_seeds_with_a_k_axis_and_callables(net, backend):
    ex = dt.Explainer(net, "epsilon_plus_flat", backend=backend, threads=1)
    x = _x(X8)
    S = np.random.default_rng(5).normal(size=(3, 4, 6))       # 4 seeds per sample
    res = ex.explain(x, seed=S)
    assert res.relevance.shape == (3, 4, *X8) and res.explained.shape == (3, 4)
    for k in range(4):
        assert _maxnorm(res.relevance[:, k], ex.explain(x, seed=S[:, k]).relevance) <= TOL
    np.testing.assert_allclose(res.explained, S.sum(axis=2), rtol=1e-6)
    seen = []

    def relu_of_output(y):
        seen.append(y.shape)
        return np.maximum(y, 0)

    got = ex.explain(x, seed=relu_of_output)
    assert seen == [(3, 6)]
    assert _maxnorm(got.relevance, ex.explain(x, seed=np.maximum(got.output, 0)).relevance) <= TOL
    assert repr(dt.seeds.contrast(1, 2)) == "contrast(1, 2)"


def test_gradient_method_seed_is_the_output_gradient(net, backend):
    ex = dt.Explainer(net, dt.methods.Gradient(), backend=backend, threads=1)
    x = _x(X8)
    w = np.random.default_rng(6).normal(size=(3, 6))
    res = ex.explain(x, seed=w)                               # an array: dg/dy as given
    want = sum(w[:, [j]] * ex.explain(x, target=j).relevance.reshape(3, -1) for j in range(6))
    assert _maxnorm(res.relevance.reshape(3, -1), want) <= TOL
    np.testing.assert_allclose(res.explained, (w * res.output).sum(axis=1), rtol=1e-6)
    same = ex.explain(x, seed=dt.seeds.mask(w))               # the objective sum w y: the same start
    assert _maxnorm(same.relevance, res.relevance) <= TOL


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("seed", "exc", "phrase"), [
    (np.ones((3, 5)), dt.ShapeError, "seed must have the network output's shape (3, 6)"),
    (np.ones((2, 6)), dt.ShapeError, "got (2, 6)"),
    (np.ones((3, 0, 6)), dt.ShapeError, "got (3, 0, 6)"),
    (np.ones((3, 6), dtype=int), dt.InputTypeError, "seed dtype int64 is not supported"),
    (np.full((3, 6), np.nan), dt.InputError, "seed contains 18 NaN/Inf value(s), first at index (0, 0)"),
    (np.where(np.eye(3, 6) > 0, np.inf, 0.0), dt.InputError, "seed contains 3 NaN/Inf value(s)"),
    ("seed", dt.InputTypeError, "seed must be a float array (N, *out), a dt.seeds.Seed or a callable"),
    (lambda y: y[:, :2], dt.ShapeError, "seed must have the network output's shape"),
    (dt.seeds.contrast(0, 6), dt.InputError, "contrast d out of range: the network has 6 output(s)"),
    (dt.seeds.contrast(np.array([0, 1]), 2), dt.ShapeError, "contrast c has shape (2,), the batch has 3"),
    (dt.seeds.mask(np.ones(5)), dt.ShapeError, "do not match the network's output (N, *out) = (3, 6)"),
    (dt.seeds.onehot(-1), dt.InputError, "onehot t out of range"),
])
def test_bad_seeds(net, backend, seed, exc, phrase):
    ex = dt.Explainer(net, "deep_taylor", backend=backend)
    with pytest.raises(exc, match=_re(phrase)):
        ex.explain(_x(X8), seed=seed)


def test_bad_seed_arguments(net):
    x = _x(X8)
    ex = dt.Explainer(net, "deep_taylor", backend="cpu")
    with pytest.raises(dt.InputError, match="either target or seed"):
        ex.explain(x, target=1, seed=np.ones((3, 6)))
    with pytest.raises(dt.InputError, match=_re("beyond float32's range")):
        ex.explain(x, seed=np.full((3, 6), 1e300))
    with pytest.raises(dt.InputError, match="mask contains NaN/Inf"):
        dt.seeds.mask([np.nan])
    with pytest.raises(dt.InputTypeError, match="contrast c must be an int"):
        dt.seeds.contrast(1.5, 2)

    class Twice(dt.methods.CompoundMethod):
        __slots__ = ()

        def compute(self, passes, x, targets):
            out, g = passes.gradient(x, targets)
            return out, 2 * g, {}

    with pytest.raises(dt.UnsupportedError, match="a seed is not available"):
        dt.Explainer(net, Twice(), backend="numpy").explain(x, seed=np.ones((3, 6)))
