"""Baseline attribution methods that every faithfulness evaluation compares against: integrated
gradients, SmoothGrad and occlusion. Each is a :class:`~deeptaylor.methods.CompoundMethod`: pass one to
an :class:`~deeptaylor.Explainer` in place of a composite, on either backend::

    ex = dt.Explainer(net, dt.methods.IntegratedGradients(steps=32), backend="cpu")
    res = ex.explain(x)                  # res.relevance: shape of x; res.extras["delta"]: (N,)

They run the network's gradient passes (IntegratedGradients, SmoothGrad) or forward-only passes
(Occlusion) on the Explainer's backend, *batched*: the m path points / noisy copies / occluded copies
of all N images go through the engine as one batch of m x N rows. When m x N rows would hold more
than :data:`MAX_BATCH_VALUES` input values (64 MiB in float32), the rows are cut into chunks of whole
steps (and, when even one step of N images is larger, of images), so memory stays bounded by the
chunk: about 3 x ``batch_size`` x (values per sample) numbers for the perturbed inputs and their
gradients. ``batch_size`` (rows per pass) overrides the bound. Chunking never changes the result
beyond float rounding of the accumulation order.

Conventions follow the reference implementations they are tested against (tests/test_attribution.py):

* :class:`IntegratedGradients` - Captum's ``IntegratedGradients`` (Sundararajan et al. 2017): its
  quadratures (``method=``; the trapezoid with weights that sum to 1) and defaults (50 steps,
  Gauss-Legendre).
* :class:`SmoothGrad` - Zennit's ``SmoothGrad`` (Smilkov et al. 2017): the noise level is relative to
  each sample's value range, and the last of the n samples is the noise-free input.
* :class:`Occlusion` - Captum's ``Occlusion`` (Zeiler & Fergus 2014): windows over the spatial axes
  (all channels at once), ``R_p`` = mean over the windows containing p of ``f(x) - f(x occluded)``;
  equal to Zennit's ``Occlusion`` (with the difference as its score) where windows tile the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, ShapeError
from .methods import CompoundMethod, Passes

__all__ = ["IntegratedGradients", "SmoothGrad", "Occlusion", "MAX_BATCH_VALUES", "IG_METHODS", "ig_weights"]

#: default bound on the input values of one perturbed batch (rows x values per sample): 2**24, i.e.
#: 64 MiB of float32 (128 MiB of float64) per pass, plus as much again for the gradients
MAX_BATCH_VALUES = 1 << 24

#: the quadratures of :class:`IntegratedGradients` (Captum's names)
IG_METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")


# --------------------------------------------------------------------------------------- helpers


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _optional_batch(value: Any) -> int | None:
    return None if value is None else _positive_int(value, "batch_size")


def _baseline_value(value: Any, name: str = "baseline") -> float | np.ndarray:
    """A finite float, or a read-only float64 array (broadcast to the sample shape at compute time)."""
    if isinstance(value, bool):
        raise InputTypeError(f"{name} must be a number or an array, got {value!r}")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            raise InputError(f"{name} must be finite, got {value!r}")
        return v
    try:
        arr = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"{name} must be a number or a float array, got {type(value).__name__}") from exc
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN/Inf values")
    if arr.ndim == 0:
        return float(arr)
    arr.setflags(write=False)
    return arr


def _broadcast_baseline(baseline: float | np.ndarray, sample_shape: tuple[int, ...], name: str) -> np.ndarray:
    """The baseline as a float64 array of ``sample_shape``."""
    try:
        return np.broadcast_to(np.asarray(baseline, dtype=np.float64), sample_shape)
    except ValueError:
        raise ShapeError(f"{name} of shape {np.shape(baseline)} does not broadcast to the sample shape "
                         f"{sample_shape}") from None


def _rows_per_pass(batch_size: int | None, values_per_row: int) -> int:
    if batch_size is not None:
        return batch_size
    return max(1, MAX_BATCH_VALUES // max(1, values_per_row))


def _blocks(m: int, n: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
    """Rectangles ``(s0, s1, i0, i1)`` of steps x images covering the m x N grid, step-major, each at
    most ``rows`` rows: whole steps of all N images when N fits, else one step and a range of images."""
    if n <= rows:
        per = max(1, rows // n)
        for s0 in range(0, m, per):
            yield s0, min(m, s0 + per), 0, n
    else:
        for s0 in range(m):
            for i0 in range(0, n, rows):
                yield s0, s0 + 1, i0, min(n, i0 + rows)


def _targets(passes: Passes, x: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(output (N, K) of x, explained index per sample (N,))."""
    out = passes.forward(x)
    t = np.argmax(out, axis=1) if targets is None else np.asarray(targets, dtype=np.int64)
    return out, t


# -------------------------------------------------------------------------------- the methods


def ig_weights(steps: int, method: str) -> tuple[np.ndarray, np.ndarray]:
    """``(alphas (steps,), weights (steps,))`` of an integrated-gradients quadrature on [0, 1], as
    Captum's ``approximation_parameters(method)``: the path points ``b + alpha (x - b)`` and the
    weights of their gradients (summing to 1, to 1 - 1/steps for the trapezoid with its half ends).

    Riemann sums: left ``alpha = k/m`` (k = 0..m-1), right ``(k+1)/m``, middle ``(k+1/2)/m``, weights
    ``1/m``; ``gausslegendre``: the m-point Gauss-Legendre rule mapped to [0, 1]; these four are
    Captum's. Trapezoid: ``alpha = k/(m-1)``, weights ``1/(m-1)`` with the two ends halved (they sum to
    1; m = 1: the right end, weight 1). Captum's trapezoid uses the same points with weights ``1/m``
    (ends halved), which sum to ``1 - 1/m``: its result is ours times ``(m - 1)/m``."""
    m = steps
    if method == "gausslegendre":
        nodes, w = np.polynomial.legendre.leggauss(m)
        return 0.5 * (1.0 + nodes), 0.5 * w
    weights = np.full(m, 1.0 / m)
    if method == "riemann_trapezoid":
        if m == 1:
            return np.ones(1), np.ones(1)
        weights = np.full(m, 1.0 / (m - 1))
        weights[0] /= 2
        weights[-1] /= 2
        return np.linspace(0.0, 1.0, m), weights
    if method == "riemann_left":
        alphas = np.arange(m) / m
    elif method == "riemann_right":
        alphas = np.arange(1, m + 1) / m
    elif method == "riemann_middle":
        alphas = (np.arange(m) + 0.5) / m
    else:
        raise InputError(f"unknown integration method {method!r}; one of {', '.join(IG_METHODS)}")
    return alphas, weights


class IntegratedGradients(CompoundMethod):
    """Integrated gradients (Sundararajan, Taly & Yan, ICML 2017):
    ``R_p = (x_p - b_p) * sum_k w_k * df_t/dx_p (b + alpha_k (x - b))``, shape of x, units of f.

    The path integral of the gradient from the baseline ``b`` to ``x`` by the quadrature ``method``
    (:func:`ig_weights`: ``"gausslegendre"`` (default, as Captum), ``"riemann_left"``,
    ``"riemann_right"``, ``"riemann_middle"``, ``"riemann_trapezoid"``): the same path points and
    weights as Captum's ``IntegratedGradients(model).attribute(x, baselines=b, target=t,
    n_steps=steps, method=method)``, with which it agrees to float rounding (tested; for the trapezoid
    see :func:`ig_weights`: Captum's weights do not sum to 1, ours do). Completeness,
    ``sum_p R_p = f_t(x) - f_t(b)``, holds up to the quadrature error; the gap is reported per sample
    as ``Explanation.extras["delta"]`` (Captum's convergence delta).

    The explained output ``t`` is chosen at ``x`` (the largest output when no target is given) and
    kept along the path. All ``steps`` path points of all images run as one batch of gradient passes
    (chunked to bound memory, see the module docstring).

    Parameters
    ----------
    steps : int >= 1
        Path points (Captum's ``n_steps``; default 50).
    baseline : float or array broadcastable to the sample shape
        The reference input ``b`` (default 0: a black image).
    method : str
        The quadrature (default ``"gausslegendre"``).
    batch_size : int, optional
        Rows (path points x images) per gradient pass (default: :data:`MAX_BATCH_VALUES` input values).
    """

    __slots__ = ("steps", "baseline", "method", "batch_size")

    def __init__(self, steps: int = 50, baseline: Any = 0.0, method: str = "gausslegendre",
                 batch_size: int | None = None) -> None:
        if method not in IG_METHODS:
            raise InputError(f"unknown integration method {method!r}; one of {', '.join(IG_METHODS)}")
        object.__setattr__(self, "steps", _positive_int(steps, "steps"))
        object.__setattr__(self, "baseline", _baseline_value(baseline))
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "batch_size", _optional_batch(batch_size))

    def params(self) -> dict[str, Any]:
        """``steps``, ``baseline``, ``method``, ``batch_size``."""
        return {"steps": self.steps, "baseline": self.baseline, "method": self.method,
                "batch_size": self.batch_size}

    def compute(self, passes: Passes, x: np.ndarray, targets: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Relevance (shape of x) and ``extras["delta"]`` (N,): ``sum_p R_p - (f_t(x) - f_t(b))``."""
        out, t = _targets(passes, x, targets)
        n, sample = x.shape[0], x.shape[1:]
        b = _broadcast_baseline(self.baseline, sample, "IntegratedGradients baseline")
        diff = x.astype(np.float64) - b
        alphas, weights = ig_weights(self.steps, self.method)
        acc = np.zeros(x.shape, dtype=np.float64)
        rows = _rows_per_pass(self.batch_size, int(np.prod(sample)))
        for s0, s1, i0, i1 in _blocks(self.steps, n, rows):
            a = alphas[s0:s1].reshape((-1, 1) + (1,) * len(sample))
            pts = (b + a * diff[None, i0:i1]).astype(passes.dtype).reshape((-1,) + sample)
            _, g = passes.gradient(pts, np.tile(t[i0:i1], s1 - s0))
            acc[i0:i1] += np.tensordot(weights[s0:s1], g.reshape((s1 - s0, i1 - i0) + sample), axes=1)
        relevance = acc * diff
        f_base = passes.forward(b[None].astype(passes.dtype))[0]
        explained = out[np.arange(n), t].astype(np.float64)
        delta = relevance.reshape(n, -1).sum(axis=1) - (explained - f_base[t].astype(np.float64))
        return out, relevance.astype(passes.dtype), {"delta": delta}


class SmoothGrad(CompoundMethod):
    """SmoothGrad (Smilkov et al. 2017): the gradient ``df_t/dx`` averaged over ``n`` noisy copies of
    x, shape of x, units of f / x (signed, as Zennit's ``SmoothGrad``).

    ``R = (1/n) * sum_i df_t/dx (x + eps_i)`` with ``eps_i ~ N(0, s^2)`` independently per value and
    ``s = sigma * (max(x_n) - min(x_n))`` per sample (``sigma`` is Smilkov et al.'s *noise level*,
    relative to the sample's value range; Zennit's ``noise_level``). As in Zennit, the last copy is
    noise-free (``eps_n = 0``), so ``n = 1`` gives the plain gradient. The explained output is chosen
    at the noise-free x.

    The noise comes from ``numpy.random.default_rng(seed)``: ``standard_normal`` values drawn in the
    order (copy, sample, value) for the n - 1 noisy copies, times each sample's ``s``; each call to
    :meth:`compute` (each chunk of :meth:`Explainer.explain <deeptaylor.Explainer.explain>` with
    ``batch_size``) starts a fresh generator, so results are reproducible for the same batching.
    Agreement with Zennit on the same noise: tests/test_attribution.py.

    Parameters
    ----------
    n : int >= 1
        Copies averaged (Zennit's ``n_iter``; default 20).
    sigma : float >= 0
        Noise level relative to each sample's value range (default 0.1).
    seed : int
        Seed of the noise (default 0).
    batch_size : int, optional
        Rows (copies x images) per gradient pass (default: :data:`MAX_BATCH_VALUES` input values).
    """

    __slots__ = ("n", "sigma", "seed", "batch_size")

    def __init__(self, n: int = 20, sigma: float = 0.1, seed: int = 0, batch_size: int | None = None) -> None:
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)) or not (
                math.isfinite(float(sigma)) and float(sigma) >= 0):
            raise InputError(f"sigma must be a finite number >= 0, got {sigma!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise InputTypeError(f"seed must be an int, got {seed!r}")
        object.__setattr__(self, "n", _positive_int(n, "n"))
        object.__setattr__(self, "sigma", float(sigma))
        object.__setattr__(self, "seed", int(seed))
        object.__setattr__(self, "batch_size", _optional_batch(batch_size))

    def params(self) -> dict[str, Any]:
        """``n``, ``sigma``, ``seed``, ``batch_size``."""
        return {"n": self.n, "sigma": self.sigma, "seed": self.seed, "batch_size": self.batch_size}

    def compute(self, passes: Passes, x: np.ndarray, targets: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Relevance (shape of x), no extras."""
        out, g0 = passes.gradient(x, targets)
        t = np.argmax(out, axis=1) if targets is None else np.asarray(targets, dtype=np.int64)
        n, sample = x.shape[0], x.shape[1:]
        flat = x.reshape(n, -1)
        scale = self.sigma * (flat.max(axis=1).astype(np.float64) - flat.min(axis=1))
        scale = scale.reshape((1, n) + (1,) * len(sample))
        acc = g0.astype(np.float64)
        rng = np.random.default_rng(self.seed)
        rows = _rows_per_pass(self.batch_size, int(np.prod(sample)))
        for s0, s1, i0, i1 in _blocks(self.n - 1, n, rows):
            eps = rng.standard_normal((s1 - s0, i1 - i0) + sample) * scale[:, i0:i1]
            pts = (x[None, i0:i1] + eps).astype(passes.dtype).reshape((-1,) + sample)
            _, g = passes.gradient(pts, np.tile(t[i0:i1], s1 - s0))
            acc[i0:i1] += g.reshape((s1 - s0, i1 - i0) + sample).sum(axis=0)
        return out, (acc / self.n).astype(passes.dtype), {}


def _windows(size: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Captum's windows along one axis: starts 0, s, 2s, ... for ``ceil((size - window) / s) + 1``
    windows, the last one cut at the edge, so that every index is covered."""
    count = -(-(size - window) // stride) + 1
    return [(i * stride, min(size, i * stride + window)) for i in range(count)]


def _pair(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise InputError(f"{name} must be an int or a pair (h, w), got {value!r}")
        return _positive_int(value[0], name), _positive_int(value[1], name)
    v = _positive_int(value, name)
    return v, v


class Occlusion(CompoundMethod):
    """Occlusion sensitivity (Zeiler & Fergus 2014), Captum's ``Occlusion``: slide a window over the
    input, set it to the baseline, and give every value the mean drop of the explained output over the
    windows that cover it: ``R_p = mean_{W ∋ p} (f_t(x) - f_t(x with W := b))``, shape of x, units of f.

    For images (N, C, H, W) the window covers ``window`` = (kh, kw) pixels in all C channels at once
    (every channel of a pixel gets the same value); for flat input (N, F) it covers ``window`` features.
    Windows start at 0, s, 2s, ... along each axis, ``ceil((H - kh) / sh) + 1`` of them (the last one cut
    at the edge, so every position is covered), exactly Captum's ``Occlusion.attribute(x,
    sliding_window_shapes=(C, kh, kw), strides=(1, sh, sw), baselines=b, target=t)``. Zennit's
    ``Occlusion`` (``window=(kh, kw)``, ``stride=(sh, sw)``, occluding inside the window, score
    ``f_t(x) - f_t(occluded)``) sums instead of averaging and wraps windows around the edge; the two
    agree where windows tile the image (stride = window, dividing H and W). Tested against both.

    All windows x N images run as one batch of forward-only passes (chunked to bound memory).

    Parameters
    ----------
    window : int or (int, int)
        Window size in pixels (or features; default 8); a window larger than the input is cut to the
        input's size (as Zennit does), and its stride with it.
    stride : int or (int, int), optional
        Step between windows, 1 <= stride <= window (default: the window, non-overlapping).
    baseline : float or array broadcastable to the sample shape
        The value an occluded position takes (default 0).
    batch_size : int, optional
        Rows (windows x images) per forward pass (default: :data:`MAX_BATCH_VALUES` input values).
    """

    __slots__ = ("window", "stride", "baseline", "batch_size")

    def __init__(self, window: Any = 8, stride: Any = None, baseline: Any = 0.0,
                 batch_size: int | None = None) -> None:
        win = _pair(window, "window")
        st = win if stride is None else _pair(stride, "stride")
        if st[0] > win[0] or st[1] > win[1]:
            raise InputError(f"stride {st} must not exceed the window {win} (positions would be left out)")
        object.__setattr__(self, "window", win)
        object.__setattr__(self, "stride", st)
        object.__setattr__(self, "baseline", _baseline_value(baseline))
        object.__setattr__(self, "batch_size", _optional_batch(batch_size))

    def params(self) -> dict[str, Any]:
        """``window``, ``stride`` (pairs), ``baseline``, ``batch_size``."""
        return {"window": self.window, "stride": self.stride, "baseline": self.baseline,
                "batch_size": self.batch_size}

    def _regions(self, sample: tuple[int, ...]) -> list[tuple[slice, ...]]:
        """Index tuples (into one sample) of every window, row-major."""
        if len(sample) == 1:
            (size,) = sample
            if self.window[0] != self.window[1] or self.stride[0] != self.stride[1]:
                raise ShapeError("flat input (N, F): window and stride must be single ints")
            win = min(self.window[0], size)
            return [(slice(a, b),) for a, b in _windows(size, win, min(self.stride[0], win))]
        _, h, w = sample
        wh, ww = min(self.window[0], h), min(self.window[1], w)
        rows = _windows(h, wh, min(self.stride[0], wh))
        cols = _windows(w, ww, min(self.stride[1], ww))
        return [(slice(None), slice(r0, r1), slice(c0, c1)) for r0, r1 in rows for c0, c1 in cols]

    def compute(self, passes: Passes, x: np.ndarray, targets: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Relevance (shape of x), no extras."""
        out, t = _targets(passes, x, targets)
        n, sample = x.shape[0], x.shape[1:]
        regions = self._regions(sample)
        b = _broadcast_baseline(self.baseline, sample, "Occlusion baseline").astype(passes.dtype)
        f0 = out[np.arange(n), t].astype(np.float64)
        acc = np.zeros(x.shape, dtype=np.float64)
        count = np.zeros(sample, dtype=np.float64)
        for reg in regions:
            count[reg] += 1
        rows = _rows_per_pass(self.batch_size, int(np.prod(sample)))
        for s0, s1, i0, i1 in _blocks(len(regions), n, rows):
            batch = np.empty((s1 - s0, i1 - i0) + sample, dtype=passes.dtype)
            batch[...] = x[None, i0:i1]
            for j, reg in enumerate(regions[s0:s1]):
                batch[(j, slice(None)) + reg] = b[reg]
            o = passes.forward(batch.reshape((-1,) + sample)).reshape(s1 - s0, i1 - i0, -1)
            drop = f0[i0:i1] - o[:, np.arange(i1 - i0), t[i0:i1]].astype(np.float64)   # (windows, images)
            for j, reg in enumerate(regions[s0:s1]):
                acc[(slice(i0, i1),) + reg] += drop[j].reshape((-1,) + (1,) * len(sample))
        return out, (acc / count).astype(passes.dtype), {}
