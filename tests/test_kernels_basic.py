"""The basic C++ kernels (``deeptaylor._core.kernels``) and the ``backend="cpu"`` Explainer against the
float64 NumPy reference. Error measure: max |got - want| / max |want| (float32 accumulation)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from custom_objects import _MyLayer, _MyRule, _MyZPlus
from hypothesis import given, settings
from hypothesis import strategies as st

import deeptaylor as dt
from deeptaylor.reference import linear_relevance

pytestmark = pytest.mark.skipif("cpu" not in dt.available_backends(), reason="compiled core not built")

TOL = 1e-5


@pytest.fixture(scope="module")
def k():
    from deeptaylor import _core

    return _core.kernels


def max_norm_err(got, want) -> float:
    scale = float(np.max(np.abs(want)))
    return float(np.max(np.abs(np.asarray(got, np.float64) - want))) / (scale if scale > 0 else 1.0)


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


shapes = st.tuples(st.sampled_from([1, 2, 3, 7, 16]), st.integers(1, 37), st.integers(1, 23))


@settings(max_examples=30, deadline=None)
@given(nio=shapes, seed=st.integers(0, 2**32 - 1))
def test_dense_kernels_match_reference(k, nio, seed):
    n, i, o = nio
    rng = np.random.default_rng(seed)
    # values exactly representable in float32, so both sides see the same numbers
    x, w, b = (f32(rng.normal(size=s)) for s in ((n, i), (o, i), (o,)))
    layer = dt.Dense(w.astype(np.float64), b.astype(np.float64))
    want = x.astype(np.float64) @ layer.weight.T + layer.bias
    out = k.dense_forward(x, w, b)
    assert out.dtype == np.float32
    assert out.shape == (n, o)
    assert max_norm_err(out, want) <= TOL

    R = f32(rng.uniform(0.1, 1.0, size=(n, o)))
    for a in (f32(np.maximum(rng.normal(size=(n, i)), 0)), x):       # post-ReLU, and either sign
        got = k.dense_zplus_relevance(a, w, R)
        ref = linear_relevance(layer, dt.rules.ZPlus(), a.astype(np.float64), R.astype(np.float64))
        assert got.shape == (n, i)
        assert max_norm_err(got, ref) <= TOL
    got = k.dense_wsquare_relevance(w, R)
    ref = linear_relevance(layer, dt.rules.WSquare(), x.astype(np.float64), R.astype(np.float64))
    assert max_norm_err(got, ref) <= TOL


@settings(max_examples=25, deadline=None)
@given(n=st.sampled_from([1, 2, 5, 9]), f=st.integers(1, 41), seed=st.integers(0, 2**32 - 1))
def test_global_sum_relevance(k, n, f, seed):
    rng = np.random.default_rng(seed)
    a = f32(rng.uniform(0, 1, size=(n, f)))
    a[0] = 0.0                                  # a sample whose sum is 0 passes nothing
    R = f32(rng.uniform(0, 2, size=n))
    got = k.global_sum_relevance(a, R)
    a64 = a.astype(np.float64)
    s = a64.sum(1, keepdims=True)
    want = np.divide(a64 * R[:, None], s, out=np.zeros_like(a64), where=s != 0)
    assert np.all(got[0] == 0.0)
    assert max_norm_err(got, want) <= TOL


def test_zplus_zero_denominator_gives_zero(k):
    a = f32([[1.0, 2.0]])
    w = f32([[-1.0, -2.0], [1.0, 0.5]])          # output 0: no positive contribution
    R = f32([[3.0, 1.0]])
    got = k.dense_zplus_relevance(a, w, R)
    np.testing.assert_allclose(got, [[0.5, 0.5]], rtol=1e-6)
    assert np.all(np.isfinite(got))


def test_kernel_argument_checks(k):
    x, w, b = f32(np.ones((2, 3))), f32(np.ones((4, 3))), f32(np.ones(4))
    with pytest.raises(TypeError, match="float32"):
        k.dense_forward(x.astype(np.float64), w, b)
    with pytest.raises(TypeError, match="C-contiguous"):
        k.dense_forward(f32(np.ones((3, 2))).T, w, b)
    with pytest.raises(ValueError, match="must have 2 dimensions"):
        k.dense_forward(f32(np.ones(3)), w, b)
    with pytest.raises(ValueError, match="in_features"):
        k.dense_forward(f32(np.ones((2, 5))), w, b)
    with pytest.raises(ValueError, match="out_features"):
        k.dense_forward(x, w, f32(np.ones(3)))
    with pytest.raises(ValueError, match="batch of a"):
        k.dense_zplus_relevance(x, w, f32(np.ones((3, 4))))
    with pytest.raises(ValueError, match="out_features"):
        k.dense_wsquare_relevance(w, f32(np.ones((2, 5))))
    with pytest.raises(ValueError, match="batch of a"):
        k.global_sum_relevance(x, f32(np.ones(3)))


# --------------------------------------------------------------------------------------------------
# The cpu Explainer against the numpy Explainer


def seed_net(rng, sizes, bias_scale=0.05):
    layers = []
    for i, o in itertools.pairwise(sizes):
        layers += [dt.Dense(dt.init.he_uniform((o, i), rng), -rng.uniform(0, bias_scale, o)), dt.ReLU()]
    return dt.Sequential(layers + [dt.GlobalSumPool()])


@pytest.mark.parametrize("sizes", [(6, 4), (13, 7, 5), (28, 17, 9, 3)])
@pytest.mark.parametrize("batch", [1, 3, 32])
@pytest.mark.parametrize("composite", ["zplus", "deep_taylor_unbounded"])
def test_cpu_backend_matches_numpy(sizes, batch, composite):
    rng = np.random.default_rng([len(sizes), batch])
    net = seed_net(rng, sizes)
    x = rng.uniform(0, 1, size=(batch, sizes[0]))
    comp = dt.rules.ZPlus() if composite == "zplus" else dt.composites.deep_taylor_unbounded()
    ref = dt.Explainer(net, comp, backend="numpy").explain(x, return_layers=True)
    for dtype in (np.float32, np.float64):
        got = dt.Explainer(net, comp, backend="cpu", threads=2).explain(x.astype(dtype), return_layers=True)
        assert got.backend == "cpu"
        assert got.relevance.dtype == np.float32
        assert got.relevance.shape == x.shape
        assert max_norm_err(got.output, ref.output) <= TOL
        np.testing.assert_array_equal(got.target, ref.target)
        assert len(got.layers) == len(ref.layers) == len(net) + 1
        for g, r in zip(got.layers, ref.layers, strict=True):
            assert g.shape == r.shape
            assert max_norm_err(g, r) <= TOL
        assert dt.checks.conservation(got).ok(rtol=1e-4)


def test_cpu_backend_multi_output_targets(rng):
    net = dt.Sequential([dt.Dense(rng.normal(size=(5, 4)), -0.1 * rng.uniform(size=5)), dt.ReLU(),
                         dt.Dense(rng.normal(size=(3, 5)))])
    x = rng.uniform(size=(4, 4))
    t = np.array([0, 2, 1, 2])
    ref = dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(x, target=t)
    got = dt.Explainer(net, dt.rules.ZPlus(), backend="cpu").explain(x, target=t)
    np.testing.assert_array_equal(got.target, t)
    assert max_norm_err(got.relevance, ref.relevance) <= TOL
    got_b = dt.Explainer(net, dt.rules.ZPlus(), backend="cpu").explain(x, target=t, batch_size=3)
    np.testing.assert_array_equal(got_b.relevance, got.relevance)


# --------------------------------------------------------------------------------------------------
# Every built-in layer, rule and method below runs on the cpu backend and agrees with numpy. (These
# tests once allowed a refusal instead, written while the engine grew; they would then pass if cpu
# support vanished. Refusals of what the engine cannot know are tested below, by their own cases.)


def _candidates(rng):
    conv = dt.Conv2d(dt.init.he_uniform((3, 2, 3, 3), rng), -0.01 * np.ones(3), padding=1)
    dense_img = dt.Dense(dt.init.he_uniform((4, 3 * 3 * 3), rng), -0.01 * np.ones(4))
    img = [conv, dt.ReLU(), dt.MaxPool2d(2), dt.Flatten(), dense_img, dt.ReLU(), dt.GlobalSumPool()]
    vec = [dt.Dense(dt.init.he_uniform((5, 6), rng), -0.01 * np.ones(5)), dt.ReLU(), dt.GlobalSumPool()]
    x_img, x_vec = rng.uniform(size=(2, 2, 6, 6)), rng.uniform(size=(3, 6))
    return [
        # (description, net, composite, x)
        ("conv z+", dt.Sequential(img), dt.rules.ZPlus(), x_img),
        ("conv zB", dt.Sequential(img), dt.composites.deep_taylor(0, 1), x_img),
        ("avgpool", dt.Sequential([conv, dt.ReLU(), dt.AvgPool2d(2), dt.Flatten(), dense_img, dt.ReLU(),
                                   dt.GlobalSumPool()]), dt.rules.ZPlus(), x_img),
        ("dense epsilon", dt.Sequential(vec), dt.rules.Epsilon(0.1), x_vec),
        ("dense zB", dt.Sequential(vec), dt.composites.deep_taylor(0, 1), x_vec),
        ("dense flat", dt.Sequential(vec), dt.rules.Flat(), x_vec),
        ("dense z+ bias", dt.Sequential(vec), dt.rules.ZPlus(use_bias=True), x_vec),
        ("dense alpha-beta", dt.Sequential(vec), dt.rules.AlphaBeta(), x_vec),
        ("lp pool", dt.Sequential(vec[:2] + [dt.LpPool(2.0)]), dt.rules.ZPlus(), x_vec),
    ]


@pytest.mark.parametrize("index", range(9))
def test_cpu_backend_runs_and_agrees(index):
    rng = np.random.default_rng(index)
    desc, net, comp, x = _candidates(rng)[index]
    ex = dt.Explainer(net, comp, backend="cpu")   # an UnsupportedError here fails the test
    ref = dt.Explainer(net, comp, backend="numpy").explain(x)
    got = ex.explain(x)
    assert got.backend == "cpu"
    assert got.relevance.dtype == np.float32, desc
    assert max_norm_err(got.relevance, ref.relevance) <= 1e-4, desc


def _assert_names_layer_and_rule(msg, net, comp):
    """The message names some layer as 'layer <i> (<Type>)' that really is layer i of that type, and,
    if it blames a rule, a rule that really is assigned to that layer."""
    import re

    m = re.search(r"layer (\d+) \((\w+)\)", msg)
    assert m, msg
    i, kind = int(m.group(1)), m.group(2)
    assert net[i].kind == kind
    c = comp if isinstance(comp, dt.Composite) else dt.Composite(default=comp)
    rule = c.resolve(net)[i]
    if "rule" in msg and rule is not None:
        assert repr(rule) in msg or rule.name in msg


def test_cpu_backend_runs_methods_and_agrees(rng):
    net = seed_net(rng, (6, 4))
    x = rng.uniform(size=(2, 6))
    for method in (dt.methods.Sensitivity(), dt.methods.GradientXInput()):
        ex = dt.Explainer(net, method, backend="cpu")   # an UnsupportedError here fails the test
        ref = dt.Explainer(net, method, backend="numpy").explain(x)
        got = ex.explain(x)
        assert got.backend == "cpu"
        assert max_norm_err(got.relevance, ref.relevance) <= 1e-4


class _MyReLU(dt.ReLU):
    __slots__ = ()


def _refused():
    rng = np.random.default_rng(7)
    dense = dt.Dense(dt.init.he_uniform((5, 6), rng), -0.01 * np.ones(5))
    vec = [dense, dt.ReLU(), dt.GlobalSumPool()]
    return [
        ("ZPlus subclass", dt.Sequential(vec), _MyZPlus()),
        ("custom rule", dt.Sequential(vec), _MyRule()),
        ("custom layer", dt.Sequential([dense, _MyLayer(), dt.GlobalSumPool()]), dt.rules.ZPlus()),
        ("ReLU subclass", dt.Sequential([dense, _MyReLU(), dt.GlobalSumPool()]), dt.rules.ZPlus()),
    ]


@pytest.mark.parametrize("index", range(4))
def test_cpu_backend_refuses_unknown_types_at_construction(index):
    """What the engine cannot run is refused by check() when the Explainer is built, naming the layer
    index, the layer type and the rule, instead of failing inside the compiled plan ("plan: unknown
    rule 'MyZ'") at the first explain()."""
    desc, net, comp = _refused()[index]
    with pytest.raises(dt.UnsupportedError) as info:
        dt.Explainer(net, comp, backend="cpu")
    msg = str(info.value)
    assert "cpu" in msg, desc
    _assert_names_layer_and_rule(msg, net, comp)
    assert "plan:" not in msg
