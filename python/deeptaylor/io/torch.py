"""PyTorch interop (extra ``torch``): :func:`from_torch` and its inverse :func:`to_torch`.

``from_torch`` reads the modules of a ``torch.nn.Sequential`` (nested ones flattened) and builds the
equivalent :class:`~deeptaylor.Sequential` (float32 weights stay float32, biases and everything else
become float64). BatchNorm layers are folded into the preceding
Linear/Conv2d (docs/importing.md gives the maths); Dropout and Identity are dropped (evaluation mode).
Torch is imported only when these functions are called.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, InputError, ShapeError, UnsupportedError
from ..layers import (
    AvgPool2d,
    Conv2d,
    Dense,
    Flatten,
    GlobalSumPool,
    Layer,
    LpPool,
    MaxPool2d,
    ReLU,
    SumPool2d,
)
from ..network import Sequential

__all__ = ["SUPPORTED_MODULES", "from_torch", "to_torch"]

SUPPORTED_MODULES = ("Sequential (nested ones are flattened)", "Linear",
                     "Conv2d (groups=1, padding_mode='zeros')", "ReLU", "MaxPool2d", "AvgPool2d",
                     "AdaptiveAvgPool2d (when its windows are of one size and stride for the input shape)",
                     "Flatten (start_dim=1, end_dim=-1)", "Dropout (dropped)", "Identity (dropped)",
                     "ZeroPad2d/ConstantPad2d (folded into the following Conv2d/AvgPool2d, or MaxPool2d for -inf)",
                     "BatchNorm1d/BatchNorm2d (folded into the preceding Linear/Conv2d)")


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - only without torch
        raise UnsupportedError("PyTorch interop needs torch: pip install 'deeptaylor[torch]'") from exc
    return torch


def _unsupported(path: str, module: Any, why: str = "") -> UnsupportedError:
    reason = f" ({why})" if why else ""
    return UnsupportedError(f"from_torch: module {path!r} of type {type(module).__name__} is not supported{reason}; "
                            f"supported: {', '.join(SUPPORTED_MODULES)}")


# The torch classes from_torch reads, most specific first. A module is read only when its class runs
# the stock forward of the class it derives from: a subclass overriding forward() computes something
# else, which deeptaylor cannot see.
_STOCK = ("Sequential", "Linear", "Conv2d", "ReLU", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "Flatten",
          "Dropout", "Identity", "ZeroPad2d", "ConstantPad2d", "BatchNorm1d", "BatchNorm2d")
# Methods that the stock forward of a class calls and a subclass could override instead of forward().
_HELPERS = {"Conv2d": ("_conv_forward",)}


def _check_stock(path: str, module: Any, nn: Any) -> None:
    """Raise (naming ``path`` and the type) unless ``module``'s class computes its supported base class's forward."""
    for name in _STOCK:
        cls = getattr(nn, name)
        if not isinstance(module, cls):
            continue
        typ = type(module)
        overridden = [m for m in ("forward", *_HELPERS.get(name, ())) if getattr(typ, m) is not getattr(cls, m)]
        if typ.__call__ is not nn.Module.__call__:
            overridden.append("__call__")
        if overridden:
            raise _unsupported(path, module, f"a subclass of nn.{name} that overrides {', '.join(overridden)}(): "
                                             "deeptaylor reads only the stock computation of the supported classes")
        return


def _walk(module: Any, prefix: str, nn: Any) -> list[tuple[str, Any]]:
    """(path, module) of every leaf, nested nn.Sequential flattened in forward order."""
    out = []
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        _check_stock(path, child, nn)
        if isinstance(child, nn.Sequential):
            out.extend(_walk(child, path, nn))
        else:
            out.append((path, child))
    return out


def _array(t: Any) -> np.ndarray:
    """A NumPy copy of a parameter: float32 stays float32 (the layers keep float32 weights, half the
    memory of a float64 copy for a large model), every other dtype becomes float64."""
    t = t.detach().to(device="cpu")
    return (t if t.dtype == _torch().float32 else t.double()).numpy().copy()


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return (int(v[0]), int(v[0]))
        return (int(v[0]), int(v[1]))
    return (int(v), int(v))


def _pool_out(size: int, k: int, s: int, p: int, ceil: bool) -> int:
    num = size + 2 * p - k
    out = (-(-num // s) if ceil else num // s) + 1
    if ceil and (out - 1) * s >= size + p:  # torch: the last window must start inside the input or left pad
        out -= 1
    return out


def _adaptive_window(size: int, out: int) -> tuple[int, int] | None:
    """(kernel, stride) of the fixed pooling that equals torch's adaptive average pooling ``size -> out``
    along one axis, or None. Torch's window ``i`` is ``[floor(i size / out), ceil((i + 1) size / out))``;
    it is a fixed pooling when all windows have one size and consecutive starts one stride apart
    (e.g. 7 -> 3: kernel 3, stride 2; 10 -> 3: kernel 4, stride 3; 8 -> 2: kernel 4, stride 4)."""
    if out < 1 or size < 1:
        return None
    starts = [i * size // out for i in range(out)]
    ends = [-(-(i + 1) * size // out) for i in range(out)]
    kernels = {e - b for b, e in zip(starts, ends, strict=True)}
    strides = {b1 - b0 for b0, b1 in itertools.pairwise(starts)}
    if len(kernels) != 1 or len(strides) > 1:
        return None
    k = kernels.pop()
    s = strides.pop() if strides else k  # a single window: any stride, the kernel's by convention
    if s < 1 or (size - k) // s + 1 != out:  # pragma: no cover - implied by the windows above
        return None
    return k, s


def _input_shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ShapeError(f"from_torch: input_shape must be a tuple of ints, got {input_shape!r}") from None
    if len(shape) in (1, 3):  # per sample
        shape = (1, *shape)
    if len(shape) not in (2, 4) or min(shape) < 1:
        raise ShapeError(f"from_torch: input_shape must be (F,), (C, H, W), (N, F) or (N, C, H, W) with positive "
                         f"sizes, got {input_shape!r}")
    return shape


def _fold_bn(prev: Layer, bn: Any, path: str) -> Layer:
    """Fold an eval-mode BatchNorm ``y = gamma (z - mean) / sqrt(var + eps) + beta`` into ``prev``:
    ``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per channel."""
    if bn.running_mean is None or bn.running_var is None:
        raise _unsupported(path, bn, "track_running_stats=False: no running statistics to fold")
    f64 = np.float64  # the fold is computed in float64 (the folded layer's weights are float64)
    mean, var = _array(bn.running_mean).astype(f64), _array(bn.running_var).astype(f64)
    gamma = _array(bn.weight).astype(f64) if bn.weight is not None else np.ones_like(mean)
    beta = _array(bn.bias).astype(f64) if bn.bias is not None else np.zeros_like(mean)
    eps = float(bn.eps)
    where = f"from_torch: module {path!r} ({type(bn).__name__})"
    for what, v in (("running_mean", mean), ("running_var", var), ("weight", gamma), ("bias", beta)):
        if not np.all(np.isfinite(v)):
            raise InputError(f"{where}: {what} contains NaN or Inf")
    if not np.all(var + eps > 0):
        bad = np.flatnonzero(~(var + eps > 0))
        raise InputError(f"{where}: running_var + eps must be positive to fold the BatchNorm, but it is "
                         f"{(var + eps)[bad[0]]:.6g} for channel {int(bad[0])} ({len(bad)} channel(s) in all)")
    scale = gamma / np.sqrt(var + eps)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported by the layer, with the path
        w = prev.weight.astype(f64) * scale.reshape((-1,) + (1,) * (prev.weight.ndim - 1))  # type: ignore[attr-defined]
        b = (prev.bias - mean) * scale + beta  # type: ignore[attr-defined]
    if isinstance(prev, Dense):
        return _build(path, bn, Dense, w, b)
    assert isinstance(prev, Conv2d)
    return _build(path, bn, Conv2d, w, b, stride=prev.stride, padding=prev.padding, dilation=prev.dilation)


def _build(path: str, module: Any, cls: type, *args: Any, **kwargs: Any) -> Layer:
    """``cls(*args, **kwargs)``; a bad parameter (NaN/Inf weights, ...) is reported with the module's path."""
    try:
        return cls(*args, **kwargs)
    except ShapeError:
        raise
    except DeepTaylorError as exc:
        raise type(exc)(f"from_torch: module {path!r} ({type(module).__name__}): {exc}") from None


def from_torch(module: Any, input_shape: Any = None) -> Sequential:
    """Convert a PyTorch ``nn.Sequential`` into a :class:`~deeptaylor.Sequential` (copies; float32
    weights stay float32, BatchNorm-folded weights and biases are float64).

    Parameters
    ----------
    module : torch.nn.Sequential (or a single supported module)
        Nested ``nn.Sequential`` containers are flattened. The conversion uses evaluation-mode
        semantics (Dropout dropped, BatchNorm with its running statistics) whatever ``module.training``.
    input_shape : tuple of int, optional
        The input shape, per sample (``(F,)``, ``(C, H, W)``) or with the batch (``(N, F)``,
        ``(N, C, H, W)``). Needed to resolve ``AdaptiveAvgPool2d`` and to check that the layers compose;
        when omitted and the first layer is Linear, ``(in_features,)`` is used.

    Returns
    -------
    Sequential
        Whose forward equals ``module.eval()(x)`` up to float rounding.

    Raises
    ------
    UnsupportedError
        For any other module (naming its path, type and what is supported), grouped convolutions,
        non-zero padding modes, dilated/ceil-mode pooling that changes the output size, BatchNorm
        without a preceding Linear/Conv2d, ...
    ShapeError
        If the layers do not compose for ``input_shape``.
    """
    torch = _torch()
    nn = torch.nn
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_torch expects a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
        _check_stock(type(module).__name__, module, nn)
        leaves = _walk(module, "", nn)
    elif len(list(module.children())) == 0:
        leaves = [(type(module).__name__, module)]
        _check_stock(*leaves[0], nn)
    else:
        raise UnsupportedError(
            f"from_torch: {type(module).__name__} is a custom module whose forward() cannot be read; convert "
            "an nn.Sequential (rewrite the model as one, or export it to ONNX and use deeptaylor.load)")
    if input_shape is None:
        first = next((m for _, m in leaves if not isinstance(m, (nn.Dropout, nn.Identity))), None)
        if isinstance(first, nn.Linear):
            input_shape = (first.in_features,)
        else:
            raise ShapeError("from_torch: pass input_shape (e.g. (1, 28, 28)) for a model that does not start "
                             "with a Linear layer")
    shape = _input_shape(input_shape)
    layers: list[Layer] = []
    pending: tuple[str, Any, tuple[int, int, int, int], float] | None = None  # a ZeroPad2d/ConstantPad2d
    last_linear = -1  # index in `layers` of a Linear/Conv2d that a BatchNorm may still be folded into
    for path, m in leaves:
        new: Layer | None = None
        if isinstance(m, (nn.Dropout, nn.Identity)):
            continue
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            if pending is not None:
                raise _unsupported(pending[0], pending[1], "two padding modules in a row")
            left, right, top, bottom = (int(v) for v in m.padding)
            if min(left, right, top, bottom) < 0:
                raise _unsupported(path, m, "negative padding (cropping)")
            pending = (path, m, (top, bottom, left, right), float(getattr(m, "value", 0.0)))
            continue
        extra_pad = (0, 0, 0, 0)
        if pending is not None:
            ppath, pmod, extra_pad, value = pending
            pending = None
            fits = ((value == 0.0 and isinstance(m, (nn.Conv2d, nn.AvgPool2d)))
                    or (value == float("-inf") and isinstance(m, nn.MaxPool2d)))
            if not fits:
                raise _unsupported(ppath, pmod, "padding is supported only right before a Conv2d or AvgPool2d "
                                                "(value 0) or a MaxPool2d (value -inf), where it is folded")
            if isinstance(m, nn.AvgPool2d) and not m.count_include_pad:
                raise _unsupported(ppath, pmod, "padding before an AvgPool2d with count_include_pad=False")
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if last_linear != len(layers) - 1 or last_linear < 0:
                raise _unsupported(path, m, "BatchNorm must directly follow a Linear or Conv2d to be folded")
            prev = layers[-1]
            want = Dense if isinstance(m, nn.BatchNorm1d) else Conv2d
            if not isinstance(prev, want):
                raise _unsupported(path, m, f"{type(m).__name__} follows a {prev.kind}")
            if m.num_features != prev.weight.shape[0]:  # type: ignore[attr-defined]
                raise _unsupported(path, m, f"num_features={m.num_features} but the preceding layer has "
                                            f"{prev.weight.shape[0]} outputs")  # type: ignore[attr-defined]
            layers[-1] = _fold_bn(prev, m, path)
            continue
        if isinstance(m, nn.Linear):
            new = _build(path, m, Dense, _array(m.weight), None if m.bias is None else _array(m.bias))
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1:
                raise _unsupported(path, m, f"groups={m.groups}: grouped/depthwise convolutions are not supported")
            if m.padding_mode != "zeros":
                raise _unsupported(path, m, f"padding_mode={m.padding_mode!r}: only zero padding is supported")
            if isinstance(m, nn.ConvTranspose2d):  # pragma: no cover - not a Conv2d subclass in torch
                raise _unsupported(path, m)
            kh, kw = m.kernel_size
            dh, dw = _pair(m.dilation)
            if m.padding == "same":
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pad: Any = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
            elif m.padding == "valid":
                pad = (0, 0, 0, 0)
            else:
                ph, pw = _pair(m.padding)
                pad = (ph, ph, pw, pw)
            pad = tuple(a + b for a, b in zip(pad, extra_pad, strict=True))
            new = _build(path, m, Conv2d, _array(m.weight), None if m.bias is None else _array(m.bias),
                         stride=_pair(m.stride), padding=pad, dilation=(dh, dw))
        elif isinstance(m, nn.ReLU):
            new = ReLU()
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise _unsupported(path, m, f"start_dim={m.start_dim}, end_dim={m.end_dim}; only (1, -1)")
            new = Flatten()
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k = _pair(m.kernel_size)
            s = k if m.stride is None or m.stride == [] else _pair(m.stride)
            p = _pair(m.padding)
            pads = (p[0] + extra_pad[0], p[0] + extra_pad[1], p[1] + extra_pad[2], p[1] + extra_pad[3])
            if isinstance(m, nn.MaxPool2d):
                if _pair(m.dilation) != (1, 1):
                    raise _unsupported(path, m, f"dilation={m.dilation}")
                if m.return_indices:
                    raise _unsupported(path, m, "return_indices=True")
            else:
                if not m.count_include_pad and max(p) > 0:
                    raise _unsupported(path, m, "count_include_pad=False with padding (deeptaylor's AvgPool2d "
                                                "counts the padding)")
                if m.divisor_override is not None:
                    raise _unsupported(path, m, f"divisor_override={m.divisor_override}")
            if m.ceil_mode:
                if len(shape) != 4:
                    raise _unsupported(path, m, "ceil_mode=True on a non-image input")
                same = all(_pool_out(shape[2 + d] + extra_pad[2 * d] + extra_pad[2 * d + 1], k[d], s[d], p[d], True)
                           == _pool_out(shape[2 + d] + extra_pad[2 * d] + extra_pad[2 * d + 1], k[d], s[d], p[d],
                                        False) for d in range(2))
                if not same:
                    raise _unsupported(path, m, f"ceil_mode=True changes the output size for input {shape[1:]}")
            cls = MaxPool2d if isinstance(m, nn.MaxPool2d) else AvgPool2d
            try:
                new = cls(k, stride=s, padding=pads)
            except ShapeError as exc:
                raise _unsupported(path, m, str(exc)) from None
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if len(shape) != 4:
                raise _unsupported(path, m, f"needs an (N, C, H, W) input, the layer gets {shape}")
            osz = m.output_size if isinstance(m.output_size, (tuple, list)) else (m.output_size, m.output_size)
            ks, ss = [], []
            for d in range(2):
                size = shape[2 + d]
                o = size if osz[d] is None else int(osz[d])
                fixed = _adaptive_window(size, o)
                if fixed is None:
                    raise _unsupported(path, m, f"output size {tuple(osz)} for the input {shape[2:]} gives windows of "
                                                f"different sizes or strides along axis {2 + d} ({size} -> {o}): "
                                                "not a fixed pooling")
                ks.append(fixed[0])
                ss.append(fixed[1])
            new = AvgPool2d(tuple(ks), stride=tuple(ss))
        else:
            raise _unsupported(path, m)
        try:
            shape = new.output_shape(shape)
        except ShapeError as exc:
            raise ShapeError(f"from_torch: module {path!r} ({type(m).__name__}) cannot take input of shape "
                             f"{shape}: {exc}") from None
        layers.append(new)
        if new.linear:
            last_linear = len(layers) - 1
    if pending is not None:
        raise _unsupported(pending[0], pending[1], "padding at the end of the model")
    if not layers:
        raise UnsupportedError("from_torch: the module has no layers deeptaylor can represent")
    return Sequential(layers)


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

