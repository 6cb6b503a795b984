"""Forward operators of every layer and their transposes, in plain NumPy (the oracle).

Readability first: convolution and pooling loop over the kernel taps (kh * kw iterations) and
vectorise over everything else, which keeps each formula visible. Shapes follow PyTorch: NCHW.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UnsupportedError
from ..layers import Conv2d, ConvTranspose2d, Dense

__all__ = [
    "linear_forward",
    "linear_transpose",
    "conv2d_forward",
    "conv2d_transpose",
    "conv_transpose2d_forward",
    "activation_forward",
    "activation_derivative",
    "window_taps",
    "window_sum",
    "window_scatter",
    "maxpool_forward",
    "maxpool_scatter",
]


def _out_size(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def window_taps(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1),
                out: tuple[int, int] | None = None):
    """Yield ``(i, j, rows, cols)`` for every kernel tap: the slices of the *padded* input that tap
    ``(i, j)`` reads for all output positions; also returns the output size as the generator's
    first item ``(oh, ow)``. ``out`` overrides the output size (only smaller: the transposed
    convolution's output_padding, whose extra rows no output reads)."""
    t, b, lft, r = padding
    oh = _out_size(h, kernel[0], stride[0], t, b, dilation[0])
    ow = _out_size(w, kernel[1], stride[1], lft, r, dilation[1])
    if out is not None:
        assert out[0] <= oh and out[1] <= ow
        oh, ow = out
    yield oh, ow
    for i in range(kernel[0]):
        r0 = i * dilation[0]
        rows = slice(r0, r0 + stride[0] * (oh - 1) + 1, stride[0])
        for j in range(kernel[1]):
            c0 = j * dilation[1]
            cols = slice(c0, c0 + stride[1] * (ow - 1) + 1, stride[1])
            yield i, j, rows, cols


def _pad(x: np.ndarray, padding: tuple[int, int, int, int], value: float = 0.0) -> np.ndarray:
    t, b, lft, r = padding
    return np.pad(x, ((0, 0), (0, 0), (t, b), (lft, r)), constant_values=value)


def conv2d_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: tuple[int, int],
                   padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int = 1) -> np.ndarray:
    """``z[n,o,y,x] = sum_{c,i,j} xpad[n,c,y*s+i*d, x*s+j*d] * w[o,c,i,j] + b[o]``, the sum over c
    running over the input channels of o's group (``torch.nn.functional.conv2d``).

    x (N, C, H, W), weight (O, C/groups, KH, KW), bias (O,) or None -> z (N, O, OH, OW).
    """
    n, c, h, w = x.shape
    taps = window_taps(h, w, weight.shape[2:], stride, padding, dilation)
    oh, ow = next(taps)
    xp = _pad(x, padding)
    o = weight.shape[0]
    z = np.zeros((n, o, oh, ow), dtype=np.result_type(x, weight))
    if groups == 1:
        for i, j, rows, cols in taps:
            z += np.einsum("nchw,oc->nohw", xp[:, :, rows, cols], weight[:, :, i, j], optimize=True)
    else:
        g = groups
        zg = z.reshape(n, g, o // g, oh, ow)  # a view of z
        for i, j, rows, cols in taps:
            xs = xp[:, :, rows, cols].reshape(n, g, c // g, oh, ow)
            zg += np.einsum("ngchw,goc->ngohw", xs, weight[:, :, i, j].reshape(g, o // g, c // g),
                            optimize=True)
    if bias is not None:
        z += bias[None, :, None, None]
    return z


def conv2d_transpose(s: np.ndarray, weight: np.ndarray, input_shape: tuple[int, ...], stride: tuple[int, int],
                     padding: tuple[int, int, int, int], dilation: tuple[int, int], groups: int = 1) -> np.ndarray:
    """Transpose of :func:`conv2d_forward` without bias (the gradient w.r.t. the input):
    ``c[n,c,y',x'] = sum_{o,i,j : y'=y*s+i*d-t, x'=...} s[n,o,y,x] w[o,c,i,j]`` (o in c's group).

    s (N, O, OH, OW), weight (O, C/groups, KH, KW) -> c of ``input_shape`` (N, C, H, W). ``s`` may
    have fewer rows/columns than the convolution of ``input_shape`` produces (a transposed
    convolution's output_padding): the missing outputs count as 0.
    """
    n, c, h, w = input_shape
    t, b, lft, r = padding
    taps = window_taps(h, w, weight.shape[2:], stride, padding, dilation, out=s.shape[2:])
    oh, ow = next(taps)
    o = weight.shape[0]
    cp = np.zeros((n, c, h + t + b, w + lft + r), dtype=np.result_type(s, weight))
    if groups == 1:
        for i, j, rows, cols in taps:
            cp[:, :, rows, cols] += np.einsum("nohw,oc->nchw", s, weight[:, :, i, j], optimize=True)
    else:
        g = groups
        sg = s.reshape(n, g, o // g, oh, ow)
        for i, j, rows, cols in taps:
            cp[:, :, rows, cols] += np.einsum(
                "ngohw,goc->ngchw", sg, weight[:, :, i, j].reshape(g, o // g, c // g), optimize=True
            ).reshape(n, c, oh, ow)
    return cp[:, :, t:t + h, lft:lft + w]


def conv_transpose2d_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                             output_shape: tuple[int, ...], stride: tuple[int, int],
                             padding: tuple[int, int, int, int], dilation: tuple[int, int],
                             groups: int = 1) -> np.ndarray:
    """``torch.nn.functional.conv_transpose2d``: the transpose of the :func:`conv2d_forward` whose
    weight is ``weight`` (torch's (C, O/groups, KH, KW) layout is the (out, in/groups, KH, KW)
    layout of that convolution from the (N, O, OH, OW) space to (N, C, H, W)), plus the bias.

    x (N, C, H, W), bias (O,) or None, ``output_shape`` (N, O, OH, OW) (it carries output_padding)
    -> (N, O, OH, OW).
    """
    y = conv2d_transpose(x, weight, tuple(output_shape), stride, padding, dilation, groups)
    if bias is not None:
        y = y + bias[None, :, None, None]
    return y


def linear_forward(layer: Dense | Conv2d | ConvTranspose2d, a: np.ndarray, weight: np.ndarray,
                   bias: np.ndarray | None) -> np.ndarray:
    """The layer's affine map ``L(a; W, b)`` with substituted parameters (``weight`` has the layer's
    weight shape): ``a @ weight.T + bias``, a (grouped) convolution or a transposed convolution.

    a (N, in) / (N, C, H, W) -> the layer's output shape."""
    if isinstance(layer, Dense):
        z = a @ weight.T
        return z + bias if bias is not None else z
    if isinstance(layer, ConvTranspose2d):
        return conv_transpose2d_forward(a, weight, bias, layer.output_shape(a.shape), layer.stride,
                                        layer.padding, layer.dilation, layer.groups)
    return conv2d_forward(a, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def linear_transpose(layer: Dense | Conv2d | ConvTranspose2d, s: np.ndarray, weight: np.ndarray,
                     input_shape: tuple[int, ...]) -> np.ndarray:
    """Transpose ``L^T(s; W)`` of the layer's linear map: ``s @ weight``, a transposed convolution, or
    (for a transposed convolution) the convolution with the same weight, cropped to the input size
    (rows that only output_padding adds are read by no input).

    s (the layer's output shape) -> ``input_shape``."""
    if isinstance(layer, Dense):
        return s @ weight
    if isinstance(layer, ConvTranspose2d):
        c = conv2d_forward(s, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
        return c[:, :, :input_shape[2], :input_shape[3]]
    return conv2d_transpose(s, weight, input_shape, layer.stride, layer.padding, layer.dilation, layer.groups)


def window_sum(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int, int, int]) -> np.ndarray:
    """Sum pooling: ``y[n,c,oy,ox] = sum over the window of xpad`` (zero padding). (N,C,H,W)->(N,C,OH,OW)."""
    n, c, h, w = x.shape
    taps = window_taps(h, w, kernel, stride, padding)
    oh, ow = next(taps)
    xp = _pad(x, padding)
    y = np.zeros((n, c, oh, ow), dtype=x.dtype)
    for _, _, rows, cols in taps:
        y += xp[:, :, rows, cols]
    return y


def window_scatter(y: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int, int, int], input_shape: tuple[int, ...]) -> np.ndarray:
    """Transpose of :func:`window_sum`: every input receives the sum of the outputs whose window
    covers it. (N,C,OH,OW) -> ``input_shape``."""
    n, c, h, w = input_shape
    t, b, lft, r = padding
    taps = window_taps(h, w, kernel, stride, padding)
    next(taps)
    xp = np.zeros((n, c, h + t + b, w + lft + r), dtype=y.dtype)
    for _, _, rows, cols in taps:
        xp[:, :, rows, cols] += y
    return xp[:, :, t:t + h, lft:lft + w]


def maxpool_forward(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Max pooling with -inf padding. Returns the output (N,C,OH,OW) and the winning tap index
    (0 .. kh*kw-1, the first maximal entry in row-major tap order, as PyTorch)."""
    n, c, h, w = x.shape
    taps = window_taps(h, w, kernel, stride, padding)
    oh, ow = next(taps)
    xp = _pad(x, padding, value=-np.inf)
    y = np.full((n, c, oh, ow), -np.inf, dtype=x.dtype)
    arg = np.zeros((n, c, oh, ow), dtype=np.int64)
    for k, (_, _, rows, cols) in enumerate(taps):
        v = xp[:, :, rows, cols]
        better = v > y
        y = np.where(better, v, y)
        arg = np.where(better, k, arg)
    return y, arg


def maxpool_scatter(y: np.ndarray, arg: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int, int, int], input_shape: tuple[int, ...]) -> np.ndarray:
    """Route every output value to its window's winning input (winner-take-all), summing overlaps."""
    n, c, h, w = input_shape
    t, b, lft, r = padding
    taps = window_taps(h, w, kernel, stride, padding)
    next(taps)
    xp = np.zeros((n, c, h + t + b, w + lft + r), dtype=y.dtype)
    for k, (_, _, rows, cols) in enumerate(taps):
        xp[:, :, rows, cols] += np.where(arg == k, y, 0.0)
    return xp[:, :, t:t + h, lft:lft + w]


# --------------------------------------------------------------------------------------------------
# Element-wise activations (forward and derivative exactly as torch, kinks included)

_erf = np.vectorize(math.erf, otypes=[np.float64])
_GELU_K = math.sqrt(2.0 / math.pi)  # torch's kBeta = M_SQRT2 * M_2_SQRTPI * 0.5
_GELU_C = 0.044715


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # numerically safe for large |x| in both directions
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def activation_forward(fn: str, param: float, x: np.ndarray) -> np.ndarray:
    """``y = f(x)`` for the activation named ``fn`` (:attr:`deeptaylor.layers.Activation.fn`) with
    parameter ``param`` (slope, alpha, or 1.0 for GELU's tanh approximation). Any shape -> same."""
    if fn == "leaky_relu":
        return np.where(x > 0, x, x * param)
    if fn == "relu6":
        return np.minimum(np.maximum(x, 0.0), 6.0)
    if fn == "elu":
        return np.where(x > 0, x, param * np.expm1(np.minimum(x, 0.0)))
    if fn == "gelu":
        if param:
            return 0.5 * x * (1.0 + np.tanh(_GELU_K * (x + _GELU_C * x ** 3)))
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if fn == "silu":
        return x * _sigmoid(x)
    if fn == "hardswish":
        return x * np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0
    if fn == "hardsigmoid":
        return np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0
    if fn == "tanh":
        return np.tanh(x)
    if fn == "sigmoid":
        return _sigmoid(x)
    raise UnsupportedError(f"no reference forward for the activation {fn!r}")


def activation_derivative(fn: str, param: float, x: np.ndarray) -> np.ndarray:
    """``f'(x)`` element-wise, with torch's values at the kinks (what ``autograd`` returns):

    * leaky_relu: 1 for x > 0, the slope for x <= 0;
    * relu6: 1 on the open interval (0, 6), else 0 (``hardtanh_backward``);
    * elu: 1 for x > 0, ``alpha * exp(x)`` for x <= 0;
    * hardswish: 0 for x <= -3, ``x / 3 + 1/2`` for -3 < x < 3, 1 for x >= 3 (torch's
      ``hardswish_backward``, checked against torch 2.x autograd at x = +-3);
    * hardsigmoid: 1/6 on the open interval (-3, 3), else 0.
    """
    if fn == "leaky_relu":
        return np.where(x > 0, 1.0, param)
    if fn == "relu6":
        return ((x > 0) & (x < 6)).astype(np.float64)
    if fn == "elu":
        return np.where(x > 0, 1.0, param * np.exp(np.minimum(x, 0.0)))
    if fn == "gelu":
        if param:
            inner = _GELU_K * (x + _GELU_C * x ** 3)
            t = np.tanh(inner)
            return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_K * (1.0 + 3.0 * _GELU_C * x * x)
        cdf = 0.5 * (1.0 + _erf(x / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return cdf + x * pdf
    if fn == "silu":
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if fn == "hardswish":
        return np.where(x <= -3.0, 0.0, np.where(x < 3.0, x / 3.0 + 0.5, 1.0))
    if fn == "hardsigmoid":
        return np.where((x > -3.0) & (x < 3.0), 1.0 / 6.0, 0.0)
    if fn == "tanh":
        t = np.tanh(x)
        return 1.0 - t * t
    if fn == "sigmoid":
        s = _sigmoid(x)
        return s * (1.0 - s)
    raise UnsupportedError(f"no reference gradient for the activation {fn!r}")
