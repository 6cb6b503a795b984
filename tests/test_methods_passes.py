"""The plain Gradient method, forward-only passes and the CompoundMethod hook, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.methods import CompoundMethod, Gradient, Passes


def _net(rng: np.random.Generator) -> dt.Graph:
    x = dt.Input((2, 7, 6))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4) * 0.1, padding=1)(x))
    h = dt.Add()(h, dt.ReLU()(dt.Conv2d(rng.normal(size=(4, 4, 1, 1)), np.zeros(4))(h)))
    h = dt.MaxPool2d(2)(h)
    out = dt.Dense(rng.normal(size=(3, 4 * 3 * 3)), rng.normal(size=3) * 0.1)(dt.Flatten()(h))
    return dt.Graph(x, out)


def _numeric_grad(net: dt.Graph, x: np.ndarray, t: np.ndarray, h: float = 1e-6) -> np.ndarray:
    g = np.zeros_like(x)
    flat = x.reshape(len(x), -1)
    for p in range(flat.shape[1]):
        xp, xm = flat.copy(), flat.copy()
        xp[:, p] += h
        xm[:, p] -= h
        fp = dt.reference.forward(net, xp.reshape(x.shape))
        fm = dt.reference.forward(net, xm.reshape(x.shape))
        g.reshape(len(x), -1)[:, p] = (fp[np.arange(len(x)), t] - fm[np.arange(len(x)), t]) / (2 * h)
    return g


def test_gradient_matches_finite_differences_numpy(rng):
    net = _net(rng)
    x = rng.normal(size=(3, 2, 7, 6))
    t = np.array([0, 2, 1])
    res = dt.Explainer(net, Gradient(), backend="numpy").explain(x, target=t)
    np.testing.assert_allclose(res.relevance, _numeric_grad(net, x, t), rtol=1e-5, atol=1e-6)
    # sign kept: Sensitivity is its square, GradientXInput its product with x
    sens = dt.Explainer(net, dt.methods.Sensitivity(), backend="numpy").explain(x, target=t)
    np.testing.assert_allclose(sens.relevance, res.relevance ** 2, rtol=1e-12)
    assert (res.relevance < 0).any() and (res.relevance > 0).any()


@pytest.mark.parametrize("n", [1, 5, 37])
def test_gradient_cpu_matches_reference(rng, n):
    net = _net(rng)
    x = rng.normal(size=(n, 2, 7, 6)).astype(np.float32)
    ref = dt.Explainer(net, "gradient", backend="numpy").explain(x)
    cpu = dt.Explainer(net, "gradient", backend="cpu").explain(x)
    np.testing.assert_array_equal(cpu.target, ref.target)
    scale = np.abs(ref.relevance).max()
    assert np.abs(cpu.relevance - ref.relevance).max() / scale < 1e-4
    assert cpu.relevance.dtype == np.float32


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_forward_only_equals_explain_output(rng, backend):
    net = _net(rng)
    x = rng.normal(size=(9, 2, 7, 6))
    ex = dt.Explainer(net, dt.composites.epsilon_plus(), backend=backend)
    out = ex.forward(x)
    assert out.shape == (9, 3)
    # the compiled engine: bitwise (same plan, same tiles); the reference: BLAS may block differently
    same = np.testing.assert_array_equal if backend == "cpu" else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12))
    same(out, ex.explain(x).output)
    same(ex.forward(x, batch_size=4), out)
    with pytest.raises(dt.InputError, match="batch_size"):
        ex.forward(x, batch_size=0)
    with pytest.raises(dt.ShapeError):
        ex.forward(x[:, :1])


class _Twice(CompoundMethod):
    """2 x gradient x input, from two gradient passes (a test double that exercises the hook)."""

    __slots__ = ("scale",)

    def __init__(self, scale: float = 2.0) -> None:
        object.__setattr__(self, "scale", scale)

    def params(self):
        return {"scale": self.scale}

    def compute(self, passes: Passes, x, targets):
        out, g = passes.gradient(x, targets)
        np.testing.assert_allclose(passes.forward(x), out, rtol=1e-6, atol=1e-6)
        return out, self.scale * g * x, {"norm": np.sqrt((g.reshape(len(x), -1) ** 2).sum(1))}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_compound_hook(rng, backend):
    net = _net(rng)
    x = rng.normal(size=(7, 2, 7, 6))
    m = _Twice(3.0)
    assert repr(m) == "_Twice(scale=3.0)" and m == _Twice(3.0) and m != _Twice(2.0)
    ex = dt.Explainer(net, m, backend=backend)
    res = ex.explain(x, batch_size=3)
    gxi = dt.Explainer(net, dt.methods.GradientXInput(), backend=backend).explain(x)
    np.testing.assert_allclose(res.relevance, 3.0 * gxi.relevance, rtol=1e-5, atol=1e-6)
    assert res.extras["norm"].shape == (7,)
    assert res.method == "_Twice" and not res.conservative_expected
    with pytest.raises(dt.UnsupportedError, match="return_layers"):
        ex.explain(x, return_layers=True)
