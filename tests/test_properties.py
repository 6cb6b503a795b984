"""Conservation and positivity of the deep Taylor rules as properties (hypothesis), layer by layer.

What theory promises (Montavon et al. 2017, Props. 1-3, and slide 003), and so what is tested here:

* A ReLU network whose linear layers have b <= 0, explained with z+ on every linear layer above the
  first, and on the first layer w² (any input), flat (any input), z+ (input >= 0) or zB (input in a
  box l <= x <= h with l <= 0 <= h), is conservative (sum_i R_i = f(x) at every layer) and positive.
* Why no relevance is lost at a zero denominator: the relevance reaching a unit j from a z+ layer
  (or a sum/avg/Lp/global pool, or max pooling's winner) above has the form R_j = x_j * c_j. If the
  z+ denominator sum_i a_i w+_ij is 0, then z_j = sum_i a_i w_ij + b_j <= b_j <= 0, so x_j = 0 and
  R_j = 0: nothing is dropped. For zB the denominator sum_i (a_i - l_i) w+_ij + (a_i - h_i) w-_ij
  vanishes only if z_j = sum_i (l_i w+_ij + h_i w-_ij) + b_j, which is <= 0 when l <= 0 <= h. For w²
  and flat the denominator is a property of the weights (never 0 for random weights; an output
  that sees only padding has x_j = max(0, b_j) = 0).
* What breaks it (tested below as counter-examples, so the suite documents them): a positive bias
  (x_j = b_j > 0 with a zero z+ denominator: relevance dropped), a box with l > 0, the epsilon
  rule or a bias-including rule (relevance absorbed), and a top layer whose explained output is
  negative (z+ then spreads negative relevance). The network's output must also be what is
  explained: the nets here end in ReLU -> GlobalSumPool (the seeds' detection-pooling layer),
  ReLU -> LpPool, or Dense(b <= 0) -> ReLU.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import deeptaylor as dt

RULES = ["zplus", "w2", "flat", "zB"]


def _bias(rng, n):
    return -rng.uniform(0.0, 0.02, size=n)             # b <= 0, small: most units stay alive


@st.composite
def cases(draw):
    """A random ReLU network with b <= 0 (Conv2d with strides, 4-tuple paddings and dilations, every
    pooling, or Dense layers), the input shape (odd batches included) and a seeded generator."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    batch = draw(st.sampled_from([1, 2, 3, 5]))
    images = draw(st.integers(0, 2)) > 0                 # two thirds convolutional
    layers: list[dt.Layer] = []
    if images:
        c, h, w = draw(st.integers(1, 3)), draw(st.integers(5, 9)), draw(st.integers(5, 9))
        x_shape = shape = (batch, c, h, w)
        for _ in range(draw(st.integers(1, 2))):
            o, kh, kw = draw(st.integers(2, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
            conv = dt.Conv2d(dt.init.he_uniform((o, shape[1], kh, kw), rng), _bias(rng, o),
                             stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                             padding=draw(st.tuples(*[st.integers(0, 2)] * 4)),
                             dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))))
            try:
                shape = conv.output_shape(shape)
            except dt.ShapeError:
                continue
            layers += [conv, dt.ReLU()]
            k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            pool = draw(st.sampled_from([dt.MaxPool2d(k, s, p), dt.AvgPool2d(k, s, (0, p, p, 0)),
                                         dt.SumPool2d(k, s, p), dt.LpPool(float(draw(st.integers(1, 3))), k, s)]))
            if pool is not None:
                try:
                    shape = pool.output_shape(shape)
                    layers.append(pool)
                except dt.ShapeError:
                    pass
        if not layers:       # every kernel was too large for the image: a 1x1 convolution
            conv = dt.Conv2d(dt.init.he_uniform((2, c, 1, 1), rng), _bias(rng, 2))
            layers += [conv, dt.ReLU()]
            shape = conv.output_shape(shape)
        head = draw(st.sampled_from(["globalsum", "lp", "dense"]))
        if head == "dense":
            layers.append(dt.Flatten())
            shape = (batch, int(np.prod(shape[1:])))
    else:
        x_shape = shape = (batch, draw(st.integers(1, 9)))
        for _ in range(draw(st.integers(1, 2))):
            o = draw(st.integers(2, 7))
            layers += [dt.Dense(dt.init.glorot_uniform((o, shape[1]), rng), _bias(rng, o)), dt.ReLU()]
            shape = (batch, o)
        head = draw(st.sampled_from(["globalsum", "lp", "dense"]))
    if head == "globalsum":
        layers.append(dt.GlobalSumPool())
    elif head == "lp":
        layers.append(dt.LpPool(draw(st.sampled_from([1.0, 2.0, 3.0]))))
    else:
        k = draw(st.integers(1, 4))
        layers += [dt.Dense(dt.init.he_uniform((k, shape[1]), rng), _bias(rng, k)), dt.ReLU()]
    return dt.Sequential(layers), x_shape, rng


def composite_and_input(rule: str, x_shape, rng):
    """The composite for ``rule`` (on the first linear layer; z+ above) and an input in its domain."""
    if rule == "zplus":
        return dt.rules.ZPlus(), rng.uniform(0.0, 1.0, size=x_shape)
    if rule == "w2":
        return dt.composites.deep_taylor_unbounded(), rng.normal(size=x_shape)
    if rule == "flat":
        return dt.Composite(first=dt.rules.Flat(), default=dt.rules.ZPlus()), rng.normal(size=x_shape)
    # zB: l <= 0 <= h, scalar or per channel / per feature
    sample = x_shape[1:]
    bshape = (sample[0],) + (1,) * (len(sample) - 1)
    if rng.uniform() < 0.5:
        lo, hi = -rng.uniform(0, 1), rng.uniform(0.5, 2)
    else:
        lo, hi = -rng.uniform(0, 1, size=bshape), rng.uniform(0.5, 2, size=bshape)
    x = lo + (hi - lo) * rng.uniform(size=x_shape)
    return dt.composites.deep_taylor(lo, hi), x


@pytest.mark.parametrize("rule", RULES)
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_conservation_and_positivity(rule, case):
    net, x_shape, rng = case
    composite, x = composite_and_input(rule, x_shape, rng)
    res = dt.Explainer(net, composite, backend="numpy").explain(x, return_layers=True)
    assert len(res.layers) == len(net) + 1
    assert res.relevance.shape == x.shape
    f = res.explained
    assert np.all(f >= 0)
    assume(np.any(f > 0))    # (all units dead: conservation holds trivially, test something else)
    cons = dt.checks.conservation(res)
    # every layer's total equals f(x) to float64 rounding
    assert cons.ok(rtol=1e-10, atol=1e-12), str(cons)
    assert cons.layer_totals.shape == (x.shape[0], len(net) + 1)
    pos = dt.checks.positivity(res)
    assert pos.ok(tol=1e-12 * max(1.0, float(f.max()))), str(pos)
    assert res.conservative_expected


# --------------------------------------------------------------------------------------------------
# Where theory does not promise conservation: counter-examples, so the limits are documented and tested


def test_positive_bias_breaks_zplus_conservation():
    """x_j = b_j > 0 while every contribution is negative: the z+ denominator is 0 and R_j is lost."""
    w1 = np.array([[-1.0, -1.0], [1.0, 1.0]])
    net = dt.Sequential([dt.Dense(w1, [0.5, 0.0]), dt.ReLU(), dt.GlobalSumPool()])
    x = np.array([[0.1, 0.2]])                       # unit 0: z = -0.3 + 0.5 = 0.2 > 0, z+ = 0
    res = dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(x)
    np.testing.assert_allclose(res.explained, [0.5])
    np.testing.assert_allclose(res.relevance.sum(), 0.3)   # unit 0's 0.2 is dropped
    assert not dt.checks.conservation(res).ok()
    assert not res.conservative_expected                   # b > 0: outside the theorem


def test_box_with_positive_lower_bound_can_break_zb():
    """With l > 0 the zB root l w+ + h w- may not switch the unit off: a zero zB denominator with
    x_j > 0 drops relevance (the derivation assumes the box's corner is a root)."""
    net = dt.Sequential([dt.Dense(np.array([[1.0, 1.0]]), [0.0]), dt.ReLU(), dt.GlobalSumPool()])
    x = np.array([[0.5, 0.5]])
    res = dt.Explainer(net, dt.composites.deep_taylor(0.5, 1.0), backend="numpy").explain(x)   # x sits on the lower corner
    assert res.explained[0] == 1.0
    assert res.relevance.sum() == 0.0
    assert not res.conservative_expected                   # l > 0: outside the theorem


def test_epsilon_and_bias_absorb_relevance(rng):
    w1, b1 = rng.normal(size=(5, 4)), rng.normal(size=5)
    net = dt.Sequential([dt.Dense(w1, b1), dt.ReLU(), dt.GlobalSumPool()])
    x = rng.normal(size=(3, 4))
    res = dt.Explainer(net, dt.rules.Epsilon(0.5), backend="numpy").explain(x, return_layers=True)
    cons = dt.checks.conservation(res)
    assert not cons.ok(rtol=1e-6)
    assert not res.conservative_expected
    # the pooling layer above is conservative: only the Dense layer (index 0) loses relevance
    np.testing.assert_allclose(cons.layer_totals[:, 1:], res.explained[:, None] * np.ones((1, 3)), rtol=1e-12)


def test_zplus_with_bias_absorbs_positive_bias():
    """ZPlus(use_bias=True) (Zennit's ZPlus) adds b+ to the denominator: b+ / (sum q + b+) is absorbed."""
    net = dt.Sequential([dt.Dense(np.array([[1.0, 1.0]]), [0.5]), dt.ReLU(), dt.GlobalSumPool()])
    x = np.array([[0.25, 0.25]])                     # z = 1.0; z+ denominator 0.5 + b+ 0.5
    res = dt.Explainer(net, dt.rules.ZPlus(use_bias=True), backend="numpy").explain(x)
    np.testing.assert_allclose(res.relevance, [[0.25, 0.25]])
    assert not res.conservative_expected
    # plain z+ happens to conserve on this input (its denominator is not 0), but with b > 0 theory
    # does not promise it (see test_positive_bias_breaks_zplus_conservation), so it is not expected
    plain = dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(x)
    assert dt.checks.conservation(plain).ok()
    assert not plain.conservative_expected
    # with b <= 0, b+ = 0 and ZPlus(use_bias=True) is z+: conservative and expected to be
    net0 = dt.Sequential([dt.Dense(np.array([[1.0, 1.0]]), [-0.25]), dt.ReLU(), dt.GlobalSumPool()])
    res0 = dt.Explainer(net0, dt.rules.ZPlus(use_bias=True), backend="numpy").explain(x)
    assert res0.conservative_expected
    assert dt.checks.conservation(res0).ok(rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Explanation.conservative_expected is the theorem's premises: True exactly where §3 promises
# conservation, and each premise that fails has a counter-example where relevance is really lost


def test_conservative_expected_true_where_theorem_applies(rng):
    net = dt.Sequential([dt.Flatten(), dt.Dense(dt.init.he_uniform((5, 6), rng), -0.01 * np.ones(5)), dt.ReLU(),
                         dt.Dense(dt.init.he_uniform((3, 5), rng), np.zeros(3)), dt.ReLU(), dt.GlobalSumPool()])
    x = rng.uniform(size=(4, 6))
    for comp in (dt.composites.deep_taylor(0, 1), dt.composites.deep_taylor(-1, 2), dt.rules.ZPlus(),
                 dt.composites.deep_taylor_unbounded(), dt.Composite(first=dt.rules.Flat(), default=dt.rules.ZPlus())):
        res = dt.Explainer(net, comp, backend="numpy").explain(x, return_layers=True)
        assert res.conservative_expected, comp
        assert dt.checks.conservation(res).ok(rtol=1e-10, atol=1e-12)
    # a top linear layer without ReLU: expected when the explained output is >= 0
    top = dt.Sequential([dt.Dense(np.array([[1.0, 2.0]]))])
    assert dt.Explainer(top, dt.rules.ZPlus(), backend="numpy").explain(np.array([[1.0, 1.0]])).conservative_expected


def test_conservative_expected_false_outside_the_theorem():
    # not a conservative rule, or a gradient method
    net = dt.Sequential([dt.Dense(np.array([[1.0, 2.0], [0.5, -1.0]]), [-0.1, 0.0]), dt.ReLU(), dt.GlobalSumPool()])
    x = np.array([[1.0, 1.0]])
    for comp in (dt.rules.Epsilon(0.1), dt.rules.Z(), dt.rules.Gamma(), dt.rules.AlphaBeta(),
                 dt.methods.GradientXInput(), dt.methods.Sensitivity()):
        assert not dt.Explainer(net, comp, backend="numpy").explain(x).conservative_expected, comp


def test_wsquare_above_the_first_layer_is_not_expected_to_conserve():
    """w² passes relevance to a unit whatever its activation: a unit that is off (all-zero weights)
    receives R_j > 0 from the w² layer above and its own zero denominator drops it."""
    net = dt.Sequential([dt.Dense(np.array([[1.0, 1.0], [0.0, 0.0]])), dt.ReLU(),
                         dt.Dense(np.array([[1.0, 1.0]])), dt.ReLU()])
    x = np.array([[0.5, 0.5]])
    res = dt.Explainer(net, dt.rules.WSquare(), backend="numpy").explain(x)
    np.testing.assert_allclose(res.explained, [1.0])
    np.testing.assert_allclose(res.relevance.sum(), 0.5)      # unit 1's half is dropped
    assert not res.conservative_expected
    assert dt.Explainer(net, dt.composites.deep_taylor_unbounded(), backend="numpy").explain(x).conservative_expected


def test_linear_layers_without_relu_are_not_expected_to_conserve():
    """Without a ReLU a unit with a zero z+ denominator keeps x_j = z_j < 0, and its relevance
    (from the z+ layer above, which sees the negative input) is dropped."""
    net = dt.Sequential([dt.Dense(np.array([[-1.0, -1.0]])), dt.Dense(np.array([[-1.0]]))])
    x = np.array([[1.0, 1.0]])
    res = dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(x)
    np.testing.assert_allclose(res.explained, [2.0])
    assert res.relevance.sum() == 0.0
    assert not res.conservative_expected


def test_negative_explained_output_is_not_expected_to_conserve():
    """A top linear layer whose explained output is negative: a zero z+ denominator drops it."""
    net = dt.Sequential([dt.Dense(np.array([[-1.0]]))])
    res = dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(np.array([[1.0]]))
    assert res.explained[0] == -1.0
    assert res.relevance.sum() == 0.0
    assert not res.conservative_expected


def test_pooling_before_the_first_linear_layer_is_not_expected():
    """The theorem's first linear layer sees the input (Flatten aside): a sum pool in between can
    cancel mixed-sign inputs to 0 while w² above still sends it relevance."""
    net = dt.Sequential([dt.SumPool2d(2), dt.Flatten(), dt.Dense(np.array([[1.0, 1.0]])), dt.ReLU()])
    x = np.array([[[[1.0, -1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]])
    res = dt.Explainer(net, dt.composites.deep_taylor_unbounded(), backend="numpy").explain(x)
    np.testing.assert_allclose(res.explained, [2.0])
    np.testing.assert_allclose(res.relevance.sum(), 1.0)       # the cancelled window's half is lost
    assert not res.conservative_expected


def test_negative_explained_output_gives_negative_zplus_relevance(rng):
    """z+ on a top layer whose output is negative: conservative (bias ignored) but not positive."""
    net = dt.Sequential([dt.Dense(np.array([[1.0, -3.0]]), [0.0])])
    x = np.array([[1.0, 1.0]])                       # f = -2, z+ denominator 1
    res = dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(x)
    np.testing.assert_allclose(res.relevance, [[-2.0, 0.0]])
    assert dt.checks.conservation(res).ok()
    assert not dt.checks.positivity(res).ok()


# --------------------------------------------------------------------------------------------------
# The check objects


def test_check_reports_print_and_assert(rng):
    w1 = dt.init.he_uniform((4, 6), rng)
    net = dt.Sequential([dt.Dense(w1, -0.01 * np.ones(4)), dt.ReLU(), dt.GlobalSumPool()])
    x = rng.uniform(size=(3, 6))
    res = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="numpy").explain(x, return_layers=True)
    cons = dt.checks.conservation(res)
    text = str(cons)
    assert "conservation" in text
    assert "3 samples" in text
    assert f"{res.relevance.reshape(3, -1).sum(1).mean():.6g}" in text
    assert f"{res.explained.mean():.6g}" in text
    assert f"{cons.max_abs_error:.3e}" in text
    assert "per layer" in text
    assert cons.ok()
    assert cons.max_rel_error < 1e-12
    pos = dt.checks.positivity(res)
    text = str(pos)
    assert "0.00 %" in text
    assert "negative entries per layer" in text
    assert pos.ok()
    assert pos.negative_fraction == 0.0
    assert pos.negative_mass == 0.0

    # a non-conservative, non-positive explanation: the reports say so, with the numbers
    res2 = dt.Explainer(net, dt.rules.AlphaBeta(2.0, 1.0), backend="numpy").explain(x - 0.5)
    cons2, pos2 = dt.checks.conservation(res2), dt.checks.positivity(res2)
    assert cons2.layer_totals is None
    assert "per layer" not in str(cons2)
    assert f"{cons2.max_rel_error:.3e}" in str(cons2)
    expect_neg = float((res2.relevance < 0).mean())
    assert pos2.negative_fraction == pytest.approx(expect_neg)
    assert f"{100 * expect_neg:.2f} %" in str(pos2)
    assert pos2.min_value == pytest.approx(float(res2.relevance.min()))
    assert not pos2.ok()
    assert pos2.ok(tol=-pos2.min_value)
    # ok() honours its tolerances
    err = cons2.max_abs_error
    assert cons2.ok(rtol=0.0, atol=err * 1.01)
    assert not cons2.ok(rtol=0.0, atol=err * 0.99)
