"""The C++ generic linear module (grouped / depthwise Conv2d, ConvTranspose2d; cpp/src/linear_generic.cpp)
on its own, through the testing bindings ``_core.kernels.generic_*``:

* forward vs ``torch.nn.functional.conv2d`` / ``conv_transpose2d`` (float64) on random geometries
  (strides, asymmetric paddings, dilations, output_padding, groups incl. depthwise, batch 1, odd sizes);
* gradient vs torch autograd;
* every rule's relevance vs the float64 NumPy reference (``deeptaylor.reference.relevance``), to a
  max-normalised error <= 1e-4;
* the direct depthwise kernel vs the per-group GEMM path, threads, the sign-split shortcuts.
"""

from __future__ import annotations

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import deeptaylor as dt  # noqa: E402
from deeptaylor import _core  # noqa: E402
from deeptaylor.reference.relevance import linear_relevance  # noqa: E402
from deeptaylor.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, Z, ZBox, ZPlus  # noqa: E402

K = _core.kernels
pytestmark = pytest.mark.skipif(not hasattr(K, "generic_forward"), reason="core built without the generic module")

TOL = 1e-4
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (absolute when want is all zero)."""
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return float(np.max(np.abs(got - want))) / (scale if scale > 0 else 1.0)


# ---- random layers --------------------------------------------------------------------------------

@st.composite
def geometries(draw, transposed: bool | None = None):
    """A random Conv2d / ConvTranspose2d layer and its input shape (N, C, H, W)."""
    if transposed is None:
        transposed = draw(st.booleans())
    depthwise = draw(st.booleans())
    G = draw(st.integers(1, 4)) if not depthwise else draw(st.integers(1, 9))
    cin_g = 1 if depthwise else draw(st.integers(1, 4))
    cout_g = 1 if depthwise else draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(4))
    N = draw(st.sampled_from([1, 2, 3]))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    C, O = G * cin_g, G * cout_g
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    b = rng.normal(size=O).astype(np.float32)
    if transposed:
        oph = draw(st.integers(0, max(sh, dh) - 1))
        opw = draw(st.integers(0, max(sw, dw) - 1))
        w = rng.normal(size=(C, cout_g, kh, kw)).astype(np.float32)
        oh = (H - 1) * sh - pad[0] - pad[1] + dh * (kh - 1) + oph + 1
        ow = (W - 1) * sw - pad[2] - pad[3] + dw * (kw - 1) + opw + 1
        assume(oh >= 1 and ow >= 1)
        layer = dt.ConvTranspose2d(w, b, stride=(sh, sw), padding=((pad[0], pad[1]), (pad[2], pad[3])),
                                   output_padding=(oph, opw), dilation=(dh, dw), groups=G)
    else:
        w = rng.normal(size=(O, cin_g, kh, kw)).astype(np.float32)
        assume(H + pad[0] + pad[1] - dh * (kh - 1) >= 1 and W + pad[2] + pad[3] - dw * (kw - 1) >= 1)
        layer = dt.Conv2d(w, b, stride=(sh, sw), padding=((pad[0], pad[1]), (pad[2], pad[3])),
                          dilation=(dh, dw), groups=G)
    return layer, (N, C, H, W), rng


def spec_of(layer, x_shape, rule=None) -> dict:
    """The op spec (docs/engine.md, contract §2) of a Conv2d / ConvTranspose2d layer."""
    out = layer.output_shape(x_shape)
    kind = "ConvTranspose2d" if isinstance(layer, dt.ConvTranspose2d) else "Conv2d"
    spec = {
        "kind": kind,
        "in_shape": list(x_shape[1:]),
        "out_shape": list(out[1:]),
        "weight": np.asarray(layer.weight, np.float32),
        "bias": np.asarray(layer.bias, np.float32),
        "kernel": list(layer.weight.shape[2:]),
        "stride": list(layer.stride),
        "padding": list(layer.padding),
        "dilation": list(layer.dilation),
        "groups": int(layer.groups),
    }
    if kind == "ConvTranspose2d":
        spec["output_padding"] = list(layer.output_padding)
    if rule is not None:
        spec["rule"] = type(rule).__name__
        for k, v in rule.params().items():
            spec[k] = v
        if isinstance(rule, ZBox):
            lo, hi = rule.bounds_for(tuple(x_shape[1:]))
            spec["low"] = np.ascontiguousarray(lo, np.float32)
            spec["high"] = np.ascontiguousarray(hi, np.float32)
    return spec


# ---- torch ground truth (float64) ----------------------------------------------------------------

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_forward(layer, x: "torch.Tensor") -> "torch.Tensor":
    """The layer in float64 torch, asymmetric padding included."""
    w = torch.tensor(np.asarray(layer.weight, np.float64))
    b = torch.tensor(np.asarray(layer.bias, np.float64))
    t, bo, lf, r = layer.padding
    if isinstance(layer, dt.ConvTranspose2d):
        if t == bo and lf == r:  # torch's own semantics, output_padding included
            return F.conv_transpose2d(x, w, b, stride=layer.stride, padding=(t, lf),
                                      output_padding=layer.output_padding, groups=layer.groups,
                                      dilation=layer.dilation)
        full = F.conv_transpose2d(x, w, None, stride=layer.stride, groups=layer.groups, dilation=layer.dilation)
        _, _, oh, ow = layer.output_shape(tuple(x.shape))
        full = F.pad(full, (0, max(0, lf + ow - full.shape[3]), 0, max(0, t + oh - full.shape[2])))
        return full[:, :, t:t + oh, lf:lf + ow] + b[None, :, None, None]
    return F.conv2d(F.pad(x, (lf, r, t, bo)), w, b, stride=layer.stride, dilation=layer.dilation,
                    groups=layer.groups)


@SETTINGS
@given(geometries())
def test_forward_matches_torch(case):
    layer, shape, rng = case
    x = rng.normal(size=shape).astype(np.float32)
    want = torch_forward(layer, torch.from_numpy(x.astype(np.float64))).numpy()
    spec = spec_of(layer, shape)
    for direct in (0, 1):
        got = K.generic_forward(spec, x, 1, direct)
        assert got.shape == want.shape
        assert err(got, want) <= TOL, (direct, err(got, want))


@SETTINGS
@given(geometries())
def test_gradient_matches_torch_autograd(case):
    layer, shape, rng = case
    x = torch.from_numpy(rng.normal(size=shape)).requires_grad_(True)
    z = torch_forward(layer, x)
    g = rng.normal(size=tuple(z.shape)).astype(np.float32)
    (z * torch.from_numpy(g.astype(np.float64))).sum().backward()
    want = x.grad.numpy()
    spec = spec_of(layer, shape)
    for direct in (0, 1):
        got = K.generic_gradient(spec, g, 1, direct)
        assert got.shape == want.shape
        assert err(got, want) <= TOL, (direct, err(got, want))


# ---- rules vs the float64 reference ---------------------------------------------------------------

def rule_case(rule_name: str, layer, shape, rng):
    """(rule, a, R, layer) with data that keeps the rule's denominators away from float32 noise."""
    if rule_name == "Z":  # z = a w + b with a, w >= 0, b > 0: no near-zero denominators
        layer = type(layer)(np.abs(layer.weight), np.abs(layer.bias) + 0.5, **_geom_kwargs(layer))
        a = np.abs(rng.normal(size=shape)).astype(np.float32)
        return Z(), a, layer
    if rule_name == "ZBox":
        C = shape[1]
        lo = -1.0 - rng.random((C, 1, 1))
        hi = 1.0 + rng.random((C, 1, 1))
        a = (lo + (hi - lo) * rng.random(shape)).astype(np.float32)
        return ZBox(lo.astype(np.float32), hi.astype(np.float32)), a, layer
    a = rng.normal(size=shape).astype(np.float32)
    rule = {
        "Epsilon": Epsilon(0.25),
        "ZPlus": ZPlus(),
        "ZPlusBias": ZPlus(use_bias=True),
        "Gamma": Gamma(0.25),
        "AlphaBeta": AlphaBeta(2.0, 1.0),
        "WSquare": WSquare(),
        "Flat": Flat(),
    }[rule_name]
    return rule, a, layer


def _geom_kwargs(layer) -> dict:
    t, b, lf, r = layer.padding
    kw = dict(stride=layer.stride, padding=((t, b), (lf, r)), dilation=layer.dilation, groups=layer.groups)
    if isinstance(layer, dt.ConvTranspose2d):
        kw["output_padding"] = layer.output_padding
    return kw


RULES = ["Z", "Epsilon", "ZPlus", "ZPlusBias", "Gamma", "AlphaBeta", "WSquare", "Flat", "ZBox"]


@pytest.mark.parametrize("rule_name", RULES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=geometries())
def test_rule_matches_reference(rule_name, case):
    layer, shape, rng = case
    rule, a, layer = rule_case(rule_name, layer, shape, rng)
    out = layer.output_shape(shape)
    R = rng.normal(size=out).astype(np.float32)
    want = linear_relevance(layer, rule, a.astype(np.float64), R.astype(np.float64))
    spec = spec_of(layer, shape, rule)
    for direct in (0, 1):
        got = K.generic_relevance(spec, a, R, False, 1, direct)
        assert got.shape == want.shape
        assert err(got, want) <= TOL, (direct, err(got, want))


@pytest.mark.parametrize("rule_name", ["ZPlus", "Gamma", "AlphaBeta"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=geometries())
def test_sign_split_rules_on_nonneg_inputs(rule_name, case):
    """Inputs >= 0: the a- terms are skipped (statically with nonneg_in, or by the per-call check)."""
    layer, shape, rng = case
    rule, a, layer = rule_case(rule_name, layer, shape, rng)
    a = np.abs(a)
    R = rng.normal(size=layer.output_shape(shape)).astype(np.float32)
    want = linear_relevance(layer, rule, a.astype(np.float64), R.astype(np.float64))
    spec = spec_of(layer, shape, rule)
    for nonneg in (False, True):
        got = K.generic_relevance(spec, a, R, nonneg, 1, -1)
        assert err(got, want) <= TOL


# ---- fixed cases: networks' shapes, threads, direct vs GEMM --------------------------------------

FIXED = [
    # (kind, C, O, groups, kernel, stride, padding, H, W, output_padding, dilation)
    ("Conv2d", 32, 32, 32, 3, 1, 1, 14, 14, 0, 1),        # MobileNet depthwise
    ("Conv2d", 40, 40, 40, 5, 2, 2, 15, 15, 0, 1),        # EfficientNet depthwise 5x5 stride 2, C % 16 != 0
    ("Conv2d", 24, 48, 24, 3, 1, 1, 9, 9, 0, 1),          # channel multiplier 2 (GEMM path)
    ("Conv2d", 128, 128, 32, 3, 1, 1, 8, 8, 0, 1),        # ResNeXt 32x4d
    ("Conv2d", 48, 48, 3, 1, 1, 0, 7, 7, 0, 1),           # ShuffleNet grouped 1x1 (identity im2col)
    ("ConvTranspose2d", 16, 8, 1, 4, 2, 1, 6, 6, 0, 1),   # DCGAN / U-Net upsampling
    ("ConvTranspose2d", 12, 12, 12, 3, 2, 1, 5, 7, 1, 1),  # depthwise transposed, output_padding
    ("ConvTranspose2d", 8, 12, 4, 3, 2, 0, 5, 4, 1, 2),   # grouped, dilated
    ("ConvTranspose2d", 8, 8, 2, 1, 1, 0, 5, 5, 0, 1),    # grouped 1x1 (identity)
]


def fixed_layer(case, rng):
    kind, C, O, G, k, s, p, H, W, op, d = case
    b = rng.normal(size=O).astype(np.float32)
    if kind == "Conv2d":
        w = rng.normal(size=(O, C // G, k, k)).astype(np.float32)
        return dt.Conv2d(w, b, stride=s, padding=p, dilation=d, groups=G), (3, C, H, W)
    w = rng.normal(size=(C, O // G, k, k)).astype(np.float32)
    return dt.ConvTranspose2d(w, b, stride=s, padding=p, output_padding=op, dilation=d, groups=G), (3, C, H, W)


@pytest.mark.parametrize("case", FIXED, ids=lambda c: f"{c[0]}-C{c[1]}-O{c[2]}-g{c[3]}-k{c[4]}s{c[5]}")
@pytest.mark.parametrize("rule_name", RULES)
def test_fixed_shapes_threads_and_paths(case, rule_name):
    rng = np.random.default_rng(7)
    layer, shape = fixed_layer(case, rng)
    rule, a, layer = rule_case(rule_name, layer, shape, rng)
    R = rng.normal(size=layer.output_shape(shape)).astype(np.float32)
    want = linear_relevance(layer, rule, a.astype(np.float64), R.astype(np.float64))
    spec = spec_of(layer, shape, rule)
    ref1 = K.generic_relevance(spec, a, R, False, 1, -1)
    assert err(ref1, want) <= TOL
    got2 = K.generic_relevance(spec, a, R, False, 2, -1)
    assert err(got2, ref1) <= 1e-6  # threads split rows / groups / channels: same sums
    if layer.groups == a.shape[1] and layer.weight.shape[1] == 1 and (
            isinstance(layer, dt.ConvTranspose2d) or layer.weight.shape[0] == layer.groups):
        assert err(K.generic_relevance(spec, a, R, False, 1, 0), want) <= TOL


@pytest.mark.parametrize("case", FIXED, ids=lambda c: f"{c[0]}-C{c[1]}-O{c[2]}-g{c[3]}")
def test_fixed_forward_gradient_threads(case):
    rng = np.random.default_rng(3)
    layer, shape = fixed_layer(case, rng)
    x = rng.normal(size=shape).astype(np.float32)
    want = torch_forward(layer, torch.from_numpy(x.astype(np.float64))).numpy()
    g = rng.normal(size=want.shape).astype(np.float32)
    spec = spec_of(layer, shape)
    for threads in (1, 2):
        for direct in (0, 1):
            assert err(K.generic_forward(spec, x, threads, direct), want) <= TOL
    gin1 = K.generic_gradient(spec, g, 1)
    assert err(K.generic_gradient(spec, g, 2), gin1) <= 1e-6


def test_depthwise_picks_direct_kernel():
    rng = np.random.default_rng(0)
    layer, shape = fixed_layer(FIXED[0], rng)
    spec = spec_of(layer, shape)
    assert K.generic_bench(spec, 1, "forward", 1, 1, -1)[1] is True
    assert K.generic_bench(spec, 1, "forward", 1, 1, 0)[1] is False
    layer, shape = fixed_layer(FIXED[3], rng)  # ResNeXt: per-group GEMMs
    assert K.generic_bench(spec_of(layer, shape), 1, "forward", 1, 1, -1)[1] is False


@pytest.mark.parametrize("bad, match", [
    ({"groups": 5}, "divisible"),
    ({"out_shape": [32, 13, 14]}, "output shape"),
    ({"weight": np.zeros(5, np.float32)}, "weight"),
    ({"bias": np.zeros(3, np.float32)}, "bias"),
    ({"output_padding": [1, 0]}, "output_padding"),
    ({"rule": "ZBox", "low": np.zeros(3, np.float32), "high": np.ones(3, np.float32)}, "ZBox"),
])
def test_bad_specs_raise(bad, match):
    rng = np.random.default_rng(0)
    layer, shape = fixed_layer(FIXED[0], rng)
    spec = spec_of(layer, shape, Z())
    spec.update(bad)
    x = np.zeros(shape, np.float32)
    R = np.zeros((3, *spec["out_shape"]), np.float32)
    with pytest.raises(ValueError, match=match):
        K.generic_relevance(spec, x, R)


def test_convtranspose_output_padding_beyond_stride():
    """output_padding >= stride (allowed below the dilation): the underlying convolution of the
    output would have more rows than the input; the module only computes the input's."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    b = rng.normal(size=2).astype(np.float32)
    layer = dt.ConvTranspose2d(w, b, stride=1, padding=((0, 3), (0, 3)), output_padding=1, dilation=2)
    shape = (1, 4, 5, 5)
    spec = spec_of(layer, shape)
    x = rng.normal(size=shape).astype(np.float32)
    z = K.generic_forward(spec, x)
    want = torch_forward(layer, torch.from_numpy(x.astype(np.float64))).numpy()
    assert err(z, want) <= TOL
    R = rng.normal(size=z.shape).astype(np.float32)
    for rule in (Epsilon(0.25), ZPlus(), WSquare()):
        ref = linear_relevance(layer, rule, x.astype(np.float64), R.astype(np.float64))
        assert err(K.generic_relevance(spec_of(layer, shape, rule), x, R), ref) <= TOL
