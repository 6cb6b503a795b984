"""torchvision zoo models explained by deeptaylor (imported with ``dt.from_torch``) against Zennit 0.5.1.

Models (torchvision 0.28, ``weights=None``, eval mode, float64): ResNet-18, ResNet-50, ResNeXt-50
(32x4d), VGG-16-BN, AlexNet, MobileNetV2. Every BatchNorm gets seeded random running statistics and
affine parameters (so that folding changes the weights and biases); AlexNet, which torchvision leaves at
torch's default initialisation, is re-initialised He-normal as the others (see below, "stabiliser").
Inputs 64x64 (VGG-16 needs >= 32, AlexNet >= 63), batch 2, pixels in (0.05, 0.95).

Zennit runs with its canonizers: ``ResNetCanonizer`` (BatchNorm merged into the convolution before it,
the residual ``+`` of BasicBlock/Bottleneck replaced by ``zennit.layer.Sum``, which gets the ``Norm``
rule, as ``dt.Add``) for ResNet/ResNeXt, ``SequentialMergeBatchNorm`` for the others. Composites:
``deep_taylor(0, 1)`` vs ``SpecialFirstLayerMapComposite`` (``ZBox(0, 1)`` on the first linear module,
``ZPlus(zero_params='bias')`` on the others, ``layer_map_base()``), as bench/compare.py maps it; and the
five Zennit composites by name. Heatmaps max-normalised per image, median over the images <= 1e-4, on
``backend="numpy"`` (float64) and ``backend="cpu"`` (float32).

Where Zennit does something else (docs/importing.md, "Agreement with Zennit"):

* MobileNetV2: its residual ``x + self.conv(x)`` is a functional ``+`` (no module for Zennit to hook,
  and no Zennit canonizer for it), so Zennit passes relevance through it as a gradient (the full R to
  both summands); its ``nn.functional.adaptive_avg_pool2d`` likewise gets the plain gradient (R / HW
  to every pixel) instead of ``Norm``. Heatmaps differ by 0.999 (max-normalised). A test canonizer that
  puts ``Sum`` at the residuals and an ``nn.AdaptiveAvgPool2d`` module at the head (what
  ``ResNetCanonizer`` does for ResNets) makes Zennit apply deeptaylor's rules; either half alone does not.
* Zennit's stabiliser ``1e-6 * sgn(z)`` in every rule's denominator (z+, zB, flat, alpha-beta, gamma,
  Norm; deeptaylor's z+/zB/flat/pools divide exactly): ~1e-5 on ResNet-18/50, VGG-16-BN, AlexNet
  (He-initialised); 1e-4 with torch's default initialisation (AlexNet as torchvision builds it:
  the activations shrink layer by layer; tested: the difference is of that size and disappears
  without the stabiliser); up to 2.4e-3 on ResNeXt-50 (grouped convolutions: small denominators) and
  up to 10 % on MobileNetV2 (mixed-sign residual sums that nearly cancel amplify it through Norm's
  R / sum). ResNeXt-50 and MobileNetV2 are therefore compared with Zennit's stabiliser at 1e-13.
* Zennit's merged BatchNorm keeps computing ``x / sqrt(1 + eps)``: the models are compared with
  BatchNorm eps 0 (ResNet-50 with eps 1e-5: one image of two 9e-4 off; tested).
* Float32 near-ties in max pools (backend "cpu"): one VGG-16-BN image of two is off by 2.5e-3 - 5e-3;
  hence the lower median over the images (the numpy reference agrees on both).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import import_torchvision, import_zennit

import deeptaylor as dt

torch = pytest.importorskip("torch")
nn = torch.nn
tv = import_torchvision()
zennit = import_zennit()
if "cpu" not in dt.available_backends():  # pragma: no cover
    pytest.skip("the cpu backend (C++ core) is not built", allow_module_level=True)
from torchvision.models.mobilenetv2 import InvertedResidual
from zennit.attribution import Gradient
from zennit.canonizers import AttributeCanonizer, CompositeCanonizer, SequentialMergeBatchNorm
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
from zennit.torchvision import ResNetCanonizer
from zennit.types import Linear

TOL = 1e-4
SHAPE = (3, 64, 64)
N_IMAGES = 2

# -- the zoo models ----------------------------------------------------------------------------


class MobileNetV2Canonizer(CompositeCanonizer):
    """Test-only: what ``ResNetCanonizer`` does for ResNets, for torchvision's MobileNetV2. BatchNorm
    merged (``SequentialMergeBatchNorm``); each ``InvertedResidual`` with a shortcut computes
    ``Sum()(stack([x, conv(x)], -1))`` (Zennit: ``Norm``, as ``dt.Add``) instead of ``x + conv(x)`` (Zennit:
    the plain gradient); the model's head pools with an ``nn.AdaptiveAvgPool2d`` module (Zennit:
    ``Norm``, as deeptaylor's pools) instead of ``F.adaptive_avg_pool2d`` (the plain gradient).
    ``residual`` / ``pool`` switch the two halves."""

    def __init__(self, residual: bool = True, pool: bool = True):
        parts = [SequentialMergeBatchNorm()]
        if residual:
            parts.append(AttributeCanonizer(self._residual))
        if pool:
            parts.append(AttributeCanonizer(self._pool))
        super().__init__(parts)

    @staticmethod
    def _residual(name, module):
        if isinstance(module, InvertedResidual) and module.use_res_connect:
            def forward(x, m=module):
                return m.canonizer_sum(torch.stack([x, m.conv(x)], dim=-1))
            return {"forward": forward, "canonizer_sum": Sum()}
        return None

    @staticmethod
    def _pool(name, module):
        if isinstance(module, tv.models.MobileNetV2):
            def forward(x, m=module):
                return m.classifier(torch.flatten(m.canonizer_pool(m.features(x)), 1))
            return {"forward": forward, "canonizer_pool": nn.AdaptiveAvgPool2d(1)}
        return None


# name -> (torchvision constructor, Zennit canonizer factory, BatchNorm eps, Zennit's stabiliser).
# BatchNorm eps is 0 everywhere: Zennit's merge leaves each merged BatchNorm computing x / sqrt(1 + eps),
# so with eps 1e-5 Zennit's canonized model is not the model (its activations shrink by eps / 2 per
# BatchNorm, paths through the residual sums by different factors); where a residual sum nearly
# cancels this shows: ResNet-50, one image of two, 9e-4 (test_resnet50_zennit_merged_batchnorm_eps).
# ResNeXt-50 is compared with Zennit's stabiliser 1e-13 (and BatchNorm eps 0): its grouped 3x3
# convolutions (4 input channels per group in the first stage) have small z+ / alpha-beta denominators,
# next to which Zennit's 1e-6 moves Zennit's own heatmap by up to 2.4e-3 (deep_taylor 9e-4; with 1e-13
# the heatmaps agree to 4e-7). MobileNetV2 likewise: its residual sums add mixed-sign
# linear bottlenecks (no ReLU before the +), and where such a sum nearly cancels, Norm's R / sum amplifies
# any small change upstream -- Zennit's 1e-6 stabiliser moves Zennit's own heatmap by up to 10 % there
# (test_mobilenet_v2_zennit_stabiliser_is_amplified), and so does the x / sqrt(1 + eps) that Zennit's
# canonizer leaves of each merged BatchNorm (1e-4).
MODELS = {
    "resnet18": ("resnet18", ResNetCanonizer, 0.0, 1e-6),
    "resnet50": ("resnet50", ResNetCanonizer, 0.0, 1e-6),
    "resnext50_32x4d": ("resnext50_32x4d", ResNetCanonizer, 0.0, 1e-13),
    "vgg16_bn": ("vgg16_bn", SequentialMergeBatchNorm, 0.0, 1e-6),
    "alexnet": ("alexnet", SequentialMergeBatchNorm, 0.0, 1e-6),
    "mobilenet_v2": ("mobilenet_v2", MobileNetV2Canonizer, 0.0, 1e-13),
}


def make_model(name: str, he_init: bool = True, bn_eps: float | None = None):
    """The torchvision model (float64, eval), seeded: BatchNorm running statistics and affine parameters
    random (mean N(0, 0.1), var U(0.5, 1.5), weight U(0.5, 1.5), bias N(0, 0.1)); AlexNet (torch's
    default init, which shrinks the activations layer by layer) re-initialised He-normal with zero
    biases unless ``he_init=False``. ``bn_eps`` replaces every BatchNorm's eps (0: Zennit's merged
    BatchNorm, left computing ``x / sqrt(1 + eps)``, is then exactly the identity)."""
    ctor = MODELS[name][0]
    torch.manual_seed(0)
    model = getattr(tv.models, ctor)(weights=None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                if bn_eps is not None:
                    m.eps = bn_eps
            elif he_init and name == "alexnet" and isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
                nn.init.zeros_(m.bias)
    return model.double().eval()


def make_input(n: int = N_IMAGES) -> np.ndarray:
    return np.random.default_rng(17).uniform(0.05, 0.95, size=(n, *SHAPE))


# One model at a time (VGG-16-BN is 1.1 GB in float64, twice with the imported copy): the tests are
# ordered by model and the cache is emptied when the model changes.
_CACHE: dict = {}


def _cached(name: str) -> dict:
    if _CACHE.get("name") != name:
        _CACHE.clear()
        model = make_model(name, bn_eps=MODELS[name][2])
        _CACHE.update(name=name, model=model, net=dt.from_torch(model, SHAPE), zennit={})
    return _CACHE


# -- Zennit --------------------------------------------------------------------------------------

COMPOSITES = ["deep_taylor", "epsilon_plus_flat", "epsilon_plus", "epsilon_alpha2_beta1",
              "epsilon_alpha2_beta1_flat", "epsilon_gamma_box"]
ZENNIT_NAMES = {"epsilon_plus_flat": EpsilonPlusFlat, "epsilon_plus": EpsilonPlus,
                "epsilon_alpha2_beta1": EpsilonAlpha2Beta1, "epsilon_alpha2_beta1_flat": EpsilonAlpha2Beta1Flat}


def zennit_composite(name: str, xt, canonizers, stabilizer: float = 1e-6):
    """Zennit's composite for our ``name`` with ``canonizers``. ``stabilizer`` goes to every rule but
    Epsilon; the residual ``Sum`` keeps Norm's 1e-6 (that of ``dt.Add``)."""
    sums = [(Sum, Norm(stabilizer=1e-6))]
    if name == "deep_taylor":
        return SpecialFirstLayerMapComposite(
            layer_map=sums + layer_map_base(stabilizer) + [(Linear, ZPlus(stabilizer=stabilizer,
                                                                           zero_params="bias"))],
            first_map=[(Linear, ZBox(low=0.0, high=1.0, stabilizer=stabilizer))], canonizers=canonizers)
    if name == "epsilon_gamma_box":
        return EpsilonGammaBox(low=torch.zeros_like(xt), high=torch.ones_like(xt), stabilizer=stabilizer,
                               layer_map=sums, canonizers=canonizers)
    return ZENNIT_NAMES[name](stabilizer=stabilizer, layer_map=sums, canonizers=canonizers)


def zennit_heatmap(model, x, name, canonizers, stabilizer=1e-6):
    """Zennit's heatmap of ``x`` for the argmax logit (LRP starts from the target's logit); also the
    model's output."""
    xt = torch.tensor(x, requires_grad=True)
    with torch.no_grad():
        out = model(xt)
    t = out.argmax(dim=1)
    seed = torch.zeros_like(out)
    seed[torch.arange(len(x)), t] = out[torch.arange(len(x)), t]
    with Gradient(model=model, composite=zennit_composite(name, xt, canonizers, stabilizer)) as attributor:
        _, rel = attributor(xt, seed)
    return rel.detach().numpy(), out.numpy()


def per_image_maxnorm(a, b):
    """max|a - b| / max|b| per image (b the reference)."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1)
    return np.abs(a - b).max(axis=1) / np.maximum(np.abs(b).max(axis=1), 1e-300)


def _reference(name: str, composite: str, x):
    c = _cached(name)
    if composite not in c["zennit"]:
        c["zennit"][composite] = zennit_heatmap(c["model"], x, composite, [MODELS[name][1]()],
                                                stabilizer=MODELS[name][3])
    return c["zennit"][composite]


# -- agreement -------------------------------------------------------------------------------------

# The numpy reference is slow on these models (10-20 s for ResNet-18, more for the big ones on a busy
# 2-core machine): it runs deep_taylor and epsilon_plus_flat on every model (the other composites
# differ only in the rule per layer, which tests/test_graph_zennit.py and the engine tests cover), the
# cpu backend every composite. The big models are slow.
FAST_MODELS = ("resnet18", "alexnet", "mobilenet_v2")
NUMPY_COMPOSITES = ("deep_taylor", "epsilon_plus_flat")


def _cases():
    for model in MODELS:
        for comp in COMPOSITES:
            for backend in ("cpu", "numpy"):
                if backend == "numpy" and comp not in NUMPY_COMPOSITES:
                    continue
                slow = model not in FAST_MODELS or (backend == "numpy" and comp != "epsilon_plus_flat") or (
                    model != "resnet18" and comp not in NUMPY_COMPOSITES) or (
                    model == "mobilenet_v2" and comp != "epsilon_plus_flat")
                yield pytest.param(model, comp, backend, id=f"{model}-{comp}-{backend}",
                                   marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(("model", "composite", "backend"), list(_cases()))
def test_zoo_heatmaps_match_zennit(model, composite, backend):
    c = _cached(model)
    x = make_input()
    ref, out = _reference(model, composite, x)
    assert np.abs(ref).max() > 0
    ex = dt.Explainer(c["net"], dt.composites.get(composite), backend=backend)
    res = ex.explain(x if backend == "numpy" else x.astype(np.float32))
    assert res.relevance.shape == x.shape
    np.testing.assert_array_equal(res.target, out.argmax(axis=1))
    diffs = per_image_maxnorm(res.relevance, ref)
    # the lower median: with 2 images, one may be off on backend "cpu" by a float32 near-tie in a max
    # pool (VGG-16-BN: one image 2.5e-3 - 5e-3 on every composite, the other 1e-5, the float64 reference
    # 9e-6 on both: the float32 arg-max picks the other input of a window whose two largest inputs
    # differ by ~1e-7 relative and routes its relevance there); a wrong rule is off on every image, by
    # far more (MobileNetV2 without the Sum canonizer: 0.999)
    assert np.sort(diffs)[(len(diffs) - 1) // 2] <= TOL, (model, composite, backend, diffs)
    assert diffs.max() <= (TOL if backend == "numpy" else 1e-2), (model, composite, backend, diffs)


def test_imported_forward_matches_torch():
    """The imported graphs compute the torch models' function (float64, folded BatchNorm)."""
    x = make_input()
    for name in FAST_MODELS:
        c = _cached(name)
        with torch.no_grad():
            out = c["model"](torch.tensor(x)).numpy()
        np.testing.assert_allclose(c["net"].forward(x), out, rtol=1e-9, atol=1e-9 * np.abs(out).max())


# -- where Zennit does something else --------------------------------------------------------------


# (residual=True, pool=False) is not asserted: with the residuals canonized and only the pool left as
# a gradient, the heatmaps measured 1.8e-4 apart on this model and input (2026-12-02), contrary to the
# O(1) expected; not yet explained, so no claim is tested either way.
@pytest.mark.parametrize(("residual", "pool"), [
    (False, False), pytest.param(False, True, marks=pytest.mark.slow)])
def test_mobilenet_v2_functional_add_and_pool_are_gradients_in_zennit(residual, pool):
    """With Zennit's own canonizer only (``SequentialMergeBatchNorm``: no Zennit canonizer knows
    MobileNetV2) Zennit takes the plain gradient through the functional residual ``+`` (the whole R to
    both summands, relevance duplicated at each of the 10 shortcuts) and through
    ``F.adaptive_avg_pool2d`` (R / HW to every pixel, whatever its activation): the heatmaps differ
    from deeptaylor's (Norm at both, as Zennit's Sum / AvgPool) by O(1) max-normalised (measured
    0.999). Canonizing the pool alone still leaves an O(1) difference; both halves together agree to 1e-4
    (the main test above)."""
    c = _cached("mobilenet_v2")
    x = make_input()
    canon = MobileNetV2Canonizer(residual, pool) if residual or pool else SequentialMergeBatchNorm()
    ref, _ = zennit_heatmap(c["model"], x, "epsilon_plus_flat", [canon], stabilizer=1e-13)
    ours = dt.Explainer(c["net"], dt.composites.epsilon_plus_flat(), backend="cpu").explain(
        x.astype(np.float32)).relevance
    diffs = per_image_maxnorm(ours, ref)
    assert diffs.min() > 0.1, diffs


@pytest.mark.slow
def test_mobilenet_v2_zennit_gradient_shortcut_duplicates_relevance():
    """The size of the effect at the shortcuts: with the pool canonized but the ``+`` left to the
    gradient, Zennit's total input relevance exceeds the explained logit by far (every shortcut passes
    R on in full to both summands), while deeptaylor's (and Zennit's with Sum) stays near it."""
    c = _cached("mobilenet_v2")
    x = make_input()
    grad_add, out = zennit_heatmap(c["model"], x, "epsilon_plus", [MobileNetV2Canonizer(residual=False)],
                                   stabilizer=1e-13)
    with_sum, _ = zennit_heatmap(c["model"], x, "epsilon_plus", [MobileNetV2Canonizer()], stabilizer=1e-13)
    logit = out.max(axis=1)
    ours = dt.Explainer(c["net"], dt.composites.epsilon_plus(), backend="numpy").explain(x).relevance
    np.testing.assert_allclose(ours.reshape(2, -1).sum(1), with_sum.reshape(2, -1).sum(1), rtol=1e-4)
    ratio_grad = grad_add.reshape(2, -1).sum(1) / logit
    ratio_sum = with_sum.reshape(2, -1).sum(1) / logit
    assert np.all(np.abs(ratio_grad) > 2 * np.abs(ratio_sum)), (ratio_grad, ratio_sum)


def test_mobilenet_v2_zennit_stabiliser_is_amplified():
    """Why MobileNetV2 is compared with Zennit's stabiliser at 1e-13: at its default 1e-6 it changes
    *Zennit's own* deep_taylor heatmap by 1-7 % (measured 0.069, 0.019), because the mixed-sign residual
    sums, where they nearly cancel, amplify it through Norm's R / sum. deeptaylor's z+ divides exactly;
    the difference to Zennit is that change, not a different rule."""
    c = _cached("mobilenet_v2")
    x = make_input()
    exact, _ = _reference("mobilenet_v2", "deep_taylor", x)  # stabiliser 1e-13
    default, _ = zennit_heatmap(c["model"], x, "deep_taylor", [MobileNetV2Canonizer()], stabilizer=1e-6)
    ours = dt.Explainer(c["net"], dt.composites.deep_taylor(0, 1), backend="cpu").explain(
        x.astype(np.float32)).relevance
    assert np.median(per_image_maxnorm(ours, exact)) <= TOL
    assert np.median(per_image_maxnorm(default, exact)) > 1e-3
    np.testing.assert_allclose(per_image_maxnorm(ours, default), per_image_maxnorm(exact, default), rtol=0.05)


def test_resnet18_identical_without_zennit_stabiliser():
    """On a zoo model the rules are Zennit's exactly: with Zennit's stabiliser made 1e-13 (every rule
    but Epsilon and the residual Sum's Norm, whose 1e-6 dt.Add shares) and BatchNorm eps 0 (Zennit's
    merged BatchNorm is then exactly the identity), ResNet-18's float64 heatmaps agree to ~1e-13
    (measured 2.7e-13, epsilon_plus)."""
    model = make_model("resnet18", bn_eps=0.0)
    net = dt.from_torch(model, SHAPE)
    x = make_input()
    ref, _ = zennit_heatmap(model, x, "epsilon_plus", [ResNetCanonizer()], stabilizer=1e-13)
    ours = dt.Explainer(net, dt.composites.epsilon_plus(), backend="numpy").explain(x).relevance
    assert per_image_maxnorm(ours, ref).max() <= 1e-10


@pytest.mark.slow
def test_resnet50_zennit_merged_batchnorm_eps():
    """With torchvision's BatchNorm eps 1e-5, Zennit's merged BatchNorms still compute x / sqrt(1 + eps)
    (its canonized model differs from the model); at a residual sum that nearly cancels before its
    ReLU, Norm's R / sum amplifies that: one ResNet-50 image of two differs by 9e-4 (measured), the
    other by 1.4e-5; with eps 0 both agree to 5e-6."""
    x = make_input()
    ours_net = {}
    diffs = {}
    for eps in (1e-5, 0.0):
        model = make_model("resnet50", bn_eps=eps)
        ours_net[eps] = dt.from_torch(model, SHAPE)
        ref, _ = zennit_heatmap(model, x, "epsilon_plus_flat", [ResNetCanonizer()])
        ours = dt.Explainer(ours_net[eps], dt.composites.epsilon_plus_flat(), backend="cpu").explain(
            x.astype(np.float32)).relevance
        diffs[eps] = per_image_maxnorm(ours, ref)
    assert diffs[0.0].max() <= 2e-5, diffs
    assert diffs[1e-5].max() > 2e-4, diffs


def test_alexnet_default_init_stabiliser_shows_at_1e_4():
    """AlexNet as torchvision builds it (torch's default init, no BatchNorm): the activations shrink
    layer by layer, so Zennit's 1e-6 stabiliser is no longer small next to the denominators and the
    deep_taylor heatmaps differ by ~1e-4 (measured 1.0e-4); with the stabiliser made 1e-13 they agree
    to ~1e-10."""
    model = make_model("alexnet", he_init=False)
    net = dt.from_torch(model, SHAPE)
    x = make_input()
    ours = dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(x).relevance
    canon = [SequentialMergeBatchNorm()]
    with_stab = per_image_maxnorm(ours, zennit_heatmap(model, x, "deep_taylor", canon)[0])
    without = per_image_maxnorm(ours, zennit_heatmap(model, x, "deep_taylor", canon, stabilizer=1e-13)[0])
    assert 3e-5 < np.median(with_stab) < 1e-3, with_stab
    assert without.max() <= 1e-8, without
