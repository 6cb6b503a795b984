"""Many targets from one forward pass (issue 12, part 1): ``explain(x, target=(N, K) | "all" | ("top", k))``.

The K relevance passes share the forward pass (and, in the compiled engine, every linear op's im2col
blocks and rule denominators); each must equal the explanation of its target alone, on both
backends, for every composite and method, on chains, graphs and the engine's head groups; results
must not depend on the thread count; bad targets raise the library's errors.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import deeptaylor as dt

TOL = 1e-6  # max-normalised, many targets vs separate calls on the same backend


def _re(s: str) -> str:
    return re.escape(s)


def _maxnorm(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a - b))) / (scale if scale > 0 else 1.0)


def _b(rng, n):  # biases <= 0, as DTD's z+ and zB assume
    return -0.05 * rng.random(n)


@pytest.fixture(scope="module")
def conv_net():
    rng = np.random.default_rng(1)
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(4, 2, 3, 3)) * 0.5, _b(rng, 4), padding=1),
        dt.ReLU(),
        dt.MaxPool2d(2),
        dt.Conv2d(rng.normal(size=(6, 4, 3, 3)) * 0.3, _b(rng, 6), padding=1),
        dt.ReLU(),
        dt.Flatten(),
        dt.Dense(rng.normal(size=(12, 6 * 4 * 4)) * 0.2, _b(rng, 12)),
        dt.ReLU(),
        dt.Dense(rng.normal(size=(5, 12)) * 0.4, _b(rng, 5)),
    ])


@pytest.fixture(scope="module")
def dense_net():
    rng = np.random.default_rng(2)
    return dt.Sequential([
        dt.Dense(rng.normal(size=(16, 10)) * 0.4, _b(rng, 16)), dt.ReLU(),
        dt.Dense(rng.normal(size=(7, 16)) * 0.3, _b(rng, 7)),
    ])


@pytest.fixture(scope="module")
def graph_net():
    """Residual sum, concatenation, a second reader of a value (fan-out), global pooling."""
    rng = np.random.default_rng(3)
    x = dt.Input((3, 6, 6))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(4, 3, 3, 3)) * 0.4, _b(rng, 4), padding=1)(x, name="stem"))
    r = dt.ReLU()(dt.Conv2d(rng.normal(size=(4, 4, 3, 3)) * 0.3, _b(rng, 4), padding=1)(h, name="conv"))
    y = dt.Add()(r, h)
    z = dt.Concat(axis=1)(h, y)
    out = dt.Dense(rng.normal(size=(6, 8)) * 0.5, _b(rng, 6))(dt.GlobalAvgPool()(z))
    return dt.Graph(x, out)


SAMPLE = {10: (10,), 2: (2, 8, 8), 3: (3, 6, 6)}   # by the first layer's input width


def _x(net, n, seed=0):
    shape = net.input_shape or SAMPLE[net[0].weight.shape[1]]
    return np.random.default_rng(seed).random((n, *shape))


# the registered composites; compound methods (several passes per target) refuse many targets (tested below)
COMPOSITES = [c for c in dt.composites.names() if not isinstance(dt.composites.get(c), dt.methods.CompoundMethod)]
METHODS = [dt.methods.Sensitivity(), dt.methods.GradientXInput(), dt.methods.Gradient()]


def _explainer(net, what, backend, threads=1):
    comp = dt.composites.get(what) if isinstance(what, str) else what
    return dt.Explainer(net, comp, backend=backend, threads=threads)


@pytest.mark.parametrize("what", COMPOSITES + METHODS, ids=str)
@pytest.mark.parametrize("net_name", ["conv_net", "dense_net", "graph_net"])
def test_all_targets_equal_separate_calls(request, net_name, what, backend):
    net = request.getfixturevalue(net_name)
    x = _x(net, 3)
    ex = _explainer(net, what, backend)
    res = ex.explain(x, target="all")
    k = res.output.shape[1]
    assert res.relevance.shape == (3, k, *x.shape[1:])
    assert res.target.shape == res.explained.shape == (3, k)
    assert res.target.tolist() == [list(range(k))] * 3
    for t in range(k):
        one = ex.explain(x, target=t)
        assert _maxnorm(res.relevance[:, t], one.relevance) <= TOL, t
        np.testing.assert_array_equal(res.explained[:, t], one.explained)
    # K = 1: an (N, 1) target array keeps the K axis; a plain (N,) target does not
    t1 = np.array([[1], [0], [k - 1]])
    r1 = ex.explain(x, target=t1)
    assert r1.relevance.shape == (3, 1, *x.shape[1:])
    assert _maxnorm(r1.relevance[:, 0], ex.explain(x, target=t1[:, 0]).relevance) <= TOL
    assert ex.explain(x, target=t1[:, 0]).relevance.shape == x.shape


def test_top_k(conv_net, backend):
    x = _x(conv_net, 4)
    ex = _explainer(conv_net, "epsilon_plus_flat", backend)
    res = ex.explain(x, target=("top", 3))
    order = np.argsort(-res.output, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(res.target, order)
    assert np.all(np.diff(np.take_along_axis(res.output, res.target, axis=1), axis=1) <= 0)
    np.testing.assert_array_equal(res.explained, np.take_along_axis(res.output, order, axis=1))
    sep = ex.explain(x, target=order)
    assert _maxnorm(res.relevance, sep.relevance) <= TOL
    # ("top", 1) is the default target with a K axis
    top1 = ex.explain(x, target=("top", 1))
    assert _maxnorm(top1.relevance[:, 0], ex.explain(x).relevance) <= TOL


def test_top_k_ties_go_to_the_lower_index(backend):
    # equal outputs: a zero Dense layer with equal biases gives every output the same value
    net = dt.Sequential([dt.Dense(np.zeros((4, 3)), np.full(4, 0.5))])
    res = dt.Explainer(net, dt.rules.Z(), backend=backend).explain(np.ones((2, 3)), target=("top", 3))
    assert res.target.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_many_rounds_and_head_groups_cpu():
    """More targets than one round of passes (rounds of 16, activations kept for every round), and a
    plan with head groups (the Dense head run on several tiles at once), against separate calls and
    the float64 reference."""
    rng = np.random.default_rng(5)
    net = dt.Sequential([
        dt.Conv2d(rng.normal(size=(32, 1, 3, 3)) * 0.5, _b(rng, 32), padding=1), dt.ReLU(),
        dt.MaxPool2d(2), dt.Flatten(),
        dt.Dense(rng.normal(size=(24, 32 * 40 * 40)) * 0.005, _b(rng, 24)), dt.ReLU(),
        dt.Dense(rng.normal(size=(40, 24)) * 0.2, _b(rng, 40)),
    ])
    x = rng.random((9, 1, 80, 80))
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu", threads=2)
    plan = ex.backend.plan(ex.graph, ex.assignment, x.shape[1:])
    assert plan.head < len(ex.graph) and plan.group > plan.tile     # head groups in use
    passes, arena = plan.passes(40)
    assert 1 <= passes < 40 and arena >= plan.arena_bytes           # several rounds
    t = np.stack([rng.permutation(40)[:20] for _ in range(9)])      # K = 20 different targets per image
    res = ex.explain(x, target=t)
    for k in (0, 7, 16, 19):   # first, middle, the second round
        assert _maxnorm(res.relevance[:, k], ex.explain(x, target=t[:, k]).relevance) <= TOL
    ref = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="numpy").explain(x[:2], target=t[:2])
    assert _maxnorm(res.relevance[:2], ref.relevance) <= 1e-4
    assert dt.checks.conservation(res).ok(rtol=1e-4)


@pytest.mark.parametrize("what", ["epsilon_plus", dt.methods.GradientXInput()], ids=str)
def test_rounds_on_a_graph_cpu(monkeypatch, what):
    """A small pass budget (DEEPTAYLOR_PASS_BUDGET_BYTES; the floor is twice the single-pass arena)
    forces several rounds of passes on a residual/concat graph: activations kept for every round."""
    monkeypatch.setenv("DEEPTAYLOR_PASS_BUDGET_BYTES", "1")
    rng = np.random.default_rng(7)
    xi = dt.Input((3, 24, 24))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(8, 3, 3, 3)) * 0.4, _b(rng, 8), padding=1)(xi, name="stem"))
    r = dt.ReLU()(dt.Conv2d(rng.normal(size=(8, 8, 3, 3)) * 0.2, _b(rng, 8), padding=1)(h, name="conv"))
    z = dt.Concat(axis=1)(h, dt.Add()(r, h))
    graph_net = dt.Graph(xi, dt.Dense(rng.normal(size=(6, 16)) * 0.5, _b(rng, 6))(dt.GlobalAvgPool()(z)))
    x = rng.random((5, 3, 24, 24))
    ex = _explainer(graph_net, what, "cpu")
    plan = ex.backend.plan(ex.graph, ex._engine_assignment, x.shape[1:])
    passes, arena = plan.passes(6)
    assert passes < 6 and arena <= 2 * plan.arena_bytes
    res = ex.explain(x, target="all", return_layers=True)
    for k in range(6):
        one = ex.explain(x, target=k, return_layers=True)
        assert _maxnorm(res.relevance[:, k], one.relevance) <= TOL
        for name in one.layers:
            assert _maxnorm(res.layers[name][:, k], one.layers[name]) <= TOL, name


@pytest.mark.parametrize("what", ["deep_taylor", "epsilon_gamma_box", dt.methods.GradientXInput()], ids=str)
def test_threads_do_not_change_results(what):
    rng = np.random.default_rng(6)
    net = dt.Sequential([
        dt.Conv2d(rng.normal(size=(8, 3, 3, 3)) * 0.4, _b(rng, 8), padding=1), dt.ReLU(), dt.MaxPool2d(2),
        dt.Flatten(), dt.Dense(rng.normal(size=(20, 8 * 6 * 6)) * 0.05, _b(rng, 20)),
    ])
    x = rng.random((150, 3, 12, 12)).astype(np.float32)   # > 2 tiles: both thread paths (tiles, inside GEMMs)
    layers = isinstance(what, dt.methods.Method)
    runs = [_explainer(net, what, "cpu", threads).explain(x, target="all", return_layers=layers)
            for threads in (1, 2, 3)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r.relevance, runs[0].relevance)
        for a, b in zip(r.layers or [], runs[0].layers or [], strict=True):
            np.testing.assert_array_equal(a, b)


def test_return_layers_with_many_targets(graph_net, backend):
    x = _x(graph_net, 2)
    ex = _explainer(graph_net, "deep_taylor", backend)
    t = np.array([[0, 3, 5], [2, 2, 1]])
    res = ex.explain(x, target=t, return_layers=True)
    assert isinstance(res.layers, dict)
    for name, arr in res.layers.items():
        assert arr.shape[:2] == (2, 3), name
    for k in range(3):
        one = ex.explain(x, target=t[:, k], return_layers=True)
        for name in one.layers:
            assert _maxnorm(res.layers[name][:, k], one.layers[name]) <= TOL, name
    # conservation per sample and target, on every clean cut of the graph
    rep = dt.checks.conservation(res)
    assert rep.total.shape == rep.explained.shape == rep.abs_error.shape == (2, 3)
    assert rep.layer_totals.shape[:2] == (2, 3)
    sep = [dt.checks.conservation(ex.explain(x, target=t[:, k], return_layers=True)) for k in range(3)]
    np.testing.assert_allclose(rep.total, np.stack([s.total for s in sep], axis=1), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(rep.layer_totals, np.stack([s.layer_totals for s in sep], axis=1), rtol=1e-6,
                               atol=1e-9)


def test_conservation_per_target(conv_net, backend):
    # deep_taylor on a ReLU network with biases <= 0 conserves every positive output exactly
    x = _x(conv_net, 3)
    ex = _explainer(conv_net, "deep_taylor", backend)
    res = ex.explain(x, target="all", return_layers=True)
    rep = dt.checks.conservation(res)
    assert rep.total.shape == (3, 5)
    pos = res.explained > 0
    assert pos.any()
    assert np.all(rep.rel_error[pos] <= (1e-5 if backend == "cpu" else 1e-10))
    assert np.all(np.abs(rep.layer_totals - res.explained[..., None])[pos] <= 1e-4 * np.abs(res.explained[pos])[:, None])
    assert "conservation" in str(rep)


def test_out_and_batches_with_many_targets(conv_net, backend):
    x = _x(conv_net, 5)
    ex = _explainer(conv_net, "epsilon_plus", backend)
    whole = ex.explain(x, target="all")
    out = np.empty((5, 5, *x.shape[1:]), dtype=np.float32)
    res = ex.explain(x, target="all", batch_size=2, out=out)
    assert res.relevance is out
    assert _maxnorm(out, whole.relevance) <= TOL
    got = dict(ex.explain_batches([x[:3], x[3:]], batch_size=2, target=("top", 2)))
    assert sorted(got) == [0, 2, 4]
    top = ex.explain(x, target=("top", 2))
    assert _maxnorm(np.concatenate([got[i].relevance for i in (0, 2, 4)]), top.relevance) <= TOL


# --------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(("target", "exc", "phrase"), [
    (np.array([[0, 5], [1, 2]]), dt.InputError, "target out of range: the network has 5 output(s)"),
    (np.array([[0, -1], [1, 2]]), dt.InputError, "target out of range"),
    (np.array([[0, 1], [1, 2], [0, 0]]), dt.ShapeError, "got shape (3, 2)"),
    (np.zeros((2, 0), dtype=int), dt.ShapeError, "got shape (2, 0)"),
    (np.array([[0.0, 1.0], [1.0, 2.0]]), dt.InputTypeError, "integer array"),
    ("some", dt.InputTypeError, "'all' or ('top', k), got 'some'"),
    (("top", 0), dt.InputError, "needs an int k in [1, 5]"),
    (("top", 6), dt.InputError, "needs an int k in [1, 5]"),
    (("top", 2.0), dt.InputError, "needs an int k"),
    (("bottom", 2), dt.InputError, "the tuple form is ('top', k)"),
])
def test_bad_many_targets(conv_net, backend, target, exc, phrase):
    with pytest.raises(exc, match=_re(phrase)):
        _explainer(conv_net, "deep_taylor", backend).explain(_x(conv_net, 2), target=target)


def test_compound_methods_refuse_many_targets(dense_net):
    class Twice(dt.methods.CompoundMethod):
        __slots__ = ()

        def compute(self, passes, x, targets):
            out, g = passes.gradient(x, targets)
            return out, 2 * g, {}

    ex = dt.Explainer(dense_net, Twice(), backend="numpy")
    with pytest.raises(dt.UnsupportedError, match="several targets per sample is not available"):
        ex.explain(_x(dense_net, 2), target="all")
