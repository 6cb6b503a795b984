"""checks.conservation / checks.positivity on explanations of Graphs: per-node relevance keyed by node
name, conservation on the clean cuts of the topological order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import checks
from deeptaylor.checks import clean_cuts


def residual_relu_net(rng, bn=False):
    """ReLU residual + concat net with b <= 0, ending in ReLU (explained outputs >= 0)."""
    x = dt.Input((3, 8, 8))

    def conv(cin, cout, name):
        return dt.Conv2d(rng.normal(size=(cout, cin, 3, 3)) * 0.3, -np.abs(rng.normal(size=cout)) * 0.05,
                         padding=1)

    h = conv(3, 4, "conv1")(x, name="conv1")
    if bn:
        h = dt.BatchNorm2d(rng.uniform(-0.1, 0.1, 4), rng.uniform(0.5, 2, 4), np.ones(4), -np.full(4, 0.01))(
            h, name="bn1")
    h = dt.ReLU()(h, name="relu1")
    y = dt.ReLU()(conv(4, 4, "conv2")(h, name="conv2"), name="relu2")
    y = dt.Add()(y, h, name="res")
    z = dt.Concat()(y, h, name="cat")
    f = dt.Flatten()(dt.AvgPool2d(2)(z, name="pool"), name="flat")
    out = dt.ReLU()(dt.Dense(np.abs(rng.normal(size=(5, 8 * 16))) * 0.1, -np.full(5, 0.01))(f, name="fc"),
                    name="out")
    return dt.Graph(x, out)


def branch_net(rng):
    """Two branches from slices of one tensor, concatenated: a clean cut with two values."""
    x = dt.Input((3, 6, 6))
    h = dt.ReLU()(dt.Conv2d(np.abs(rng.normal(size=(4, 3, 3, 3))) * 0.3, padding=1)(x, name="stem"), name="r0")
    a = dt.Slice(0, 2)(h, name="sa")
    b = dt.Slice(2, 4)(h, name="sb")
    a = dt.ReLU()(dt.Conv2d(np.abs(rng.normal(size=(2, 2, 1, 1))))(a, name="ca"), name="ra")
    b = dt.ReLU()(dt.Conv2d(np.abs(rng.normal(size=(2, 2, 1, 1))))(b, name="cb"), name="rb")
    c = dt.Concat()(a, b, name="cat")
    return dt.Graph(x, dt.GlobalSumPool()(c, name="sum"))


def test_clean_cuts_of_a_chain_are_every_cut(rng):
    net = dt.Sequential([dt.Dense(rng.normal(size=(3, 4))), dt.ReLU(), dt.Dense(rng.normal(size=(2, 3)))])
    assert clean_cuts(net) == [(0,), (1,), (2,), (3,)]


def test_clean_cuts_of_residual_and_branches(rng):
    net = residual_relu_net(rng)
    names = ["input", *net.names]
    cuts = ["+".join(names[v] for v in cut) for cut in clean_cuts(net)]
    # inside the residual block relu1 is read on both sides of every cut: no clean cut there
    assert cuts == ["input", "conv1", "relu1", "cat", "pool", "flat", "fc", "out"]
    net = branch_net(rng)
    names = ["input", *net.names]
    cuts = ["+".join(names[v] for v in cut) for cut in clean_cuts(net)]
    assert "ra+rb" in cuts
    assert cuts[0] == "input"
    assert cuts[-1] == "sum"


@pytest.mark.parametrize("backend", dt.available_backends())
@pytest.mark.parametrize("make", [residual_relu_net, branch_net])
def test_deep_taylor_conserves_on_every_clean_cut(rng, backend, make):
    net = make(rng)
    x = rng.uniform(0, 1, size=(4,) + net.input_shape)
    ex = dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend=backend)
    res = ex.explain(x, return_layers=True)
    assert isinstance(res.layers, dict)
    assert next(iter(res.layers)) == "input"
    assert res.conservative_expected
    # the Add's proportional split is stabilised by eps = 1e-6 in the denominator (Zennit's Norm rule):
    # it absorbs eps / (z + eps) of each element's relevance, so a residual net conserves to ~1e-6 only
    tol = 1e-4 if backend != "numpy" else 1e-5 if make is residual_relu_net else 1e-9
    rep = checks.conservation(res, graph=net)
    assert rep.layer_names is not None
    assert rep.layer_names[0] == "input"
    assert rep.layer_totals.shape == (4, len(rep.layer_names))
    assert rep.ok(rtol=tol), str(rep)
    np.testing.assert_allclose(rep.layer_totals, np.repeat(res.explained[:, None], len(rep.layer_names), 1),
                               rtol=tol)
    text = str(rep)
    for name in rep.layer_names:
        assert name in text
    # the canonical graph works the same, and is the default (res.graph); without a graph, input
    # and output are checked
    assert checks.conservation(res, graph=ex.graph).layer_names == rep.layer_names
    assert checks.conservation(res).layer_names == rep.layer_names
    bare = checks.conservation(dataclasses.replace(res, graph=None))
    assert bare.layer_names == ["input", net.names[-1]]
    assert bare.ok(rtol=tol)
    pos = checks.positivity(res)
    assert pos.ok(tol=1e-6 * float(np.abs(res.relevance).max()))
    assert pos.layer_names == list(res.layers)
    assert len(pos.layer_negative_fraction) == len(net) + 1
    assert "stem" in str(pos) or "conv1" in str(pos)


def test_non_conservative_method_is_reported_per_cut(rng):
    net = residual_relu_net(rng)
    x = rng.uniform(0, 1, size=(3, 3, 8, 8))
    res = dt.Explainer(net, "gradient-x-input", backend="numpy").explain(x, return_layers=True)
    rep = checks.conservation(res, graph=net)
    assert not rep.ok(rtol=1e-6)
    assert rep.layer_rel_error.shape == (len(rep.layer_names),)


def test_folded_batchnorm_graph_maps_to_canonical_names(rng):
    """The original network (with a BatchNorm the explainer folds) is accepted: checks canonicalise it."""
    net = residual_relu_net(rng, bn=True)
    x = rng.uniform(0, 1, size=(2, 3, 8, 8))
    res = dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(x, return_layers=True)
    assert "bn1" not in res.layers
    rep = checks.conservation(res, graph=net)
    assert rep.ok(rtol=1e-5), str(rep)  # up to the Add's eps
    other = branch_net(rng)
    with pytest.raises(dt.InputError, match="does not match"):
        checks.conservation(res, graph=other)
    with pytest.raises(dt.InputTypeError):
        checks.conservation(res, graph="net")


def test_sequential_reports_unchanged(rng):
    net = dt.Sequential([dt.Dense(np.abs(rng.normal(size=(3, 4))), -np.full(3, 0.1)), dt.ReLU(),
                         dt.Dense(np.abs(rng.normal(size=(2, 3))), -np.full(2, 0.1))])
    res = dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(rng.uniform(0.2, 1, (3, 4)),
                                                                      return_layers=True)
    rep = checks.conservation(res)
    assert isinstance(res.layers, list)
    assert rep.layer_names is None
    assert rep.layer_totals.shape == (3, 4)
    assert "per layer (input of 0..L-1, output)" in str(rep)
    assert checks.positivity(res).layer_names is None
