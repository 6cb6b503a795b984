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

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, ShapeError

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
]


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


def _window_out(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


class Layer:
    """Base class. Subclasses are immutable; ``linear`` marks layers that take a relevance rule."""

    linear: bool = False
    __slots__ = ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the layer's output for ``input_shape`` (batch dimension included)."""
        raise NotImplementedError

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
    """2-D convolution (cross-correlation, as PyTorch), zero padding.

    Parameters
    ----------
    weight : array (out_channels, in_channels, kh, kw)
    bias : array (out_channels,) or None
    stride, dilation : int or (sh, sw)
    padding : int, (ph, pw) or ((top, bottom), (left, right)); zero padding

    Input ``(N, in_channels, H, W)``; output ``(N, out_channels, OH, OW)`` with
    ``OH = (H + top + bottom - dilation*(kh-1) - 1) // stride + 1``.
    """

    linear = True
    __slots__ = ("weight", "bias", "stride", "padding", "dilation")

    def __init__(self, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1) -> None:
        w = _param(weight, "weight", "Conv2d", 4, keep_float32=True)
        if bias is None:
            b = np.zeros(w.shape[0])
            b.setflags(write=False)
        else:
            b = _param(bias, "bias", "Conv2d", 1)
            if b.shape[0] != w.shape[0]:
                raise ShapeError(f"Conv2d: bias has {b.shape[0]} entries but weight has {w.shape[0]} "
                                 "output channels")
        self._set(weight=w, bias=b, stride=_pair(stride, "stride", "Conv2d", 1),
                  padding=_padding(padding, "Conv2d"), dilation=_pair(dilation, "dilation", "Conv2d", 1))

    @property
    def in_channels(self) -> int:
        """Input channels C, ``weight.shape[1]`` (the input is ``(N, in_channels, H, W)``)."""
        return int(self.weight.shape[1])

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
                "dilation": self.dilation}


class ReLU(Layer):
    """Rectifier ``max(0, z)``. Relevance passes through unchanged (DTD: R_j = x_j at the root 0)."""

    __slots__ = ()

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(input_shape) not in (2, 4):
            raise ShapeError(f"ReLU expects (N, F) or (N, C, H, W), got {tuple(input_shape)}")
        return tuple(input_shape)


class _Pool2d(Layer):
    __slots__ = ("kernel_size", "stride", "padding")

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0) -> None:
        name = type(self).__name__
        k = _pair(kernel_size, "kernel_size", name, 1)
        s = k if stride is None else _pair(stride, "stride", name, 1)
        p = _padding(padding, name)
        if max(p[0], p[1]) > k[0] // 2 or max(p[2], p[3]) > k[1] // 2:
            raise ShapeError(f"{name}: padding {p} must be at most half the kernel size {k}")
        self._set(kernel_size=k, stride=s, padding=p)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        name = type(self).__name__
        if len(input_shape) != 4:
            raise ShapeError(f"{name} expects input (N, C, H, W), got shape {tuple(input_shape)}")
        n, c, h, w = input_shape
        t, b, lft, r = self.padding
        oh = _window_out(h, self.kernel_size[0], self.stride[0], t, b, 1)
        ow = _window_out(w, self.kernel_size[1], self.stride[1], lft, r, 1)
        if oh < 1 or ow < 1:
            raise ShapeError(f"{name}: input {h}x{w} is smaller than the kernel {self.kernel_size}")
        return (n, c, oh, ow)

    def _fields(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "stride": self.stride, "padding": self.padding}


class MaxPool2d(_Pool2d):
    """Max pooling (padding with -inf, as PyTorch). Relevance: winner-take-all (first maximal entry)."""

    __slots__ = ()


class AvgPool2d(_Pool2d):
    """Average pooling (zero padding counted in the divisor, PyTorch's ``count_include_pad=True``).

    Relevance in proportion to the inputs: ``R_i = a_i * sum_j R_j / sum_{i' in j} a_i'``.
    """

    __slots__ = ()


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
        return (input_shape[0], int(np.prod(input_shape[1:])))
