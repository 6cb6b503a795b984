"""The Graph API: construction from symbolic calls, the representation, shapes, errors naming the node,
Sequential as the one-chain graph, composites over graphs, the canonicalisation passes."""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import passes
from deeptaylor.network import Node


def _conv(rng, o, c, k=3, **kw):
    return dt.Conv2d(rng.normal(size=(o, c, k, k)) * 0.3, -np.abs(rng.normal(size=o)) * 0.1, **kw)


def residual_net(rng, c=3, hw=8):
    x = dt.Input((c, hw, hw))
    h = dt.ReLU()(_conv(rng, c, c, padding=1)(x, name="conv1"), name="relu1")
    y = dt.Add()(h, x, name="add")
    z = dt.Concat(axis=1)(h, y, name="cat")
    out = dt.Dense(rng.normal(size=(4, 2 * c * hw * hw)) * 0.1)(dt.Flatten()(z), name="fc")
    return dt.Graph(x, out)


def test_nodes_values_and_shapes(rng):
    net = residual_net(rng)
    assert net.names == ("conv1", "relu1", "add", "cat", "flatten1", "fc")
    assert [n.inputs for n in net.nodes] == [(0,), (1,), (2, 0), (2, 3), (4,), (5,)]
    assert net.input_shape == (3, 8, 8)
    assert net.output_shape((5, 3, 8, 8)) == (5, 4)
    assert net.shapes()[4] == (1, 6, 8, 8)
    assert net.consumers()[0] == [0, 2] and net.consumers()[2] == [2, 3]
    assert net.first_linear() == [0, 5]   # fc reads the input through the skip connection
    assert not net.is_chain
    assert len(net) == 6 and net[0] is net.node("conv1").layer and net.index("add") == 2
    with pytest.raises(KeyError, match="no node named 'nope'"):
        net.node("nope")
    text = repr(net)
    assert "add" in text and "<- relu1, input" in text and "-> (6, 8, 8)" in text


def test_shared_layer_called_twice(rng):
    conv = _conv(rng, 3, 3, padding=1)
    x = dt.Input((3, 6, 6))
    h = conv(dt.ReLU()(conv(x)))
    net = dt.Graph(x, dt.GlobalSumPool()(h))
    assert net[0] is net[2]                      # two nodes, one set of arrays
    assert net.names[0] != net.names[2]
    xs = rng.uniform(size=(2, 3, 6, 6))
    seq = dt.Sequential([conv, dt.ReLU(), conv, dt.GlobalSumPool()])
    np.testing.assert_array_equal(net.forward(xs), seq.forward(xs))


def test_sequential_is_the_chain_graph(rng):
    seq = dt.Sequential([dt.Dense(rng.normal(size=(5, 4))), dt.ReLU(), dt.Dense(rng.normal(size=(3, 5)))])
    assert isinstance(seq, dt.Graph) and seq.is_chain
    assert seq.names == ("0", "1", "2") and seq.nodes[2].inputs == (2,)
    x = dt.Input((4,))
    g = dt.Graph(x, seq[2](seq[1](seq[0](x))))
    xs = rng.normal(size=(7, 4))
    for comp in ("epsilon-plus-flat", dt.rules.ZPlus(), "sensitivity"):
        a = dt.Explainer(seq, comp, backend="numpy").explain(xs)
        b = dt.Explainer(g, comp, backend="numpy").explain(xs)
        np.testing.assert_array_equal(a.relevance, b.relevance)
    r = dt.Explainer(g, dt.rules.Epsilon(0.01), backend="numpy").explain(xs, return_layers=True)
    assert isinstance(r.layers, dict) and list(r.layers) == ["input", "dense1", "relu1", "dense2"]
    r2 = dt.Explainer(seq, dt.rules.Epsilon(0.01), backend="numpy").explain(xs, return_layers=True)
    assert isinstance(r2.layers, list) and len(r2.layers) == 4
    np.testing.assert_array_equal(r.layers["relu1"], r2.layers[2])


def test_errors_name_the_node(rng):
    x = dt.Input((3, 8, 8))
    h = _conv(rng, 4, 3, padding=1)(x, name="c4")
    with pytest.raises(dt.ShapeError, match="Add 'bad'.*input 1 has shape"):
        dt.Add()(h, x, name="bad")
    with pytest.raises(dt.ShapeError, match="Concat 'cc'.*outside axis 1"):
        dt.Concat()(h, dt.MaxPool2d(2)(x), name="cc")
    with pytest.raises(dt.ShapeError, match="Conv2d 'c'.*expects 3 input channels"):
        _conv(rng, 4, 3)(h, name="c")
    with pytest.raises(dt.ShapeError, match="two or more inputs"):
        dt.Add()(h)
    with pytest.raises(dt.InputTypeError, match="not a symbolic tensor"):
        dt.ReLU()(np.zeros((3, 8, 8)))
    with pytest.raises(dt.InputTypeError, match="node name"):
        dt.ReLU()(x, name="bad name!")
    # an output that does not depend on the input, a foreign input, duplicate names
    other = dt.Input((3, 8, 8))
    with pytest.raises(dt.ShapeError, match="not this graph's input"):
        dt.Graph(x, dt.ReLU()(other))
    with pytest.raises(dt.ShapeError, match="two nodes are named 'r'"):
        dt.Graph(x, dt.ReLU()(dt.ReLU()(x, name="r"), name="r"))
    with pytest.raises(dt.ShapeError, match="no layers"):
        dt.Graph(x, x)
    with pytest.raises(dt.UnsupportedError, match="neither operand is a gate"):
        dt.Mul()(h, h)


def test_from_nodes_refuses_cycles_and_dangling(rng):
    relu = dt.ReLU()
    with pytest.raises(dt.ShapeError, match="cycle or a dangling input"):
        dt.Graph.from_nodes((4,), [Node("a", relu, (0,)), Node("b", relu, (3,))])
    with pytest.raises(dt.ShapeError, match="cycle or a dangling input"):
        dt.Graph.from_nodes((4,), [Node("a", relu, (1,))])
    with pytest.raises(dt.ShapeError, match="never used"):
        dt.Graph.from_nodes((4,), [Node("a", relu, (0,)), Node("b", relu, (0,))])
    with pytest.raises(dt.ShapeError, match="node 'b' \\(Add\\) has 1 input"):
        dt.Graph.from_nodes((4,), [Node("a", relu, (0,)), Node("b", dt.Add(), (1,))])
    with pytest.raises(dt.ShapeError, match="node 1 'd' \\(Dense\\)"):
        dt.Graph.from_nodes((4,), [Node("a", relu, (0,)), Node("d", dt.Dense(np.ones((2, 5))), (1,))])
    g = dt.Graph.from_nodes((4,), [Node("a", relu, (0,)), Node("b", dt.Add(), (1, 0))])
    assert g.output_shape() == (1, 4)


def test_mul_orders_signal_and_gate(rng):
    x = dt.Input((4, 5, 5))
    s = dt.Sigmoid()(dt.Conv2d(rng.normal(size=(4, 4, 1, 1)))(dt.AdaptiveAvgPool2d(1)(x)), name="gate")
    y = dt.Mul()(s, x, name="se")              # gate first: reordered
    net = dt.Graph(x, dt.GlobalSumPool()(y))
    node = net.node("se")
    assert node.inputs == (0, net.index("gate") + 1)


def test_composites_on_graphs(rng):
    net = residual_net(rng)
    c = dt.Composite(first=dt.rules.ZBox(0, 1), default=dt.rules.ZPlus(),
                     by_name={"fc": dt.rules.Epsilon(0.1)})
    rules = c.resolve(net)
    assert isinstance(rules[0], dt.rules.ZBox) and isinstance(rules[5], dt.rules.Epsilon)
    assert rules[1] is None and rules[2] is None
    c2 = dt.Composite(default=dt.rules.ZPlus(), by_name={"f*": dt.rules.Flat(), "conv1": dt.rules.WSquare()},
                      by_index={-1: dt.rules.Z()})
    r2 = c2.resolve(net)
    assert isinstance(r2[0], dt.rules.WSquare) and isinstance(r2[5], dt.rules.Z)
    with pytest.raises(dt.RuleError, match="no node named 'fc2'"):
        dt.Composite(default=dt.rules.ZPlus(), by_name={"fc2": dt.rules.Z()}).resolve(net)
    with pytest.raises(dt.RuleError, match="'add' \\(Add\\), which takes no rule"):
        dt.Composite(default=dt.rules.ZPlus(), by_name={"add": dt.rules.Z()}).resolve(net)
    # EpsilonGammaBox as Zennit: ZBox only on a first convolution
    mlp = dt.Sequential([dt.Dense(rng.normal(size=(3, 4))), dt.ReLU(), dt.Dense(rng.normal(size=(2, 3)))])
    r3 = dt.composites.epsilon_gamma_box().resolve(mlp)
    assert isinstance(r3[0], dt.rules.Epsilon)
    r4 = dt.composites.epsilon_gamma_box().resolve(net)
    assert isinstance(r4[0], dt.rules.ZBox) and isinstance(r4[5], dt.rules.Epsilon)
    for name in ("epsilon-plus", "epsilon-alpha2-beta1", "epsilon-alpha2-beta1-flat", "epsilon-plus-flat"):
        assert name in dt.composites.names()


def test_batchnorm_takes_only_optional_rules(rng):
    x = dt.Input((3, 4, 4))
    bn = dt.BatchNorm2d(rng.normal(size=3), rng.uniform(0.5, 2, size=3))
    net = dt.Graph(x, dt.Dense(rng.normal(size=(2, 48)))(dt.Flatten()(dt.ReLU()(bn(x, name="bn")))))
    assert dt.Composite(default=dt.rules.ZPlus()).resolve(net)[0] is None          # pass by default
    r = dt.Composite(default=dt.rules.ZPlus(), by_type={dt.BatchNorm2d: dt.rules.Epsilon(0.1)}).resolve(net)
    assert isinstance(r[0], dt.rules.Epsilon)
    with pytest.raises(dt.RuleError, match="takes only Epsilon or Z"):
        dt.Composite(default=dt.rules.ZPlus(), by_name={"bn": dt.rules.ZPlus()}).resolve(net)


# ---- passes ---------------------------------------------------------------------------------

def _bn(rng, c):
    return dt.BatchNorm2d(rng.normal(size=c), rng.uniform(0.5, 2.0, size=c), rng.normal(size=c),
                          rng.normal(size=c), eps=1e-3)


def test_fold_batchnorm_exact_and_where_allowed(rng):
    x = dt.Input((3, 6, 6))
    c1 = _conv(rng, 4, 3, padding=1)(x, name="c1")
    b1 = _bn(rng, 4)(c1, name="b1")                       # conv -> BN: folded
    r1 = dt.ReLU()(b1)
    b2 = _bn(rng, 4)(r1, name="b2")                       # BN after ReLU: stays
    c2 = _conv(rng, 4, 4, padding=1)(b2, name="c2")
    s = dt.Add()(c2, r1, name="add")
    b3 = _bn(rng, 4)(s, name="b3")                        # BN after Add: stays
    c3 = _conv(rng, 4, 4, padding=1)(b3, name="c3")
    side = _bn(rng, 4)(c3, name="b4")                     # c3 read by b4 and the Add below: stays
    out = dt.GlobalSumPool()(dt.Add()(side, c3))
    net = dt.Graph(x, out)
    folded = passes.fold_batchnorm(net)
    assert "b1" not in folded.names and {"b2", "b3", "b4", "c1"} <= set(folded.names)
    xs = rng.uniform(size=(3, 3, 6, 6))
    np.testing.assert_allclose(folded.forward(xs), net.forward(xs), rtol=1e-10)
    assert passes.fold_batchnorm(folded) is folded


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_batchnorm_dense_and_transposed(rng, dtype):
    x = dt.Input((2, 5, 5))
    t = dt.ConvTranspose2d(rng.normal(size=(2, 3, 3, 3)).astype(dtype), rng.normal(size=6), stride=2,
                           groups=2)(x, name="t")
    h = _bn(rng, 6)(t)
    d = dt.Dense(rng.normal(size=(4, 6 * 11 * 11)).astype(dtype))(dt.Flatten()(h), name="d")
    bn1 = dt.BatchNorm1d(rng.normal(size=4), rng.uniform(0.5, 2, size=4), rng.normal(size=4), rng.normal(size=4))
    net = dt.Graph(x, bn1(d))
    folded = passes.canonicalize(net)
    assert folded.names == ("t", "flatten1", "d")
    assert folded[0].weight.dtype == dtype
    xs = rng.uniform(size=(2, 2, 5, 5))
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(folded.forward(xs), net.forward(xs), rtol=tol, atol=tol)


def test_drop_identities_and_resolve_adaptive(rng):
    x = dt.Input((3, 8, 8))
    h = dt.Identity()(dt.Dropout(0.3)(_conv(rng, 3, 3, padding=1)(x, name="c")))
    h = dt.Add()(dt.ReLU()(h), dt.Identity()(x))
    p = dt.AdaptiveAvgPool2d((2, 4))(h, name="pool")
    q = dt.AdaptiveAvgPool2d((3, 3))(h, name="odd")
    out = dt.Dense(rng.normal(size=(2, 24 + 27)))(dt.Concat()(dt.Flatten()(p), dt.Flatten()(q)))
    net = dt.Graph(x, out)
    can = passes.canonicalize(net)
    kinds = [n.layer.kind for n in can.nodes]
    assert "Identity" not in kinds and "Dropout" not in kinds
    assert isinstance(can.node("pool").layer, dt.AvgPool2d) and can.node("pool").layer.kernel_size == (4, 2)
    assert isinstance(can.node("odd").layer, dt.AdaptiveAvgPool2d)       # 8 is not a multiple of 3
    xs = rng.uniform(size=(2, 3, 8, 8))
    np.testing.assert_allclose(can.forward(xs), net.forward(xs), rtol=1e-12)
    with pytest.raises(dt.ShapeError, match="identity"):
        passes.canonicalize(dt.Sequential([dt.Identity(), dt.Dropout()]))
    seq = dt.Sequential([dt.Dense(rng.normal(size=(3, 4))), dt.Dropout(), dt.ReLU()])
    c2 = passes.canonicalize(seq)
    assert isinstance(c2, dt.Sequential) and [layer.kind for layer in c2] == ["Dense", "ReLU"]
    plain = dt.Sequential([dt.ReLU()])
    assert passes.canonicalize(plain) is plain
