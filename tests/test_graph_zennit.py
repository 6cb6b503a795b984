"""Graph networks (residual additions, concatenations, fan-out) against Zennit, and conservation over a DAG.

Two small torch models, each rebuilt by hand as a ``dt.Graph`` from the same float64 weights with the
public API (``dt.Input``, layers called on symbolic tensors, ``dt.Add``, ``dt.Concat``):

* ``residual``: a ResNet in miniature. Every residual ``+`` is Zennit's ``zennit.layer.Sum`` applied
  to the summands stacked on a last axis (what Zennit's ResNetCanonizer does to torchvision's
  BasicBlock/Bottleneck), so Zennit gives it its ``Norm`` rule; ``dt.Add`` uses the same rule
  (R_k = a_k R / (sum + 1e-6 sgn(sum))). One block has an identity shortcut (a fan-out of two), one a
  strided 1x1 projection shortcut; AvgPool2d and a global average pool (Zennit: ``Norm``) and a max
  pool (Zennit: the plain gradient, winner-take-all, as ours).
* ``concat``: an Inception-style block: a 1x1 branch, a 3x3 branch and the block's input itself
  concatenated on the channels (the stem's output feeds three nodes), average/max pooling, a second
  convolution, a Dense head.

Composites compared (heatmaps max-normalised per image, the median over the images <= 1e-4; backend
``numpy`` in float64 and ``cpu`` in float32, each against Zennit in float64):

* ``deep_taylor(0, 1)`` vs Zennit's ``SpecialFirstLayerMapComposite``: ``ZBox(0, 1)`` on the first
  linear module, ``ZPlus(zero_params='bias')`` on the others (our DTD rules ignore the bias; bench/
  compare.py maps it the same way) and ``layer_map_base()`` (Pass on ReLU, Norm on Sum and average
  pools).
* ``epsilon_plus_flat``, ``epsilon_plus``, ``epsilon_alpha2_beta1``, ``epsilon_alpha2_beta1_flat``,
  ``epsilon_gamma_box`` vs Zennit's composites of the same names (default parameters: epsilon 1e-6,
  gamma 0.25, ZBox(0, 1) on the first convolution).

Where Zennit differs (all below the tolerance here):

* Zennit adds its stabiliser ``1e-6 * sgn(z)`` (sgn(0) = +1) to the denominators of every rule other
  than Epsilon (z+, zB, flat, alpha-beta (to each of its two parts), gamma, and Norm on average
  pools). Our z+, zB, flat and pools divide exactly (0 where the denominator is 0); our Add uses
  Norm's stabiliser exactly as Zennit's Sum. That stabiliser is the *whole* difference: with it set to
  1e-13 the float64 heatmaps agree to ~1e-11 (tested below), with Zennit's default the difference is
  ~1e-6 relative on denominators of O(1), so the models are He-initialised (activations stay O(1));
  with torch's default init the activations of the residual model shrink to ~1e-2 and the difference
  reaches 7e-4 (measured).
* Zennit's first layer is the first ``Linear``/``Convolution`` module in ``model.modules()`` order
  (registration order); ours are the linear nodes that read the input through non-linear nodes. The
  torch models register the stem first, so both mean the stem convolution.
* Max pooling: both route the window's relevance to its arg-max; a float near-tie could pick another
  input (one image off), which is why the median over images is compared.

Conservation (no Zennit needed): on ReLU residual nets with ``b <= 0`` whose Add inputs are ReLU
outputs (non-negative), z+ above zB / z+ on the pixels conserves the explained output at every node
in the sense that a DAG allows: the relevance at every *cut value* (one that every input-to-output
path passes through) sums to f(x), and every node whose input values it alone consumes passes on
what it receives (locally conservative); the only loss is the Norm stabiliser's
``sum * 1e-6 / (sum + 1e-6)`` at each Add. ``conservative_expected`` is True there, and False for an
Add that reads mixed-sign values.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import import_zennit

import deeptaylor as dt

torch = pytest.importorskip("torch")
nn = torch.nn
zennit = import_zennit()
from zennit.attribution import Gradient
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonGammaBox,
    EpsilonPlus,
    EpsilonPlusFlat,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.layer import Sum
from zennit.rules import Norm, ZBox, ZPlus
from zennit.types import Linear

TOL = 1e-4
N_IMAGES = 6


# --------------------------------------------------------------------------------------------------
# torch models (Zennit's Sum at the residuals) and the same networks as dt.Graphs


class Residual(nn.Module):
    """stem conv3x3(3->8) ReLU MaxPool2 | block (identity shortcut) | block (stride 2, 1x1 projection)
    | AvgPool2 | global avg pool | Linear(16->10). Residual sums are ``Sum()(stack([..], -1))``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.b1c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b1sum = Sum()
        self.b2c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.b2c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.b2down = nn.Conv2d(8, 16, 1, stride=2)
        self.b2sum = Sum()
        self.avg = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        self.relu = nn.ReLU()

    def forward(self, x):
        h = self.pool(self.relu(self.stem(x)))
        r = self.b1c2(self.relu(self.b1c1(h)))
        h = self.relu(self.b1sum(torch.stack([r, h], dim=-1)))
        r = self.b2c2(self.relu(self.b2c1(h)))
        h = self.relu(self.b2sum(torch.stack([r, self.b2down(h)], dim=-1)))
        h = self.gap(self.avg(h))
        return self.fc(torch.flatten(h, 1))


def _conv(m, name, t, **kw):
    return dt.Conv2d(m.weight.detach().numpy(), m.bias.detach().numpy(), stride=m.stride,
                     padding=m.padding, **kw)(t, name=name)


def _dense(m, name, t):
    return dt.Dense(m.weight.detach().numpy(), m.bias.detach().numpy())(t, name=name)


def residual_graph(m: Residual, shape) -> dt.Graph:
    x = dt.Input(shape)
    h = dt.MaxPool2d(2)(dt.ReLU()(_conv(m.stem, "stem", x)), name="pool")
    r = _conv(m.b1c2, "b1.conv2", dt.ReLU()(_conv(m.b1c1, "b1.conv1", h)))
    h = dt.ReLU()(dt.Add()(r, h, name="b1.add"), name="b1.relu")
    r = _conv(m.b2c2, "b2.conv2", dt.ReLU()(_conv(m.b2c1, "b2.conv1", h)))
    h = dt.ReLU()(dt.Add()(r, _conv(m.b2down, "b2.down", h), name="b2.add"), name="b2.relu")
    h = dt.GlobalAvgPool()(dt.AvgPool2d(2)(h, name="avg"), name="gap")
    return dt.Graph(x, _dense(m.fc, "fc", h))


class ConcatNet(nn.Module):
    """stem conv3x3(3->6) ReLU | cat(ReLU(conv1x1 6->4), ReLU(conv3x3 6->5), stem) = 15 channels |
    AvgPool2 | conv3x3(15->8) ReLU MaxPool2 | Flatten | Linear(8*4*4 -> 24) ReLU | Linear(24 -> 7)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 4, 1)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.avg = nn.AvgPool2d(2)
        self.conv = nn.Conv2d(15, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 4 * 4, 24)
        self.fc2 = nn.Linear(24, 7)
        self.relu = nn.ReLU()

    def forward(self, x):
        s = self.relu(self.stem(x))
        h = torch.cat([self.relu(self.a(s)), self.relu(self.b(s)), s], dim=1)
        h = self.pool(self.relu(self.conv(self.avg(h))))
        return self.fc2(self.relu(self.fc1(torch.flatten(h, 1))))


def concat_graph(m: ConcatNet, shape) -> dt.Graph:
    x = dt.Input(shape)
    s = dt.ReLU()(_conv(m.stem, "stem", x), name="stem.relu")
    a = dt.ReLU()(_conv(m.a, "a", s))
    b = dt.ReLU()(_conv(m.b, "b", s))
    h = dt.Concat(axis=1)(a, b, s, name="cat")
    h = dt.MaxPool2d(2)(dt.ReLU()(_conv(m.conv, "conv", dt.AvgPool2d(2)(h))))
    h = dt.ReLU()(_dense(m.fc1, "fc1", dt.Flatten()(h)))
    return dt.Graph(x, _dense(m.fc2, "fc2", h))


MODELS = {"residual": (Residual, residual_graph, (3, 16, 16)),
          "concat": (ConcatNet, concat_graph, (3, 16, 16))}


def _models(name):
    """The torch model (float64, eval) with He-normal weights and biases U(-0.05, 0.05) (activations
    stay O(1) through the depth, as in a trained network with BatchNorm; torch's default init shrinks
    them layer by layer until Zennit's 1e-6 stabiliser shows at 1e-4), and the same network as a
    dt.Graph."""
    cls, to_graph, shape = MODELS[name]
    torch.manual_seed(5)
    model = cls().double().eval()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
                nn.init.uniform_(mod.bias, -0.05, 0.05)
    return model, to_graph(model, shape), shape


def _input(shape, n=N_IMAGES):
    return np.random.default_rng(17).uniform(0.05, 0.95, size=(n, *shape))


# --------------------------------------------------------------------------------------------------
# Zennit


COMPOSITES = ["deep_taylor", "epsilon_plus_flat", "epsilon_plus", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat", "epsilon_gamma_box"]


def _zennit_composite(name, xt, stabilizer=1e-6):
    """Zennit's composite for our ``name``; ``stabilizer`` is Zennit's (1e-6 by default) for every rule
    but Epsilon, except at ``Sum``, which keeps Norm's 1e-6 (that of dt.Add)."""
    sums = [(Sum, Norm(stabilizer=1e-6))]
    if name == "deep_taylor":
        return SpecialFirstLayerMapComposite(
            layer_map=sums + layer_map_base(stabilizer) + [(Linear, ZPlus(stabilizer=stabilizer,
                                                                           zero_params="bias"))],
            first_map=[(Linear, ZBox(low=0.0, high=1.0, stabilizer=stabilizer))])
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=torch.zeros_like(xt), high=torch.ones_like(xt), stabilizer=stabilizer,
                               layer_map=sums)
    return {"epsilon_plus_flat": EpsilonPlusFlat, "epsilon_plus": EpsilonPlus,
            "epsilon_alpha2_beta1": EpsilonAlpha2Beta1,
            "epsilon_alpha2_beta1_flat": EpsilonAlpha2Beta1Flat}[name](stabilizer=stabilizer, layer_map=sums)


def _zennit(model, x, name, stabilizer=1e-6):
    xt = torch.tensor(x, requires_grad=True)
    with torch.no_grad():
        out = model(xt)
    t = out.argmax(dim=1)
    seed = torch.zeros_like(out)
    seed[torch.arange(len(x)), t] = out[torch.arange(len(x)), t]  # LRP starts from the target's logit
    with Gradient(model=model, composite=_zennit_composite(name, xt, stabilizer)) as attributor:
        _, rel = attributor(xt, seed)
    return rel.detach().numpy(), out.numpy()


def _per_image_maxnorm(a, b):
    """max|a - b| / max|b| per image (b the reference)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1)
    return np.abs(a - b).max(axis=1) / np.maximum(np.abs(b).max(axis=1), 1e-300)


def _cpu_has_graphs() -> bool:
    """True once the compiled engine runs non-chain graphs (the C++ DAG engine, issue 9)."""
    if "cpu" not in dt.available_backends():
        return False
    _, net, _ = _models("residual")
    try:
        dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="cpu")
    except dt.UnsupportedError:
        return False
    return True


_REF: dict = {}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_graph_heatmaps_match_zennit(model, composite, backend):
    torch_model, net, shape = _models(model)
    x = _input(shape)
    if (model, composite) not in _REF:
        _REF[(model, composite)] = _zennit(torch_model, x, composite)
    ref, out = _REF[(model, composite)]
    assert np.abs(ref).max() > 0
    # the graph computes the torch model's function (same weights, same wiring)
    np.testing.assert_allclose(net.forward(x), out, rtol=1e-10, atol=1e-12)
    if backend == "cpu" and "cpu" not in dt.available_backends():  # pragma: no cover
        pytest.skip("the cpu backend (C++ core) is not built")
    # no UnsupportedError is tolerated: the cpu engine runs graphs (issue 9)
    ex = dt.Explainer(net, dt.composites.get(composite), backend=backend)
    res = ex.explain(x if backend == "numpy" else x.astype(np.float32))
    assert res.relevance.shape == x.shape
    np.testing.assert_array_equal(res.target, out.argmax(axis=1))
    diffs = _per_image_maxnorm(res.relevance, ref)
    assert np.median(diffs) <= TOL, (model, composite, backend, diffs)
    # every image close, too (alpha-beta's negative-part denominators are the smallest, so Zennit's
    # stabiliser shows most there: up to 1.6e-4 on single images, measured): a wrong rule is off
    # everywhere, by far more
    assert diffs.max() <= 10 * TOL, (model, composite, backend, diffs)


@pytest.mark.parametrize("composite", COMPOSITES)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_graph_rules_identical_to_zennit_without_its_stabiliser(model, composite):
    """With Zennit's stabiliser made negligible (1e-13 on every rule but Epsilon and the Sum's Norm,
    whose 1e-6 we share) the float64 heatmaps agree to ~1e-11: the remaining difference above is
    Zennit's stabiliser alone, the rules (and the residual/concat routing) are the same."""
    torch_model, net, shape = _models(model)
    x = _input(shape)
    ref, _ = _zennit(torch_model, x, composite, stabilizer=1e-13)
    ours = dt.Explainer(net, dt.composites.get(composite), backend="numpy").explain(x).relevance
    assert _per_image_maxnorm(ours, ref).max() <= 1e-9


def test_zennit_sum_is_what_makes_it_match():
    """Without the Sum module (a plain ``+``, the torchvision model before Zennit's canonizer), Zennit
    passes relevance through the addition as a gradient (R to both summands in full), so our Norm
    split differs: the comparison above really checks the residual rule."""
    torch_model, net, shape = _models("residual")

    class PlainPlus(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            m = self.m
            h = m.pool(m.relu(m.stem(x)))
            h = m.relu(m.b1c2(m.relu(m.b1c1(h))) + h)
            h = m.relu(m.b2c2(m.relu(m.b2c1(h))) + m.b2down(h))
            return m.fc(torch.flatten(m.gap(m.avg(h)), 1))

    x = _input(shape)
    plain, _ = _zennit(PlainPlus(torch_model), x, "deep_taylor")
    ours = dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(x).relevance
    assert np.median(_per_image_maxnorm(ours, plain)) > 1e-2


# --------------------------------------------------------------------------------------------------
# Conservation over a DAG (no Zennit involved)


def _he(rng, shape):
    return rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))


def relu_residual_net(rng, mixed=False, c=6, shape=(3, 12, 12)) -> dt.Graph:
    """A ReLU residual net with b <= 0: stem conv; two blocks ``h + ReLU(conv(ReLU(conv(h))))`` (the
    ReLU *before* the Add, so the Add's inputs are non-negative), one with an identity shortcut
    (fan-out of two), one summing three values (identity, branch, a 1x1 projection branch); a
    concatenation; max pool; Dense-ReLU-Dense head. ``mixed=True``: the second block adds the branch's
    convolution output before its ReLU (torchvision's BasicBlock order), a mixed-sign Add input."""
    def conv(cin, cout, k, t, name):
        return dt.Conv2d(_he(rng, (cout, cin, k, k)), -rng.uniform(0, 0.05, cout), padding=k // 2)(t, name=name)

    x = dt.Input(shape)
    h = dt.ReLU()(conv(shape[0], c, 3, x, "stem"), name="stem.relu")
    r = dt.ReLU()(conv(c, c, 3, dt.ReLU()(conv(c, c, 3, h, "b1.conv1")), "b1.conv2"), name="b1.relu2")
    h = dt.Add()(h, r, name="b1.add")
    r = conv(c, c, 3, dt.ReLU()(conv(c, c, 3, h, "b2.conv1")), "b2.conv2")
    if not mixed:
        r = dt.ReLU()(r, name="b2.relu2")
    p = dt.ReLU()(conv(c, c, 1, h, "b2.proj"), name="b2.proj.relu")
    h = dt.Add()(h, r, p, name="b2.add")
    h = dt.Concat()(h, dt.ReLU()(conv(c, 4, 3, h, "side"), name="side.relu"), name="cat")
    h = dt.Flatten()(dt.MaxPool2d(2)(h, name="pool"), name="flat")
    f = (c + 4) * (shape[1] // 2) * (shape[2] // 2)
    h = dt.ReLU()(dt.Dense(_he(rng, (32, f)), -rng.uniform(0, 0.05, 32))(h, name="fc1"), name="fc1.relu")
    return dt.Graph(x, dt.Dense(_he(rng, (5, 32)), -rng.uniform(0, 0.05, 5))(h, name="fc2"))


def cut_values(net: dt.Graph) -> list[int]:
    """Value ids every path from the input (value 0) to the output passes through."""
    L = len(net)
    reach_fwd = [False] * (L + 1)
    reach_fwd[0] = True
    for i, node in enumerate(net.nodes):
        reach_fwd[i + 1] = any(reach_fwd[v] for v in node.inputs)
    cuts = []
    for v in range(L + 1):
        # remove v: can the output still be reached from the input?
        ok = [False] * (L + 1)
        ok[0] = v != 0
        for i, node in enumerate(net.nodes):
            ok[i + 1] = (i + 1 != v) and any(ok[u] for u in node.inputs)
        if not ok[L]:
            cuts.append(v)
    return cuts


def _value_names(net):
    return ["input"] + list(net.names)


@pytest.mark.parametrize("first", ["zbox", "zplus"])
@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_relu_residual_net_conserves_at_every_node(backend, first):
    rng = np.random.default_rng(3)
    net = relu_residual_net(rng)
    x = rng.uniform(0.0, 1.0, size=(5, 3, 12, 12))
    comp = dt.composites.deep_taylor(0, 1) if first == "zbox" else dt.composites.Composite(default=dt.rules.ZPlus())
    ex = dt.Explainer(net, comp, backend=backend)
    if backend == "numpy":
        # the only loss: Norm's stabiliser at each Add, R_y * 1e-6 / (y + 1e-6) per element (measured
        # 2e-6 of f(x) here; without the stabiliser it is float rounding, see the next test)
        rtol, res = 1e-5, ex.explain(x, return_layers=True)
    else:
        rtol, res = 1e-4, ex.explain(x.astype(np.float32), return_layers=True)
    assert res.conservative_expected
    assert np.all(res.explained > 0)
    f = res.explained
    names = _value_names(ex.graph)
    assert set(res.layers) == set(names)
    sums = {k: v.reshape(len(v), -1).astype(np.float64).sum(axis=1) for k, v in res.layers.items()}
    # z+ / zB on non-negative activations: relevance is non-negative everywhere, and no value holds more
    # than the whole
    for k, v in res.layers.items():
        assert v.min() >= -1e-7 * f.max(), k
        assert np.all(sums[k] <= f * (1 + rtol)), k
    # every cut value carries the whole explained output
    cuts = cut_values(ex.graph)
    assert {names[v] for v in cuts} >= {"input", "stem", "stem.relu", "b1.add", "b2.add", "cat", "pool",
                                       "fc1", "fc2"}
    for v in cuts:
        np.testing.assert_allclose(sums[names[v]], f, rtol=rtol, err_msg=names[v])
    # local conservation: a node whose inputs it alone consumes passes on what it receives
    consumers = ex.graph.consumers()
    checked = 0
    for i, node in enumerate(ex.graph.nodes):
        if all(consumers[v] == [i] for v in node.inputs):
            got = sum(sums[names[v]] for v in set(node.inputs))
            np.testing.assert_allclose(got, sums[node.name], rtol=rtol, err_msg=node.name)
            checked += 1
    assert checked >= 8
    # the Add's Norm split: sum R_inputs = R_out * sum / (sum + 1e-6) per element (float64 reference)
    assert dt.checks.conservation(res).max_rel_error <= rtol


def test_relu_residual_net_conserves_to_rounding_without_the_stabiliser(monkeypatch):
    """The reference with Add's stabiliser set to 0: conservation at every cut value to float64
    rounding, so the loss measured above is the stabiliser's and nothing else."""
    monkeypatch.setattr(dt.Add, "eps", 0.0)
    rng = np.random.default_rng(3)
    net = relu_residual_net(rng)
    x = rng.uniform(0.0, 1.0, size=(5, 3, 12, 12))
    res = dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(x, return_layers=True)
    names = _value_names(net)
    for v in cut_values(net):
        r = res.layers[names[v]].reshape(len(x), -1).sum(axis=1)
        np.testing.assert_allclose(r, res.explained, rtol=1e-12, err_msg=names[v])


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_mixed_sign_add_is_not_expected_to_conserve(backend):
    """An Add reading a convolution's output before its ReLU (mixed signs) breaks the theorem's
    premises: ``conservative_expected`` is False. The same net with the ReLU before the Add: True."""
    x = np.random.default_rng(4).uniform(0.0, 1.0, size=(3, 3, 12, 12))
    x = x if backend == "numpy" else x.astype(np.float32)
    good = dt.Explainer(relu_residual_net(np.random.default_rng(3)), dt.composites.deep_taylor(0, 1),
                        backend=backend).explain(x)
    bad = dt.Explainer(relu_residual_net(np.random.default_rng(3), mixed=True),
                       dt.composites.deep_taylor(0, 1), backend=backend).explain(x)
    assert np.all(bad.explained > 0)  # the only premise that fails is the Add's
    assert good.conservative_expected
    assert not bad.conservative_expected
    # what goes wrong: the proportional split of a mixed-sign sum y = a + b (a >= 0 > b) gives
    # R_a = a/y R_y > R_y and R_b = b/y R_y < 0. The split still adds up (R_a + R_b = R_y * y / (y +
    # 1e-6 sgn y): it loses relevance only where |y| is comparable to the stabiliser, and then all of
    # it) but it is no longer positive: negative relevance, and more |R| than f(x) below the Add.
    bad = dt.Explainer(relu_residual_net(np.random.default_rng(3), mixed=True),
                       dt.composites.deep_taylor(0, 1), backend=backend).explain(x, return_layers=True)
    r = bad.layers["b2.conv2"].reshape(len(x), -1).astype(np.float64)
    assert r.min() < 0
    assert np.all(np.abs(r).sum(axis=1) > 1.2 * r.sum(axis=1))
    assert dt.checks.conservation(bad).max_rel_error <= (1e-5 if backend == "numpy" else 1e-4)


def test_cpu_engine_runs_graphs():
    """Reports (rather than skips) whether the compiled engine takes graphs yet: it must (issue 9)."""
    if "cpu" not in dt.available_backends():  # pragma: no cover
        pytest.skip("the cpu backend (C++ core) is not built")
    assert _cpu_has_graphs(), "backend='cpu' refuses a residual dt.Graph (UnsupportedError)"

