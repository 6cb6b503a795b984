"""Layers of a deeptaylor network.

Layers are small immutable descriptions: parameters (read-only copies: weights given as float32 stay
float32, which halves the memory of large imported models; everything else becomes float64) and
hyper-parameters.
They compute nothing themselves; the backends (``deeptaylor.reference`` for NumPy, the C++ core)
implement their forward and relevance passes.

Conventions (as PyTorch):

* inputs are ``(N, features)`` or ``(N, C, H, W)``; ``N`` is the batch;
* :class:`Dense` weights are ``(out_features, in_features)``;
* :class:`Conv2d` weights are ``(out_channels, in_channels, kh, kw)``;
* padding is zero padding for convolution, sum and average pooling, ``-inf`` for max pooling.

Every layer's :meth:`Layer.output_shape` takes a full input shape *including the batch dimension*.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, ShapeError, UnsupportedError

__all__ = [
    "Layer",
    "Dense",
    "Conv2d",
    "ReLU",
    "MaxPool2d",
    "AvgPool2d",
    "SumPool2d",
    "GlobalSumPool",
    "LpPool",
    "Flatten",
    "ConvTranspose2d",
    "BatchNorm2d",
    "BatchNorm1d",
    "Activation",
    "LeakyReLU",
    "ReLU6",
    "ELU",
    "GELU",
    "SiLU",
    "Hardswish",
    "Hardsigmoid",
    "Tanh",
    "Sigmoid",
    "AdaptiveAvgPool2d",
    "GlobalAvgPool",
    "Upsample",
    "ChannelShuffle",
    "Identity",
    "Dropout",
    "Add",
    "Concat",
    "Slice",
    "Mul",
    "BUILTIN_LAYERS",
]


_MAX_INT64 = int(np.iinfo(np.int64).max)


def _param(value: Any, name: str, layer: str, ndim: int, keep_float32: bool = False) -> np.ndarray:
    """Validate a parameter array and return a read-only copy: float64, or float32 when
    ``keep_float32`` and the array is float32 (every float32 value is exact in float64, so the float64
    reference, which upcasts, computes the same as with a float64 copy)."""
    try:
        arr = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise InputTypeError(f"{layer}: {name} is not array-like ({type(value).__name__})") from exc
    if arr.dtype.kind not in "fiu" or arr.dtype.kind == "b":
        raise InputTypeError(f"{layer}: {name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ShapeError(f"{layer}: {name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.size == 0:
        raise ShapeError(f"{layer}: {name} is empty (shape {arr.shape})")
    dtype = np.float32 if keep_float32 and arr.dtype == np.float32 else np.float64
    out = np.array(arr, dtype=dtype, copy=True)
    if not np.all(np.isfinite(out)):
        raise InputError(f"{layer}: {name} contains NaN or Inf")
    out.setflags(write=False)
    return out


def _pair(value: Any, name: str, layer: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        pair = (int(value), int(value))
    elif isinstance(value, Sequence) and len(value) == 2 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ShapeError(f"{layer}: {name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ShapeError(f"{layer}: {name} must be >= {minimum}, got {value!r}")
    return pair


def _padding(value: Any, layer: str) -> tuple[int, int, int, int]:
    """Padding as (top, bottom, left, right) from int, (ph, pw) or ((top, bottom), (left, right))."""
    if isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, Sequence) for v in value):
        (t, b), (lft, r) = (_pair(value[0], "padding", layer, 0), _pair(value[1], "padding", layer, 0))
        return (t, b, lft, r)
    if isinstance(value, Sequence) and len(value) == 4:
        vals = tuple(value)
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in vals):
            return tuple(int(v) for v in vals)  # type: ignore[return-value]
        raise ShapeError(f"{layer}: padding must be non-negative ints, got {value!r}")
    ph, pw = _pair(value, "padding", layer, 0)
    return (ph, ph, pw, pw)


def _positive_int(value: Any, name: str, layer: str, minimum: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ShapeError(f"{layer}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _ceil_extra(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    """Extra bottom/right padding that torch's ``ceil_mode=True`` adds: the output gets one more
    window when the last stride does not fit, unless that window would start in the right padding."""
    span = size + p0 + p1 - d * (k - 1) - 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + p0:
        out -= 1
    return max(0, (out - 1) * s + d * (k - 1) + 1 - (size + p0 + p1))


def _window_out(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


class Layer:
    """Base class. Subclasses are immutable; ``linear`` marks layers that take a relevance rule,
    ``rule_optional`` those that may take one (standalone BatchNorm: ε as a diagonal linear layer).

    A layer is callable on symbolic tensors (:func:`deeptaylor.Input`) to build a
    :class:`~deeptaylor.Graph`: ``h = dt.ReLU()(x)``; ``dt.Add()(h, x)``. Calling one layer object
    twice makes two nodes that share its parameters.
    """

    linear: bool = False
    rule_optional: bool = False
    #: number of inputs: an int, or None for "two or more" (Add, Concat)
    arity: int | None = 1
    __slots__ = ()

    def output_shape(self, *input_shapes: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the layer's output for the input shape(s) (batch dimension included)."""
        raise NotImplementedError

    def __call__(self, *inputs: Any, name: str | None = None) -> Any:
        """Apply the layer to symbolic tensor(s); returns the output :class:`~deeptaylor.network.Tensor`."""
        from .network import _apply

        return _apply(self, inputs, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            object.__setattr__(self, k, v)

    @property
    def kind(self) -> str:
        """The layer's type name, e.g. ``"Dense"``."""
        return type(self).__name__

    def _fields(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Fully connected layer ``z = a @ weight.T + bias``.

    Parameters
    ----------
    weight : array (out_features, in_features)
    bias : array (out_features,) or None (zeros)

    Input ``(N, in_features)``; output ``(N, out_features)``.
    """

    linear = True
    __slots__ = ("weight", "bias")

    def __init__(self, weight: Any, bias: Any = None) -> None:
        w = _param(weight, "weight", "Dense", 2, keep_float32=True)
        if bias is None:
            b = np.zeros(w.shape[0])
            b.setflags(write=False)
        else:
            b = _param(bias, "bias", "Dense", 1)
            if b.shape[0] != w.shape[0]:
                raise ShapeError(f"Dense: bias has {b.shape[0]} entries but weight has {w.shape[0]} outputs")
        self._set(weight=w, bias=b)

    @property
    def in_features(self) -> int:
        """Number of input features, ``weight.shape[1]`` (the input is ``(N, in_features)``)."""
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        """Number of outputs, ``weight.shape[0]`` (the output is ``(N, out_features)``)."""
        return int(self.weight.shape[0])

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 2:
            raise ShapeError(f"Dense expects input (N, {self.in_features}), got rank {len(input_shape)} "
                             f"shape {tuple(input_shape)} (add a Flatten before it?)")
        if input_shape[1] != self.in_features:
            raise ShapeError(f"Dense expects {self.in_features} input features, got {input_shape[1]}")
        return (input_shape[0], self.out_features)

    def _fields(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features}


class Conv2d(Layer):
    """2-D convolution (cross-correlation, as PyTorch), zero padding, optionally grouped.

    Parameters
    ----------
    weight : array (out_channels, in_channels // groups, kh, kw)
    bias : array (out_channels,) or None
    stride, dilation : int or (sh, sw)
    padding : int, (ph, pw) or ((top, bottom), (left, right)); zero padding
    groups : int
        Grouped convolution as ``torch.nn.Conv2d(groups=...)``: input and output channels are split
        into ``groups`` blocks, block g of the output sees only block g of the input (depthwise:
        ``groups == in_channels``).

    Input ``(N, in_channels, H, W)``; output ``(N, out_channels, OH, OW)`` with
    ``OH = (H + top + bottom - dilation*(kh-1) - 1) // stride + 1``.
    """

    linear = True
    __slots__ = ("weight", "bias", "stride", "padding", "dilation", "groups")

    def __init__(self, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1) -> None:
        w = _param(weight, "weight", "Conv2d", 4, keep_float32=True)
        groups = _positive_int(groups, "groups", "Conv2d")
        if w.shape[0] % groups:
            raise ShapeError(f"Conv2d: {w.shape[0]} output channels are not divisible by groups={groups}")
        if bias is None:
            b = np.zeros(w.shape[0])
            b.setflags(write=False)
        else:
            b = _param(bias, "bias", "Conv2d", 1)
            if b.shape[0] != w.shape[0]:
                raise ShapeError(f"Conv2d: bias has {b.shape[0]} entries but weight has {w.shape[0]} "
                                 "output channels")
        self._set(weight=w, bias=b, stride=_pair(stride, "stride", "Conv2d", 1),
                  padding=_padding(padding, "Conv2d"), dilation=_pair(dilation, "dilation", "Conv2d", 1),
                  groups=groups)

    @property
    def in_channels(self) -> int:
        """Input channels C, ``weight.shape[1] * groups`` (the input is ``(N, in_channels, H, W)``)."""
        return int(self.weight.shape[1]) * self.groups

    @property
    def out_channels(self) -> int:
        """Output channels O, ``weight.shape[0]`` (the output is ``(N, out_channels, OH, OW)``)."""
        return int(self.weight.shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """``(kh, kw)``, the kernel's height and width in pixels (``weight.shape[2:]``, undilated)."""
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 4:
            raise ShapeError(f"Conv2d expects input (N, {self.in_channels}, H, W), got shape {tuple(input_shape)}")
        n, c, h, w = input_shape
        if c != self.in_channels:
            raise ShapeError(f"Conv2d expects {self.in_channels} input channels, got {c}")
        kh, kw = self.kernel_size
        t, b, lft, r = self.padding
        oh = _window_out(h, kh, self.stride[0], t, b, self.dilation[0])
        ow = _window_out(w, kw, self.stride[1], lft, r, self.dilation[1])
        if oh < 1 or ow < 1:
            raise ShapeError(f"Conv2d: input {h}x{w} is smaller than the (dilated) kernel {kh}x{kw} "
                             f"with padding {self.padding}")
        return (n, self.out_channels, oh, ow)

    def _fields(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "dilation": self.dilation, "groups": self.groups}


class ReLU(Layer):
    """Rectifier ``max(0, z)``. Relevance passes through unchanged (DTD: R_j = x_j at the root 0)."""

    __slots__ = ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) not in (2, 4):
            raise ShapeError(f"ReLU expects (N, F) or (N, C, H, W), got {tuple(input_shape)}")
        return tuple(input_shape)


class _Pool2d(Layer):
    __slots__ = ("kernel_size", "stride", "padding", "ceil_mode")

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False) -> None:
        name = type(self).__name__
        k = _pair(kernel_size, "kernel_size", name, 1)
        s = k if stride is None else _pair(stride, "stride", name, 1)
        p = _padding(padding, name)
        if max(p[0], p[1]) > k[0] // 2 or max(p[2], p[3]) > k[1] // 2:
            raise ShapeError(f"{name}: padding {p} must be at most half the kernel size {k}")
        if not isinstance(ceil_mode, (bool, np.bool_)):
            raise InputTypeError(f"{name}: ceil_mode must be a bool, got {ceil_mode!r}")
        self._set(kernel_size=k, stride=s, padding=p, ceil_mode=bool(ceil_mode))

    def resolved_padding(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, bottom, left, right) padding for an ``h x w`` input, with the extra bottom/right rows
        and columns that ``ceil_mode=True`` adds (as torch: a last, partial window unless it would
        start in the padding). Equal to :attr:`padding` without ceil_mode."""
        t, b, lft, r = self.padding
        if not self.ceil_mode:
            return self.padding
        return (t, b + _ceil_extra(h, self.kernel_size[0], self.stride[0], t, b, 1), lft,
                r + _ceil_extra(w, self.kernel_size[1], self.stride[1], lft, r, 1))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        name = type(self).__name__
        if len(input_shape) != 4:
            raise ShapeError(f"{name} expects input (N, C, H, W), got shape {tuple(input_shape)}")
        n, c, h, w = input_shape
        if h + self.padding[0] + self.padding[1] < self.kernel_size[0] or \
                w + self.padding[2] + self.padding[3] < self.kernel_size[1]:
            raise ShapeError(f"{name}: input {h}x{w} is smaller than the kernel {self.kernel_size}")
        t, b, lft, r = self.resolved_padding(h, w)
        oh = _window_out(h, self.kernel_size[0], self.stride[0], t, b, 1)
        ow = _window_out(w, self.kernel_size[1], self.stride[1], lft, r, 1)
        if oh < 1 or ow < 1:
            raise ShapeError(f"{name}: input {h}x{w} is smaller than the kernel {self.kernel_size}")
        return (n, c, oh, ow)

    def _fields(self) -> dict[str, Any]:
        out = {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}
        if self.ceil_mode:
            out["ceil_mode"] = True
        return out


class MaxPool2d(_Pool2d):
    """Max pooling (padding with -inf, as PyTorch; ``ceil_mode`` as torch). Relevance: winner-take-all
    (first maximal entry)."""

    __slots__ = ()


class AvgPool2d(_Pool2d):
    """Average pooling as ``torch.nn.AvgPool2d``: zero padding, ``ceil_mode``, and
    ``count_include_pad`` (True: the divisor counts the zero padding, not the extra rows of
    ceil_mode; False: only real inputs).

    Relevance in proportion to the inputs: ``R_i = a_i * sum_j R_j / sum_{i' in j} a_i'`` (the divisor
    cancels).
    """

    __slots__ = ("count_include_pad",)

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, ceil_mode: bool = False,
                 count_include_pad: bool = True) -> None:
        super().__init__(kernel_size, stride, padding, ceil_mode)
        if not isinstance(count_include_pad, (bool, np.bool_)):
            raise InputTypeError(f"AvgPool2d: count_include_pad must be a bool, got {count_include_pad!r}")
        self._set(count_include_pad=bool(count_include_pad))

    def inv_count(self, h: int, w: int) -> np.ndarray:
        """``(OH, OW)`` float64: 1 / the divisor of every output pixel for an ``h x w`` input, as torch:
        the window clipped to the padded input (count_include_pad) or to the input itself."""
        t, b, lft, r = self.padding
        rt, rb, rl, rr = self.resolved_padding(h, w)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        oh = _window_out(h, kh, sh, rt, rb, 1)
        ow = _window_out(w, kw, sw, rl, rr, 1)

        def counts(n_out: int, k: int, s: int, p0: int, size: int, p1: int) -> np.ndarray:
            start = np.arange(n_out) * s - p0
            end = start + k
            if self.count_include_pad:
                lo, hi = -p0, size + p1
            else:
                lo, hi = 0, size
            return (np.minimum(end, hi) - np.maximum(start, lo)).astype(np.float64)

        ch = counts(oh, kh, sh, t, h, b)
        cw = counts(ow, kw, sw, lft, w, r)
        return 1.0 / np.outer(ch, cw)

    def _fields(self) -> dict[str, Any]:
        out = super()._fields()
        if not self.count_include_pad:
            out["count_include_pad"] = False
        return out


class SumPool2d(_Pool2d):
    """Sum pooling ``x_k = sum_{j in window} x_j``. Relevance in proportion to the inputs."""

    __slots__ = ()


class GlobalSumPool(Layer):
    """The seeds' pooling ``x_k = sum_j x_j`` over all non-batch dimensions; output ``(N, 1)``.

    Relevance ``R_j = x_j / sum_j' x_j' * R_k`` (with ReLU inputs and the output as relevance:
    ``R_j = x_j``, slide 003 "Setting").
    """

    __slots__ = ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) not in (2, 4):
            raise ShapeError(f"GlobalSumPool expects (N, F) or (N, C, H, W), got {tuple(input_shape)}")
        return (input_shape[0], 1)


class LpPool(Layer):
    """p-norm pooling ``x_k = (sum_j |x_j|^p)^(1/p)`` (the training-free relevance model, slide 003).

    With ``kernel_size=None`` it pools all non-batch dimensions to ``(N, 1)``; otherwise it pools
    ``(N, C, H, W)`` windows like :class:`SumPool2d` (no padding). Relevance is redistributed in
    proportion to the inputs: ``R_j = x_j / sum_j' x_j' * R_k``.
    """

    __slots__ = ("p", "kernel_size", "stride")

    def __init__(self, p: float = 2.0, kernel_size: Any = None, stride: Any = None) -> None:
        if not isinstance(p, (int, float, np.integer, np.floating)) or isinstance(p, bool) or not (
            np.isfinite(p) and p >= 1
        ):
            raise ShapeError(f"LpPool: p must be a finite number >= 1, got {p!r}")
        if kernel_size is None:
            if stride is not None:
                raise ShapeError("LpPool: stride given without kernel_size")
            k = s = None
        else:
            k = _pair(kernel_size, "kernel_size", "LpPool", 1)
            s = k if stride is None else _pair(stride, "stride", "LpPool", 1)
        self._set(p=float(p), kernel_size=k, stride=s)

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """Always ``(0, 0, 0, 0)`` as (top, bottom, left, right) pixels: LpPool takes no padding (the
        attribute exists so that every windowed layer has the same geometry fields)."""
        return (0, 0, 0, 0)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.kernel_size is None:
            if len(input_shape) not in (2, 4):
                raise ShapeError(f"LpPool expects (N, F) or (N, C, H, W), got {tuple(input_shape)}")
            return (input_shape[0], 1)
        if len(input_shape) != 4:
            raise ShapeError(f"LpPool with a kernel expects (N, C, H, W), got {tuple(input_shape)}")
        n, c, h, w = input_shape
        oh = _window_out(h, self.kernel_size[0], self.stride[0], 0, 0, 1)
        ow = _window_out(w, self.kernel_size[1], self.stride[1], 0, 0, 1)
        if oh < 1 or ow < 1:
            raise ShapeError(f"LpPool: input {h}x{w} is smaller than the kernel {self.kernel_size}")
        return (n, c, oh, ow)

    def _fields(self) -> dict[str, Any]:
        return {"p": self.p, "kernel_size": self.kernel_size, "stride": self.stride}


class Flatten(Layer):
    """``(N, C, H, W) -> (N, C*H*W)`` in C order (as ``torch.flatten(x, 1)``); ``(N, F)`` unchanged."""

    __slots__ = ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) not in (2, 4):
            raise ShapeError(f"Flatten expects (N, F) or (N, C, H, W), got {tuple(input_shape)}")
        features = math.prod(int(d) for d in input_shape[1:])   # exact (np.prod wraps around in int64)
        if features > _MAX_INT64:
            raise ShapeError(f"Flatten: {' x '.join(str(int(d)) for d in input_shape[1:])} = {features} features "
                             "per sample overflows int64")
        return (input_shape[0], features)


class ConvTranspose2d(Layer):
    """Transposed 2-D convolution as ``torch.nn.ConvTranspose2d`` (the decoder half of U-Nets).

    Parameters
    ----------
    weight : array (in_channels, out_channels // groups, kh, kw) -- torch's layout
    bias : array (out_channels,) or None
    stride, dilation : int or (sh, sw)
    padding : int, (ph, pw) or ((top, bottom), (left, right)): rows/columns cropped from the output
    output_padding : int or (oph, opw), each smaller than the stride or the dilation (as torch)
    groups : int

    Input ``(N, in_channels, H, W)``; output ``(N, out_channels, OH, OW)`` with
    ``OH = (H - 1) * sh - top - bottom + dh * (kh - 1) + oph + 1``. It is the transpose of the
    :class:`Conv2d` with the same weight, so it is a linear layer and every rule applies.
    """

    linear = True
    __slots__ = ("weight", "bias", "stride", "padding", "output_padding", "dilation", "groups")

    def __init__(self, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                 output_padding: Any = 0, dilation: Any = 1, groups: int = 1) -> None:
        w = _param(weight, "weight", "ConvTranspose2d", 4, keep_float32=True)
        groups = _positive_int(groups, "groups", "ConvTranspose2d")
        if w.shape[0] % groups:
            raise ShapeError(f"ConvTranspose2d: {w.shape[0]} input channels are not divisible by groups={groups}")
        out_ch = w.shape[1] * groups
        if bias is None:
            b = np.zeros(out_ch)
            b.setflags(write=False)
        else:
            b = _param(bias, "bias", "ConvTranspose2d", 1)
            if b.shape[0] != out_ch:
                raise ShapeError(f"ConvTranspose2d: bias has {b.shape[0]} entries but the layer has {out_ch} "
                                 "output channels")
        stride = _pair(stride, "stride", "ConvTranspose2d", 1)
        dilation = _pair(dilation, "dilation", "ConvTranspose2d", 1)
        op = _pair(output_padding, "output_padding", "ConvTranspose2d", 0)
        if op[0] >= max(stride[0], dilation[0]) or op[1] >= max(stride[1], dilation[1]):
            raise ShapeError(f"ConvTranspose2d: output_padding {op} must be smaller than the stride {stride} "
                             f"or the dilation {dilation}")
        self._set(weight=w, bias=b, stride=stride, padding=_padding(padding, "ConvTranspose2d"),
                  output_padding=op, dilation=dilation, groups=groups)

    @property
    def in_channels(self) -> int:
        """Input channels, ``weight.shape[0]``."""
        return int(self.weight.shape[0])

    @property
    def out_channels(self) -> int:
        """Output channels, ``weight.shape[1] * groups``."""
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        """``(kh, kw)`` (undilated)."""
        return (int(self.weight.shape[2]), int(self.weight.shape[3]))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 4:
            raise ShapeError(f"ConvTranspose2d expects input (N, {self.in_channels}, H, W), got shape "
                             f"{tuple(input_shape)}")
        n, c, h, w = input_shape
        if c != self.in_channels:
            raise ShapeError(f"ConvTranspose2d expects {self.in_channels} input channels, got {c}")
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        t, b, lft, r = self.padding
        oh = (h - 1) * sh - t - b + dh * (kh - 1) + self.output_padding[0] + 1
        ow = (w - 1) * sw - lft - r + dw * (kw - 1) + self.output_padding[1] + 1
        if oh < 1 or ow < 1:
            raise ShapeError(f"ConvTranspose2d: padding {self.padding} crops the whole {h}x{w} output")
        return (n, self.out_channels, oh, ow)

    def _fields(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding,
                "output_padding": self.output_padding, "dilation": self.dilation, "groups": self.groups}


class _BatchNorm(Layer):
    rule_optional = True
    __slots__ = ("running_mean", "running_var", "weight", "bias", "eps")
    _rank = 4

    def __init__(self, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
                 eps: float = 1e-5) -> None:
        name = type(self).__name__
        mean = _param(running_mean, "running_mean", name, 1)
        var = _param(running_var, "running_var", name, 1)
        c = mean.shape[0]
        if var.shape[0] != c:
            raise ShapeError(f"{name}: running_var has {var.shape[0]} entries, running_mean {c}")
        if np.any(var < 0):
            raise InputError(f"{name}: running_var has negative entries")
        wt = np.ones(c) if weight is None else _param(weight, "weight", name, 1)
        bs = np.zeros(c) if bias is None else _param(bias, "bias", name, 1)
        for arr, what in ((wt, "weight"), (bs, "bias")):
            if arr.shape[0] != c:
                raise ShapeError(f"{name}: {what} has {arr.shape[0]} entries, running_mean {c}")
            arr.setflags(write=False)
        if not isinstance(eps, (int, float, np.floating)) or isinstance(eps, bool) or not (eps >= 0):
            raise InputError(f"{name}: eps must be a number >= 0, got {eps!r}")
        if np.any(var + eps <= 0):
            raise InputError(f"{name}: running_var + eps must be > 0")
        self._set(running_mean=mean, running_var=var, weight=wt, bias=bs, eps=float(eps))

    @property
    def num_features(self) -> int:
        """Channels (BatchNorm2d) or features (BatchNorm1d) C."""
        return int(self.running_mean.shape[0])

    @property
    def scale(self) -> np.ndarray:
        """(C,) float64: ``weight / sqrt(running_var + eps)``; the layer is ``y = x * scale + shift``."""
        return self.weight / np.sqrt(self.running_var + self.eps)

    @property
    def shift(self) -> np.ndarray:
        """(C,) float64: ``bias - running_mean * scale``."""
        return self.bias - self.running_mean * self.scale

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        name = type(self).__name__
        if len(input_shape) != self._rank:
            want = "(N, C, H, W)" if self._rank == 4 else "(N, C)"
            raise ShapeError(f"{name} expects {want}, got {tuple(input_shape)}")
        if input_shape[1] != self.num_features:
            raise ShapeError(f"{name} has {self.num_features} channels, input has {input_shape[1]}")
        return tuple(input_shape)

    def _fields(self) -> dict[str, Any]:
        return {"num_features": self.num_features, "eps": self.eps}


class BatchNorm2d(_BatchNorm):
    """Batch normalisation in eval mode as ``torch.nn.functional.batch_norm``:
    ``y = (x - running_mean) / sqrt(running_var + eps) * weight + bias`` per channel of (N, C, H, W).

    Folded into the linear layer before it when that is exact (:mod:`deeptaylor.passes`); otherwise
    a node of its own: relevance passes through unchanged (as Zennit), or, given ``Epsilon``/``Z`` by
    the composite, is redistributed as by a diagonal linear layer.
    """

    __slots__ = ()
    _rank = 4


class BatchNorm1d(_BatchNorm):
    """:class:`BatchNorm2d` for (N, C) inputs."""

    __slots__ = ()
    _rank = 2


def _same_rank(name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(input_shape) not in (2, 4):
        raise ShapeError(f"{name} expects (N, F) or (N, C, H, W), got {tuple(input_shape)}")
    return tuple(input_shape)


class Activation(Layer):
    """Base of the element-wise activations beyond ReLU. Forward and gradient are exact (torch's
    formulas and conventions at kinks); relevance passes through unchanged (the LRP convention,
    Zennit's ``Pass``), so conservation is not promised across them.

    ``fn`` names the function for the backends, ``param`` is its parameter (slope, alpha, or 1.0 for
    the tanh approximation of GELU)."""

    fn: str = ""
    __slots__ = ("param",)

    def __init__(self, param: float = 0.0) -> None:
        if not isinstance(param, (int, float, np.integer, np.floating)) or isinstance(param, bool) or \
                not np.isfinite(param):
            raise InputError(f"{type(self).__name__}: parameter must be a finite number, got {param!r}")
        self._set(param=float(param))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _same_rank(type(self).__name__, input_shape)


class LeakyReLU(Activation):
    """``max(0, x) + negative_slope * min(0, x)``."""

    fn = "leaky_relu"
    __slots__ = ()

    def __init__(self, negative_slope: float = 0.01) -> None:
        super().__init__(negative_slope)

    @property
    def negative_slope(self) -> float:
        """The slope for x < 0."""
        return self.param

    def _fields(self) -> dict[str, Any]:
        return {"negative_slope": self.param}


class ReLU6(Activation):
    """``min(max(0, x), 6)`` (gradient 0 at and beyond both kinks, as torch's hardtanh)."""

    fn = "relu6"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.0)


class ELU(Activation):
    """``x`` for x > 0, ``alpha * (exp(x) - 1)`` otherwise."""

    fn = "elu"
    __slots__ = ()

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)

    @property
    def alpha(self) -> float:
        """Scale of the negative branch."""
        return self.param

    def _fields(self) -> dict[str, Any]:
        return {"alpha": self.param}


class GELU(Activation):
    """``x * Phi(x)`` (``approximate="none"``, erf) or torch's tanh approximation (``"tanh"``)."""

    fn = "gelu"
    __slots__ = ()

    def __init__(self, approximate: str = "none") -> None:
        if approximate not in ("none", "tanh"):
            raise InputError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        super().__init__(1.0 if approximate == "tanh" else 0.0)

    @property
    def approximate(self) -> str:
        """``"none"`` or ``"tanh"``."""
        return "tanh" if self.param else "none"

    def _fields(self) -> dict[str, Any]:
        return {"approximate": self.approximate}


class SiLU(Activation):
    """``x * sigmoid(x)`` (swish)."""

    fn = "silu"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.0)


class Hardswish(Activation):
    """``x * relu6(x + 3) / 6``."""

    fn = "hardswish"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.0)


class Hardsigmoid(Activation):
    """``relu6(x + 3) / 6``."""

    fn = "hardsigmoid"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.0)


class Tanh(Activation):
    """``tanh(x)``."""

    fn = "tanh"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.0)


class Sigmoid(Activation):
    """``1 / (1 + exp(-x))``."""

    fn = "sigmoid"
    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(0.0)


class AdaptiveAvgPool2d(Layer):
    """Average pooling to a fixed output size as ``torch.nn.AdaptiveAvgPool2d``: output row i averages
    input rows ``[floor(i*H/OH), ceil((i+1)*H/OH))`` (windows of varying size that may overlap).
    Relevance in proportion to the inputs, as :class:`AvgPool2d`."""

    __slots__ = ("output_size",)

    def __init__(self, output_size: Any) -> None:
        self._set(output_size=_pair(output_size, "output_size", "AdaptiveAvgPool2d", 1))

    @staticmethod
    def _ranges(size: int, out: int) -> list[tuple[int, int]]:
        return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]

    def windows(self, h: int, w: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(rows, cols)``: the ``[start, end)`` input range of every output row and column."""
        return self._ranges(h, self.output_size[0]), self._ranges(w, self.output_size[1])

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 4:
            raise ShapeError(f"AdaptiveAvgPool2d expects (N, C, H, W), got {tuple(input_shape)}")
        return (input_shape[0], input_shape[1]) + self.output_size

    def _fields(self) -> dict[str, Any]:
        return {"output_size": self.output_size}


class GlobalAvgPool(Layer):
    """Mean over H and W: ``(N, C, H, W) -> (N, C)`` (``x.mean((2, 3))``). Relevance in proportion to
    the inputs."""

    __slots__ = ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 4:
            raise ShapeError(f"GlobalAvgPool expects (N, C, H, W), got {tuple(input_shape)}")
        return (input_shape[0], input_shape[1])


class Upsample(Layer):
    """Nearest-neighbour upsampling by integer factors (``nn.Upsample(scale_factor=s, mode="nearest")``).
    Each output copies one input, so an input's relevance is the sum of its copies' relevances."""

    __slots__ = ("scale_factor", "mode")

    def __init__(self, scale_factor: Any = 2, mode: str = "nearest") -> None:
        if mode != "nearest":
            raise UnsupportedError(f"Upsample: mode {mode!r} is not supported (only 'nearest' with integer "
                                   "scale factors)")
        self._set(scale_factor=_pair(scale_factor, "scale_factor", "Upsample", 1), mode=mode)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 4:
            raise ShapeError(f"Upsample expects (N, C, H, W), got {tuple(input_shape)}")
        n, c, h, w = input_shape
        return (n, c, h * self.scale_factor[0], w * self.scale_factor[1])

    def _fields(self) -> dict[str, Any]:
        return {"scale_factor": self.scale_factor}


class ChannelShuffle(Layer):
    """ShuffleNet's channel shuffle (``view(N, g, C/g, H, W).transpose(1, 2)``): output channel
    ``j * g + i`` is input channel ``i * (C / g) + j``. Relevance and gradient follow the inverse
    permutation (exact)."""

    __slots__ = ("groups",)

    def __init__(self, groups: int) -> None:
        self._set(groups=_positive_int(groups, "groups", "ChannelShuffle"))

    def permutation(self, channels: int) -> np.ndarray:
        """(C,) int: output channel k reads input channel ``permutation[k]``."""
        g = self.groups
        return np.arange(channels).reshape(g, channels // g).T.reshape(-1)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) != 4:
            raise ShapeError(f"ChannelShuffle expects (N, C, H, W), got {tuple(input_shape)}")
        if input_shape[1] % self.groups:
            raise ShapeError(f"ChannelShuffle: {input_shape[1]} channels are not divisible by {self.groups} groups")
        return tuple(input_shape)

    def _fields(self) -> dict[str, Any]:
        return {"groups": self.groups}


class Identity(Layer):
    """``y = x``. Removed by :func:`deeptaylor.passes.canonicalize` before any backend runs."""

    __slots__ = ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _same_rank("Identity", input_shape)


class Dropout(Layer):
    """Dropout in eval mode: the identity. Removed by :func:`deeptaylor.passes.canonicalize`."""

    __slots__ = ("p",)

    def __init__(self, p: float = 0.5) -> None:
        if not isinstance(p, (int, float, np.floating)) or isinstance(p, bool) or not 0 <= p <= 1:
            raise InputError(f"Dropout: p must be in [0, 1], got {p!r}")
        self._set(p=float(p))

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        return _same_rank("Dropout", input_shape)

    def _fields(self) -> dict[str, Any]:
        return {"p": self.p}


class Add(Layer):
    """Element-wise sum of two or more inputs of the same shape (the residual ``+``).

    Relevance: each input in proportion to its contribution, ``R_k = a_k / (sum_k' a_k') * R``,
    stabilised as Zennit's ``Norm`` rule (ε = 1e-6 with the sign of the denominator)."""

    arity = None
    __slots__ = ()

    #: the stabiliser of the proportional split (Zennit's Norm rule)
    eps = 1e-6

    def output_shape(self, *input_shapes: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shapes) < 2:
            raise ShapeError(f"Add needs at least two inputs, got {len(input_shapes)}")
        first = tuple(input_shapes[0])
        for k, s in enumerate(input_shapes[1:], 1):
            if tuple(s) != first:
                raise ShapeError(f"Add: input {k} has shape {tuple(s)}, input 0 has {first}")
        return _same_rank("Add", first)


class Concat(Layer):
    """Concatenation along the channel (or feature) axis, ``torch.cat(dim=1)``; ``axis`` counts the
    batch axis, and only ``axis=1`` is supported. Relevance is sliced back by position (exact)."""

    arity = None
    __slots__ = ("axis",)

    def __init__(self, axis: int = 1) -> None:
        if axis != 1 or isinstance(axis, bool):
            raise UnsupportedError(f"Concat: only axis=1 (channels / features) is supported, got {axis!r}")
        self._set(axis=1)

    def output_shape(self, *input_shapes: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shapes) < 2:
            raise ShapeError(f"Concat needs at least two inputs, got {len(input_shapes)}")
        first = tuple(input_shapes[0])
        _same_rank("Concat", first)
        for k, s in enumerate(input_shapes[1:], 1):
            s = tuple(s)
            if len(s) != len(first) or s[0] != first[0] or s[2:] != first[2:]:
                raise ShapeError(f"Concat: input {k} has shape {s}, which does not match input 0's {first} "
                                 "outside axis 1")
        return (first[0], sum(int(s[1]) for s in input_shapes)) + first[2:]

    def _fields(self) -> dict[str, Any]:
        return {"axis": self.axis}


class Slice(Layer):
    """Channels (or features) ``[start, stop)`` of the input: ``x[:, start:stop]`` (one piece of
    ``x.chunk(k, dim=1)``). Relevance is routed back to those channels (the others get none)."""

    __slots__ = ("axis", "start", "stop")

    def __init__(self, start: int, stop: int, axis: int = 1) -> None:
        if axis != 1:
            raise UnsupportedError(f"Slice: only axis=1 is supported, got {axis!r}")
        start = _positive_int(start, "start", "Slice", 0)
        stop = _positive_int(stop, "stop", "Slice", start + 1)
        self._set(axis=1, start=start, stop=stop)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        _same_rank("Slice", input_shape)
        if self.stop > input_shape[1]:
            raise ShapeError(f"Slice [{self.start}, {self.stop}) is beyond the {input_shape[1]} channels")
        return (input_shape[0], self.stop - self.start) + tuple(input_shape[2:])

    def _fields(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop}


class Mul(Layer):
    """Product ``signal * gate`` of two computed tensors (squeeze-and-excitation gates).

    The first input is the signal, the second the gate: the gate has the signal's shape or
    ``(N, C, 1, 1)`` (broadcast over H and W). When the layer is called on symbolic tensors the
    operands are ordered so: a gate is a tensor produced by Sigmoid or Hardsigmoid, or one of shape
    (N, C, 1, 1) next to a signal of larger spatial size; a call where neither operand is a gate
    raises :class:`~deeptaylor.errors.UnsupportedError`. Forward and gradient are exact; relevance goes
    entirely to the signal and none to the gate (Arras et al. 2017's rule for multiplicative gates).
    """

    arity = 2
    __slots__ = ()

    def output_shape(self, *input_shapes: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shapes) != 2:
            raise ShapeError(f"Mul takes two inputs (signal, gate), got {len(input_shapes)}")
        sig, gate = (tuple(s) for s in input_shapes)
        _same_rank("Mul", sig)
        if gate != sig and not (len(sig) == 4 and gate == (sig[0], sig[1], 1, 1)):
            raise ShapeError(f"Mul: the gate's shape {gate} is neither the signal's {sig} nor (N, C, 1, 1)")
        return sig


#: every layer type the built-in backends dispatch on (matched by exact type)
BUILTIN_LAYERS: tuple[type, ...] = (
    Dense, Conv2d, ConvTranspose2d, ReLU, MaxPool2d, AvgPool2d, SumPool2d, GlobalSumPool, LpPool, Flatten,
    BatchNorm2d, BatchNorm1d, LeakyReLU, ReLU6, ELU, GELU, SiLU, Hardswish, Hardsigmoid, Tanh, Sigmoid,
    AdaptiveAvgPool2d, GlobalAvgPool, Upsample, ChannelShuffle, Identity, Dropout, Add, Concat, Slice, Mul,
)
