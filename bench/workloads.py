"""The benchmark workloads (DESIGN.md §4), their FLOP counts, and the same networks in PyTorch/Zennit.

Every workload is a seeded ``dt.Sequential`` with He-initialised weights (He et al. 2015: a normal
truncated at two standard deviations, std ``sqrt(2 / fan_in)``, the formula of
``dt.init.he_normal``, drawn in float32 so that VGG-16's 138 M parameters do not need a float64
copy in the Zennit process), small negative biases (``-U(0, 0.01)``: DTD's z+ and zB rules assume
``b <= 0``) and inputs drawn uniformly from [0, 1] (the ZBox(0, 1) domain).

========== ================================================================= ======
workload   model                                                             batch
========== ================================================================= ======
seed_dtd   1568 -> 400 ReLU -> GlobalSumPool (Montavon et al. 2017)           256
mlp        784-400-400-10                                                    256
lenet      conv5x5(32,p2)-pool2-conv5x5(64,p2)-pool2-512-10 on 1x28x28       256
cifar_vgg  3x[conv3x3 x2 (p1), pool2] (64,128,256) - 512 - 10 on 3x32x32     64
vgg16      VGG-16 (13 conv3x3 p1, 5 max-pools, 4096-4096-1000) on 3x224x224   4
========== ================================================================= ======

``to_torch`` converts a ``dt.Sequential`` into a ``torch.nn.Sequential`` with the same (float32)
weights; ``zennit_composite`` gives the Zennit composite equivalent to each of ours.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

import deeptaylor as dt

__all__ = [
    "COMPOSITES",
    "WORKLOADS",
    "Workload",
    "blas_threads",
    "build",
    "composite",
    "forward_macs",
    "import_zennit",
    "inputs",
    "specs",
    "to_torch",
    "torch_module",
    "torch_sensitivity",
    "work_factor",
    "zennit_composite",
    "zennit_relevance",
]


@dataclass(frozen=True)
class Workload:
    name: str
    input_shape: tuple[int, ...]  # one sample
    batch: int                     # benchmark batch
    quick_batch: int               # CI-sized batch (--quick, --benchmark-disable)
    numpy_images: int              # images the slow NumPy reference explains in compare.py
    make: Callable[[np.random.Generator], Iterator[tuple[str, dict]]]


class _ShapesOnly:
    """Stands in for the generator when only the layer shapes are wanted (weights become read-only
    zero views that take no memory)."""


def _he32(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """He normal (truncated at 2 std, std corrected by 0.8796 as Keras / dt.init.he_normal), float32."""
    if isinstance(rng, _ShapesOnly):
        return np.broadcast_to(np.float32(0), shape)
    fan_in = int(np.prod(shape[1:]))
    std = np.float32(np.sqrt(2.0 / fan_in) / 0.87962566103423978)
    w = rng.standard_normal(shape, dtype=np.float32)
    bad = np.abs(w) > 2
    while bad.any():
        w[bad] = rng.standard_normal(int(bad.sum()), dtype=np.float32)
        bad = np.abs(w) > 2
    w *= std
    return w


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    if isinstance(rng, _ShapesOnly):
        return np.broadcast_to(np.float32(0), (n,))
    return -rng.uniform(0.0, 0.01, n).astype(np.float32)


# A layer spec is (kind, params): the dt layer class name and its constructor arguments, with
# float32 arrays. Builders *yield* specs so that each layer's arrays can be dropped once converted
# (VGG-16: the deeptaylor process holds only its own float64 copy, the Zennit process only torch's).
Spec = tuple[str, dict]


def _dense(rng, n_in, n_out) -> Spec:
    return ("Dense", {"weight": _he32(rng, (n_out, n_in)), "bias": _bias(rng, n_out)})


def _conv(rng, c_in, c_out, k, padding) -> Spec:
    return ("Conv2d", {"weight": _he32(rng, (c_out, c_in, k, k)), "bias": _bias(rng, c_out), "padding": padding})


RELU: Spec = ("ReLU", {})
POOL: Spec = ("MaxPool2d", {"kernel_size": 2})
FLATTEN: Spec = ("Flatten", {})


def _seed_dtd(rng):
    yield _dense(rng, 1568, 400)
    yield RELU
    yield ("GlobalSumPool", {})


def _mlp(rng):
    yield _dense(rng, 784, 400)
    yield RELU
    yield _dense(rng, 400, 400)
    yield RELU
    yield _dense(rng, 400, 10)


def _lenet(rng):
    yield _conv(rng, 1, 32, 5, 2)
    yield RELU
    yield POOL
    yield _conv(rng, 32, 64, 5, 2)
    yield RELU
    yield POOL
    yield FLATTEN
    yield _dense(rng, 64 * 7 * 7, 512)
    yield RELU
    yield _dense(rng, 512, 10)


def _vgg_blocks(rng, c_in, plan):
    for item in plan:
        if item == "M":
            yield POOL
        else:
            yield _conv(rng, c_in, item, 3, 1)
            yield RELU
            c_in = item


def _cifar_vgg(rng):
    yield from _vgg_blocks(rng, 3, [64, 64, "M", 128, 128, "M", 256, 256, "M"])
    yield FLATTEN
    yield _dense(rng, 256 * 4 * 4, 512)
    yield RELU
    yield _dense(rng, 512, 10)


def _vgg16(rng):
    yield from _vgg_blocks(rng, 3, [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                    512, 512, 512, "M"])
    yield FLATTEN
    yield _dense(rng, 512 * 7 * 7, 4096)
    yield RELU
    yield _dense(rng, 4096, 4096)
    yield RELU
    yield _dense(rng, 4096, 1000)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("seed_dtd", (1568,), 256, 16, 64, _seed_dtd),
    Workload("mlp", (784,), 256, 16, 64, _mlp),
    Workload("lenet", (1, 28, 28), 256, 8, 8, _lenet),
    Workload("cifar_vgg", (3, 32, 32), 64, 4, 4, _cifar_vgg),
    Workload("vgg16", (3, 224, 224), 4, 1, 1, _vgg16),
]}

# Our composites / methods by name. deep_taylor_unbounded (w² first) is an extra: the early cpu
# backend runs it on dense nets while zB is not implemented there yet.
COMPOSITES: dict[str, Callable[[], object]] = {
    "deep_taylor": lambda: dt.composites.deep_taylor(0.0, 1.0),
    "epsilon_plus_flat": lambda: dt.composites.epsilon_plus_flat(),
    "sensitivity": lambda: dt.methods.Sensitivity(),
    "deep_taylor_unbounded": lambda: dt.composites.deep_taylor_unbounded(),
}


def composite(name: str) -> object:
    return COMPOSITES[name]()


def build(name: str, seed: int = 0) -> dt.Sequential:
    """The workload's network, identical for a given seed."""
    return dt.Sequential(getattr(dt, kind)(**params) for kind, params in specs(name, seed))


def specs(name: str, seed: int = 0) -> Iterator[tuple[str, dict]]:
    """The workload's layers as (dt class name, float32 constructor arguments), one at a time."""
    return WORKLOADS[name].make(np.random.default_rng(seed))


def inputs(name: str, n: int, seed: int = 1) -> np.ndarray:
    """``n`` float32 inputs in [0, 1] of the workload's input shape (the first k are the same for any n)."""
    shape = WORKLOADS[name].input_shape
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def forward_macs(name: str) -> int:
    """Multiply-accumulates of one sample's forward pass through the linear layers of workload ``name``
    (Dense: in * out; Conv2d: out_channels * in_channels * kh * kw * OH * OW; pooling/ReLU not counted).
    Shapes are propagated from the layer specs, without drawing the weights."""
    shape = WORKLOADS[name].input_shape
    macs = 0
    for kind, p in WORKLOADS[name].make(_ShapesOnly()):
        if kind == "Dense":
            o, i = p["weight"].shape
            macs += o * i
            shape = (o,)
        elif kind in ("Conv2d", "MaxPool2d"):
            if kind == "Conv2d":
                o, c, kh, kw = p["weight"].shape
                s = 1
            else:
                o, kh, kw, s = shape[0], p["kernel_size"], p["kernel_size"], p["kernel_size"]
            pad = p.get("padding", 0)
            h, w = ((shape[1] + 2 * pad - kh) // s + 1, (shape[2] + 2 * pad - kw) // s + 1)
            if kind == "Conv2d":
                macs += o * c * kh * kw * h * w
            shape = (o, h, w)
        elif kind == "Flatten":
            shape = (int(np.prod(shape)),)
        elif kind == "GlobalSumPool":
            shape = (1,)
    return macs


def work_factor(composite_name: str) -> float:
    """Work of an explanation in units of the forward pass's FLOPs (the 'effective' GFLOP/s use it).

    LRP/DTD composites: 3 (the forward pass; the rule's denominators, e.g. z+ = a W+, one more
    forward-sized product; the transposed product s W+^T); zB's extra terms on the first layer and the
    cheaper w²/flat/epsilon layers are ignored. Sensitivity: 2 (forward + one transposed product for
    the input gradient; no weight gradients)."""
    return 2.0 if composite_name == "sensitivity" else 3.0


def blas_threads(n: int):
    """A context manager limiting NumPy's BLAS to ``n`` threads (a no-op without threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


# --------------------------------------------------------------------------------------------------
# PyTorch / Zennit


def _torch_modules():
    import torch

    class GlobalSum(torch.nn.Module):
        """dt.GlobalSumPool: sum over every non-batch dimension -> (N, 1)."""

        def forward(self, x):
            return x.reshape(x.shape[0], -1).sum(dim=1, keepdim=True)

    return torch, GlobalSum


_GLOBAL_SUM = None


def global_sum_type():
    """The torch module class standing for dt.GlobalSumPool (one class per process)."""
    global _GLOBAL_SUM
    if _GLOBAL_SUM is None:
        _GLOBAL_SUM = _torch_modules()[1]
    return _GLOBAL_SUM


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def _sym_padding(p, what: str) -> tuple[int, int]:
    """int, (ph, pw) or dt's (top, bottom, left, right) -> torch's symmetric (ph, pw)."""
    if np.ndim(p) == 0 or len(p) == 2:
        return _pair(p)
    t, b, le, r = (int(v) for v in p)
    if t != b or le != r:
        raise NotImplementedError(f"to_torch: asymmetric {what} padding {tuple(p)}")
    return (t, le)


def torch_module(kind: str, p: dict):
    """One torch module for a layer given as (dt class name, constructor arguments / attributes)."""
    import torch

    if kind in ("Dense", "Conv2d"):
        w = torch.from_numpy(np.ascontiguousarray(p["weight"], dtype=np.float32))
        b = torch.from_numpy(np.ascontiguousarray(p["bias"], dtype=np.float32))
        if kind == "Dense":
            m = torch.nn.Linear(w.shape[1], w.shape[0])
        else:
            o, c, kh, kw = w.shape
            m = torch.nn.Conv2d(c, o, (kh, kw), stride=_pair(p.get("stride", 1)),
                                padding=_sym_padding(p.get("padding", 0), "Conv2d"),
                                dilation=_pair(p.get("dilation", 1)))
        m.weight.data, m.bias.data = w, b
        return m
    if kind == "ReLU":
        return torch.nn.ReLU()
    if kind in ("MaxPool2d", "AvgPool2d", "SumPool2d"):
        k = _pair(p["kernel_size"])
        s = _pair(p["stride"]) if p.get("stride") is not None else k
        pad = _sym_padding(p.get("padding", 0), kind)
        if kind == "MaxPool2d":
            return torch.nn.MaxPool2d(k, s, pad)
        # SumPool2d: AvgPool2d with divisor 1 is an exact window sum (rather than AvgPool * k², whose
        # scaling would be a separate op that Zennit's hooks do not see); Zennit's Norm rule then
        # redistributes in proportion to the inputs, as dt.SumPool2d.
        return torch.nn.AvgPool2d(k, s, pad, count_include_pad=True,
                                  divisor_override=1 if kind == "SumPool2d" else None)
    if kind == "Flatten":
        return torch.nn.Flatten()
    if kind == "GlobalSumPool":
        return global_sum_type()()
    raise NotImplementedError(f"to_torch: no torch equivalent for {kind}")


_ATTRS = {"Dense": ("weight", "bias"), "Conv2d": ("weight", "bias", "stride", "padding", "dilation"),
          "MaxPool2d": ("kernel_size", "stride", "padding"), "AvgPool2d": ("kernel_size", "stride", "padding"),
          "SumPool2d": ("kernel_size", "stride", "padding")}


def to_torch(net):
    """A float32 ``torch.nn.Sequential`` (eval mode) computing the same function as ``net``.

    ``net`` is a ``dt.Sequential`` or an iterable of layer specs ``(kind, params)`` (see ``specs``).
    Dense -> Linear, Conv2d -> Conv2d (symmetric padding), ReLU, MaxPool2d, AvgPool2d
    (count_include_pad), SumPool2d -> AvgPool2d(divisor_override=1), Flatten, GlobalSumPool -> a
    module summing over all non-batch dimensions to (N, 1)."""
    import torch

    mods = []
    for layer in net:
        if isinstance(layer, dt.Layer):
            kind, params = layer.kind, {a: getattr(layer, a) for a in _ATTRS.get(layer.kind, ())}
        else:
            kind, params = layer
        mods.append(torch_module(kind, params))
    return torch.nn.Sequential(*mods).eval()


def import_zennit():
    """Import zennit. Same stand-in as tests/conftest.py's import_zennit (copied, not imported, so the
    benchmarks do not depend on the test suite): Zennit 0.5.1 imports torchvision at import time and
    PyPI's torchvision does not import beside the CPU torch 2.13 wheel, so register a minimal
    ``torchvision.models.resnet`` with two empty ``nn.Module`` subclasses ``BasicBlock`` and
    ``Bottleneck`` (used only by Zennit's ResNet canonizer, which we do not use)."""
    import torch

    if "torchvision.models.resnet" not in sys.modules:
        try:
            import torchvision.models.resnet  # noqa: F401
        except Exception:  # noqa: BLE001 - any import failure: use the stand-in
            tv = types.ModuleType("torchvision")
            models = types.ModuleType("torchvision.models")
            resnet = types.ModuleType("torchvision.models.resnet")

            class BasicBlock(torch.nn.Module):
                pass

            class Bottleneck(torch.nn.Module):
                pass

            resnet.BasicBlock = BasicBlock
            resnet.Bottleneck = Bottleneck
            tv.models = models
            models.resnet = resnet
            sys.modules.update({"torchvision": tv, "torchvision.models": models,
                                "torchvision.models.resnet": resnet})
    import zennit

    return zennit


def zennit_composite(name: str):
    """The Zennit composite equivalent to our ``name`` (None for sensitivity: plain autograd).

    * deep_taylor(0, 1): ZBox(0, 1) on the first linear layer, ZPlus elsewhere, both with the bias
      zeroed (zero_params='bias': our DTD rules ignore the bias; with b <= 0 Zennit's ZPlus would
      coincide anyway).
    * deep_taylor_unbounded: WSquare first, ZPlus elsewhere (bias zeroed).
    * epsilon_plus_flat: Zennit's EpsilonPlusFlat.
    Every composite also maps our GlobalSumPool module to Zennit's Norm rule (proportional
    redistribution, as dt.GlobalSumPool), like Zennit's own ``Sum`` layer."""
    import torch

    zennit = import_zennit()
    from zennit.composites import EpsilonPlusFlat, SpecialFirstLayerMapComposite, layer_map_base
    from zennit.rules import Norm, WSquare, ZBox, ZPlus

    linear = (torch.nn.Linear, torch.nn.Conv2d)
    extra = [(global_sum_type(), Norm())]
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(layer_map=extra)
    if name in ("deep_taylor", "deep_taylor_unbounded"):
        first = ZBox(0.0, 1.0, zero_params=["bias"]) if name == "deep_taylor" else WSquare(zero_params=["bias"])
        return SpecialFirstLayerMapComposite(
            layer_map=extra + layer_map_base() + [(linear, ZPlus(zero_params=["bias"]))],
            first_map=[(linear, first)])
    if name == "sensitivity":
        return None
    del zennit
    raise KeyError(name)


def _initial_relevance(out):
    """R_out[n, t] = output[n, t] at the argmax t, 0 elsewhere (as deeptaylor's target=None)."""
    import torch

    r = torch.zeros_like(out)
    idx = out.argmax(dim=1, keepdim=True)
    return r.scatter_(1, idx, out.gather(1, idx))


def zennit_relevance(model, comp, x):
    """Zennit's heatmap of ``x`` (float32 torch tensor) for the argmax output; returns (output, relevance)."""
    from zennit.attribution import Gradient

    with Gradient(model=model, composite=comp) as attributor:
        out, rel = attributor(x, _initial_relevance)
    return out, rel


def torch_sensitivity(model, x):
    """(d f_t / d x)^2 at the argmax output t with torch autograd; returns (output, relevance)."""
    import torch

    x = x.detach().requires_grad_(True)
    out = model(x)
    idx = out.argmax(dim=1, keepdim=True)
    (grad,) = torch.autograd.grad(out.gather(1, idx).sum(), x)
    return out.detach(), grad * grad
