"""dt.methods.Taylor: first-order Taylor decomposition at a root point (slides 003), on both backends."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.methods import Taylor


def _linear(rng: np.random.Generator, d: int = 10, k: int = 3
            ) -> tuple[dt.Sequential, np.ndarray, np.ndarray]:
    w, b = rng.normal(size=(k, d)), rng.normal(size=k)
    return dt.Sequential([dt.Dense(w, b)]), w, b


def _mlp(rng: np.random.Generator, act=dt.ReLU, d: int = 10, h: int = 16, k: int = 3) -> dt.Sequential:
    return dt.Sequential([dt.Dense(rng.normal(size=(h, d)) / np.sqrt(d), rng.normal(size=h) * 0.1), act(),
                          dt.Dense(rng.normal(size=(h, h)) / np.sqrt(h), rng.normal(size=h) * 0.1), act(),
                          dt.Dense(rng.normal(size=(k, h)) / np.sqrt(h), rng.normal(size=k) * 0.1)])


def _pattern(net: dt.Sequential, x: np.ndarray) -> np.ndarray:
    """The ReLU on/off pattern of ``_mlp`` at x (N, d): (N, 2h) bool."""
    pats, a = [], x
    for layer in net:
        if isinstance(layer, dt.Dense):
            a = a @ layer.weight.T + layer.bias
            pre = a
        else:
            pats.append(pre > 0)
            a = np.maximum(a, 0)
    return np.concatenate(pats, axis=1)


def _f(net, x, t):
    return dt.reference.forward(net, x)[np.arange(len(x)), t]


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_linear_nearest_root_is_exact(rng, backend):
    net, w, b = _linear(rng)
    x = rng.normal(size=(6, 10))
    res = dt.Explainer(net, Taylor(), backend=backend).explain(x)
    e, t = res.extras, res.target
    f = x @ w.T + b
    wt = w[t]
    root = x - (f[np.arange(6), t] / (wt ** 2).sum(1))[:, None] * wt     # the projection of x on w·ξ + b = 0
    tol = 1e-10 if backend == "numpy" else 2e-5
    np.testing.assert_allclose(e["root"], root, rtol=0, atol=tol * 10)
    np.testing.assert_allclose(res.relevance.sum(1), res.explained, rtol=tol, atol=tol)
    np.testing.assert_allclose(e["residual"], 0.0, atol=tol * np.abs(res.explained).max())
    assert e["root_found"].all() and (e["iterations"] == 1).all()
    np.testing.assert_allclose(e["root_distance"], np.abs(f[np.arange(6), t]) / np.linalg.norm(wt, axis=1),
                               rtol=1e-5)
    assert res.method == "Taylor"
    assert res.relevance.dtype == (np.float64 if backend == "numpy" else np.float32)
    assert {k: v.shape[0] for k, v in e.items()} == dict.fromkeys(
        ("residual", "root_distance", "f_root", "root_found", "iterations", "root"), 6)


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_zero_root_on_linear_model_is_gradient_x_input(rng, backend):
    net, w, b = _linear(rng)
    x = rng.normal(size=(5, 10))
    t = np.array([0, 1, 2, 0, 1])
    res = dt.Explainer(net, Taylor("zero"), backend=backend).explain(x, target=t)
    gxi = dt.Explainer(net, dt.methods.GradientXInput(), backend=backend).explain(x, target=t)
    np.testing.assert_allclose(res.relevance, gxi.relevance, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.relevance, x * w[t], rtol=1e-5, atol=1e-6)
    # f(0) = b is not 0: the residual is the bias, and the root is reported as not one (no warning)
    np.testing.assert_allclose(res.extras["f_root"], b[t], rtol=1e-5)
    np.testing.assert_allclose(res.extras["residual"], b[t], rtol=1e-4, atol=1e-5)
    assert not res.extras["root_found"].any() and (res.extras["iterations"] == 0).all()


def test_relu_net_exact_where_no_unit_switches_on_the_segment(rng):
    net = _mlp(rng)
    x = rng.normal(size=(40, 10))
    res = dt.Explainer(net, Taylor(), backend="numpy").explain(x)
    e = res.extras
    assert e["root_found"].all()
    np.testing.assert_allclose(_f(net, e["root"], res.target), 0.0, atol=1e-9 * np.abs(res.explained).max())
    # on the segment from ξ to x no unit switches iff the pattern is the same at both ends (each layer's
    # pre-activation is affine on the segment while the layers below keep their pattern)
    same = (_pattern(net, x) == _pattern(net, e["root"])).all(1)
    assert same.sum() >= 5 and (~same).sum() >= 5
    np.testing.assert_allclose(res.relevance[same].sum(1), res.explained[same], rtol=1e-10, atol=1e-12)
    assert np.abs(e["residual"][same]).max() < 1e-10 * np.abs(res.explained).max()
    # where the segment crosses kinks the first-order terms miss part of f(x)
    assert np.abs(e["residual"][~same]).max() > 1e-3 * np.abs(res.explained[~same]).max()
    # any given point (not a root) on the same linear piece: sum R = f(x) - f(ξ) exactly
    xi = x + 1e-4 * rng.normal(size=x.shape)
    keep = (_pattern(net, x) == _pattern(net, xi)).all(1)
    r2 = dt.Explainer(net, Taylor(xi[keep]), backend="numpy").explain(x[keep], target=res.target[keep])
    np.testing.assert_allclose(r2.relevance.sum(1), r2.explained - _f(net, xi[keep], res.target[keep]),
                               rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(r2.extras["residual"], r2.extras["f_root"], rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("act", [dt.Tanh, dt.SiLU])
def test_residual_shrinks_quadratically_with_distance_to_root(rng, act):
    net = _mlp(rng, act)
    x = rng.normal(size=(8, 10))
    res = dt.Explainer(net, Taylor(), backend="numpy").explain(x)
    e = res.extras
    assert e["root_found"].all()
    root, t = e["root"], res.target
    # reported residual = f(x) - sum R, and f(root) = 0
    np.testing.assert_allclose(e["residual"], res.explained - res.relevance.sum(1), rtol=1e-12, atol=1e-14)
    assert np.abs(e["f_root"]).max() <= 1e-9 * np.abs(res.explained).max()
    # points on the line from the root through x, at distance s·|x - ξ|: the residual is the
    # higher-order remainder, ~ s² (second-order term) once s is small
    scales = [2.0 ** -k for k in range(10)]
    resid = []
    for s in scales:
        xs = root + s * (x - root)
        r = dt.Explainer(net, Taylor(root), backend="numpy").explain(xs, target=t)
        np.testing.assert_allclose(r.extras["root_distance"], s * e["root_distance"], rtol=1e-9)
        resid.append(np.abs(r.extras["residual"]))
    resid = np.array(resid)
    assert np.all(resid[0] > 1e-7)
    ratio = resid[:-1] / resid[1:]
    assert np.all((ratio[-2:] > 3.5) & (ratio[-2:] < 4.5))     # halving the distance divides it by ~4
    assert resid[-1].sum() < 1e-3 * resid[0].sum()


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_zero_root_of_bias_free_relu_net_is_gradient_x_input_and_conservative(rng, backend):
    # f is positively homogeneous: f(x) = x·∇f(x), and ∇f is constant on the ray from 0 to x. The
    # gradient at ξ = 0 itself is 0 (every ReLU at its kink, ReLU'(0) = 0); approached from x it is ∇f(x).
    net = dt.Sequential([dt.Dense(rng.normal(size=(12, 8)), np.zeros(12)), dt.ReLU(),
                         dt.Dense(rng.normal(size=(3, 12)), np.zeros(3))])
    x = rng.normal(size=(6, 8))
    res = dt.Explainer(net, Taylor("zero"), backend=backend).explain(x)
    gxi = dt.Explainer(net, dt.methods.GradientXInput(), backend=backend).explain(x)
    tol = 1e-12 if backend == "numpy" else 1e-5
    np.testing.assert_allclose(res.relevance, gxi.relevance, rtol=tol, atol=tol)
    np.testing.assert_allclose(res.relevance.sum(1), res.explained, rtol=tol * 10, atol=tol * 10)
    assert res.extras["root_found"].all() and np.abs(res.relevance).max() > 0.1


def test_flat_zero_set_root_on_its_boundary(rng):
    # a detection-pooling network f = sum_j max(0, z_j), b <= 0: f >= 0, and f = 0 on a region with
    # interior (every unit off), where the gradient is 0. The root must lie on the region's boundary,
    # and the relevance is the first-order term of the units that switch on from there towards x.
    w, b = rng.normal(size=(30, 20)), -np.abs(rng.normal(size=30)) * 0.5
    net = dt.Sequential([dt.Dense(w, b), dt.ReLU(), dt.GlobalSumPool()])
    x = rng.normal(size=(10, 20))
    res = dt.Explainer(net, Taylor(), backend="numpy").explain(x)
    e = res.extras
    assert e["root_found"].all() and np.all(np.abs(e["f_root"]) <= 1e-9 * res.explained)
    near = e["root"] + 2.0 ** -14 * (x - e["root"])        # where Taylor takes the gradient
    assert np.all(_f(net, near, res.target) > 0)          # on the boundary: f > 0 just towards x
    z_root = e["root"] @ w.T + b
    # no unit (really) on, and the nearest ones within the pull-back's bisection (2^-16 of the segment)
    assert np.all(z_root.max(1) <= 1e-9) and np.all(z_root.max(1) > -1e-3)
    # R = the gradient from x's side (the units tight at the root that switch on towards x) times x - ξ
    on = (near @ w.T + b) > 0
    np.testing.assert_allclose(res.relevance, (x - e["root"]) * (on @ w), rtol=1e-9, atol=1e-12)
    assert np.all(np.abs(res.relevance).sum(1) > 0)
    # the reported residual: the units on at x that are not tight at the root are missed
    np.testing.assert_allclose(e["residual"], res.explained - res.relevance.sum(1), rtol=1e-12, atol=1e-12)
    # f(0) = 0 (b <= 0): the segment from x to 0 holds a root at t* (bisection here); the search
    # starts from it and keeps a closer root when it finds one
    lo, hi = np.zeros(10), np.ones(10)
    for _ in range(60):
        mid = (lo + hi) / 2
        zero = _f(net, x * (1 - mid)[:, None], res.target) <= 0
        lo, hi = np.where(zero, lo, mid), np.where(zero, mid, hi)
    d_seg = hi * np.linalg.norm(x, axis=1)
    assert np.all(e["root_distance"] <= d_seg * (1 + 2.0 ** -15))     # the pull-back bisects to 2^-16
    assert np.mean(e["root_distance"] < 0.95 * d_seg) >= 0.5


def test_cpu_agrees_with_numpy(rng):
    net = _mlp(rng, dt.Tanh)
    x = rng.normal(size=(12, 10))
    ref = dt.Explainer(net, Taylor(), backend="numpy").explain(x)
    cpu = dt.Explainer(net, Taylor(), backend="cpu").explain(x)
    np.testing.assert_array_equal(cpu.target, ref.target)
    assert cpu.extras["root_found"].all()
    scale = np.abs(ref.relevance).max()
    assert np.abs(cpu.relevance - ref.relevance).max() / scale < 2e-2
    np.testing.assert_allclose(cpu.extras["root_distance"], ref.extras["root_distance"], rtol=2e-2)
    # the float32 search reaches its own tolerance (1e-4 |f(x)|)
    assert np.all(np.abs(cpu.extras["f_root"]) <= 1e-4 * np.abs(cpu.explained) + 1e-7)
    for key in ("zero",):
        a = dt.Explainer(net, Taylor(key), backend="numpy").explain(x)
        b = dt.Explainer(net, Taylor(key), backend="cpu").explain(x)
        np.testing.assert_allclose(b.relevance, a.relevance, rtol=1e-4, atol=1e-5 * np.abs(a.relevance).max())


def test_conv_graph_with_box_on_both_backends(rng):
    x = dt.Input((2, 8, 8))
    h = dt.Tanh()(dt.Conv2d(rng.normal(size=(4, 2, 3, 3)) / 4, rng.normal(size=4) * 0.1, padding=1)(x))
    h = dt.AvgPool2d(2)(h)
    net = dt.Graph(x, dt.Dense(rng.normal(size=(3, 64)) / 8, rng.normal(size=3) * 0.1)(dt.Flatten()(h)))
    xs = rng.uniform(0, 1, size=(5, 2, 8, 8))
    res = {b: dt.Explainer(net, Taylor(box=(0.0, 1.0)), backend=b).explain(xs) for b in ("numpy", "cpu")}
    for b, r in res.items():
        e = r.extras
        assert e["root_found"].all() and e["root"].shape == xs.shape
        assert e["root"].min() >= 0 and e["root"].max() <= 1
        tol = 1e-9 if b == "numpy" else 2e-4
        np.testing.assert_allclose(e["residual"], r.explained - r.relevance.astype(np.float64).sum((1, 2, 3)),
                                   rtol=1e-5, atol=tol)
    ref, cpu = res["numpy"], res["cpu"]
    np.testing.assert_allclose(cpu.extras["root_distance"], ref.extras["root_distance"], rtol=1e-2)
    scale = np.abs(ref.relevance).max()
    assert np.abs(cpu.relevance - ref.relevance).max() / scale < 2e-2


def _no_root_net() -> dt.Sequential:
    # f(x) = sum relu(x) + 1 >= 1 everywhere: there is no root
    return dt.Sequential([dt.Dense(np.eye(4), np.zeros(4)), dt.ReLU(), dt.Dense(np.ones((1, 4)), np.ones(1))])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_root_not_found(rng, backend):
    net = _no_root_net()
    x = rng.normal(size=(5, 4))
    with pytest.warns(dt.RootNotFoundWarning, match="no root point found for 5 of 5") as rec:
        res = dt.Explainer(net, Taylor(), backend=backend).explain(x)
    assert rec[0].filename == __file__            # points at the explain() call
    e = res.extras
    assert not e["root_found"].any()
    assert np.all(e["f_root"] >= 1 - 1e-6)
    # the relevance at the last iterate, and the residual reported for it
    np.testing.assert_allclose(e["residual"], res.explained - res.relevance.astype(np.float64).sum(1),
                               rtol=1e-6)
    g = (e["root"] > 0).astype(float)                              # the gradient at the last iterate
    np.testing.assert_allclose(res.relevance, g * (x - e["root"]), rtol=1e-5, atol=1e-6)
    assert np.all(e["root_distance"] > 0)
    with pytest.raises(dt.RootNotFoundError, match="no root point found"):
        dt.Explainer(net, Taylor(on_failure="raise"), backend=backend).explain(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = dt.Explainer(net, Taylor(on_failure="ignore"), backend=backend).explain(x)
    np.testing.assert_array_equal(quiet.relevance, res.relevance)


def test_box_constrains_the_root(rng):
    w = np.abs(rng.normal(size=(1, 6))) + 0.1
    net = dt.Sequential([dt.Dense(w, np.array([-1.0]))])
    x = rng.uniform(0.5, 1.0, size=(4, 6))
    res = dt.Explainer(net, Taylor(box=(0.0, 1.0)), backend="numpy").explain(x)
    e = res.extras
    assert e["root_found"].all()
    assert e["root"].min() >= 0 and e["root"].max() <= 1
    np.testing.assert_allclose(e["f_root"], 0.0, atol=1e-9)
    np.testing.assert_allclose(res.relevance.sum(1), res.explained, rtol=1e-9)
    # the box-free root is the projection; inside the box it can only be farther (or equal)
    free = dt.Explainer(net, Taylor(), backend="numpy").explain(x)
    assert np.all(e["root_distance"] >= free.extras["root_distance"] - 1e-12)
    # with the bias at +0.5, f > 0 on the whole box: no root inside it
    net2 = dt.Sequential([dt.Dense(w, np.array([0.5]))])
    with pytest.warns(dt.RootNotFoundWarning):
        r2 = dt.Explainer(net2, Taylor(box=(0.0, 1.0)), backend="numpy").explain(x)
    assert not r2.extras["root_found"].any()
    assert r2.extras["root"].min() >= 0.0
    np.testing.assert_allclose(r2.extras["root"], 0.0, atol=1e-12)   # the box corner nearest the root set


def test_batches_targets_and_zero_output(rng):
    net = _mlp(rng, dt.Tanh)
    x = rng.normal(size=(9, 10))
    t = np.arange(9) % 3
    whole = dt.Explainer(net, Taylor(), backend="numpy").explain(x, target=t)
    parts = dt.Explainer(net, Taylor(), backend="numpy").explain(x, target=t, batch_size=4)
    np.testing.assert_allclose(parts.relevance, whole.relevance, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(parts.extras["iterations"], whole.extras["iterations"])
    np.testing.assert_allclose(_f(net, whole.extras["root"], t), 0.0, atol=1e-8)
    # an input with f(x) = 0 is its own root
    lin = dt.Sequential([dt.Dense(np.array([[1.0, -1.0]]), np.zeros(1))])
    r = dt.Explainer(lin, Taylor(), backend="numpy").explain(np.array([[0.3, 0.3], [1.0, 0.0]]))
    assert r.extras["iterations"][0] == 0 and np.all(r.relevance[0] == 0) and r.extras["root_found"].all()


def test_bad_input(rng):
    net, _, _ = _linear(rng)
    x = rng.normal(size=(4, 10))
    with pytest.raises(dt.ShapeError, match="root array has shape"):
        dt.Explainer(net, Taylor(np.zeros(9)), backend="numpy").explain(x)
    with pytest.raises(dt.ShapeError, match="batch_size"):
        dt.Explainer(net, Taylor(np.zeros((4, 10))), backend="numpy").explain(x, batch_size=2)
    with pytest.raises(dt.InputError, match="NaN"):
        Taylor(np.full(10, np.nan))
    with pytest.raises(dt.InputError, match="root must be"):
        Taylor("closest")
    with pytest.raises(dt.ShapeError, match="scalar"):
        Taylor(0.0)
    with pytest.raises(dt.InputError, match="low <= high"):
        Taylor(box=(1.0, 0.0))
    with pytest.raises(dt.InputError, match="box applies"):
        Taylor("zero", box=(0.0, 1.0))
    with pytest.raises(dt.InputError, match="outside the box"):
        dt.Explainer(net, Taylor(box=(0.0, 1.0)), backend="numpy").explain(x)
    with pytest.raises(dt.ShapeError, match="broadcast"):
        dt.Explainer(net, Taylor(box=(np.zeros(3), 1.0)), backend="numpy").explain(np.abs(x) * 0)
    with pytest.raises(dt.InputError, match="on_failure"):
        Taylor(on_failure="panic")
    with pytest.raises(dt.InputError, match="max_iter"):
        Taylor(max_iter=0)
    with pytest.raises(dt.InputTypeError, match="rtol"):
        Taylor(rtol="small")
    with pytest.raises(dt.InputError, match="NaN"):
        dt.Explainer(net, Taylor(), backend="numpy").explain(np.full((2, 10), np.nan))
    with pytest.raises(dt.UnsupportedError, match="return_layers"):
        dt.Explainer(net, Taylor(), backend="numpy").explain(x, return_layers=True)


def test_value_semantics():
    a = Taylor(np.zeros(3))
    assert a == Taylor(np.zeros(3)) and a != Taylor(np.ones(3)) and a != Taylor("zero")
    assert hash(Taylor()) == hash(Taylor()) and Taylor() == Taylor() and Taylor(max_iter=5) != Taylor()
    assert Taylor(box=(0, 1)) == Taylor(box=(0.0, 1.0)) and Taylor(box=(0, 1)) != Taylor(box=(0, 2))
    assert repr(Taylor("zero")) == "Taylor(root='zero')"
    assert repr(Taylor(np.zeros((2, 3)))) == "Taylor(root=array(2, 3))"
    assert repr(Taylor()).startswith("Taylor(root='nearest', max_iter=50")
    with pytest.raises(AttributeError):
        Taylor().root = "zero"
    assert dt.methods.Taylor is Taylor


def test_command_line(rng, tmp_path, capsys):
    from deeptaylor.cli import main

    net = _mlp(rng, dt.Tanh)
    model = tmp_path / "net.npz"
    dt.save(net, model)
    x = rng.uniform(-1, 2, size=(4, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x.npy"), "--composite",
                 "taylor", "--low", "-1", "--high", "2", "--out", str(out), "--backend", "numpy",
                 "--no-progress", "--png", "none"]) == 0
    ref = dt.Explainer(net, Taylor(box=(-1.0, 2.0)), backend="numpy").explain(x)
    np.testing.assert_allclose(np.load(out / "relevance.npy"), ref.relevance, rtol=1e-6, atol=1e-9)
    capsys.readouterr()
