"""The reference forward, relevance and gradient passes through a whole network (float64 NumPy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, UnsupportedError
from ..layers import (
    Activation,
    Add,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    ChannelShuffle,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GlobalSumPool,
    Identity,
    Layer,
    LpPool,
    MaxPool2d,
    Mul,
    ReLU,
    Slice,
    SumPool2d,
    Upsample,
)
from ..methods import Gradient, GradientXInput, Method, Sensitivity
from ..network import Graph
from ..rules import Rule
from . import ops
from .relevance import batchnorm_relevance, linear_relevance, norm_split, safe_divide

__all__ = ["forward_layer", "relevance_layer", "gradient_layer", "forward_node", "relevance_node",
           "gradient_node", "forward", "run", "start_values", "Pass"]

_LINEAR = (Dense, Conv2d, ConvTranspose2d)
_BATCHNORM = (BatchNorm1d, BatchNorm2d)


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) float64 -> broadcastable against (N, C) or (N, C, H, W)."""
    return np.asarray(v, dtype=np.float64).reshape((1, -1) + (1,) * (ndim - 2))


def _avgpool_default(layer: AvgPool2d) -> bool:
    """No ceil_mode and count_include_pad: every divisor is kh*kw (the historical formula, kept bit
    for bit)."""
    return not layer.ceil_mode and layer.count_include_pad


def _adaptive_sum(a: np.ndarray, rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> np.ndarray:
    """Window sums of an adaptive pool: (N, C, H, W) -> (N, C, len(rows), len(cols))."""
    out = np.zeros(a.shape[:2] + (len(rows), len(cols)), dtype=a.dtype)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, i, j] = a[:, :, r0:r1, c0:c1].sum(axis=(2, 3))
    return out


def _adaptive_scatter(y: np.ndarray, rows: list[tuple[int, int]], cols: list[tuple[int, int]],
                      shape: tuple[int, ...]) -> np.ndarray:
    """Transpose of :func:`_adaptive_sum`: every input gets the sum of the outputs whose window holds it."""
    out = np.zeros(shape, dtype=y.dtype)
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            out[:, :, r0:r1, c0:c1] += y[:, :, i:i + 1, j:j + 1]
    return out


def _adaptive_counts(rows: list[tuple[int, int]], cols: list[tuple[int, int]]) -> np.ndarray:
    """(OH, OW) float64: the number of inputs in every adaptive window."""
    return np.outer([r1 - r0 for r0, r1 in rows], [c1 - c0 for c0, c1 in cols]).astype(np.float64)


def _upsample_sum(R: np.ndarray, scale: tuple[int, int]) -> np.ndarray:
    """Sum over the copies of nearest upsampling: (N, C, H*sh, W*sw) -> (N, C, H, W)."""
    n, c, oh, ow = R.shape
    sh, sw = scale
    return R.reshape(n, c, oh // sh, sh, ow // sw, sw).sum(axis=(3, 5))


def _unshuffle(R: np.ndarray, layer: ChannelShuffle) -> np.ndarray:
    """Inverse of the channel permutation: output channel k goes back to input channel perm[k]."""
    out = np.empty_like(R)
    out[:, layer.permutation(R.shape[1])] = R
    return out


def _unslice(R: np.ndarray, layer: Slice, shape: tuple[int, ...]) -> np.ndarray:
    """Scatter the slice's relevance (or gradient) into zeros of the input's shape."""
    out = np.zeros(shape, dtype=R.dtype)
    out[:, layer.start:layer.stop] = R
    return out


def forward_layer(layer: Layer, a: np.ndarray) -> tuple[np.ndarray, Any]:
    """Forward one single-input layer: a (the layer's input shape) -> (output, cache); the cache holds
    what the backward passes need beyond the input (max-pool winners)."""
    if isinstance(layer, _LINEAR):
        return ops.linear_forward(layer, a, np.asarray(layer.weight, dtype=np.float64),
                                 np.asarray(layer.bias, dtype=np.float64)), None
    if isinstance(layer, ReLU):
        return np.maximum(a, 0.0), None
    if isinstance(layer, Activation):
        return ops.activation_forward(layer.fn, layer.param, a), None
    if isinstance(layer, _BATCHNORM):
        return a * _channel(layer.scale, a.ndim) + _channel(layer.shift, a.ndim), None
    if isinstance(layer, MaxPool2d):
        return ops.maxpool_forward(a, layer.kernel_size, layer.stride, layer.resolved_padding(*a.shape[2:]))
    if isinstance(layer, AvgPool2d):
        if _avgpool_default(layer):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            return ops.window_sum(a, layer.kernel_size, layer.stride, layer.padding) / k, None
        pad = layer.resolved_padding(*a.shape[2:])
        return ops.window_sum(a, layer.kernel_size, layer.stride, pad) * layer.inv_count(*a.shape[2:]), None
    if isinstance(layer, AdaptiveAvgPool2d):
        rows, cols = layer.windows(*a.shape[2:])
        return _adaptive_sum(a, rows, cols) / _adaptive_counts(rows, cols), None
    if isinstance(layer, GlobalAvgPool):
        return a.sum(axis=(2, 3)) / (a.shape[2] * a.shape[3]), None
    if isinstance(layer, SumPool2d):
        return ops.window_sum(a, layer.kernel_size, layer.stride, layer.resolved_padding(*a.shape[2:])), None
    if isinstance(layer, GlobalSumPool):
        return a.reshape(a.shape[0], -1).sum(axis=1, keepdims=True), None
    if isinstance(layer, LpPool):
        ap = np.abs(a) ** layer.p
        if layer.kernel_size is None:
            s = ap.reshape(a.shape[0], -1).sum(axis=1, keepdims=True)
        else:
            s = ops.window_sum(ap, layer.kernel_size, layer.stride, layer.padding)
        return s ** (1.0 / layer.p), None
    if isinstance(layer, Flatten):
        return a.reshape(a.shape[0], -1), None
    if isinstance(layer, Upsample):
        sh, sw = layer.scale_factor
        return np.repeat(np.repeat(a, sh, axis=2), sw, axis=3), None
    if isinstance(layer, ChannelShuffle):
        return a[:, layer.permutation(a.shape[1])], None
    if isinstance(layer, Slice):
        return a[:, layer.start:layer.stop].copy(), None
    if isinstance(layer, (Identity, Dropout)):
        return a, None
    raise UnsupportedError(f"no reference forward for {type(layer).__name__}")


def _proportional(layer: Layer, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Pooling relevance in proportion to the inputs (z-rule with unit weights):
    R_i = a_i sum_{j covering i} R_j / (sum_{i' in j} a_i') (0 where a window sums to 0; an average's
    divisor cancels). a (N, C, H, W) or (N, F); R the pool's output shape; returns a's shape."""
    if isinstance(layer, AdaptiveAvgPool2d):
        rows, cols = layer.windows(*a.shape[2:])
        s = safe_divide(R, _adaptive_sum(a, rows, cols))
        return a * _adaptive_scatter(s, rows, cols, a.shape)
    if isinstance(layer, GlobalAvgPool):  # per channel
        s = safe_divide(R, a.sum(axis=(2, 3)))
        return a * s[:, :, None, None]
    if getattr(layer, "kernel_size", None) is None:  # global pools
        flat = a.reshape(a.shape[0], -1)
        s = safe_divide(R, flat.sum(axis=1, keepdims=True))
        return (flat * s).reshape(a.shape)
    pad = layer.resolved_padding(*a.shape[2:]) if isinstance(layer, (AvgPool2d, SumPool2d)) else layer.padding
    z = ops.window_sum(a, layer.kernel_size, layer.stride, pad)
    s = safe_divide(R, z)
    return a * ops.window_scatter(s, layer.kernel_size, layer.stride, pad, a.shape)


def relevance_layer(layer: Layer, rule: Rule | None, a: np.ndarray, cache: Any, R: np.ndarray) -> np.ndarray:
    """Relevance at the input of a single-input ``layer`` from the relevance ``R`` of its output.

    Linear layers (Dense, Conv2d, ConvTranspose2d) apply their ``rule``; standalone BatchNorm applies
    its optional rule (None: pass); ReLU and the other activations pass relevance through (DTD, slide
    003: R_j = x_j; Zennit's Pass); sum/avg/p-norm/adaptive/global pooling redistribute in proportion
    to their inputs (training-free relevance model); max pooling is winner-take-all; Flatten reshapes;
    Upsample sums the copies; ChannelShuffle permutes back; Slice scatters into zeros; Identity and
    Dropout pass. a: the layer's input, R: its output's shape; returns a's shape.
    """
    if isinstance(layer, _LINEAR):
        assert rule is not None
        return linear_relevance(layer, rule, a, R)
    if isinstance(layer, _BATCHNORM):
        return batchnorm_relevance(layer, rule, a, R)
    if isinstance(layer, (ReLU, Activation, Identity, Dropout)):
        return R
    if isinstance(layer, MaxPool2d):
        return ops.maxpool_scatter(R, cache, layer.kernel_size, layer.stride,
                                   layer.resolved_padding(*a.shape[2:]), a.shape)
    if isinstance(layer, (AvgPool2d, SumPool2d, GlobalSumPool, LpPool, AdaptiveAvgPool2d, GlobalAvgPool)):
        return _proportional(layer, a, R)
    if isinstance(layer, Flatten):
        return R.reshape(a.shape)
    if isinstance(layer, Upsample):
        return _upsample_sum(R, layer.scale_factor)
    if isinstance(layer, ChannelShuffle):
        return _unshuffle(R, layer)
    if isinstance(layer, Slice):
        return _unslice(R, layer, a.shape)
    raise UnsupportedError(f"no reference relevance for {type(layer).__name__}")


def gradient_layer(layer: Layer, a: np.ndarray, out: np.ndarray, cache: Any, g: np.ndarray) -> np.ndarray:
    """Backpropagate the gradient ``g`` (shape of the layer's output) to its input (shape of ``a``)."""
    if isinstance(layer, _LINEAR):
        return ops.linear_transpose(layer, g, np.asarray(layer.weight, dtype=np.float64), a.shape)
    if isinstance(layer, ReLU):
        return g * (a > 0)
    if isinstance(layer, Activation):
        return g * ops.activation_derivative(layer.fn, layer.param, a)
    if isinstance(layer, _BATCHNORM):
        return g * _channel(layer.scale, a.ndim)
    if isinstance(layer, (Identity, Dropout)):
        return g
    if isinstance(layer, MaxPool2d):
        return ops.maxpool_scatter(g, cache, layer.kernel_size, layer.stride,
                                   layer.resolved_padding(*a.shape[2:]), a.shape)
    if isinstance(layer, AvgPool2d):
        if _avgpool_default(layer):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            return ops.window_scatter(g / k, layer.kernel_size, layer.stride, layer.padding, a.shape)
        pad = layer.resolved_padding(*a.shape[2:])
        return ops.window_scatter(g * layer.inv_count(*a.shape[2:]), layer.kernel_size, layer.stride, pad,
                                  a.shape)
    if isinstance(layer, AdaptiveAvgPool2d):
        rows, cols = layer.windows(*a.shape[2:])
        return _adaptive_scatter(g / _adaptive_counts(rows, cols), rows, cols, a.shape)
    if isinstance(layer, GlobalAvgPool):
        return np.broadcast_to((g / (a.shape[2] * a.shape[3]))[:, :, None, None], a.shape).copy()
    if isinstance(layer, SumPool2d):
        return ops.window_scatter(g, layer.kernel_size, layer.stride, layer.resolved_padding(*a.shape[2:]),
                                  a.shape)
    if isinstance(layer, GlobalSumPool):
        return np.broadcast_to(g.reshape((-1,) + (1,) * (a.ndim - 1)), a.shape).copy()
    if isinstance(layer, LpPool):
        # d/dx_i (sum |x|^p)^(1/p) = sign(x_i) |x_i|^(p-1) / y^(p-1)
        local = np.sign(a) * np.abs(a) ** (layer.p - 1.0)
        gy = safe_divide(g, out ** (layer.p - 1.0))
        if layer.kernel_size is None:
            return local * gy.reshape((-1,) + (1,) * (a.ndim - 1))
        return local * ops.window_scatter(gy, layer.kernel_size, layer.stride, layer.padding, a.shape)
    if isinstance(layer, Flatten):
        return g.reshape(a.shape)
    if isinstance(layer, Upsample):
        return _upsample_sum(g, layer.scale_factor)
    if isinstance(layer, ChannelShuffle):
        return _unshuffle(g, layer)
    if isinstance(layer, Slice):
        return _unslice(g, layer, a.shape)
    raise UnsupportedError(f"no reference gradient for {type(layer).__name__}")


def forward_node(layer: Layer, inputs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
    """Forward one node on its input arrays (one per input, in the node's input order). Returns
    ``(output, cache)``. Add: the sum (left to right); Concat: along axis 1; Mul: signal * gate (the
    gate (N, C, 1, 1) broadcast over H, W)."""
    if layer.arity == 1:
        return forward_layer(layer, inputs[0])
    if isinstance(layer, Add):
        out = inputs[0] + inputs[1]
        for a in inputs[2:]:
            out = out + a
        return out, None
    if isinstance(layer, Concat):
        return np.concatenate(inputs, axis=1), None
    if isinstance(layer, Mul):
        return inputs[0] * inputs[1], None
    raise UnsupportedError(f"no reference forward for {type(layer).__name__}")


def relevance_node(layer: Layer, rule: Rule | None, inputs: list[np.ndarray], out: np.ndarray, cache: Any,
                   R: np.ndarray) -> list[np.ndarray]:
    """Relevance at each input of a node from the relevance ``R`` of its output (one array per input,
    each of its input's shape). Add: Zennit's Norm rule (:func:`~.relevance.norm_split`, the layer's
    ``eps``); Concat: R sliced by position; Mul: all of R to the signal, zeros to the gate (Arras et
    al. 2017)."""
    if layer.arity == 1:
        return [relevance_layer(layer, rule, inputs[0], cache, R)]
    if isinstance(layer, Add):
        return norm_split(inputs, out, R, layer.eps)
    if isinstance(layer, Concat):
        bounds = np.cumsum([a.shape[1] for a in inputs])[:-1]
        return np.split(R, bounds, axis=1)
    if isinstance(layer, Mul):
        return [R, np.zeros_like(inputs[1])]
    raise UnsupportedError(f"no reference relevance for {type(layer).__name__}")


def gradient_node(layer: Layer, inputs: list[np.ndarray], out: np.ndarray, cache: Any,
                  g: np.ndarray) -> list[np.ndarray]:
    """The gradient ``g`` of the node's output backpropagated to each of its inputs. Mul: the product
    rule, the gate's part summed over the axes it was broadcast along."""
    if layer.arity == 1:
        return [gradient_layer(layer, inputs[0], out, cache, g)]
    if isinstance(layer, Add):
        return [g for _ in inputs]
    if isinstance(layer, Concat):
        bounds = np.cumsum([a.shape[1] for a in inputs])[:-1]
        return np.split(g, bounds, axis=1)
    if isinstance(layer, Mul):
        sig, gate = inputs
        g_gate = g * sig
        if gate.shape != sig.shape:
            g_gate = g_gate.sum(axis=(2, 3), keepdims=True)
        return [g * gate, g_gate]
    raise UnsupportedError(f"no reference gradient for {type(layer).__name__}")


def _forward_all(net: Graph, x: np.ndarray) -> tuple[list[np.ndarray], list[Any]]:
    """Every value (input, then each node's output) and every node's cache. Values are dropped
    after their last reader (the reference keeps only what it needs... except that the relevance
    pass needs them all, so :func:`run` keeps them; :func:`forward` frees them)."""
    acts: list[np.ndarray] = [x]
    caches: list[Any] = []
    for node in net.nodes:
        out, cache = forward_node(node.layer, [acts[v] for v in node.inputs])
        acts.append(out)
        caches.append(cache)
    return acts, caches


def forward(net: Graph, x: np.ndarray) -> np.ndarray:
    """The network's output for ``x`` (float64), freeing every value after its last reader."""
    consumers = net.consumers()
    last = [max(c) if c else -1 for c in consumers]
    acts: dict[int, np.ndarray] = {0: x}
    for i, node in enumerate(net.nodes):
        out, _ = forward_node(node.layer, [acts[v] for v in node.inputs])
        acts[i + 1] = out
        for v in set(node.inputs):
            if last[v] == i:
                del acts[v]
    return acts[len(net)]


@dataclass
class Pass:
    """Everything one reference pass computed (lists indexed by value id: 0 is the input, ``i + 1``
    the output of node ``i``)."""

    output: np.ndarray            # (N, *out) network output
    relevance: np.ndarray         # shape of x; (N, K, *x.shape[1:]) with K passes (run's k axis)
    layers: list[np.ndarray]      # relevance at every value (len L+1): input of every layer, then the output
                                  # (only the input's with run(keep_layers=False))
    activations: list[np.ndarray]  # every value (len L+1)


def _accumulate(buf: list[np.ndarray | None], v: int, r: np.ndarray) -> None:
    buf[v] = r if buf[v] is None else buf[v] + r


def start_values(output: np.ndarray, targets: np.ndarray | None, *, top: int | None = None,
                 seed: np.ndarray | None = None, seed_times_output: bool = False,
                 gradient: bool = False) -> tuple[list[np.ndarray], bool]:
    """The relevance (or, ``gradient=True``, the output gradient) each backward pass starts from.

    ``output`` (N, *out). Exactly one source: ``seed`` (N, *out) or (N, K, *out), as given or, with
    ``seed_times_output``, times ``output``; else one-hot at ``targets`` (N,) or (N, K) (flat indices
    into the per-sample output, C-order), times the output unless ``gradient``; else at the ``top``
    largest outputs (largest first, ties to the lower index) or, with neither, at the largest (argmax).
    Returns ``(list of K arrays (N, *out), k_axis)``; ``k_axis``: the results get a K axis after N
    (2-D targets, a seed with a K axis, or ``top``)."""
    n = output.shape[0]
    flat = output.reshape(n, -1)
    if seed is not None:
        k_axis = seed.ndim == output.ndim + 1
        parts = [seed[:, k] for k in range(seed.shape[1])] if k_axis else [seed]
        return [np.asarray(p, dtype=output.dtype) * (output if seed_times_output else 1.0) for p in parts], k_axis
    if targets is None:
        if top is not None:
            targets = np.argsort(-flat, axis=1, kind="stable")[:, :top]
        else:
            targets = np.argmax(flat, axis=1)
    t = np.asarray(targets)
    k_axis = t.ndim == 2
    cols = t.T if k_axis else t[None]
    starts = []
    for tk in cols:
        onehot = np.zeros_like(flat)
        onehot[np.arange(n), tk] = 1.0
        starts.append((onehot if gradient else flat * onehot).reshape(output.shape))
    return starts, k_axis


def _backward(net: Graph, assignment: list[Rule | None] | Method, acts: list[np.ndarray], caches: list[Any],
              start: np.ndarray) -> list[np.ndarray]:
    """One backward pass from ``start`` at the output: the relevance (gradient) at every value."""
    L = len(net)
    method = isinstance(assignment, Method)
    buf: list[np.ndarray | None] = [None] * (L + 1)
    buf[L] = start
    for i in range(L - 1, -1, -1):
        node = net.nodes[i]
        R = buf[i + 1]
        if R is None:
            R = np.zeros_like(acts[i + 1])
            buf[i + 1] = R
        ins = [acts[v] for v in node.inputs]
        try:
            if method:
                parts = gradient_node(node.layer, ins, acts[i + 1], caches[i], R)
            else:
                parts = relevance_node(node.layer, assignment[i], ins, acts[i + 1], caches[i], R)
        except DeepTaylorError as exc:
            raise type(exc)(f"{net._where(i)}: {exc}") from None
        for v, r in zip(node.inputs, parts, strict=True):
            _accumulate(buf, v, r)
    if buf[0] is None:
        buf[0] = np.zeros_like(acts[0])
    layers: list[np.ndarray] = [b if b is not None else np.zeros_like(a) for b, a in zip(buf, acts)]
    if method:
        if isinstance(assignment, Sensitivity):
            layers = [g ** 2 for g in layers]
        elif isinstance(assignment, GradientXInput):
            layers = [g * a for g, a in zip(layers, acts)]
        elif isinstance(assignment, Gradient):
            pass
        else:  # pragma: no cover - guarded by the Explainer
            raise UnsupportedError(f"unknown method {assignment!r}")
    return layers


def run(net: Graph, assignment: list[Rule | None] | Method, x: np.ndarray,
        targets: np.ndarray | None, *, top: int | None = None, seed: np.ndarray | None = None,
        seed_times_output: bool = False, keep_layers: bool = True) -> Pass:
    """Forward ``x`` (N, ...) through ``net``, then propagate back from the targets' outputs.

    ``assignment`` is the per-node rule list of a resolved composite, or a gradient method.
    ``targets`` (N,) int: the output explained per sample (a flat index into the per-sample output);
    None: the largest output (argmax). Returns a :class:`Pass`. Relevance starts as
    ``R_out[n, t_n] = f_{t_n}(x_n)`` (others 0); for a gradient method the backward pass starts from the
    one-hot ``df_t/df``. Nodes are visited in reverse topological order; a value read by several nodes
    receives the sum of their relevances (gradients). A value that no path from the output reaches
    gets zeros.

    Many targets and seeds (:func:`start_values`): ``targets`` (N, K), ``top`` (the K largest outputs,
    with ``targets`` None) or ``seed`` (N, *out) / (N, K, *out) (the relevance, or for a gradient
    method the output gradient, to start from; times the output with ``seed_times_output``). The K
    backward passes share the forward pass; with a K axis the relevance is (N, K, *x.shape[1:]) and
    every ``layers`` entry (N, K, ...). ``keep_layers=False``: ``layers`` holds the input's relevance
    only (less memory).
    """
    acts, caches = _forward_all(net, x)
    output = acts[-1]
    starts, k_axis = start_values(output, targets, top=top, seed=seed, seed_times_output=seed_times_output,
                                  gradient=isinstance(assignment, Method))
    passes = []
    for start in starts:
        layers = _backward(net, assignment, acts, caches, start)
        passes.append(layers if keep_layers else layers[:1])
    if k_axis:
        layers = [np.stack([p[v] for p in passes], axis=1) for v in range(len(passes[0]))]
    else:
        layers = passes[0]
    return Pass(output=output, relevance=layers[0], layers=layers, activations=acts)
