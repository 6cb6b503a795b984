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
resnet18   ResNet-18 (BasicBlocks [2, 2, 2, 2], BN folded) on 3x112x112      16
resnet50   ResNet-50 (Bottlenecks [3, 4, 6, 3], BN folded) on 3x224x224       8
========== ================================================================= ======

The ResNets are graphs (``dt.Graph``): torchvision's architectures (v1.5: the stride on the 3x3 of a
Bottleneck, a strided 1x1 projection shortcut where the shape changes) with every BatchNorm folded
into the convolution before it, i.e. each convolution has a bias, as in the other workloads; the
residual ``+`` is a ``dt.Add``, the head a global average pool and a 1000-way Dense layer. Their specs
are *nodes* ``(name, kind, params, inputs)`` (``inputs``: names of earlier nodes, ``"input"`` for the
network input); the chains' specs are layers ``(kind, params)``.

``to_torch`` converts a ``dt.Sequential`` (or the specs of a chain) into a ``torch.nn.Sequential``, and
the specs of a graph into a :class:`TorchGraph` module, with the same (float32) weights; each
residual ``+`` becomes ``zennit.layer.Sum`` on the summands stacked on a last axis, which is exactly
what Zennit's ``ResNetCanonizer`` does to torchvision's blocks (Zennit then gives it its ``Norm`` rule,
as ``dt.Add``). ``zennit_composite`` gives the Zennit composite equivalent to each of ours.
"""

from __future__ import annotations

import itertools
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
    "is_graph",
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
    make: Callable[[np.random.Generator], Iterator[tuple]]
    graph: bool = False            # specs are nodes (name, kind, params, inputs), built as a dt.Graph


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


# -- ResNets (graphs) --------------------------------------------------------------------------
# A node spec is (name, kind, params, inputs): inputs are names of earlier nodes or "input".
Node = tuple[str, str, dict, tuple[str, ...]]


def _conv_node(rng, name, src, c_in, c_out, k, stride=1, padding=0) -> Node:
    kind, p = _conv(rng, c_in, c_out, k, padding)
    if stride != 1:
        p["stride"] = stride
    return (name, kind, p, (src,))


def _relu(name, src) -> Node:
    return (name, "ReLU", {}, (src,))


def _resnet(rng, block: str, layers: list[int]):
    """torchvision's ResNet with BatchNorm folded: conv7x7/2 (p3) ReLU maxpool3x3/2 (p1), four stages of
    BasicBlocks (two conv3x3) or Bottlenecks (conv1x1, conv3x3 with the stage's stride, conv1x1 to 4x
    the width), a strided conv1x1 projection where the shape changes, global average pool, Dense 1000."""
    yield _conv_node(rng, "conv1", "input", 3, 64, 7, 2, 3)
    yield _relu("relu", "conv1")
    yield ("maxpool", "MaxPool2d", {"kernel_size": 3, "stride": 2, "padding": 1}, ("relu",))
    src, c_in = "maxpool", 64
    expansion = 1 if block == "basic" else 4
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
        for b in range(n):
            stride = 2 if stage > 1 and b == 0 else 1
            pre = f"layer{stage}.{b}."
            c_out = planes * expansion
            if block == "basic":
                yield _conv_node(rng, pre + "conv1", src, c_in, planes, 3, stride, 1)
                yield _relu(pre + "relu1", pre + "conv1")
                yield _conv_node(rng, pre + "conv2", pre + "relu1", planes, planes, 3, 1, 1)
                last = pre + "conv2"
            else:
                yield _conv_node(rng, pre + "conv1", src, c_in, planes, 1)
                yield _relu(pre + "relu1", pre + "conv1")
                yield _conv_node(rng, pre + "conv2", pre + "relu1", planes, planes, 3, stride, 1)
                yield _relu(pre + "relu2", pre + "conv2")
                yield _conv_node(rng, pre + "conv3", pre + "relu2", planes, c_out, 1)
                last = pre + "conv3"
            shortcut = src
            if stride != 1 or c_in != c_out:
                yield _conv_node(rng, pre + "downsample", src, c_in, c_out, 1, stride)
                shortcut = pre + "downsample"
            yield (pre + "add", "Add", {}, (last, shortcut))
            yield _relu(pre + "relu", pre + "add")
            src, c_in = pre + "relu", c_out
    yield ("avgpool", "GlobalAvgPool", {}, (src,))
    kind, p = _dense(rng, c_in, 1000)
    yield ("fc", kind, p, ("avgpool",))


def _resnet18(rng):
    return _resnet(rng, "basic", [2, 2, 2, 2])


def _resnet50(rng):
    return _resnet(rng, "bottleneck", [3, 4, 6, 3])


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("seed_dtd", (1568,), 256, 16, 64, _seed_dtd),
    Workload("mlp", (784,), 256, 16, 64, _mlp),
    Workload("lenet", (1, 28, 28), 256, 8, 8, _lenet),
    Workload("cifar_vgg", (3, 32, 32), 64, 4, 4, _cifar_vgg),
    Workload("vgg16", (3, 224, 224), 4, 1, 1, _vgg16),
    Workload("resnet18", (3, 112, 112), 16, 2, 2, _resnet18, graph=True),
    Workload("resnet50", (3, 224, 224), 8, 1, 1, _resnet50, graph=True),
]}

# Our composites / methods by name. deep_taylor_unbounded (w² on the first layer, z+ above) is an
# extra, for inputs without a box.
COMPOSITES: dict[str, Callable[[], object]] = {
    "deep_taylor": lambda: dt.composites.deep_taylor(0.0, 1.0),
    "epsilon_plus_flat": lambda: dt.composites.epsilon_plus_flat(),
    "sensitivity": lambda: dt.methods.Sensitivity(),
    "deep_taylor_unbounded": lambda: dt.composites.deep_taylor_unbounded(),
}


def composite(name: str) -> object:
    return COMPOSITES[name]()


def is_graph(name: str) -> bool:
    """True for the workloads built as a ``dt.Graph`` (node specs), False for the chains."""
    return WORKLOADS[name].graph


def build(name: str, seed: int = 0) -> dt.Graph:
    """The workload's network, identical for a given seed: a ``dt.Sequential`` for the chains, a
    ``dt.Graph`` (node names as torchvision's modules, ``layer1.0.add`` for a residual sum) for the
    ResNets."""
    return _build(WORKLOADS[name], specs(name, seed))


def _build(wl: Workload, items) -> dt.Graph:
    if not wl.graph:
        return dt.Sequential(getattr(dt, kind)(**params) for kind, params in items)
    x = dt.Input(wl.input_shape)
    values = {"input": x}
    for name, kind, params, inputs in items:  # each node's arrays are dropped once its layer copied them
        values[name] = getattr(dt, kind)(**params)(*(values[v] for v in inputs), name=name)
    return dt.Graph(x, values[name])


def specs(name: str, seed: int = 0) -> Iterator[tuple]:
    """The workload's layers as (dt class name, float32 constructor arguments), one at a time; for a
    graph workload its nodes as (name, dt class name, arguments, input names)."""
    return WORKLOADS[name].make(np.random.default_rng(seed))


def inputs(name: str, n: int, seed: int = 1) -> np.ndarray:
    """``n`` float32 inputs in [0, 1] of the workload's input shape (the first k are the same for any n)."""
    shape = WORKLOADS[name].input_shape
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def forward_macs(name: str) -> int:
    """Multiply-accumulates of one sample's forward pass through the linear layers of workload ``name``
    (Dense: in * out; Conv2d: out_channels * in_channels / groups * kh * kw * OH * OW; pooling, ReLU and
    the residual additions not counted). Shapes come from the network built on zero-size-in-memory
    weights (read-only broadcast views: nothing is drawn)."""
    wl = WORKLOADS[name]
    net = _build(wl, wl.make(_ShapesOnly()))
    shapes = net.shapes((1, *wl.input_shape))
    macs = 0
    for i, node in enumerate(net.nodes):
        layer = node.layer
        if isinstance(layer, dt.Dense):
            macs += int(layer.weight.shape[0]) * int(layer.weight.shape[1])
        elif isinstance(layer, dt.Conv2d):
            o, c, kh, kw = layer.weight.shape
            oh, ow = shapes[i + 1][2:]
            macs += int(o) * int(c) * int(kh) * int(kw) * int(oh) * int(ow)
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


def _sum_type():
    """Zennit's ``zennit.layer.Sum`` (sum over the last axis), or the same module without Zennit."""
    try:
        import_zennit()
        from zennit.layer import Sum

        return Sum
    except ImportError:
        import torch

        class Sum(torch.nn.Module):
            def forward(self, x):
                return x.sum(dim=-1)

        return Sum


def _torch_graph(nodes):
    """A float32 torch module (eval mode) running graph node specs ``(name, kind, params, inputs)`` in
    order: Add -> ``Sum()(torch.stack(inputs, -1))`` (Zennit's residual canonical form),
    GlobalAvgPool -> ``AdaptiveAvgPool2d(1)`` then flatten (Zennit: Norm, as ours), every other kind
    as in :func:`torch_module`. One module per node (Zennit's hooks assume a module runs once per
    pass); registered in node order, so the stem is Zennit's first layer."""
    import torch

    Sum = _sum_type()

    class TorchGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mods = torch.nn.ModuleDict()
            self.plan: list[tuple[str, str, str, tuple[str, ...]]] = []
            for name, kind, params, inputs in nodes:
                key = name.replace(".", "_")
                if kind == "Add":
                    mod = Sum()
                elif kind == "GlobalAvgPool":
                    mod = torch.nn.AdaptiveAvgPool2d(1)
                else:
                    mod = torch_module(kind, params)
                self.mods[key] = mod
                self.plan.append((name, key, kind, tuple(inputs)))

        def forward(self, x):
            vals = {"input": x}
            for name, key, kind, inputs in self.plan:
                ins = [vals[v] for v in inputs]
                if kind == "Add":
                    out = self.mods[key](torch.stack(ins, dim=-1))
                elif kind == "GlobalAvgPool":
                    out = torch.flatten(self.mods[key](ins[0]), 1)
                else:
                    out = self.mods[key](*ins)
                vals[name] = out
            return out

    return TorchGraph().eval()


def to_torch(net):
    """A float32 torch module (eval mode) computing the same function as ``net``.

    ``net`` is a ``dt.Sequential`` or an iterable of layer specs ``(kind, params)`` (see ``specs``):
    a ``torch.nn.Sequential`` with Dense -> Linear, Conv2d -> Conv2d (symmetric padding), ReLU,
    MaxPool2d, AvgPool2d (count_include_pad), SumPool2d -> AvgPool2d(divisor_override=1), Flatten,
    GlobalSumPool -> a module summing over all non-batch dimensions to (N, 1). Or an iterable of
    graph node specs ``(name, kind, params, inputs)`` (a graph workload's ``specs``): a module running
    the nodes in order, each ``Add`` as Zennit's ``Sum`` on the stacked summands (see ``_torch_graph``)."""
    import torch

    if not isinstance(net, dt.Graph):
        items = iter(net)
        first = next(items)
        if len(first) == 4:
            return _torch_graph(itertools.chain([first], items))
        net = itertools.chain([first], items)
    mods = []
    for layer in net:
        if isinstance(layer, dt.Layer):
            kind, params = layer.kind, {a: getattr(layer, a) for a in _ATTRS.get(layer.kind, ())}
        else:
            kind, params = layer
        mods.append(torch_module(kind, params))
    return torch.nn.Sequential(*mods).eval()


def _import_torchvision() -> bool:
    """Import the real torchvision if it imports: PyPI's torchvision 0.28.0 is built for CUDA torch and
    its compiled ops fail to register beside the CPU torch 2.13 wheel (``torchvision._meta_registrations``);
    the models are pure Python, so an empty module registered under that name first makes ``import
    torchvision`` work (as tests/conftest.py's import_torchvision). False if it still fails."""
    name = "torchvision._meta_registrations"
    registered = "torchvision" not in sys.modules and name not in sys.modules
    if registered:
        sys.modules[name] = types.ModuleType(name)
    try:
        import torchvision.models.resnet  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: use the stand-in
        if registered:
            sys.modules.pop(name, None)
        return False
    return True


def import_zennit():
    """Import zennit. The same as tests/conftest.py's import_zennit (copied, not imported, so the
    benchmarks do not depend on the test suite): Zennit 0.5.1 imports torchvision at import time; the
    real torchvision is imported where it can be (see ``_import_torchvision``), otherwise a minimal
    ``torchvision.models.resnet`` with two empty ``nn.Module`` subclasses ``BasicBlock`` and
    ``Bottleneck`` is registered (used only by Zennit's ResNet canonizer, which we do not use: our
    torch ResNets carry Zennit's ``Sum`` already)."""
    import torch

    if "torchvision.models.resnet" not in sys.modules and not _import_torchvision():
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
    redistribution, as dt.GlobalSumPool), like Zennit's own ``Sum`` layer. In the ResNets the residual
    ``Sum`` modules and the global ``AdaptiveAvgPool2d`` get Norm from Zennit's ``layer_map_base``
    (every built-in composite includes it), as ``dt.Add`` and ``dt.GlobalAvgPool``."""
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
