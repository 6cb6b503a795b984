"""The fused C++ engine (backend="cpu") against the float64 NumPy reference.

Every layer x rule x method on random shapes (hypothesis): batch 1 and odd sizes, non-square
kernels, stride > 1, asymmetric padding, dilation, every pooling and head. Test networks follow each
linear layer by a ReLU, so a neuron whose denominator is close to 0 also carries almost no relevance
and the comparison tests the rule rather than float32 cancellation (STYLE.md). Error measure: max
absolute difference normalised by the reference map's largest magnitude, <= 1e-4 (float32 engine).
"""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.errors import UnsupportedError
from deeptaylor.methods import GradientXInput, Sensitivity
from deeptaylor.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, Z, ZBox, ZPlus

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings, assume = hypothesis.given, hypothesis.settings, hypothesis.assume

pytestmark = pytest.mark.skipif("cpu" not in dt.available_backends(), reason="compiled core not built")

TOL = 1e-4

# rule-under-test -> what the Explainer gets (ZBox needs its box: on the first layer, z+ above)
CASES = {
    "Z": Z(),
    "Epsilon": Epsilon(0.05),
    "ZPlus": ZPlus(),
    "ZPlus(use_bias)": ZPlus(use_bias=True),
    "Gamma": Gamma(0.25),
    "AlphaBeta": AlphaBeta(2.0, 1.0),
    "AlphaBeta(1,0)": AlphaBeta(1.0, 0.0),
    "WSquare": WSquare(),
    "Flat": Flat(),
    "ZBox": dt.Composite(first=ZBox(-1.0, 1.0), default=ZPlus(), name="zbox"),
    "Sensitivity": Sensitivity(),
    "GradientXInput": GradientXInput(),
}


def nerr(got: np.ndarray, ref: np.ndarray) -> float:
    """Max |got - ref| normalised by max |ref| (absolute when the reference is all zero)."""
    assert got.shape == ref.shape
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    return diff / scale if scale > 0 else diff


def compare(net: dt.Sequential, composite, x: np.ndarray, target=None, threads=None) -> dt.Explanation:
    ref = dt.Explainer(net, composite, backend="numpy").explain(x, target=target, return_layers=True)
    got = dt.Explainer(net, composite, backend="cpu", threads=threads).explain(x, target=target,
                                                                                return_layers=True)
    assert got.relevance.dtype == np.float32
    assert got.relevance.shape == x.shape
    assert nerr(got.output, ref.output) <= TOL
    np.testing.assert_array_equal(got.target, ref.target)
    assert len(got.layers) == len(net) + 1
    for i, (g, r) in enumerate(zip(got.layers, ref.layers, strict=True)):
        assert nerr(g, r) <= TOL, f"layer {i} ({net[i].kind if i < len(net) else 'output'})"
    assert nerr(got.relevance, ref.relevance) <= TOL
    return got


def _conv(rng, o, c, kh, kw, **kw_):
    w = rng.normal(size=(o, c, kh, kw)) / np.sqrt(c * kh * kw)
    return dt.Conv2d(w, rng.normal(size=o) * 0.1, **kw_)


@st.composite
def conv_nets(draw):
    """A conv net: Conv2d (random geometry) - ReLU - [pool] - [Conv2d - ReLU] - head, and its input."""
    n = draw(st.sampled_from([1, 2, 3, 5]))
    c, h, w = draw(st.integers(1, 3)), draw(st.integers(3, 9)), draw(st.integers(3, 9))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    oh = (h + pad[0] + pad[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pad[2] + pad[3] - dw * (kw - 1) - 1) // sw + 1
    assume(oh >= 1 and ow >= 1)
    o = draw(st.integers(1, 4))
    pool = draw(st.sampled_from(["none", "max", "avg", "sum", "lp"]))
    second = draw(st.booleans())
    head = draw(st.sampled_from(["dense", "gsum", "lp"]))
    signed = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    layers = [_conv(rng, o, c, kh, kw, stride=(sh, sw), padding=((pad[0], pad[1]), (pad[2], pad[3])),
                    dilation=(dh, dw)), dt.ReLU()]
    ps = draw(st.integers(1, 2))
    pp = draw(st.integers(0, 1))
    if pool != "none":
        k = 2 if min(oh, ow) >= 2 else 1
        pp = min(pp, k // 2)
        if pool == "max":
            layers.append(dt.MaxPool2d(k, stride=ps, padding=pp))
        elif pool == "avg":
            layers.append(dt.AvgPool2d(k, stride=ps, padding=pp))
        elif pool == "sum":
            layers.append(dt.SumPool2d(k, stride=ps, padding=pp))
        else:
            layers.append(dt.LpPool(draw(st.sampled_from([1.0, 2.0, 3.0])), kernel_size=k, stride=ps))
    if second:
        layers += [_conv(rng, draw(st.integers(1, 3)), o, 2, 1, padding=((0, 1), (1, 0))), dt.ReLU()]
    if head == "dense":
        shape = dt.Sequential(layers).output_shape((1, c, h, w))
        f = int(np.prod(shape[1:]))
        layers += [dt.Flatten(), dt.Dense(rng.normal(size=(3, f)) / np.sqrt(f), rng.normal(size=3) * 0.1)]
    elif head == "gsum":
        layers.append(dt.GlobalSumPool())
    else:
        layers.append(dt.LpPool(2.0))
    x = rng.uniform(-1.0 if signed else 0.0, 1.0, size=(n, c, h, w))
    return dt.Sequential(layers), x


@st.composite
def dense_nets(draw):
    """An MLP: Dense - ReLU - Dense - [ReLU - Dense], odd sizes, batch 1 included."""
    n = draw(st.sampled_from([1, 2, 7, 70]))
    sizes = [draw(st.integers(1, 17)) for _ in range(draw(st.integers(2, 3)))] + [draw(st.integers(1, 5))]
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(len(sizes) - 1):
        if i:
            layers.append(dt.ReLU())
        layers.append(dt.Dense(rng.normal(size=(sizes[i + 1], sizes[i])) / np.sqrt(sizes[i]),
                               rng.normal(size=sizes[i + 1]) * 0.1))
    x = rng.uniform(-1.0, 1.0, size=(n, sizes[0])).astype(dtype)
    return dt.Sequential(layers), x


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=conv_nets())
def test_conv_nets_match_reference(case, data):
    net, x = data
    compare(net, CASES[case], x)


@pytest.mark.parametrize("case", list(CASES))
@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=dense_nets())
def test_dense_nets_match_reference(case, data):
    net, x = data
    compare(net, CASES[case], x)


def lenet_like(rng, b_nonpositive=False):
    """A small lenet: conv5x5(4)-ReLU-maxpool2-conv3x3(6)-ReLU-avgpool2-Flatten-Dense(16)-ReLU-Dense(5)."""
    def bias(k):
        b = rng.normal(size=k) * 0.1
        return -np.abs(b) if b_nonpositive else b

    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(4, 1, 5, 5)) / 5, bias(4), padding=2), dt.ReLU(), dt.MaxPool2d(2),
        dt.Conv2d(rng.normal(size=(6, 4, 3, 3)) / 6, bias(6)), dt.ReLU(), dt.AvgPool2d(2),
        dt.Flatten(), dt.Dense(rng.normal(size=(16, 24)) / 5, bias(16)), dt.ReLU(),
        dt.Dense(rng.normal(size=(5, 16)) / 4, bias(5)),
    ])


@pytest.mark.parametrize("name", ["deep_taylor", "epsilon_plus_flat", "epsilon_gamma_box", "sensitivity",
                                  "gradient_x_input"])
@pytest.mark.parametrize("threads", [1, 2])
def test_reused_arenas_give_what_fresh_ones_give(rng, name, threads):
    # The plan keeps its arenas between calls: a call after others (larger and smaller batches,
    # other inputs, layers requested) must equal the same call on a fresh Explainer, bit for bit.
    net = lenet_like(rng)
    comp = dt.composites.get(name)
    used = dt.Explainer(net, comp, backend="cpu", threads=threads)
    for n in (150, 5, 1):  # 3 tiles (the parallel path at 2 threads), 1, 1
        used.explain(rng.uniform(0.0, 1.0, size=(n, 1, 12, 12)), return_layers=n == 5)
    x = rng.uniform(0.0, 1.0, size=(71, 1, 12, 12))  # 2 tiles
    got = used.explain(x, return_layers=True)
    want = dt.Explainer(net, comp, backend="cpu", threads=threads).explain(x, return_layers=True)
    np.testing.assert_array_equal(got.relevance, want.relevance)
    np.testing.assert_array_equal(got.output, want.output)
    for g, w in zip(got.layers, want.layers, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", ["deep_taylor", "deep_taylor_unbounded", "epsilon_plus_flat",
                                  "epsilon_gamma_box", "sensitivity", "gradient_x_input"])
def test_composites_match_reference(rng, name):
    net = lenet_like(rng)
    x = rng.uniform(0.0, 1.0, size=(9, 1, 12, 12))
    compare(net, dt.composites.get(name), x)


def test_multichannel_input_and_channel_bounds(rng):
    """3-channel input (channels-last inside the engine) with per-channel zB bounds (C, 1, 1)."""
    low = np.array([-1.0, 0.0, -0.5]).reshape(3, 1, 1)
    high = np.array([1.0, 2.0, 0.5]).reshape(3, 1, 1)
    net = dt.Sequential([_conv(rng, 5, 3, 3, 2, stride=2, padding=1), dt.ReLU(), dt.MaxPool2d(2, padding=1),
                         dt.Flatten(), dt.Dense(rng.normal(size=(4, 5 * 3 * 3)) / 6), dt.ReLU(),
                         dt.Dense(rng.normal(size=(3, 4)))])
    x = rng.uniform(low, high, size=(6, 3, 9, 8))
    compare(net, dt.composites.deep_taylor(low, high), x)
    compare(net, dt.composites.epsilon_gamma_box(low, high), x)


@pytest.mark.parametrize("target", [None, 2, "array"])
def test_targets(rng, target):
    net = lenet_like(rng)
    x = rng.uniform(0.0, 1.0, size=(5, 1, 12, 12))
    t = rng.integers(0, 5, size=5) if target == "array" else target
    got = compare(net, dt.composites.deep_taylor(), x, target=t)
    expect = np.argmax(got.output, axis=1) if t is None else np.broadcast_to(t, (5,))
    np.testing.assert_array_equal(got.target, expect)


def test_thread_count_independence(rng):
    """threads=1 vs 2: both the parallel-over-tiles path (many tiles) and the GEMM-threads path."""
    net = lenet_like(rng)
    comp = dt.composites.epsilon_gamma_box()
    ex1 = dt.Explainer(net, comp, backend="cpu", threads=1)
    ex2 = dt.Explainer(net, comp, backend="cpu", threads=2)
    x = rng.uniform(0.0, 1.0, size=(1, 1, 12, 12)).astype(np.float32)
    tile = ex1.backend.plan(net, ex1.assignment, x.shape[1:]).tile
    for n in (1, 3 * tile + 5):
        xb = rng.uniform(0.0, 1.0, size=(n, 1, 12, 12)).astype(np.float32)
        r1 = ex1.explain(xb, return_layers=True)
        r2 = ex2.explain(xb, return_layers=True)
        assert nerr(r2.output, r1.output) <= 1e-6
        for a, b in zip(r2.layers, r1.layers, strict=True):
            assert nerr(a, b) <= 1e-6


def test_batch_split_across_tiles_matches_single_samples(rng):
    """A batch spanning several tiles (incl. a partial last one) equals explaining each sample alone."""
    net = dt.Sequential([dt.Dense(rng.normal(size=(9, 6)), rng.normal(size=9)), dt.ReLU(),
                         dt.Dense(rng.normal(size=(4, 9)))])
    ex = dt.Explainer(net, dt.composites.deep_taylor(-1.0, 1.0), backend="cpu")
    n = 2 * ex.backend.plan(net, ex.assignment, (6,)).tile + 3
    x = rng.uniform(-1.0, 1.0, size=(n, 6)).astype(np.float32)
    full = ex.explain(x).relevance
    for i in (0, n // 2, n - 1):
        assert nerr(full[i:i + 1], ex.explain(x[i:i + 1]).relevance.astype(np.float64)) <= 1e-6


@pytest.mark.parametrize("layout", ["fortran", "strided", "float64", "reversed"])
def test_noncontiguous_inputs_are_copied(rng, layout):
    net = lenet_like(rng)
    ex = dt.Explainer(net, dt.composites.deep_taylor(), backend="cpu")
    base = rng.uniform(0.0, 1.0, size=(4, 1, 12, 12)).astype(np.float32)
    if layout == "fortran":
        x = np.asfortranarray(base)
    elif layout == "strided":
        big = np.zeros((8, 1, 12, 24), dtype=np.float32)
        big[::2, :, :, ::2] = base
        x = big[::2, :, :, ::2]
    elif layout == "float64":
        x = base.astype(np.float64)
    else:
        x = base[::-1].copy()[::-1]
    assert not (x.flags.c_contiguous and x.dtype == np.float32) or layout == "reversed"
    want = ex.explain(np.ascontiguousarray(base)).relevance
    np.testing.assert_allclose(ex.explain(x).relevance, want, rtol=1e-6, atol=1e-7 * np.abs(want).max())


def test_plan_is_compiled_once_per_shape(rng):
    net = dt.Sequential([dt.Conv2d(rng.normal(size=(2, 1, 3, 3))), dt.ReLU(), dt.GlobalSumPool()])
    ex = dt.Explainer(net, dt.composites.deep_taylor(), backend="cpu")
    assert ex.backend.plans == 0
    x = rng.uniform(0, 1, size=(3, 1, 6, 6))
    ex.explain(x)
    plan = ex.backend.plan(net, ex.assignment, (1, 6, 6))
    ex.explain(x[:1])
    assert ex.backend.plans == 1
    assert ex.backend.plan(net, ex.assignment, (1, 6, 6)) is plan
    ex.explain(rng.uniform(0, 1, size=(2, 1, 7, 5)))
    assert ex.backend.plans == 2
    assert 1 <= plan.tile <= 64
    assert 0 < plan.arena_bytes <= 16 << 20


def test_conservation_and_positivity_deep_taylor(rng):
    """DTD (zB first, z+ above) on a ReLU net with b <= 0: conservative and positive, layer by layer."""
    net = lenet_like(rng, b_nonpositive=True)
    x = rng.uniform(0.0, 1.0, size=(7, 1, 12, 12))
    res = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu").explain(x, return_layers=True)
    keep = res.explained > 1e-3 * np.abs(res.explained).max()  # positive targets (z+ needs R >= 0)
    assert keep.any()
    for layer in res.layers:
        tot = layer.reshape(len(x), -1).astype(np.float64).sum(axis=1)
        np.testing.assert_allclose(tot[keep], res.explained[keep], rtol=1e-4)
        assert layer[keep].min() >= -1e-6 * np.abs(layer[keep]).max()
    ref = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="numpy").explain(x)
    assert nerr(res.relevance, ref.relevance) <= TOL


def test_zero_denominators_pass_nothing():
    """Outputs whose denominator is exactly 0 pass no relevance (no NaN), as in the reference."""
    w1 = np.array([[1.0, 2.0], [0.0, 0.0], [-1.0, -1.0]])
    net = dt.Sequential([dt.Dense(w1), dt.ReLU(), dt.Dense(np.array([[1.0, 1.0, 1.0]]))])
    x = np.array([[0.5, 0.25], [0.0, 0.0]], dtype=np.float32)
    for comp in (Z(), ZPlus(), Gamma(0.5), AlphaBeta(2.0, 1.0), dt.composites.deep_taylor(0.0, 1.0)):
        got = compare(net, comp, x, target=0)
        assert np.all(np.isfinite(got.relevance))
        np.testing.assert_array_equal(got.relevance[1], 0.0)


def test_unsupported_layer_is_refused(rng):
    class Custom(dt.Layer):
        __slots__ = ()

        def output_shape(self, input_shape):
            return tuple(input_shape)

    net = dt.Sequential([dt.Dense(rng.normal(size=(3, 4))), Custom()])
    with pytest.raises(UnsupportedError, match="layer 1"):
        dt.Explainer(net, Z(), backend="cpu")


@pytest.mark.parametrize("field", ["padding", "weight", "low"])
def test_inconsistent_specs_are_refused_not_crashed(rng, field):
    """The C++ plan checks every op spec (geometry, sizes), so a bad spec raises instead of reading
    out of bounds."""
    from deeptaylor import _core
    from deeptaylor.backends.cpu import op_specs

    net = dt.Sequential([dt.Conv2d(rng.normal(size=(2, 1, 3, 3))), dt.ReLU(), dt.MaxPool2d(2, padding=1),
                         dt.GlobalSumPool()])
    ops = op_specs(net, dt.composites.deep_taylor().resolve(net), (1, 6, 6))
    if field == "padding":
        ops[2]["padding"] = (0, 0, 0, 0)
    elif field == "weight":
        ops[0]["weight"] = ops[0]["weight"][:1]
    else:
        ops[0]["low"] = ops[0]["low"][:, :2]
    with pytest.raises(ValueError, match="plan: op"):
        _core.Plan(ops, (1, 6, 6), "rules")


def test_concurrent_calls_share_one_plan(rng):
    """The GIL is released during a run and runs are reentrant (arenas are per call): two Python
    threads explaining with the same Explainer get the same results as sequential calls."""
    from concurrent.futures import ThreadPoolExecutor

    net = lenet_like(rng)
    ex = dt.Explainer(net, dt.composites.deep_taylor(), backend="cpu", threads=1)
    xs = [rng.uniform(0.0, 1.0, size=(23, 1, 12, 12)).astype(np.float32) for _ in range(4)]
    want = [ex.explain(x).relevance for x in xs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(lambda x: ex.explain(x).relevance, xs))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    assert ex.backend.plans == 1


def _grouped_net(rng):
    """A net whose tile is a few images (64x64 convolution maps) and whose Dense head holds 1 MiB of
    weights: the plan runs the head on groups of several tiles (docs/engine.md §4)."""
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(32, 3, 3, 3)) / 5, -np.abs(rng.normal(size=32)) * 0.05, padding=1),
        dt.ReLU(), dt.MaxPool2d(2), dt.Flatten(),
        dt.Dense(rng.normal(size=(8, 32 * 32 * 32)) / 180, -np.abs(rng.normal(size=8)) * 0.01), dt.ReLU(),
        dt.Dense(rng.normal(size=(5, 8)) / 3, -np.abs(rng.normal(size=5)) * 0.01),
    ])


@pytest.mark.parametrize("name", ["deep_taylor", "epsilon_plus_flat", "sensitivity", "gradient_x_input"])
def test_head_groups_match_reference(rng, name):
    net = _grouped_net(rng)
    comp = dt.composites.get(name)
    ex = dt.Explainer(net, comp, backend="cpu", threads=2)
    plan = ex.backend.plan(net, ex.assignment, (3, 64, 64))
    assert plan.tile <= 4 < plan.group  # the case under test
    x = rng.uniform(0.0, 1.0, size=(2 * plan.group + plan.tile + 1, 3, 64, 64))  # a partial tile too
    compare(net, comp, x, threads=2)


def test_head_groups_do_not_change_results(rng):
    """Group sizes follow the batch and the thread count; tile boundaries do not: bit-identical
    heatmaps for 1 and 2 threads, for the batch at once and in pieces, and per layer."""
    net = _grouped_net(rng)
    comp = dt.composites.deep_taylor(0.0, 1.0)
    x = rng.uniform(0.0, 1.0, size=(41, 3, 64, 64)).astype(np.float32)
    r1 = dt.Explainer(net, comp, backend="cpu", threads=1).explain(x, return_layers=True)
    ex2 = dt.Explainer(net, comp, backend="cpu", threads=2)
    r2 = ex2.explain(x, return_layers=True)
    for a, b in zip(r1.layers, r2.layers, strict=True):
        np.testing.assert_array_equal(a, b)
    tile = ex2.backend.plan(net, ex2.assignment, x.shape[1:]).tile
    cut = 3 * tile  # a tile boundary
    parts = np.concatenate([ex2.explain(x[:cut]).relevance, ex2.explain(x[cut:]).relevance])
    np.testing.assert_array_equal(parts, r2.relevance)
