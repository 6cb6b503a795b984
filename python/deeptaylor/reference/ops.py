"""Forward operators of every layer and their transposes, in plain NumPy (the oracle).

Readability first: convolution and pooling loop over the kernel taps (kh * kw iterations) and
vectorise over everything else, which keeps each formula visible. Shapes follow PyTorch: NCHW.
"""

from __future__ import annotations

import numpy as np

from ..layers import Conv2d, Dense

__all__ = [
    "linear_forward",
    "linear_transpose",
    "conv2d_forward",
    "conv2d_transpose",
    "window_taps",
    "window_sum",
    "window_scatter",
    "maxpool_forward",
    "maxpool_scatter",
]


def _out_size(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


def window_taps(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1)):
    """Yield ``(i, j, rows, cols)`` for every kernel tap: the slices of the *padded* input that tap
    ``(i, j)`` reads for all output positions; also returns the output size as the generator's
    first item ``(oh, ow)``."""
    t, b, lft, r = padding
    oh = _out_size(h, kernel[0], stride[0], t, b, dilation[0])
    ow = _out_size(w, kernel[1], stride[1], lft, r, dilation[1])
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
                   padding: tuple[int, int, int, int], dilation: tuple[int, int]) -> np.ndarray:
    """``z[n,o,y,x] = sum_{c,i,j} xpad[n,c,y*s+i*d, x*s+j*d] * w[o,c,i,j] + b[o]``.

    x (N, C, H, W), weight (O, C, KH, KW), bias (O,) or None -> z (N, O, OH, OW).
    """
    n, _, h, w = x.shape
    taps = window_taps(h, w, weight.shape[2:], stride, padding, dilation)
    oh, ow = next(taps)
    xp = _pad(x, padding)
    z = np.zeros((n, weight.shape[0], oh, ow), dtype=np.result_type(x, weight))
    for i, j, rows, cols in taps:
        z += np.einsum("nchw,oc->nohw", xp[:, :, rows, cols], weight[:, :, i, j], optimize=True)
    if bias is not None:
        z += bias[None, :, None, None]
    return z


def conv2d_transpose(s: np.ndarray, weight: np.ndarray, input_shape: tuple[int, ...], stride: tuple[int, int],
                     padding: tuple[int, int, int, int], dilation: tuple[int, int]) -> np.ndarray:
    """Transpose of :func:`conv2d_forward` without bias (the gradient w.r.t. the input):
    ``c[n,c,y',x'] = sum_{o,i,j : y'=y*s+i*d-t, x'=...} s[n,o,y,x] w[o,c,i,j]``.

    s (N, O, OH, OW), weight (O, C, KH, KW) -> c of ``input_shape`` (N, C, H, W).
    """
    n, c, h, w = input_shape
    t, b, lft, r = padding
    taps = window_taps(h, w, weight.shape[2:], stride, padding, dilation)
    next(taps)
    cp = np.zeros((n, c, h + t + b, w + lft + r), dtype=np.result_type(s, weight))
    for i, j, rows, cols in taps:
        cp[:, :, rows, cols] += np.einsum("nohw,oc->nchw", s, weight[:, :, i, j], optimize=True)
    return cp[:, :, t:t + h, lft:lft + w]


def linear_forward(layer: Dense | Conv2d, a: np.ndarray, weight: np.ndarray,
                   bias: np.ndarray | None) -> np.ndarray:
    """The layer's affine map with substituted parameters: ``a @ weight.T + bias`` or a convolution."""
    if isinstance(layer, Dense):
        z = a @ weight.T
        return z + bias if bias is not None else z
    return conv2d_forward(a, weight, bias, layer.stride, layer.padding, layer.dilation)


def linear_transpose(layer: Dense | Conv2d, s: np.ndarray, weight: np.ndarray,
                     input_shape: tuple[int, ...]) -> np.ndarray:
    """Transpose of the layer's linear map: ``s @ weight`` or a transposed convolution."""
    if isinstance(layer, Dense):
        return s @ weight
    return conv2d_transpose(s, weight, input_shape, layer.stride, layer.padding, layer.dilation)


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
