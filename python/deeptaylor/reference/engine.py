"""The reference forward, relevance and gradient passes through a whole network (float64 NumPy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UnsupportedError
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
from ..methods import GradientXInput, Method, Sensitivity
from ..network import Graph
from ..rules import Rule
from . import ops
from .relevance import linear_relevance, safe_divide

__all__ = ["forward_layer", "relevance_layer", "gradient_layer", "forward_node", "relevance_node",
           "gradient_node", "forward", "run", "Pass"]


def forward_layer(layer: Layer, a: np.ndarray) -> tuple[np.ndarray, Any]:
    """Forward one layer. Returns ``(output, cache)``; the cache holds what the backward passes
    need beyond the input (max-pool winners)."""
    if isinstance(layer, (Dense, Conv2d)):
        return ops.linear_forward(layer, a, np.asarray(layer.weight, dtype=np.float64),
                                 np.asarray(layer.bias, dtype=np.float64)), None
    if isinstance(layer, ReLU):
        return np.maximum(a, 0.0), None
    if isinstance(layer, MaxPool2d):
        return ops.maxpool_forward(a, layer.kernel_size, layer.stride, layer.padding)
    if isinstance(layer, AvgPool2d):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return ops.window_sum(a, layer.kernel_size, layer.stride, layer.padding) / k, None
    if isinstance(layer, SumPool2d):
        return ops.window_sum(a, layer.kernel_size, layer.stride, layer.padding), None
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
    raise UnsupportedError(f"no reference forward for {type(layer).__name__}")


def _proportional(layer: Layer, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Pooling relevance in proportion to the inputs (z-rule with unit weights):
    R_i = a_i sum_{j covering i} R_j / (sum_{i' in j} a_i')."""
    if getattr(layer, "kernel_size", None) is None:  # global pools
        flat = a.reshape(a.shape[0], -1)
        s = safe_divide(R, flat.sum(axis=1, keepdims=True))
        return (flat * s).reshape(a.shape)
    z = ops.window_sum(a, layer.kernel_size, layer.stride, layer.padding)
    s = safe_divide(R, z)
    return a * ops.window_scatter(s, layer.kernel_size, layer.stride, layer.padding, a.shape)


def relevance_layer(layer: Layer, rule: Rule | None, a: np.ndarray, cache: Any, R: np.ndarray) -> np.ndarray:
    """Relevance at the input of ``layer`` from the relevance ``R`` of its output.

    Linear layers apply their ``rule``; ReLU passes relevance through (DTD, slide 003: R_j = x_j);
    sum/avg/p-norm pooling redistribute in proportion to their inputs (training-free relevance model);
    max pooling is winner-take-all; Flatten reshapes.
    """
    if isinstance(layer, (Dense, Conv2d)):
        assert rule is not None
        return linear_relevance(layer, rule, a, R)
    if isinstance(layer, ReLU):
        return R
    if isinstance(layer, MaxPool2d):
        return ops.maxpool_scatter(R, cache, layer.kernel_size, layer.stride, layer.padding, a.shape)
    if isinstance(layer, (AvgPool2d, SumPool2d, GlobalSumPool, LpPool)):
        return _proportional(layer, a, R)
    if isinstance(layer, Flatten):
        return R.reshape(a.shape)
    raise UnsupportedError(f"no reference relevance for {type(layer).__name__}")


def gradient_layer(layer: Layer, a: np.ndarray, out: np.ndarray, cache: Any, g: np.ndarray) -> np.ndarray:
    """Backpropagate the gradient ``g`` (shape of the layer's output) to its input (shape of ``a``)."""
    if isinstance(layer, (Dense, Conv2d)):
        return ops.linear_transpose(layer, g, np.asarray(layer.weight, dtype=np.float64), a.shape)
    if isinstance(layer, ReLU):
        return g * (a > 0)
    if isinstance(layer, MaxPool2d):
        return ops.maxpool_scatter(g, cache, layer.kernel_size, layer.stride, layer.padding, a.shape)
    if isinstance(layer, AvgPool2d):
        k = layer.kernel_size[0] * layer.kernel_size[1]
        return ops.window_scatter(g / k, layer.kernel_size, layer.stride, layer.padding, a.shape)
    if isinstance(layer, SumPool2d):
        return ops.window_scatter(g, layer.kernel_size, layer.stride, layer.padding, a.shape)
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
    raise UnsupportedError(f"no reference gradient for {type(layer).__name__}")


def forward_node(layer: Layer, inputs: list[np.ndarray]) -> tuple[np.ndarray, Any]:
    """Forward one node on its input arrays (one per input). Returns ``(output, cache)``."""
    if layer.arity == 1:
        return forward_layer(layer, inputs[0])
    raise UnsupportedError(f"no reference forward for {type(layer).__name__}")


def relevance_node(layer: Layer, rule: Rule | None, inputs: list[np.ndarray], out: np.ndarray, cache: Any,
                   R: np.ndarray) -> list[np.ndarray]:
    """Relevance at each input of a node from the relevance ``R`` of its output (one array per input,
    each of its input's shape)."""
    if layer.arity == 1:
        return [relevance_layer(layer, rule, inputs[0], cache, R)]
    raise UnsupportedError(f"no reference relevance for {type(layer).__name__}")


def gradient_node(layer: Layer, inputs: list[np.ndarray], out: np.ndarray, cache: Any,
                  g: np.ndarray) -> list[np.ndarray]:
    """The gradient ``g`` of the node's output backpropagated to each of its inputs."""
    if layer.arity == 1:
        return [gradient_layer(layer, inputs[0], out, cache, g)]
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

    output: np.ndarray            # (N, K) network output
    relevance: np.ndarray         # shape of x
    layers: list[np.ndarray]      # relevance at every value (len L+1): input of every layer, then the output
    activations: list[np.ndarray]  # every value (len L+1)


def _accumulate(buf: list[np.ndarray | None], v: int, r: np.ndarray) -> None:
    buf[v] = r if buf[v] is None else buf[v] + r


def run(net: Graph, assignment: list[Rule | None] | Method, x: np.ndarray,
        targets: np.ndarray | None) -> Pass:
    """Forward ``x`` (N, ...) through ``net``, then propagate back from the targets' outputs.

    ``assignment`` is the per-node rule list of a resolved composite, or a gradient method.
    ``targets`` (N,) int: the output explained per sample; None: the largest output (argmax).
    Returns a :class:`Pass`. Relevance starts as ``R_out[n, t_n] = f_{t_n}(x_n)`` (others 0); for a
    gradient method the backward pass starts from the one-hot ``df_t/df``. Nodes are visited in
    reverse topological order; a value read by several nodes receives the sum of their relevances
    (gradients). A value that no path from the output reaches gets zeros.
    """
    acts, caches = _forward_all(net, x)
    L = len(net)
    output = acts[-1]
    n = output.shape[0]
    t = np.argmax(output, axis=1) if targets is None else np.asarray(targets)
    onehot = np.zeros_like(output)
    onehot[np.arange(n), t] = 1.0
    method = isinstance(assignment, Method)
    buf: list[np.ndarray | None] = [None] * (L + 1)
    buf[L] = onehot if method else output * onehot
    for i in range(L - 1, -1, -1):
        node = net.nodes[i]
        R = buf[i + 1]
        if R is None:
            R = np.zeros_like(acts[i + 1])
            buf[i + 1] = R
        ins = [acts[v] for v in node.inputs]
        if method:
            parts = gradient_node(node.layer, ins, acts[i + 1], caches[i], R)
        else:
            parts = relevance_node(node.layer, assignment[i], ins, acts[i + 1], caches[i], R)
        for v, r in zip(node.inputs, parts, strict=True):
            _accumulate(buf, v, r)
    if buf[0] is None:
        buf[0] = np.zeros_like(x)
    layers: list[np.ndarray] = [b if b is not None else np.zeros_like(a) for b, a in zip(buf, acts)]
    if method:
        if isinstance(assignment, Sensitivity):
            layers = [g ** 2 for g in layers]
        elif isinstance(assignment, GradientXInput):
            layers = [g * a for g, a in zip(layers, acts)]
        else:  # pragma: no cover - guarded by the Explainer
            raise UnsupportedError(f"unknown method {assignment!r}")
    return Pass(output=output, relevance=layers[0], layers=layers, activations=acts)
