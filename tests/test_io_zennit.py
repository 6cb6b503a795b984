"""Heatmaps of imported models agree with Zennit's for the same recipe on the same torch model.

Recipes compared (max-normalised difference <= 1e-4):

* ``deep_taylor(0, 1)`` vs Zennit's ``SpecialFirstLayerMapComposite`` with ``ZBox(0, 1)`` on the first
  linear layer and ``ZPlus(zero_params='bias')`` on the others (our DTD z+ ignores the bias, Zennit's
  includes the positive bias unless zeroed; zB's bias cancels in Zennit's three terms), ``Pass`` on
  ReLU, ``Norm`` on average pooling, plain gradient (winner-take-all) through max pooling;
* ``epsilon_plus_flat()`` vs Zennit's ``EpsilonPlusFlat`` (both use the bias in Epsilon and in z+);
* ``Sensitivity`` vs Zennit's ``Gradient`` attributor, squared.

BatchNorm models: deeptaylor folds BatchNorm on import, Zennit gets its ``SequentialMergeBatchNorm``
canonizer, which folds the same way (it leaves each BatchNorm as ``x / sqrt(1 + eps)``, so, as in
Zennit's built-in composites, BatchNorm gets ``Pass``; without it Zennit loses ~5e-6 of the relevance
per BatchNorm). Zennit adds ``1e-6 * sign`` to every denominator while our
z+/zB/Norm divide exactly; inputs lie in (0.05, 0.95) and weights are random so denominators are far
from zero and the stabiliser's effect stays below the tolerance.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from conftest import import_zennit

import deeptaylor as dt

torch = pytest.importorskip("torch")
nn = torch.nn
zennit = import_zennit()
from zennit.attribution import Gradient
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat, SpecialFirstLayerMapComposite
from zennit.rules import Norm, Pass, ZBox, ZPlus
from zennit.types import Activation, AvgPool, BatchNorm, Linear


def _randomise_bn(model):
    g = torch.Generator().manual_seed(7)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)


def lenet():
    return nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.ReLU(), nn.Linear(32, 10))


def mlp():
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5))


def bn_net():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, 4))


MODELS = {"lenet": (lenet, (1, 28, 28)), "mlp": (mlp, (64,)), "bn": (bn_net, (2, 16, 16))}


def _model(name):
    factory, shape = MODELS[name]
    torch.manual_seed(3)
    model = factory()
    _randomise_bn(model)
    return model.float().double().eval(), shape  # float32-exact weights: the ONNX export round-trips them


def _input(shape, n=3):
    return np.random.default_rng(11).uniform(0.05, 0.95, size=(n, *shape))


def _zennit(model, x, recipe, bn):
    canon = [SequentialMergeBatchNorm()] if bn else []
    if recipe == "deep_taylor":
        composite = SpecialFirstLayerMapComposite(
            layer_map=[(Activation, Pass()), (AvgPool, Norm()), (BatchNorm, Pass()),
                       (Linear, ZPlus(zero_params="bias"))],
            first_map=[(Linear, ZBox(low=0.0, high=1.0))], canonizers=canon)
    elif recipe == "epsilon_plus_flat":
        composite = EpsilonPlusFlat(canonizers=canon)
    else:
        composite = None
    xt = torch.tensor(x, requires_grad=True)
    with torch.no_grad():
        out = model(xt)
    target = out.argmax(dim=1)
    onehot = torch.zeros_like(out)
    onehot[torch.arange(len(x)), target] = 1.0
    seed = onehot if recipe == "sensitivity" else onehot * out  # LRP starts from the target's logit
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(xt, seed)
    rel = rel.detach().numpy()
    return rel ** 2 if recipe == "sensitivity" else rel


def _ours(recipe):
    if recipe == "deep_taylor":
        return dt.composites.deep_taylor(0.0, 1.0)
    if recipe == "epsilon_plus_flat":
        return dt.composites.epsilon_plus_flat()
    return dt.methods.Sensitivity()


def _import(model, shape, importer):
    if importer == "torch":
        return dt.from_torch(model, shape)
    onnx = pytest.importorskip("onnx")  # noqa: F841
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.float(), torch.zeros(1, *shape), buf, dynamo=False, do_constant_folding=False)
    except ImportError as exc:  # pragma: no cover - an exporter dependency is missing; any other error fails
        pytest.skip(f"torch.onnx.export unavailable: {exc}")
    finally:
        model.double()
    return dt.io.load_onnx(buf.getvalue())


def _maxnorm_diff(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


_REF: dict = {}


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
@pytest.mark.parametrize("importer", ["torch", "onnx"])
@pytest.mark.parametrize("recipe", ["deep_taylor", "epsilon_plus_flat", "sensitivity"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_heatmaps_match_zennit(name, recipe, importer, backend):
    model, shape = _model(name)
    x = _input(shape)
    net = _import(model, shape, importer)
    if (name, recipe) not in _REF:
        _REF[(name, recipe)] = _zennit(model, x, recipe, bn=(name == "bn"))
    ref = _REF[(name, recipe)]
    assert np.abs(ref).max() > 0
    if backend == "numpy":
        res = dt.Explainer(net, _ours(recipe), backend="numpy").explain(x)
    else:  # the C++ engine supports every layer and rule of these models: an UnsupportedError is a failure
        if "cpu" not in dt.available_backends():  # pragma: no cover - only where the C++ core is not built
            pytest.skip("the cpu backend (C++ core) is not built")
        res = dt.Explainer(net, _ours(recipe), backend="cpu").explain(x.astype(np.float32))
    assert _maxnorm_diff(res.relevance.astype(np.float64), ref) <= 1e-4, (name, recipe, importer, backend)


def test_zennit_bias_convention_matters():
    """The comparison can fail: with positive biases, Zennit's z+ *with* the bias (its default) differs
    from our DTD z+ (bias ignored), so the test above really checks the bias convention."""
    model, shape = _model("mlp")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.abs_().add_(0.5)
    x = _input(shape)
    net = dt.from_torch(model, shape)
    ours = dt.Explainer(net, _ours("deep_taylor"), backend="numpy").explain(x).relevance
    composite = SpecialFirstLayerMapComposite(
        layer_map=[(Activation, Pass()), (Linear, ZPlus())], first_map=[(Linear, ZBox(low=0.0, high=1.0))])
    xt = torch.tensor(x, requires_grad=True)
    out = model(xt).detach()
    seed = torch.zeros_like(out)
    seed[torch.arange(len(x)), out.argmax(1)] = out[torch.arange(len(x)), out.argmax(1)]
    with Gradient(model=model, composite=composite) as attributor:
        _, rel = attributor(xt, seed)
    assert _maxnorm_diff(ours, rel.detach().numpy()) > 1e-3
