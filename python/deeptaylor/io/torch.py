"""PyTorch interop (extra ``torch``): :func:`from_torch`, its inverse :func:`to_torch`, and the helpers
:func:`as_network` / :func:`as_array` through which :class:`~deeptaylor.Explainer` takes torch objects.

``from_torch`` traces the module with ``torch.fx`` (``symbolic_trace``), runs the traced graph once on
a zero input of ``input_shape`` to learn every intermediate shape, and translates the fx nodes into a
:class:`~deeptaylor.Graph` (``dt.Input`` then one symbolic layer call per node): modules become layers
named by their module path (``"layer3.1.downsample.0"``); functional ops get the path of the module
whose ``forward`` called them plus the op (``"layer1.0.add"``). BatchNorm, Dropout and Identity
become nodes of their own: folding and removing them is the job of :func:`deeptaylor.passes.canonicalize`,
which runs before any backend. docs/importing.md lists every op and what it maps to.

Torch is imported only when these functions are called.
"""

from __future__ import annotations

import inspect
import math
import operator
import re
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import layers as L
from ..errors import DeepTaylorError, InputError, InputTypeError, ShapeError, UnsupportedError
from ..layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalSumPool, LpPool, MaxPool2d, ReLU, SumPool2d
from ..network import Graph, Input, Sequential, Tensor

__all__ = ["SUPPORTED_FUNCTIONS", "SUPPORTED_MODULES", "as_array", "as_network", "from_torch", "to_torch"]

SUPPORTED_MODULES = (
    "Linear", "Conv2d (padding_mode='zeros')", "ConvTranspose2d (padding_mode='zeros')",
    "BatchNorm1d/2d (with running statistics)", "ReLU", "ReLU6", "Hardtanh(0, 6)", "LeakyReLU", "ELU", "GELU",
    "SiLU", "Hardswish", "Hardsigmoid", "Tanh", "Sigmoid", "MaxPool2d (dilation 1)",
    "AvgPool2d (no divisor_override)", "AdaptiveAvgPool2d", "Flatten (start_dim=1)",
    "Dropout/Dropout1d/Dropout2d/AlphaDropout", "Identity", "Upsample/UpsamplingNearest2d (nearest, integer scale)",
    "ChannelShuffle", "ZeroPad2d/ConstantPad2d (folded into the following Conv2d/AvgPool2d, or MaxPool2d for -inf)",
    "containers and custom modules (traced through)")
SUPPORTED_FUNCTIONS = (
    "+ / += / torch.add (two tensors of one shape)", "torch.cat(dim=1)", "x * gate / torch.mul (gates)",
    "torch.flatten(x, 1) / x.flatten(1) / x.view(n, -1) / x.reshape(n, -1)", "x.mean((2, 3))",
    "F.relu and the other activations (and in-place variants), torch.clamp(x, 0[, 6])",
    "F.adaptive_avg_pool2d", "F.max_pool2d", "F.avg_pool2d", ("F.conv2d / F.conv_transpose2d / F.linear / "
    "F.batch_norm with constant weights"), "F.dropout (training=False)", "F.interpolate (nearest, integer scale)",
    "F.pad (constant, folded)", "x.chunk / x.split / x[:, a:b] (channels)", "view-transpose-view (channel shuffle)",
    "torchvision.ops.stochastic_depth (eval)", "x.size() / x.shape / x.dim() / torch._assert (shape arithmetic)")

#: the batch size of the shape-recording run (2, so that the batch axis is told apart from size-1 axes)
_B = 2


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise UnsupportedError("PyTorch interop needs torch: pip install 'deeptaylor[torch]'") from exc
    return torch


def _array(t: Any) -> np.ndarray:
    """A NumPy view of a parameter (the layers copy it): float32 stays float32 (the layers keep float32
    weights, half the memory of a float64 copy for a large model), every other dtype becomes float64."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        return np.array(t, dtype=np.float64)
    t = t.detach().to(device="cpu")
    return (t if t.dtype == torch.float32 else t.double()).resolve_conj().resolve_neg().numpy()


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]), int(v[0]))
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _input_shape(input_shape: Any) -> tuple[int, ...]:
    """The per-sample shape ``(F,)`` or ``(C, H, W)`` from a per-sample or batched shape."""
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ShapeError(f"from_torch: input_shape must be a tuple of ints, got {input_shape!r}") from None
    if len(shape) in (2, 4):  # with the batch
        shape = shape[1:]
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ShapeError(f"from_torch: input_shape must be (F,), (C, H, W), (N, F) or (N, C, H, W) with positive "
                         f"sizes, got {input_shape!r}")
    return shape


_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:/\-\[\]]")


@dataclass
class _Pad:
    """A pending ZeroPad2d / ConstantPad2d / F.pad: folded into the Conv2d / pool that reads it."""

    tensor: Tensor
    pad: tuple[int, int, int, int]  # top, bottom, left, right
    value: float
    where: str


@dataclass
class _Grouped:
    """ShuffleNet's ``x.view(N, g, C // g, H, W)`` (``transposed`` after ``transpose(1, 2)``): becomes a
    ChannelShuffle when viewed back to ``(N, C, H, W)``."""

    tensor: Tensor
    groups: int
    transposed: bool
    where: str


class _Passthrough:
    """Marker: the node is the identity on its (first) input."""


_PASS = _Passthrough()


_OUT_OF_SCOPE_TYPES = ("LayerNorm", "LayerNorm2d", "MultiheadAttention", "TransformerEncoderLayer",
                       "TransformerDecoderLayer", "Transformer", "TransformerEncoder", "VisionTransformer",
                       "SwinTransformer", "MaxVit", "ConvNeXt", "CNBlock", "ShiftedWindowAttention",
                       "ShiftedWindowAttentionV2", "RelativePositionalMultiHeadAttention")


def _check_scope(module: Any) -> None:
    """Transformers and ConvNeXt (LayerNorm, attention, permutes) are out of scope: say so up front,
    before tracing (which may fail on them for unrelated reasons)."""
    for path, m in module.named_modules():
        if type(m).__name__ in _OUT_OF_SCOPE_TYPES or any(
                c.__name__ in ("LayerNorm", "MultiheadAttention") and c.__module__.startswith("torch.nn")
                for c in type(m).__mro__):
            where = f"module {path!r} of type {type(m).__name__}" if path else f"{type(m).__name__}"
            raise UnsupportedError(
                f"from_torch: {where}: LayerNorm and attention, hence transformers (ViT, Swin, MaxViT) and ConvNeXt, are "
                "out of scope for now; deeptaylor imports convolutional networks (the torchvision classification "
                "CNNs: ResNet, VGG, DenseNet, MobileNet, EfficientNet, RegNet, ...)")


def _sig_defaults(fn: Any) -> dict[str, Any] | None:
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return None
    return {p.name: p.default for p in params}


_REQ = object()


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (torch appends the fx graph and a traceback)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else ""


class _Converter:
    """One conversion: the traced module, the shapes/values of its nodes, the symbolic tensors."""

    def __init__(self, torch: Any, module: Any, shape: tuple[int, ...]) -> None:
        self.torch = torch
        self.nn = torch.nn
        self.F = torch.nn.functional
        self.module = module
        self.shape = shape
        self.used: set[str] = set()

    # -- tracing and the shape-recording run ----------------------------------------------------
    def trace(self) -> None:
        torch, fx = self.torch, self.torch.fx
        concrete = {}
        try:
            params = list(inspect.signature(self.module.forward).parameters.values())
        except (TypeError, ValueError):  # pragma: no cover
            params = []
        params = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        for p in params[1:]:
            if p.default is inspect.Parameter.empty:
                raise UnsupportedError(f"from_torch: {type(self.module).__name__}.forward takes several inputs "
                                       f"({', '.join(q.name for q in params)}); deeptaylor explains one input tensor")
            concrete[p.name] = p.default
        try:
            self.gm = fx.symbolic_trace(self.module, concrete_args=concrete or None)
        except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear error
            raise UnsupportedError(
                f"from_torch: torch.fx cannot trace {type(self.module).__name__}.forward ({type(exc).__name__}: "
                f"{exc}); deeptaylor reads a model through torch.fx.symbolic_trace: control flow must not depend "
                "on tensor values (make it depend on constructor flags), or export the model to ONNX and use "
                "deeptaylor.load") from None
        self.graph = self.gm.graph
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:  # pragma: no cover - forward's extra parameters were made concrete
            raise UnsupportedError(f"from_torch: the traced forward has {len(placeholders)} inputs; expected one")
        # dynamic: depends on the input
        self.dynamic: dict[Any, bool] = {}
        for n in self.graph.nodes:
            self.dynamic[n] = n.op == "placeholder" or any(self.dynamic[a] for a in n.all_input_nodes)
        first = next((p for p in list(self.module.parameters()) + list(self.module.buffers())
                      if p.is_floating_point()), None)
        dtype = torch.float32 if first is None else first.dtype
        device = "cpu" if first is None else first.device
        self.info: dict[Any, Any] = {}
        conv = self

        class Recorder(fx.Interpreter):
            def run_node(self, n: Any) -> Any:
                try:
                    result = super().run_node(n)
                except DeepTaylorError:  # pragma: no cover
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise ShapeError(f"from_torch: {conv.where(n)} cannot take its input for input_shape "
                                     f"{conv.shape}: {type(exc).__name__}: {_first_line(exc)}") from None
                conv.info[n] = conv._summary(n, result)
                return result

        x = torch.zeros((_B, *self.shape), dtype=dtype, device=device)
        with torch.no_grad():
            Recorder(self.gm).run(x)

    def _summary(self, n: Any, result: Any) -> Any:
        torch = self.torch
        if not self.dynamic[n]:
            return result
        if isinstance(result, torch.Tensor):
            return ("tensor", tuple(result.shape))
        if isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
            return ("tensors", [tuple(r.shape) for r in result])
        if isinstance(result, torch.Size):
            return ("value", torch.Size(result))
        if isinstance(result, (int, float, bool, str, type(None), tuple, list, torch.dtype, torch.device)):
            return ("value", result)
        return ("other", type(result).__name__)

    # -- names and messages ---------------------------------------------------------------------
    def enclosing(self, n: Any) -> tuple[str, str]:
        """(path, type name) of the module whose forward created node ``n`` ("" at the top)."""
        stack = n.meta.get("nn_module_stack") or {}
        if n.op == "call_module":
            return str(n.target), type(self.gm.get_submodule(n.target)).__name__
        if stack:
            path, cls = list(stack.values())[-1]
            return str(path), getattr(cls, "__name__", str(cls))
        return "", type(self.module).__name__

    def target_name(self, n: Any) -> str:
        t = n.target
        if n.op == "call_method":
            return f"Tensor.{t}"
        if n.op == "call_module":
            return type(self.gm.get_submodule(t)).__name__
        mod = getattr(t, "__module__", None) or ""
        name = getattr(t, "__name__", str(t))
        if name == "fn" and t is getattr(self.F, "max_pool2d", None):
            name = "max_pool2d"
        if mod in ("_operator", "operator"):
            mod = "operator"
        elif mod.startswith("torch.nn.functional") or mod == "torch._C._nn":
            mod = "F"
        elif not mod or mod.startswith("torch"):
            mod = "torch"
        return f"{mod}.{name}"

    def where(self, n: Any) -> str:
        path, cls = self.enclosing(n)
        if n.op == "call_module":
            return f"module {path!r} of type {cls} (fx node {n.name!r})"
        inside = f" in module {path!r} ({cls})" if path else f" in {cls}.forward"
        return f"fx node {n.name!r} ({n.op} {self.target_name(n)}){inside}"

    def name_for(self, n: Any, label: str | None = None) -> str:
        path, _ = self.enclosing(n)
        if n.op == "call_module":
            base = path
        else:
            if label is None:
                label = n.target if n.op == "call_method" else self.target_name(n).split(".")[-1]
            base = f"{path}.{label}" if path else str(label)
        base = _NAME_BAD.sub("_", base) or "node"
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}:{k}"
        self.used.add(name)
        return name

    def unsupported(self, n: Any, why: str, todo: str = "") -> UnsupportedError:
        if not todo:
            if n.op == "call_module":
                todo = f"supported modules: {', '.join(SUPPORTED_MODULES)}"
            else:
                todo = f"supported functions: {'; '.join(SUPPORTED_FUNCTIONS)}"
        return UnsupportedError(f"from_torch: {self.where(n)} is not supported ({why}); {todo} (docs/importing.md)")

    # -- values -------------------------------------------------------------------------------
    def tensor(self, n: Any, v: Any, what: str = "input") -> Tensor:
        """``v`` as a symbolic tensor, or an error naming node ``n``."""
        if isinstance(v, Tensor):
            return v
        if isinstance(v, _Pad):
            raise UnsupportedError(
                f"from_torch: {v.where} (padding by {v.pad} (top, bottom, left, right) with value {v.value}) is "
                f"read by {self.where(n)}: padding is supported only right before a Conv2d/AvgPool2d (value 0) "
                "or a MaxPool2d (value -inf), where it is folded into the layer's padding")
        if isinstance(v, _Grouped):
            raise UnsupportedError(
                f"from_torch: {v.where} reshapes to 5 dimensions (N, {v.groups}, C/{v.groups}, H, W) and "
                f"{self.where(n)} reads it: only the channel shuffle x.view(N, g, C/g, H, W).transpose(1, 2)"
                ".view(N, C, H, W) is supported")
        raise self.unsupported(n, f"its {what} is a constant ({type(v).__name__}), not computed from the model's "
                                  "input", "deeptaylor explains layers applied to the input; fold constants into "
                                  "the weights")

    def rec_shape(self, n: Any) -> tuple[int, ...]:
        kind, shape = self.info[n]
        assert kind == "tensor", (n, kind)
        return shape

    def call(self, n: Any, layer: L.Layer, inputs: list[Any], name: str | None = None) -> Tensor:
        ts = [self.tensor(n, v) for v in inputs]
        name = self.name_for(n) if name is None else name
        try:
            return layer(*ts, name=name)
        except UnsupportedError as exc:
            raise UnsupportedError(f"from_torch: {self.where(n)}: {exc}") from None
        except ShapeError as exc:
            raise UnsupportedError(f"from_torch: {self.where(n)} cannot be represented: {exc}") from None

    def build(self, n: Any, cls: Any, *args: Any, **kwargs: Any) -> L.Layer:
        """``cls(*args, **kwargs)``; a bad parameter is reported with the node / module path."""
        try:
            return cls(*args, **kwargs)
        except InputError as exc:
            raise type(exc)(f"from_torch: {self.where(n)}: {exc}") from None
        except DeepTaylorError as exc:
            raise UnsupportedError(f"from_torch: {self.where(n)}: {exc}") from None

    # -- the walk -------------------------------------------------------------------------------
    def convert(self) -> Graph:
        out_node = next(n for n in self.graph.nodes if n.op == "output")
        needed: set[Any] = set()
        stack = [out_node]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            stack.extend(n.all_input_nodes)
        env: dict[Any, Any] = {}
        x = Input(self.shape)
        fx = self.torch.fx
        for n in self.graph.nodes:
            if n not in needed:
                continue
            if n.op == "placeholder":
                env[n] = x
                continue
            if n.op == "output":
                break
            if not self.dynamic[n]:
                env[n] = self.info[n]
                continue
            kind, rec = self.info[n]
            if kind == "value":  # shape arithmetic on the input: its value at the recording run
                env[n] = rec
                continue
            if kind == "other":
                raise self.unsupported(n, f"it gives a {rec}")
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            v = self.node(n, args, kwargs)
            if v is _PASS:
                v = args[0] if args else next(iter(kwargs.values()))
            env[n] = v
            self.check(n, v)
        result = out_node.args[0]
        if not isinstance(result, fx.Node):
            what = "several tensors" if isinstance(result, (tuple, list, dict)) else type(result).__name__
            raise UnsupportedError(f"from_torch: {type(self.module).__name__}.forward returns {what}, not one "
                                   "tensor; deeptaylor explains one output tensor (wrap the model so that it "
                                   "returns the logits)")
        out = env[result]
        if out is x:
            raise UnsupportedError(f"from_torch: {type(self.module).__name__} computes nothing (its output is its "
                                   "input)")
        if isinstance(out, tuple):
            raise UnsupportedError(f"from_torch: {type(self.module).__name__}.forward returns several tensors; "
                                   "deeptaylor explains one output tensor (wrap the model so that it returns the "
                                   "logits)")
        out = self.tensor(result, out, "output")
        return Graph(x, out)

    def check(self, n: Any, v: Any) -> None:
        """The symbolic shape must equal the recorded one (catches any mistranslation early)."""
        kind, rec = self.info[n]
        if isinstance(v, Tensor):
            got = [(_B, *v.shape)]
            want = [rec] if kind == "tensor" else None
        elif isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v):
            got = [(_B, *t.shape) for t in v]
            want = rec if kind == "tensors" else None
        else:
            return
        if want is None or [tuple(s) for s in want] != got:
            raise ShapeError(f"from_torch: {self.where(n)}: the translated shape {got} differs from torch's "
                             f"{want} (batch {_B}); please report this model")

    # -- node translation -----------------------------------------------------------------------
    def node(self, n: Any, args: tuple, kwargs: dict) -> Any:
        if n.op == "call_module":
            return self.module_node(n, self.gm.get_submodule(n.target), args, kwargs)
        if n.op == "get_attr":  # pragma: no cover - get_attr never depends on the input
            raise self.unsupported(n, "attribute")
        if n.op == "call_method":
            handler = _METHODS.get(n.target)
        else:
            handler = self.functions().get(n.target)
            if handler is None and getattr(n.target, "__name__", "") == "stochastic_depth" and \
                    str(getattr(n.target, "__module__", "")).startswith("torchvision"):
                handler = _stochastic_depth
        if handler is None:
            raise self.unsupported(n, "no deeptaylor equivalent")
        return handler(self, n, args, kwargs)

    _FUNCS: dict[Any, Any] | None = None

    def functions(self) -> dict[Any, Any]:
        if _Converter._FUNCS is None:
            _Converter._FUNCS = _function_table(self.torch)
        return _Converter._FUNCS

    def bind(self, n: Any, args: tuple, kwargs: dict, spec: list[tuple[str, Any]]) -> dict[str, Any]:
        """Arguments by name as in ``spec`` ((name, default) pairs; ``_REQ`` for required)."""
        names = [s[0] for s in spec]
        if len(args) > len(spec):
            raise self.unsupported(n, f"{len(args)} positional arguments")
        out = dict(zip(names, args, strict=False))
        for k, v in kwargs.items():
            if k not in names or k in out:
                raise self.unsupported(n, f"argument {k}={v!r}")
            out[k] = v
        for name, default in spec:
            if name not in out:
                if default is _REQ:
                    raise self.unsupported(n, f"missing argument {name}")
                out[name] = default
        return out

    # -- layers shared by modules and functions ------------------------------------------------
    def pad(self, n: Any, x: Any, pad: tuple[int, int, int, int], value: float) -> _Pad:
        if min(pad) < 0:
            raise self.unsupported(n, f"negative padding {pad} (cropping)")
        if isinstance(x, _Pad) and x.value == value:
            return _Pad(x.tensor, tuple(a + b for a, b in zip(x.pad, pad, strict=True)), value,  # type: ignore[arg-type]
                        f"{x.where} and {self.where(n)}")
        xt = self.tensor(n, x)
        if len(xt.shape) != 3:
            raise self.unsupported(n, f"padding of a rank-{len(xt.shape) + 1} tensor (only H and W of (N, C, H, W))")
        return _Pad(xt, pad, value, self.where(n))

    def unpad(self, n: Any, x: Any, value: float, ok: bool = True) -> tuple[Tensor, tuple[int, int, int, int]]:
        """The tensor under a pending padding of ``value`` (folded into the reader) and the padding."""
        if isinstance(x, _Pad):
            if x.value != value or not ok:
                self.tensor(n, x)  # raises, naming the padding
            return x.tensor, x.pad
        return self.tensor(n, x), (0, 0, 0, 0)

    def conv(self, n: Any, x: Any, weight: Any, bias: Any, stride: Any, padding: Any, dilation: Any, groups: Any,
             padding_mode: str = "zeros") -> Tensor:
        if padding_mode != "zeros":
            raise self.unsupported(n, f"padding_mode={padding_mode!r}", "only zero padding is supported")
        for what, v in (("weight", weight), ("bias", bias)):
            if isinstance(v, (Tensor, _Pad, _Grouped)):
                raise self.unsupported(n, f"its {what} is computed from the input", "weights must be constants")
        xt, extra = self.unpad(n, x, 0.0)
        w = _array(weight)
        if w.ndim != 4:
            raise self.unsupported(n, f"a weight of shape {w.shape} (only 2-D convolutions)")
        kh, kw = w.shape[2:]
        dh, dw = _pair(dilation)
        if isinstance(padding, str):
            if padding == "same":
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pad = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            elif padding == "valid":
                pad = (0, 0, 0, 0)
            else:
                raise self.unsupported(n, f"padding={padding!r}")
        else:
            ph, pw = _pair(padding)
            pad = (ph, ph, pw, pw)
        pad = tuple(a + b for a, b in zip(pad, extra, strict=True))
        layer = self.build(n, L.Conv2d, w, None if bias is None else _array(bias), stride=_pair(stride),
                           padding=pad, dilation=(dh, dw), groups=int(groups))
        return self.call(n, layer, [xt])

    def conv_transpose(self, n: Any, x: Any, weight: Any, bias: Any, stride: Any, padding: Any,
                       output_padding: Any, groups: Any, dilation: Any, padding_mode: str = "zeros") -> Tensor:
        if padding_mode != "zeros":
            raise self.unsupported(n, f"padding_mode={padding_mode!r}", "only zero padding is supported")
        if isinstance(weight, (Tensor, _Pad, _Grouped)) or isinstance(bias, (Tensor, _Pad, _Grouped)):
            raise self.unsupported(n, "its weight is computed from the input", "weights must be constants")
        w = _array(weight)
        if w.ndim != 4:
            raise self.unsupported(n, f"a weight of shape {w.shape} (only 2-D transposed convolutions)")
        ph, pw = _pair(padding)
        layer = self.build(n, L.ConvTranspose2d, w, None if bias is None else _array(bias), stride=_pair(stride),
                           padding=(ph, ph, pw, pw), output_padding=_pair(output_padding), dilation=_pair(dilation),
                           groups=int(groups))
        return self.call(n, layer, [x])

    def linear(self, n: Any, x: Any, weight: Any, bias: Any) -> Tensor:
        if isinstance(weight, (Tensor, _Pad, _Grouped)) or isinstance(bias, (Tensor, _Pad, _Grouped)):
            raise self.unsupported(n, "its weight is computed from the input", "weights must be constants")
        xt = self.tensor(n, x)
        if len(xt.shape) != 1:
            raise self.unsupported(n, f"a Linear on a rank-{len(xt.shape) + 1} input {(_B, *xt.shape)}",
                                   "flatten to (N, features) before it")
        layer = self.build(n, L.Dense, _array(weight), None if bias is None else _array(bias))
        return self.call(n, layer, [xt])

    def batchnorm(self, n: Any, x: Any, mean: Any, var: Any, weight: Any, bias: Any, eps: float) -> Tensor:
        if mean is None or var is None:
            raise self.unsupported(n, "no running statistics (track_running_stats=False): it normalises with the "
                                      "statistics of each batch even in eval mode",
                                   "use a BatchNorm with running statistics")
        xt = self.tensor(n, x)
        f64 = np.float64
        mean, var = _array(mean).astype(f64), _array(var).astype(f64)
        gamma = _array(weight).astype(f64) if weight is not None else np.ones_like(mean)
        beta = _array(bias).astype(f64) if bias is not None else np.zeros_like(mean)
        for what, v in (("running_mean", mean), ("running_var", var), ("weight", gamma), ("bias", beta)):
            if not np.all(np.isfinite(v)):
                raise InputError(f"from_torch: {self.where(n)}: {what} contains NaN or Inf")
        if not np.all(var + eps > 0):
            bad = np.flatnonzero(~(var + eps > 0))
            raise InputError(f"from_torch: {self.where(n)}: running_var + eps must be positive, but it is "
                             f"{(var + eps)[bad[0]]:.6g} for channel {int(bad[0])} ({len(bad)} channel(s) in all)")
        cls = {4: L.BatchNorm2d, 2: L.BatchNorm1d}.get(len(xt.shape) + 1)
        if cls is None:
            raise self.unsupported(n, f"a BatchNorm on a rank-{len(xt.shape) + 1} input")
        return self.call(n, self.build(n, cls, mean, var, gamma, beta, float(eps)), [xt])

    def pool(self, n: Any, x: Any, kind: str, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
             dilation: Any = 1, return_indices: bool = False, count_include_pad: bool = True,
             divisor_override: Any = None) -> Tensor:
        if kind == "max":
            if _pair(dilation) != (1, 1):
                raise self.unsupported(n, f"dilation={dilation}", "only dilation 1 is supported")
            if return_indices:
                raise self.unsupported(n, "return_indices=True")
        elif divisor_override is not None:
            raise self.unsupported(n, f"divisor_override={divisor_override}")
        k = _pair(kernel)
        s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _pair(stride)
        p = _pair(padding)
        pads = (p[0], p[0], p[1], p[1])
        folded = isinstance(x, _Pad)
        if kind == "max":
            xt, extra = self.unpad(n, x, float("-inf"), ok=not ceil_mode)
        else:
            xt, extra = self.unpad(n, x, 0.0, ok=not ceil_mode and (count_include_pad or max(p) == 0))
            if folded:
                count_include_pad = True  # the padded zeros are real inputs for torch; the pool pads nothing
        pads = tuple(a + b for a, b in zip(pads, extra, strict=True))
        if kind == "max":
            layer = self.build(n, L.MaxPool2d, k, stride=s, padding=pads, ceil_mode=bool(ceil_mode))
        else:
            layer = self.build(n, L.AvgPool2d, k, stride=s, padding=pads, ceil_mode=bool(ceil_mode),
                               count_include_pad=bool(count_include_pad))
        return self.call(n, layer, [xt])

    def adaptive(self, n: Any, x: Any, output_size: Any) -> Tensor:
        xt = self.tensor(n, x)
        if len(xt.shape) != 3:
            raise self.unsupported(n, f"needs an (N, C, H, W) input, got {(_B, *xt.shape)}")
        osz = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        size = tuple(xt.shape[1 + d] if osz[d] is None else int(osz[d]) for d in range(2))
        return self.call(n, self.build(n, L.AdaptiveAvgPool2d, size), [xt])

    def flatten(self, n: Any, x: Any, start: int, end: int) -> Tensor:
        xt = self.tensor(n, x)
        r = len(xt.shape) + 1
        if start % r != 1 or end % r != r - 1:
            raise self.unsupported(n, f"flatten(start_dim={start}, end_dim={end}) of a rank-{r} tensor",
                                   "only flattening to (N, features), start_dim=1, end_dim=-1, is supported")
        return self.call(n, L.Flatten(), [xt])

    def upsample(self, n: Any, x: Any, mode: str) -> Tensor:
        if mode not in ("nearest", "nearest-exact"):
            raise self.unsupported(n, f"mode={mode!r}", "only nearest-neighbour upsampling by integer factors")
        xt = self.tensor(n, x)
        out = self.rec_shape(n)
        if len(out) != 4 or len(xt.shape) != 3 or out[2] % xt.shape[1] or out[3] % xt.shape[2]:
            raise self.unsupported(n, f"a resize from {(_B, *xt.shape)} to {out}",
                                   "only nearest-neighbour upsampling by integer factors")
        return self.call(n, L.Upsample((out[2] // xt.shape[1], out[3] // xt.shape[2])), [xt])

    def dropout(self, n: Any, x: Any, p: float, training: bool) -> Tensor:
        if training:
            raise self.unsupported(n, "dropout active in eval mode (training=True: Monte-Carlo dropout)",
                                   "pass training=self.training so that eval mode is the identity")
        return self.call(n, self.build(n, L.Dropout, float(p)), [x])

    # -- modules ----------------------------------------------------------------------------------
    def module_node(self, n: Any, m: Any, args: tuple, kwargs: dict) -> Any:
        nn = self.nn
        if len(args) != 1 or kwargs:
            raise self.unsupported(n, f"called with {len(args)} positional and {len(kwargs)} keyword arguments",
                                   "modules must be called on one tensor")
        x = args[0]
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            left, right, top, bottom = (int(v) for v in m.padding)
            return self.pad(n, x, (top, bottom, left, right), float(getattr(m, "value", 0.0)))
        if isinstance(m, nn.Conv2d):
            return self.conv(n, x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)
        if isinstance(m, nn.ConvTranspose2d):
            return self.conv_transpose(n, x, m.weight, m.bias, m.stride, m.padding, m.output_padding, m.groups,
                                       m.dilation, m.padding_mode)
        if isinstance(m, nn.Linear):
            return self.linear(n, x, m.weight, m.bias)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.batchnorm(n, x, m.running_mean, m.running_var, m.weight, m.bias, m.eps)
        act = self.module_activation(n, m)
        if act is not None:
            return self.call(n, act, [x])
        if isinstance(m, nn.MaxPool2d):
            return self.pool(n, x, "max", m.kernel_size, m.stride, m.padding, m.ceil_mode, m.dilation,
                             m.return_indices)
        if isinstance(m, nn.AvgPool2d):
            return self.pool(n, x, "avg", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                             count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return self.adaptive(n, x, m.output_size)
        if isinstance(m, nn.Flatten):
            return self.flatten(n, x, m.start_dim, m.end_dim)
        if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)):
            return self.call(n, self.build(n, L.Dropout, float(m.p)), [x])
        if isinstance(m, nn.Identity):
            return self.call(n, L.Identity(), [x])
        if isinstance(m, nn.Upsample):
            return self.upsample(n, x, m.mode)
        if isinstance(m, nn.ChannelShuffle):
            return self.call(n, self.build(n, L.ChannelShuffle, int(m.groups)), [x])
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            raise self.unsupported(n, "a softmax", "remove it: relevance starts from the logits (the scores "
                                                   "before the softmax)")
        raise self.unsupported(n, "no deeptaylor equivalent")

    def module_activation(self, n: Any, m: Any) -> L.Layer | None:
        nn = self.nn
        if isinstance(m, nn.ReLU):
            return L.ReLU()
        if isinstance(m, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            return self.hardtanh(n, m.min_val, m.max_val)
        simple = {nn.LeakyReLU: lambda: L.LeakyReLU(m.negative_slope), nn.ELU: lambda: L.ELU(m.alpha),
                  nn.GELU: lambda: L.GELU(m.approximate), nn.SiLU: L.SiLU, nn.Hardswish: L.Hardswish,
                  nn.Hardsigmoid: L.Hardsigmoid, nn.Tanh: L.Tanh, nn.Sigmoid: L.Sigmoid}
        for cls, make in simple.items():
            if isinstance(m, cls):
                return self.build(n, make)
        return None

    def hardtanh(self, n: Any, lo: Any, hi: Any) -> L.Layer:
        if lo == 0 and hi == 6:
            return L.ReLU6()
        if lo == 0 and hi is None:
            return L.ReLU()
        raise self.unsupported(n, f"clamping to [{lo}, {hi}]", "only [0, 6] (ReLU6) and [0, inf) (ReLU)")


# ------------------------------------------------------------------------- functions and methods
# Each handler takes (converter, fx node, args, kwargs) with the node's arguments already translated:
# symbolic tensors for values computed from the input, concrete values for everything else.

def _is_dyn(v: Any) -> bool:
    return isinstance(v, (Tensor, _Pad, _Grouped))


def _add(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("other", _REQ), ("alpha", 1)])
    a, o = b["input"], b["other"]
    if b["alpha"] != 1:
        raise c.unsupported(n, f"alpha={b['alpha']}")
    if _is_dyn(a) and _is_dyn(o):
        return c.call(n, L.Add(), [a, o], c.name_for(n, "add"))
    dyn, const = (a, o) if _is_dyn(a) else (o, a)
    if isinstance(const, (int, float)) and const == 0:
        return c.tensor(n, dyn)
    raise c.unsupported(n, f"it adds a constant ({type(const).__name__})",
                        "deeptaylor adds computed tensors only (residuals); fold constants into a bias")


def _mul(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("other", _REQ)])
    a, o = b["input"], b["other"]
    if _is_dyn(a) and _is_dyn(o):
        return c.call(n, L.Mul(), [a, o], c.name_for(n, "mul"))
    dyn, const = (a, o) if _is_dyn(a) else (o, a)
    if isinstance(const, (int, float)) and const == 1:
        return c.tensor(n, dyn)
    raise c.unsupported(n, f"it multiplies by a constant ({const!r})" if isinstance(const, (int, float)) else
                        f"it multiplies by a constant {type(const).__name__}",
                        "deeptaylor multiplies a signal by a computed gate only (squeeze-excitation); fold "
                        "constant factors into the weights")


def _cat(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    kwargs = dict(kwargs)
    if "axis" in kwargs:
        kwargs["dim"] = kwargs.pop("axis")
    b = c.bind(n, args, kwargs, [("tensors", _REQ), ("dim", 0)])
    ts = [c.tensor(n, t) for t in b["tensors"]]
    r = len(ts[0].shape) + 1
    if int(b["dim"]) % r != 1:
        raise c.unsupported(n, f"concatenation along dim {b['dim']} of rank-{r} tensors",
                            "only dim=1 (channels / features) is supported")
    if len(ts) == 1:
        return ts[0]
    return c.call(n, L.Concat(1), ts, c.name_for(n, "cat"))


def _flatten(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("start_dim", 0), ("end_dim", -1)])
    return c.flatten(n, b["input"], int(b["start_dim"]), int(b["end_dim"]))


def _reshape(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    """view / reshape / squeeze / unsqueeze, judged by the recorded shapes."""
    x = args[0] if args else next(iter(kwargs.values()))
    out = c.rec_shape(n)
    if isinstance(x, _Grouped):
        if x.transposed and out == (_B, *x.tensor.shape):
            return c.call(n, L.ChannelShuffle(x.groups), [x.tensor], c.name_for(n, "channel_shuffle"))
        c.tensor(n, x)  # raises
    xt = c.tensor(n, x)
    ins = (_B, *xt.shape)
    if out == ins:
        return xt
    if len(ins) == 4 and len(out) == 5 and out[0] == _B and out[1] * out[2] == ins[1] and out[3:] == ins[2:] \
            and n.target in ("view", "reshape", torch_reshape_target(c)):
        return _Grouped(xt, int(out[1]), False, c.where(n))
    if out == (_B, math.prod(ins[1:])):
        if len(ins) == 2:
            return xt
        return c.call(n, L.Flatten(), [xt], c.name_for(n, "flatten"))
    raise c.unsupported(n, f"it reshapes (N, {', '.join(map(str, ins[1:]))}) to {out} (batch {_B})",
                        "only flattening to (N, features) and ShuffleNet's channel shuffle are supported")


def torch_reshape_target(c: _Converter) -> Any:
    return c.torch.reshape


def _transpose(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("dim0", _REQ), ("dim1", _REQ)])
    x = b["input"]
    if isinstance(x, _Grouped) and {int(b["dim0"]) % 5, int(b["dim1"]) % 5} == {1, 2}:
        return _Grouped(x.tensor, x.groups, not x.transposed, x.where)
    raise c.unsupported(n, "a transpose", "only ShuffleNet's channel shuffle, x.view(N, g, C/g, H, W).transpose(1, 2)"
                                          ".view(N, C, H, W), is supported")


def _same(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    return args[0]  # contiguous(), clone(): the identity (a _Grouped stays pending)


def _mean(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("dim", None), ("keepdim", False), ("dtype", None)])
    xt = c.tensor(n, b["input"])
    dims = b["dim"]
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    if len(xt.shape) != 3 or {int(d) % 4 for d in dims} != {2, 3} or b["dtype"] is not None:
        raise c.unsupported(n, f"a mean over dims {b['dim']} of {(_B, *xt.shape)}",
                            "only the spatial mean x.mean((2, 3)) of (N, C, H, W) is supported")
    if b["keepdim"]:
        return c.call(n, L.AdaptiveAvgPool2d(1), [xt], c.name_for(n, "mean"))
    return c.call(n, L.GlobalAvgPool(), [xt], c.name_for(n, "mean"))


def _pieces(c: _Converter, n: Any, x: Any, dim: int, label: str) -> Any:
    xt = c.tensor(n, x)
    kind, shapes = c.info[n]
    r = len(xt.shape) + 1
    if int(dim) % r != 1 or kind != "tensors":
        raise c.unsupported(n, f"a split along dim {dim}", "only splits along dim=1 (channels) are supported")
    base = c.name_for(n, label)
    out, start = [], 0
    for k, s in enumerate(shapes):
        stop = start + int(s[1])
        if start == 0 and stop == xt.shape[0]:
            out.append(xt)
        else:
            out.append(c.call(n, L.Slice(start, stop), [xt], f"{base}[{k}]"))
        start = stop
    return tuple(out)


def _chunk(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("chunks", _REQ), ("dim", 0)])
    return _pieces(c, n, b["input"], b["dim"], "chunk")


def _split(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    kwargs = dict(kwargs)
    for k in ("split_size", "split_size_or_sections"):
        if k in kwargs:
            kwargs["size"] = kwargs.pop(k)
    if "tensor" in kwargs:
        kwargs["input"] = kwargs.pop("tensor")
    b = c.bind(n, args, kwargs, [("input", _REQ), ("size", _REQ), ("dim", 0)])
    return _pieces(c, n, b["input"], b["dim"], "split")


def _getitem(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    a, idx = args
    if isinstance(a, tuple):
        return a[idx]
    xt = c.tensor(n, a)
    idx = idx if isinstance(idx, tuple) else (idx,)
    rest = idx[2:]
    if len(idx) >= 2 and idx[0] == slice(None) and isinstance(idx[1], slice) and \
            all(i is Ellipsis or i == slice(None) for i in rest):
        start, stop, step = idx[1].indices(xt.shape[0])
        if step == 1 and stop > start:
            if start == 0 and stop == xt.shape[0]:
                return xt
            return c.call(n, L.Slice(start, stop), [xt], c.name_for(n, "slice"))
    raise c.unsupported(n, f"indexing with {idx!r}", "only channel slices x[:, a:b] are supported")


def _activation(make: Any, spec: list[tuple[str, Any]], label: str) -> Any:
    def handler(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
        b = c.bind(n, args, kwargs, [("input", _REQ), *spec])
        layer = make(c, n, b)
        return c.call(n, layer, [b["input"]], c.name_for(n, label))
    return handler


_INPLACE = [("inplace", False)]
_relu = _activation(lambda c, n, b: L.ReLU(), _INPLACE, "relu")
_relu6 = _activation(lambda c, n, b: L.ReLU6(), _INPLACE, "relu6")
_hardtanh = _activation(lambda c, n, b: c.hardtanh(n, b["min_val"], b["max_val"]),
                        [("min_val", -1.0), ("max_val", 1.0), *_INPLACE], "hardtanh")
_clamp = _activation(lambda c, n, b: c.hardtanh(n, b["min"], b["max"]), [("min", None), ("max", None)], "clamp")
_leaky = _activation(lambda c, n, b: c.build(n, L.LeakyReLU, b["negative_slope"]),
                     [("negative_slope", 0.01), *_INPLACE], "leaky_relu")
_elu = _activation(lambda c, n, b: c.build(n, L.ELU, b["alpha"]), [("alpha", 1.0), *_INPLACE], "elu")
_gelu = _activation(lambda c, n, b: c.build(n, L.GELU, b["approximate"]), [("approximate", "none")], "gelu")
_silu = _activation(lambda c, n, b: L.SiLU(), _INPLACE, "silu")
_hardswish = _activation(lambda c, n, b: L.Hardswish(), _INPLACE, "hardswish")
_hardsigmoid = _activation(lambda c, n, b: L.Hardsigmoid(), _INPLACE, "hardsigmoid")
_sigmoid = _activation(lambda c, n, b: L.Sigmoid(), [], "sigmoid")
_tanh = _activation(lambda c, n, b: L.Tanh(), [], "tanh")


def _f_conv2d(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("weight", _REQ), ("bias", None), ("stride", 1), ("padding", 0),
                                 ("dilation", 1), ("groups", 1)])
    return c.conv(n, b["input"], b["weight"], b["bias"], b["stride"], b["padding"], b["dilation"], b["groups"])


def _f_conv_transpose2d(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("weight", _REQ), ("bias", None), ("stride", 1), ("padding", 0),
                                 ("output_padding", 0), ("groups", 1), ("dilation", 1)])
    return c.conv_transpose(n, b["input"], b["weight"], b["bias"], b["stride"], b["padding"], b["output_padding"],
                            b["groups"], b["dilation"])


def _f_linear(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("weight", _REQ), ("bias", None)])
    return c.linear(n, b["input"], b["weight"], b["bias"])


def _f_batch_norm(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("running_mean", _REQ), ("running_var", _REQ), ("weight", None),
                                 ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5)])
    if b["training"]:
        raise c.unsupported(n, "training=True: batch statistics", "use training=False (running statistics)")
    return c.batchnorm(n, b["input"], b["running_mean"], b["running_var"], b["weight"], b["bias"], float(b["eps"]))


def _f_max_pool2d(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("kernel_size", _REQ), ("stride", None), ("padding", 0),
                                 ("dilation", 1), ("ceil_mode", False), ("return_indices", False)])
    return c.pool(n, b["input"], "max", b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"], b["dilation"],
                  b["return_indices"])


def _f_avg_pool2d(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("kernel_size", _REQ), ("stride", None), ("padding", 0),
                                 ("ceil_mode", False), ("count_include_pad", True), ("divisor_override", None)])
    return c.pool(n, b["input"], "avg", b["kernel_size"], b["stride"], b["padding"], b["ceil_mode"],
                  count_include_pad=b["count_include_pad"], divisor_override=b["divisor_override"])


def _f_adaptive_avg_pool2d(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("output_size", _REQ)])
    return c.adaptive(n, b["input"], b["output_size"])


def _f_dropout(default_training: bool) -> Any:
    def handler(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
        kw = dict(kwargs)
        if "train" in kw:
            kw["training"] = kw.pop("train")
        b = c.bind(n, args, kw, [("input", _REQ), ("p", 0.5), ("training", default_training), *_INPLACE])
        return c.dropout(n, b["input"], b["p"], b["training"])
    return handler


def _f_interpolate(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("size", None), ("scale_factor", None), ("mode", "nearest"),
                                 ("align_corners", None), ("recompute_scale_factor", None), ("antialias", False)])
    return c.upsample(n, b["input"], b["mode"])


def _f_pad(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("pad", _REQ), ("mode", "constant"), ("value", None)])
    p = [int(v) for v in b["pad"]]
    if b["mode"] != "constant" or len(p) not in (2, 4):
        raise c.unsupported(n, f"mode={b['mode']!r}, pad={tuple(p)}", "only constant padding of H and W")
    left, right, top, bottom = (p + [0, 0])[:4]
    return c.pad(n, b["input"], (top, bottom, left, right), 0.0 if b["value"] is None else float(b["value"]))


def _f_channel_shuffle(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("groups", _REQ)])
    return c.call(n, c.build(n, L.ChannelShuffle, int(b["groups"])), [b["input"]], c.name_for(n, "channel_shuffle"))


def _stochastic_depth(c: _Converter, n: Any, args: tuple, kwargs: dict) -> Any:
    b = c.bind(n, args, kwargs, [("input", _REQ), ("p", _REQ), ("mode", _REQ), ("training", True)])
    if b["training"] and b["p"] > 0:
        raise c.unsupported(n, "stochastic depth with training=True", "call it with training=self.training")
    return c.tensor(n, b["input"])


def _function_table(torch: Any) -> dict[Any, Any]:
    F = torch.nn.functional
    t: dict[Any, Any] = {}

    def put(handler: Any, *fns: Any) -> None:
        for f in fns:
            if f is not None:
                t[f] = handler

    g = lambda name: getattr(torch, name, None)
    put(_add, operator.add, operator.iadd, torch.add)
    put(_mul, operator.mul, operator.imul, torch.mul, g("multiply"))
    put(_cat, torch.cat, g("concat"), g("concatenate"))
    put(_flatten, torch.flatten)
    put(_reshape, torch.reshape, torch.squeeze, torch.unsqueeze)
    put(_transpose, torch.transpose, g("swapaxes"))
    put(_mean, torch.mean)
    put(_chunk, torch.chunk)
    put(_split, torch.split)
    put(_getitem, operator.getitem)
    put(_relu, F.relu, torch.relu, F.relu_, torch.relu_)
    put(_relu6, F.relu6)
    put(_hardtanh, F.hardtanh, F.hardtanh_)
    put(_clamp, torch.clamp, torch.clip, g("clamp_"))
    put(_leaky, F.leaky_relu, F.leaky_relu_)
    put(_elu, F.elu, F.elu_)
    put(_gelu, F.gelu)
    put(_silu, F.silu)
    put(_hardswish, F.hardswish)
    put(_hardsigmoid, F.hardsigmoid)
    put(_sigmoid, torch.sigmoid, F.sigmoid)
    put(_tanh, torch.tanh, F.tanh)
    put(_f_conv2d, F.conv2d)
    put(_f_conv_transpose2d, F.conv_transpose2d)
    put(_f_linear, F.linear)
    put(_f_batch_norm, F.batch_norm)
    put(_f_max_pool2d, F.max_pool2d, g("max_pool2d"))
    put(_f_avg_pool2d, F.avg_pool2d)
    put(_f_adaptive_avg_pool2d, F.adaptive_avg_pool2d, g("adaptive_avg_pool2d"))
    put(_f_dropout(True), F.dropout, F.dropout1d, F.dropout2d, g("dropout"))
    put(_f_dropout(False), F.alpha_dropout, F.feature_alpha_dropout)
    put(_f_interpolate, F.interpolate)
    put(_f_pad, F.pad)
    put(_f_channel_shuffle, getattr(F, "channel_shuffle", None), g("channel_shuffle"), g("native_channel_shuffle"))
    return t


_METHODS: dict[str, Any] = {
    **dict.fromkeys(("add", "add_", "__add__", "__iadd__", "__radd__"), _add),
    **dict.fromkeys(("mul", "mul_", "__mul__", "__imul__", "__rmul__", "multiply"), _mul),
    "flatten": _flatten,
    **dict.fromkeys(("view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as"), _reshape),
    **dict.fromkeys(("transpose", "swapaxes"), _transpose),
    **dict.fromkeys(("contiguous", "clone"), _same),
    "mean": _mean,
    "chunk": _chunk,
    "split": _split,
    **dict.fromkeys(("relu", "relu_"), _relu),
    **dict.fromkeys(("sigmoid", "sigmoid_"), _sigmoid),
    **dict.fromkeys(("tanh", "tanh_"), _tanh),
    **dict.fromkeys(("clamp", "clamp_", "clip", "clip_"), _clamp),
}


# ------------------------------------------------------------------------------------- public API

def from_torch(module: Any, input_shape: Any = None) -> Graph:
    """Convert a PyTorch module into a deeptaylor network (copies of the weights; float32 weights stay
    float32, everything else becomes float64).

    The module is traced with ``torch.fx.symbolic_trace`` and run once on a zero input of
    ``input_shape`` (batch 2) to learn the shape of every intermediate tensor; each fx node becomes a
    node of a :class:`~deeptaylor.Graph` (docs/importing.md lists what each torch module, function and
    method maps to). Modules are named by their path (``"layer3.1.downsample.0"``); functional ops by
    the path of the module whose ``forward`` calls them and the op (``"layer1.0.add"``); a module called
    twice, or a second op of one kind in one ``forward``, gets ``":1"``, ``":2"``... appended.
    BatchNorm, Dropout and Identity become nodes (:func:`deeptaylor.passes.canonicalize` folds and
    removes them before any backend runs). The conversion uses evaluation-mode semantics (running
    BatchNorm statistics, no dropout) whatever ``module.training``; the module's training flags are
    restored afterwards, and nothing else of it changes.

    Parameters
    ----------
    module : torch.nn.Module
        Any module that ``torch.fx`` traces (its control flow must not depend on tensor values) whose
        ops are all supported: the torchvision classification CNNs, ``nn.Sequential`` stacks, custom
        residual / concatenating / gated models. Extra ``forward`` parameters with defaults keep them.
    input_shape : tuple of int, optional
        The input shape, per sample (``(F,)``, ``(C, H, W)``) or with a batch (``(N, F)``,
        ``(N, C, H, W)``; the batch is dropped). When omitted and the module's first leaf is a
        ``Linear``, ``(in_features,)`` is used.

    Returns
    -------
    Graph
        With ``input_shape`` as its declared input shape; a :class:`~deeptaylor.Sequential` (nodes
        named ``"0"``, ``"1"``, ...) when ``module`` is an ``nn.Sequential`` that computes a chain. Its
        forward equals ``module.eval()(x)`` up to float rounding.

    Raises
    ------
    UnsupportedError
        For the first op deeptaylor cannot represent: the message names the fx node, its op or module
        type, the module path and what to do instead. Transformers and ConvNeXt (LayerNorm, attention)
        are refused up front as out of scope. A ``forward`` that ``torch.fx`` cannot trace is refused
        with the tracer's reason.
    ShapeError
        If the module cannot take ``input_shape`` (naming the module that fails) or ``input_shape`` is
        malformed or missing.
    InputError
        For NaN/Inf weights or BatchNorm statistics (naming the module).
    InputTypeError
        If ``module`` is not a ``torch.nn.Module``.
    """
    torch = _torch()
    nn = torch.nn
    if not isinstance(module, nn.Module):
        raise InputTypeError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    _check_scope(module)
    if input_shape is None:
        first = next((m for m in module.modules() if not list(m.children())
                      and not isinstance(m, (nn.Dropout, nn.Identity, nn.Flatten))), None)
        if isinstance(first, nn.Linear):
            input_shape = (first.in_features,)
        else:
            raise ShapeError("from_torch: pass input_shape (e.g. (3, 224, 224)) for a model that does not start "
                             "with a Linear layer")
    shape = _input_shape(input_shape)
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        conv = _Converter(torch, module, shape)
        conv.trace()
        net = conv.convert()
    finally:
        for m, flag in flags:
            m.training = flag
    if isinstance(module, nn.Sequential) and net.is_chain:
        return Sequential(net.layers)
    return net


def as_network(obj: Any, input_shape: Any = None) -> Graph:
    """The deeptaylor network for ``obj``, as :class:`~deeptaylor.Explainer` takes it.

    Parameters
    ----------
    obj : Graph, Sequential or torch.nn.Module
        A deeptaylor network is returned as is; a torch module is converted once with
        :func:`from_torch` (``input_shape`` as there).
    input_shape : tuple of int, optional
        Per sample (``(C, H, W)``, ``(F,)``) or with a batch. For a deeptaylor network it is only
        checked: it must equal the network's declared input shape, or (a Sequential, which declares
        none) be one its layers take.

    Raises
    ------
    InputTypeError
        For any other object (naming its type and what is accepted).
    ShapeError
        As :func:`from_torch`, or when ``input_shape`` does not fit a deeptaylor network.
    """
    if isinstance(obj, Graph):
        if input_shape is not None:
            shape = _input_shape(input_shape)
            if obj.input_shape and tuple(obj.input_shape) != shape:
                raise ShapeError(f"input_shape {shape} differs from the network's declared input shape "
                                 f"{tuple(obj.input_shape)}")
            obj.shapes((1, *shape))
        return obj
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return from_torch(obj, input_shape)
    raise InputTypeError(f"expected a deeptaylor network (dt.Graph, dt.Sequential) or a torch.nn.Module, got "
                         f"{type(obj).__module__}.{type(obj).__qualname__}")


def as_array(x: Any) -> Any:
    """``x`` as the explainer takes it: a CPU ``torch.Tensor`` becomes a NumPy array (its values, no
    copy where torch allows; float32 stays float32, float64 float64, ``requires_grad`` ignored); NumPy
    arrays, lists and numbers are returned unchanged (the explainer validates them).

    Raises
    ------
    InputTypeError
        For a tensor on another device (move it with ``x.cpu()``), a sparse or quantized tensor, a
        bfloat16 tensor (NumPy has no bfloat16: convert with ``x.float()``), or any other object (naming
        its type and what is accepted).
    """
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return x
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise InputTypeError(f"x is a torch tensor on device {x.device}; explain takes CPU tensors (x.cpu())")
        if x.layout != torch.strided or x.is_quantized:
            raise InputTypeError(f"x is a {x.layout} / quantized torch tensor; pass a dense tensor (x.to_dense())")
        if x.dtype == torch.bfloat16:
            raise InputTypeError("x is a bfloat16 torch tensor, which NumPy cannot hold; convert it (x.float())")
        return x.detach().resolve_conj().resolve_neg().numpy()
    raise InputTypeError(f"x must be a NumPy array (or array-like) or a CPU torch.Tensor, got "
                         f"{type(x).__module__}.{type(x).__qualname__}")

# ---------------------------------------------------------------------------------------------- to_torch

_MODULES: dict[str, Any] = {}


def _extra_modules(torch: Any) -> dict[str, Any]:
    """Small torch modules for the layers torch lacks (defined once, on first use)."""
    if _MODULES:
        return _MODULES
    nn = torch.nn

    class SumPool2d(nn.Module):
        """Sum pooling: average pooling (padding counted) times the window size."""

        def __init__(self, kernel_size: tuple[int, int], stride: tuple[int, int]) -> None:
            super().__init__()
            self.pool = nn.AvgPool2d(kernel_size, stride=stride, padding=0, count_include_pad=True)
            self.k = kernel_size[0] * kernel_size[1]

        def forward(self, x: Any) -> Any:
            return self.pool(x) * self.k

    class GlobalSumPool(nn.Module):
        """``(N, ...) -> (N, 1)``: the sum over all non-batch dimensions."""

        def forward(self, x: Any) -> Any:
            return x.flatten(1).sum(dim=1, keepdim=True)

    class LpPool(nn.Module):
        """p-norm pooling ``(sum |x|^p)^(1/p)``, global (kernel_size None) or over windows."""

        def __init__(self, p: float, kernel_size: Any, stride: Any) -> None:
            super().__init__()
            self.p, self.kernel_size, self.stride = p, kernel_size, stride

        def forward(self, x: Any) -> Any:
            xp = x.abs() ** self.p
            if self.kernel_size is None:
                s = xp.flatten(1).sum(dim=1, keepdim=True)
            else:
                k = self.kernel_size[0] * self.kernel_size[1]
                s = torch.nn.functional.avg_pool2d(xp, self.kernel_size, self.stride) * k
            return s ** (1.0 / self.p)

    _MODULES.update(SumPool2d=SumPool2d, GlobalSumPool=GlobalSumPool, LpPool=LpPool)
    return _MODULES


def to_torch(net: Sequential, dtype: Any = None) -> Any:
    """Convert a :class:`~deeptaylor.Sequential` into a ``torch.nn.Sequential`` with the same weights.

    Dense -> Linear, Conv2d -> Conv2d (asymmetric padding as a ``ZeroPad2d`` before it), ReLU, Flatten,
    MaxPool2d / AvgPool2d (asymmetric padding as a ``-inf`` / zero ``ConstantPad2d`` before them),
    SumPool2d / GlobalSumPool / LpPool as small modules. ``dtype`` defaults to ``torch.float32``.
    The result is in evaluation mode; its forward equals ``net.forward`` up to float rounding.
    """
    torch = _torch()
    nn = torch.nn
    if not isinstance(net, Sequential):
        raise TypeError(f"to_torch expects a deeptaylor.Sequential, got {type(net).__name__}")
    dtype = torch.float32 if dtype is None else dtype
    extra = _extra_modules(torch)
    mods: list[Any] = []

    def sym(p: tuple[int, int, int, int]) -> tuple[int, int] | None:
        return (p[0], p[2]) if p[0] == p[1] and p[2] == p[3] else None

    def pad(p: tuple[int, int, int, int], value: float) -> Any:
        return nn.ConstantPad2d((p[2], p[3], p[0], p[1]), value)  # torch order: left, right, top, bottom

    for layer in net:
        if isinstance(layer, Dense):
            m = nn.Linear(layer.in_features, layer.out_features, dtype=dtype)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.weight.copy()))
                m.bias.copy_(torch.from_numpy(layer.bias.copy()))
            mods.append(m)
        elif isinstance(layer, Conv2d):
            p = sym(layer.padding)
            if p is None:
                mods.append(pad(layer.padding, 0.0))
                p = (0, 0)
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                          padding=p, dilation=layer.dilation, dtype=dtype)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(layer.weight.copy()))
                m.bias.copy_(torch.from_numpy(layer.bias.copy()))
            mods.append(m)
        elif isinstance(layer, ReLU):
            mods.append(nn.ReLU())
        elif isinstance(layer, Flatten):
            mods.append(nn.Flatten())
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            p = sym(layer.padding)
            if p is None:
                mods.append(pad(layer.padding, float("-inf") if isinstance(layer, MaxPool2d) else 0.0))
                p = (0, 0)
            if isinstance(layer, MaxPool2d):
                mods.append(nn.MaxPool2d(layer.kernel_size, stride=layer.stride, padding=p))
            else:
                mods.append(nn.AvgPool2d(layer.kernel_size, stride=layer.stride, padding=p, count_include_pad=True))
        elif isinstance(layer, SumPool2d):
            if any(layer.padding):
                mods.append(pad(layer.padding, 0.0))
            mods.append(extra["SumPool2d"](layer.kernel_size, layer.stride))
        elif isinstance(layer, GlobalSumPool):
            mods.append(extra["GlobalSumPool"]())
        elif isinstance(layer, LpPool):
            mods.append(extra["LpPool"](layer.p, layer.kernel_size, layer.stride))
        else:  # pragma: no cover - every layer type is handled above
            raise UnsupportedError(f"to_torch: no torch equivalent for {layer.kind}")
    return nn.Sequential(*mods).to(dtype).eval()

