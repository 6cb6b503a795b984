"""Every relevance rule against a slow implementation of its definition, plus identities that follow
from the definitions.

As in Zennit's tests, each rule is paired (``@replicates``) with a slow function that follows the
paper's formula element by element, ``R_i = sum_j q_ij / (sum_i' q_i'j + bias term) R_j``, on a dense
matrix. A convolution is turned into its dense matrix by applying it to unit vectors, so the same
definition checks Dense and Conv2d (strides, paddings, dilations included).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.reference import linear_relevance
from deeptaylor.reference.ops import conv2d_forward
from deeptaylor.rules import AlphaBeta, Epsilon, Flat, Gamma, WSquare, Z, ZBox, ZPlus

# --------------------------------------------------------------------------------------------------
# The registry of slow definitions

DEFINITIONS: dict[type, Callable] = {}


def replicates(rule_cls: type):
    """Register ``fn`` as the slow definition of ``rule_cls``."""
    def deco(fn):
        DEFINITIONS[rule_cls] = fn
        return fn
    return deco


class Matrix:
    """A linear layer as a dense matrix: ``z = M a + b`` on flattened samples; ``mask[j, i]`` tells
    whether input i is connected to output j (for the flat rule's fan-in)."""

    def __init__(self, M, b, mask):
        self.M, self.b, self.mask = M, b, mask


def as_matrix(layer, sample_shape) -> Matrix:
    """Dense matrix of a Dense or Conv2d layer for inputs of ``sample_shape`` (built from unit vectors)."""
    if isinstance(layer, dt.Dense):
        return Matrix(layer.weight, layer.bias, np.ones(layer.weight.shape, dtype=bool))
    p = int(np.prod(sample_shape))
    eye = np.eye(p).reshape((p,) + tuple(sample_shape))

    def apply(weight):
        out = conv2d_forward(eye, weight, None, layer.stride, layer.padding, layer.dilation)
        return out.reshape(p, -1).T, out.shape[2] * out.shape[3]

    M, positions = apply(layer.weight)
    conn, _ = apply(np.ones_like(layer.weight))
    return Matrix(M, np.repeat(layer.bias, positions), conn > 0)


def redistribute(q, den, R):
    """R_i = sum_j q[j][i] / den[j] * R[j] with explicit loops; a zero denominator passes nothing."""
    J, I = len(q), len(q[0])
    out = [0.0] * I
    for j in range(J):
        if den[j] == 0:
            continue
        for i in range(I):
            out[i] += q[j][i] / den[j] * R[j]
    return out


def pos(v):
    return max(v, 0.0)


def neg(v):
    return min(v, 0.0)


@replicates(Z)
def z_definition(rule, m, a, R, lo, hi):
    q = [[a[i] * m.M[j, i] for i in range(len(a))] for j in range(len(R))]
    den = [sum(q[j]) + m.b[j] for j in range(len(R))]
    return redistribute(q, den, R), den


@replicates(Epsilon)
def epsilon_definition(rule, m, a, R, lo, hi):
    q = [[a[i] * m.M[j, i] for i in range(len(a))] for j in range(len(R))]
    z = [sum(q[j]) + m.b[j] for j in range(len(R))]
    den = [zj + rule.eps * (1.0 if zj >= 0 else -1.0) for zj in z]
    return redistribute(q, den, R), z


@replicates(ZPlus)
def zplus_definition(rule, m, a, R, lo, hi):
    q = [[pos(a[i] * m.M[j, i]) for i in range(len(a))] for j in range(len(R))]
    den = [sum(q[j]) + (pos(m.b[j]) if rule.use_bias else 0.0) for j in range(len(R))]
    return redistribute(q, den, R), den


@replicates(Gamma)
def gamma_definition(rule, m, a, R, lo, hi):
    g, out, dens = rule.gamma, [0.0] * len(a), []
    for j in range(len(R)):
        z = sum(a[i] * m.M[j, i] for i in range(len(a))) + m.b[j]
        dens.append(z)
        q = []
        for i in range(len(a)):
            w = m.M[j, i]
            up, dn = w + g * pos(w), w + g * neg(w)
            if z > 0:        # boost the contributions that agree with z's sign
                q.append(pos(a[i]) * up + neg(a[i]) * dn)
            else:
                q.append(pos(a[i]) * dn + neg(a[i]) * up)
        if z > 0:
            den = sum(q) + m.b[j] + g * pos(m.b[j])
        elif z < 0:
            den = sum(q) + m.b[j] + g * neg(m.b[j])
        else:
            continue
        dens.append(den)
        for i in range(len(a)):
            out[i] += q[i] / den * R[j]
    return out, dens


@replicates(AlphaBeta)
def alphabeta_definition(rule, m, a, R, lo, hi):
    qp = [[pos(a[i] * m.M[j, i]) for i in range(len(a))] for j in range(len(R))]
    qn = [[neg(a[i] * m.M[j, i]) for i in range(len(a))] for j in range(len(R))]
    dp = [sum(qp[j]) + pos(m.b[j]) for j in range(len(R))]
    dn = [sum(qn[j]) + neg(m.b[j]) for j in range(len(R))]
    rp, rn = redistribute(qp, dp, R), redistribute(qn, dn, R)
    return [rule.alpha * p - rule.beta * n for p, n in zip(rp, rn, strict=True)], dp + dn


@replicates(WSquare)
def wsquare_definition(rule, m, a, R, lo, hi):
    q = [[m.M[j, i] ** 2 for i in range(len(a))] for j in range(len(R))]
    den = [sum(q[j]) for j in range(len(R))]
    return redistribute(q, den, R), den


@replicates(Flat)
def flat_definition(rule, m, a, R, lo, hi):
    q = [[1.0 if m.mask[j, i] else 0.0 for i in range(len(a))] for j in range(len(R))]
    den = [sum(q[j]) for j in range(len(R))]
    return redistribute(q, den, R), den


@replicates(ZBox)
def zbox_definition(rule, m, a, R, lo, hi):
    q = [[a[i] * m.M[j, i] - lo[i] * pos(m.M[j, i]) - hi[i] * neg(m.M[j, i]) for i in range(len(a))]
         for j in range(len(R))]
    den = [sum(q[j]) for j in range(len(R))]
    return redistribute(q, den, R), den


def definition(rule, layer, a, R):
    """Apply the slow definition sample by sample. Returns (R_in of a's shape, smallest |denominator|
    among the nonzero ones)."""
    m = as_matrix(layer, a.shape[1:])
    lo = hi = None
    if isinstance(rule, ZBox):
        lo, hi = (np.broadcast_to(v, a.shape[1:]).ravel() for v in rule.bounds_for(a.shape[1:]))
    out = np.zeros((a.shape[0], m.M.shape[1]))
    smallest = np.inf
    for n in range(a.shape[0]):
        r, dens = DEFINITIONS[type(rule)](rule, m, a[n].ravel(), R[n].ravel(), lo, hi)
        out[n] = r
        nz = [abs(d) for d in dens if d != 0]
        smallest = min([smallest] + nz)
    return out.reshape(a.shape), smallest


def test_every_rule_has_a_definition():
    assert set(DEFINITIONS) == set(dt.reference.RULE_FUNCTIONS)


# --------------------------------------------------------------------------------------------------
# Layers and rules under test

def make_layer(kind: str, rng):
    if kind == "dense":
        return dt.Dense(rng.normal(size=(4, 6)), rng.normal(size=4)), (6,)
    if kind == "conv-stride-pad":
        return dt.Conv2d(rng.normal(size=(3, 2, 3, 2)), rng.normal(size=3), stride=(2, 1),
                         padding=(1, 0, 1, 1)), (2, 5, 4)
    if kind == "conv-dilation":
        return dt.Conv2d(rng.normal(size=(2, 1, 3, 3)), rng.normal(size=2), padding=2, dilation=2), (1, 6, 5)
    raise ValueError(kind)


LAYERS = ["dense", "conv-stride-pad", "conv-dilation"]

RULES = [
    ("Z", lambda s: Z(), "any"),
    ("Epsilon", lambda s: Epsilon(0.3), "any"),
    ("ZPlus", lambda s: ZPlus(), "positive"),
    ("ZPlus-any-sign", lambda s: ZPlus(), "any"),
    ("ZPlus-bias", lambda s: ZPlus(use_bias=True), "positive"),
    ("Gamma", lambda s: Gamma(0.25), "positive"),
    ("Gamma-any-sign", lambda s: Gamma(1.5), "any"),
    ("AlphaBeta", lambda s: AlphaBeta(2.0, 1.0), "any"),
    ("AlphaBeta-1-0", lambda s: AlphaBeta(1.0, 0.0), "positive"),
    ("WSquare", lambda s: WSquare(), "any"),
    ("Flat", lambda s: Flat(), "any"),
    ("ZBox-scalar", lambda s: ZBox(-1.0, 2.0), "box"),
    # per-channel bounds for convolutions, per-feature for dense
    ("ZBox-array", lambda s: ZBox(np.linspace(-1, 0, s[0]).reshape((s[0],) + (1,) * (len(s) - 1)),
                                  np.linspace(1, 2, s[0]).reshape((s[0],) + (1,) * (len(s) - 1))), "box"),
]


def draw_input(rule, domain, shape, rng):
    if domain == "positive":
        a = rng.uniform(0.0, 1.0, size=shape)
        a[rng.uniform(size=shape) < 0.2] = 0.0         # exact zeros, as after a ReLU
        return a
    if domain == "box":
        lo, hi = (np.broadcast_to(v, shape[1:]) for v in rule.bounds_for(shape[1:]))
        return lo + (hi - lo) * rng.uniform(size=shape)
    return rng.normal(size=shape)


@pytest.mark.parametrize("layer_kind", LAYERS)
@pytest.mark.parametrize(("name", "make_rule", "domain"), RULES, ids=[r[0] for r in RULES])
@pytest.mark.parametrize("batch", [1, 2])
def test_rule_matches_definition(layer_kind, name, make_rule, domain, batch):
    rng = np.random.default_rng([LAYERS.index(layer_kind), [r[0] for r in RULES].index(name), batch])
    layer, sample = make_layer(layer_kind, rng)
    rule = make_rule(sample)
    out_shape = layer.output_shape((batch,) + sample)
    for _ in range(100):   # keep every denominator away from 0: compare the rules, not the stabiliser
        a = draw_input(rule, domain, (batch,) + sample, rng)
        R = rng.normal(size=out_shape)
        want, smallest = definition(rule, layer, a, R)
        if smallest > 1e-3 or isinstance(rule, (WSquare, Flat)):   # (their denominators are constants)
            break
    else:  # pragma: no cover
        pytest.fail("could not draw an input away from z = 0")
    got = linear_relevance(layer, rule, a, R)
    assert got.shape == a.shape
    scale = float(np.max(np.abs(want)))
    assert scale > 0
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * scale)


# --------------------------------------------------------------------------------------------------
# Identities that follow from the definitions


@pytest.fixture(params=LAYERS)
def layer_and_shape(request):
    rng = np.random.default_rng(LAYERS.index(request.param) + 100)
    layer, sample = make_layer(request.param, rng)
    return layer, (2,) + sample


def with_params(layer, weight=None, bias=None):
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is None else bias
    if isinstance(layer, dt.Dense):
        return dt.Dense(weight, bias)
    return dt.Conv2d(weight, bias, layer.stride, layer.padding, layer.dilation)


def forward(layer, a, bias=True):
    return dt.reference.ops.linear_forward(layer, a, layer.weight, layer.bias if bias else None)


def test_epsilon_absorbs_exactly_what_theory_says(layer_and_shape, rng):
    """sum_i R_i = sum_j R_j (z_j - b_j) / (z_j + eps sign z_j): epsilon and the bias absorb the rest."""
    layer, shape = layer_and_shape
    a = rng.normal(size=shape)
    z = forward(layer, a)
    R = rng.normal(size=z.shape)
    for eps in (0.0, 0.01, 1.0):
        if eps == 0.0 and np.min(np.abs(z)) < 1e-3:
            continue
        Rin = linear_relevance(layer, Epsilon(eps), a, R)
        expect = (R * (z - forward(layer, np.zeros_like(a))) / (z + eps * np.where(z >= 0, 1, -1)))
        np.testing.assert_allclose(Rin.reshape(2, -1).sum(1), expect.reshape(2, -1).sum(1), rtol=1e-10)


def test_epsilon_zero_is_z(layer_and_shape, rng):
    layer, shape = layer_and_shape
    a = rng.normal(size=shape)
    R = rng.normal(size=layer.output_shape(shape))
    np.testing.assert_allclose(linear_relevance(layer, Epsilon(0.0), a, R), linear_relevance(layer, Z(), a, R),
                               rtol=1e-12, atol=1e-12)


def test_epsilon_zero_with_zero_denominator_passes_nothing():
    """Epsilon(0) on an output with z = 0 must drop its relevance like Z does, not produce NaN."""
    layer = dt.Dense(np.array([[1.0, -1.0], [1.0, 1.0]]))
    a = np.array([[1.0, 1.0]])                  # z = (0, 2)
    R = np.array([[5.0, 2.0]])
    got = linear_relevance(layer, Epsilon(0.0), a, R)
    np.testing.assert_allclose(got, [[1.0, 1.0]])
    np.testing.assert_allclose(got, linear_relevance(layer, Z(), a, R))


def test_z_without_bias_is_conservative(layer_and_shape, rng):
    layer, shape = layer_and_shape
    layer = with_params(layer, bias=np.zeros_like(layer.bias))
    a = rng.normal(size=shape)
    z = forward(layer, a)
    assert np.min(np.abs(z)) > 1e-3
    R = rng.normal(size=z.shape)
    Rin = linear_relevance(layer, Z(), a, R)
    np.testing.assert_allclose(Rin.reshape(2, -1).sum(1), R.reshape(2, -1).sum(1), rtol=1e-10)
    # with a bias, Z absorbs sum_j R_j b_j / z_j
    layer_b = with_params(layer, bias=np.linspace(-1, 1, layer.bias.size))
    zb = forward(layer_b, a)
    Rin = linear_relevance(layer_b, Z(), a, R)
    expect = (R * (zb - forward(layer_b, np.zeros_like(a))) / zb).reshape(2, -1).sum(1)
    np.testing.assert_allclose(Rin.reshape(2, -1).sum(1), expect, rtol=1e-8)


def test_alphabeta_structure_and_conservation(layer_and_shape, rng):
    """R(alpha, beta) = alpha P - beta Q with P, Q independent of alpha and beta; with b = 0 both
    shares sum to sum_j R_j, so sum R_in = (alpha - beta) sum R = sum R."""
    layer, shape = layer_and_shape
    a = rng.normal(size=shape)
    R = rng.uniform(0.5, 1.0, size=layer.output_shape(shape))
    P = linear_relevance(layer, AlphaBeta(1.0, 0.0), a, R)
    Q = 2 * P - linear_relevance(layer, AlphaBeta(2.0, 1.0), a, R)
    for alpha in (1.5, 3.0):
        got = linear_relevance(layer, AlphaBeta(alpha, alpha - 1.0), a, R)
        np.testing.assert_allclose(got, alpha * P - (alpha - 1.0) * Q, rtol=1e-10, atol=1e-12)
    nobias = with_params(layer, bias=np.zeros_like(layer.bias))
    # outputs where all contributions have one sign (possible at a convolution's border) have a zero
    # denominator on the other side: theory promises conservation only where both are nonzero
    W = layer.weight
    L = dt.reference.ops.linear_forward
    zp = L(layer, np.maximum(a, 0), np.maximum(W, 0), None) + L(layer, np.minimum(a, 0), np.minimum(W, 0), None)
    zn = L(layer, np.maximum(a, 0), np.minimum(W, 0), None) + L(layer, np.minimum(a, 0), np.maximum(W, 0), None)
    Rb = R * (zp != 0) * (zn != 0)
    assert Rb.any()
    for alpha in (1.0, 2.0):
        Rin = linear_relevance(nobias, AlphaBeta(alpha, alpha - 1.0), a, Rb)
        np.testing.assert_allclose(Rin.reshape(2, -1).sum(1), Rb.reshape(2, -1).sum(1), rtol=1e-10)
    # alpha=1, beta=0 on a >= 0 is z+ (positive bias in the denominator, as ZPlus(use_bias=True))
    ap = np.abs(a)
    np.testing.assert_allclose(linear_relevance(layer, AlphaBeta(1.0, 0.0), ap, R),
                               linear_relevance(layer, ZPlus(use_bias=True), ap, R), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(linear_relevance(nobias, AlphaBeta(1.0, 0.0), ap, R),
                               linear_relevance(layer, ZPlus(), ap, R), rtol=1e-12, atol=1e-12)


def test_gamma_zero_is_z(layer_and_shape, rng):
    layer, shape = layer_and_shape
    a = rng.normal(size=shape)
    R = rng.normal(size=layer.output_shape(shape))
    np.testing.assert_allclose(linear_relevance(layer, Gamma(0.0), a, R), linear_relevance(layer, Z(), a, R),
                               rtol=1e-10, atol=1e-12)


def test_gamma_large_tends_to_zplus(layer_and_shape, rng):
    """q = a (w + g w+) -> g a w+ as g -> oo: on a >= 0, b = 0 and outputs with z > 0, Gamma -> z+."""
    layer, shape = layer_and_shape
    layer = with_params(layer, bias=np.zeros_like(layer.bias))
    a = rng.uniform(0.1, 1.0, size=shape)
    z = forward(layer, a)
    R = rng.normal(size=z.shape) * (z > 0)
    got = linear_relevance(layer, Gamma(1e7), a, R)
    want = linear_relevance(layer, ZPlus(), a, R)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))


def test_zbox_with_high_equal_input_is_zplus(layer_and_shape, rng):
    """With l = 0 and h = a: q = a w - a w- = a w+, the z+ rule."""
    layer, shape = layer_and_shape
    a = rng.uniform(0.0, 1.0, size=(1,) + shape[1:])
    R = rng.uniform(size=layer.output_shape(a.shape))
    np.testing.assert_allclose(linear_relevance(layer, ZBox(0.0, a[0]), a, R),
                               linear_relevance(layer, ZPlus(), a, R), rtol=1e-10, atol=1e-12)


def test_wsquare_flat_and_zplus_invariances(layer_and_shape, rng):
    layer, shape = layer_and_shape
    a = rng.uniform(0.0, 1.0, size=shape)
    R = rng.uniform(size=layer.output_shape(shape))
    w = layer.weight
    ws = linear_relevance(layer, WSquare(), a, R)
    # w²: independent of the input, the bias and the weights' signs
    flipped = with_params(layer, weight=w * rng.choice([-1.0, 1.0], size=w.shape), bias=layer.bias + 3)
    np.testing.assert_allclose(linear_relevance(flipped, WSquare(), rng.normal(size=shape), R), ws, rtol=1e-12)
    # flat is w² with unit weights (of either sign)
    ones = with_params(layer, weight=rng.choice([-1.0, 1.0], size=w.shape))
    np.testing.assert_allclose(linear_relevance(layer, Flat(), a, R), linear_relevance(ones, WSquare(), a, R),
                               rtol=1e-12)
    # z+ on a >= 0: the negative weights and the bias do not matter
    other_neg = with_params(layer, weight=np.where(w < 0, 5 * w - 1, w), bias=-layer.bias)
    np.testing.assert_allclose(linear_relevance(other_neg, ZPlus(), a, R), linear_relevance(layer, ZPlus(), a, R),
                               rtol=1e-12)


@pytest.mark.parametrize("rule", [ZPlus(), WSquare(), Flat(), ZBox(0.0, 1.0)], ids=repr)
def test_single_layer_conservation_and_positivity(layer_and_shape, rng, rule):
    """Theory (Montavon et al. 2017): on its domain, with R_j >= 0 and R_j = 0 wherever the
    denominator vanishes, each DTD rule conserves and is positive."""
    layer, shape = layer_and_shape
    a = rng.uniform(0.0, 1.0, size=shape)
    a[rng.uniform(size=shape) < 0.3] = 0.0
    R = rng.uniform(size=layer.output_shape(shape))
    if isinstance(rule, ZPlus):   # R_j = 0 where no input contributes positively (then x_j = 0 in a net)
        zp = dt.reference.ops.linear_forward(layer, a, np.maximum(layer.weight, 0), None)
        R = R * (zp > 0)
    Rin = linear_relevance(layer, rule, a, R)
    assert np.all(Rin >= 0)
    np.testing.assert_allclose(Rin.reshape(2, -1).sum(1), R.reshape(2, -1).sum(1), rtol=1e-12)
    assert rule.conservative
    assert rule.positive


def test_rule_flags_and_values():
    assert not Z.conservative
    assert not Epsilon.conservative
    assert not Gamma.conservative
    assert not AlphaBeta.positive
    assert Epsilon(0.1) == Epsilon(0.1)
    assert Epsilon(0.1) != Epsilon(0.2)
    assert hash(ZBox(0, 1)) == hash(ZBox(0.0, 1.0))
    assert ZBox(0, 1) == ZBox(0.0, 1.0)
    assert ZBox(np.zeros(3), 1.0) != ZBox(0.0, 1.0)
    assert repr(AlphaBeta(2, 1)) == "AlphaBeta(alpha=2.0, beta=1.0)"
    assert repr(ZBox(np.zeros((3, 1, 1)), 1)) == "ZBox(low=array(3, 1, 1), high=1.0)"
    assert ZPlus(use_bias=True).params() == {"use_bias": True}
    with pytest.raises(AttributeError, match="immutable"):
        Epsilon().eps = 2.0
    b = ZBox(np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="read-only"):
        b.low[0] = -1.0


def test_epsilon_sign_of_zero_is_plus_one(backend):
    """LRP-epsilon divides by z_j + eps * sign(z_j) with sign(0) = +1 (numpy reference and the cpu
    engine's ``zr >= 0 ? eps : -eps``). Unit 0 of the first layer has z_0 = 0.5 - 0.5 = 0 exactly and
    receives R_0 = 0.5 from the Flat layer above (Flat ignores activations), so its share is
    s_0 = 0.5 / (+eps) and R_i gets a_i w_i0 s_0 = +-0.25 / eps; with sign(0) = -1 the signs flip."""
    eps = 0.5
    net = dt.Sequential([dt.Dense(np.array([[1.0, -1.0], [1.0, 1.0]])), dt.Dense(np.array([[1.0, 1.0]]))])
    x = np.array([[0.5, 0.5]], dtype=np.float32 if backend == "cpu" else np.float64)
    comp = dt.Composite(by_index={0: Epsilon(eps), 1: Flat()})
    res = dt.Explainer(net, comp, backend=backend).explain(x, return_layers=True)
    np.testing.assert_array_equal(res.output, [[1.0]])             # z = (0, 1): f = 1
    np.testing.assert_allclose(res.layers[1], [[0.5, 0.5]], rtol=1e-6)  # Flat: R_j = f / 2
    s0, s1 = 0.5 / eps, 0.5 / (1.0 + eps)                          # sign(0) = +1, sign(1) = +1
    want = [0.5 * 1.0 * s0 + 0.5 * 1.0 * s1, 0.5 * -1.0 * s0 + 0.5 * 1.0 * s1]
    np.testing.assert_allclose(res.relevance, [want], rtol=1e-6)
    assert res.relevance[0, 0] > 0 > res.relevance[0, 1]           # (-1 would give the opposite signs)
