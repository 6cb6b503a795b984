"""Graph passes: small functions ``Graph -> Graph`` that canonicalise a network before any backend
runs it (DESIGN.md §2b). The importers only translate ops; everything that simplifies the graph is
written once, here:

* :func:`drop_identities` removes ``Identity`` and ``Dropout`` nodes (evaluation mode);
* :func:`fold_batchnorm` folds a BatchNorm into the linear node before it when that is exact (the
  linear node's output is read by the BatchNorm only) -- as Zennit's ``MergeBatchNorm`` canonizers;
* :func:`resolve_adaptive_pools` turns an ``AdaptiveAvgPool2d`` whose windows are all of one size
  and stride (input divisible by the output size) into an ``AvgPool2d``;
* :func:`canonicalize` runs them in that order.

A pass returns its argument itself when it changes nothing, and a :class:`~deeptaylor.Sequential`
stays a Sequential when its result is still a chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import ShapeError
from .layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    ConvTranspose2d,
    Dense,
    Dropout,
    Identity,
    Layer,
)
from .network import Graph, Node, Sequential

__all__ = ["canonicalize", "drop_identities", "fold_batchnorm", "resolve_adaptive_pools", "rebuild", "fold_bn_into"]


def rebuild(net: Graph, nodes: Sequence[Node | None], alias: dict[int, int] | None = None) -> Graph:
    """A graph from ``net``'s nodes with some removed (``None``) or replaced, renumbering value ids.

    ``nodes[i]`` replaces node ``i`` (its ``inputs`` are still *old* value ids); ``alias`` maps an old
    value id to the old value id that stands for it (a removed node's output -> its input). The
    output is the (aliased) output of the last node. Nodes that no longer lead to the output are
    dropped. A Sequential whose result is a chain stays a Sequential.
    """
    alias = alias or {}

    def resolve(v: int) -> int:
        seen = 0
        while v in alias:
            v = alias[v]
            seen += 1
            if seen > len(nodes) + 1:  # pragma: no cover - would be a bug in a pass
                raise ShapeError("graph pass: cyclic alias")
        return v

    out_old = resolve(len(nodes))
    if out_old == 0:
        raise ShapeError("the network reduces to the identity (no layer besides Identity/Dropout)")
    # nodes that lead to the output
    live = [False] * (len(nodes) + 1)
    live[out_old] = True
    for i in range(len(nodes) - 1, -1, -1):
        if live[i + 1] and nodes[i] is not None:
            for v in nodes[i].inputs:
                live[resolve(v)] = True
    new_id = {0: 0}
    out: list[Node] = []
    for i, node in enumerate(nodes):
        if node is None or not live[i + 1] or i + 1 > out_old:
            continue
        out.append(Node(node.name, node.layer, tuple(new_id[resolve(v)] for v in node.inputs)))
        new_id[i + 1] = len(out)
    if isinstance(net, Sequential) and all(n.inputs == (k,) for k, n in enumerate(out)):
        return Sequential([n.layer for n in out])
    return Graph.from_nodes(net.input_shape or None, out)


def drop_identities(net: Graph) -> Graph:
    """Remove ``Identity`` and ``Dropout`` nodes (the network in evaluation mode): their readers read
    their input instead."""
    if not any(isinstance(n.layer, (Identity, Dropout)) for n in net.nodes):
        return net
    nodes: list[Node | None] = list(net.nodes)
    alias: dict[int, int] = {}
    for i, node in enumerate(net.nodes):
        if isinstance(node.layer, (Identity, Dropout)):
            nodes[i] = None
            alias[i + 1] = node.inputs[0]
    return rebuild(net, nodes, alias)


def fold_bn_into(linear: Layer, scale: np.ndarray, shift: np.ndarray) -> Layer:
    """The linear layer followed by the per-channel affine map ``y * scale + shift`` as one layer:
    ``W' = W * scale`` (per output channel), ``b' = b * scale + shift``. Computed in float64; float32
    weights stay float32."""
    w = np.asarray(linear.weight, dtype=np.float64)
    b = np.asarray(linear.bias, dtype=np.float64) * scale + shift
    keep32 = linear.weight.dtype == np.float32

    def cast(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32) if keep32 else a

    if isinstance(linear, Dense):
        return Dense(cast(w * scale[:, None]), b)
    if isinstance(linear, Conv2d):
        return Conv2d(cast(w * scale[:, None, None, None]), b, stride=linear.stride, padding=linear.padding,
                      dilation=linear.dilation, groups=linear.groups)
    if isinstance(linear, ConvTranspose2d):
        g = linear.groups
        cin, og = w.shape[0], w.shape[1]
        ws = w.reshape(g, cin // g, og, *w.shape[2:]) * scale.reshape(g, 1, og, 1, 1)
        return ConvTranspose2d(cast(ws.reshape(w.shape)), b, stride=linear.stride, padding=linear.padding,
                               output_padding=linear.output_padding, dilation=linear.dilation, groups=g)
    raise TypeError(f"cannot fold a BatchNorm into {linear.kind}")  # pragma: no cover


def fold_batchnorm(net: Graph) -> Graph:
    """Fold every BatchNorm whose input is the output of a Dense / Conv2d / ConvTranspose2d node read by
    that BatchNorm only (the BatchNorm of conv -> BN -> ReLU). The linear node keeps its name and
    position; the BatchNorm node disappears. A BatchNorm before its linear layer (DenseNet's
    pre-activation), after an Add, or after a linear output that something else also reads stays a
    node (relevance passes it unchanged unless the composite gives it a rule)."""
    if not any(isinstance(n.layer, (BatchNorm1d, BatchNorm2d)) for n in net.nodes):
        return net
    readers = net.consumers()
    nodes: list[Node | None] = list(net.nodes)
    alias: dict[int, int] = {}
    for i, node in enumerate(net.nodes):
        if not isinstance(node.layer, (BatchNorm1d, BatchNorm2d)):
            continue
        v = node.inputs[0]
        if v == 0 or len(readers[v]) != 1:
            continue
        prev = nodes[v - 1]
        if prev is None or not isinstance(prev.layer, (Dense, Conv2d, ConvTranspose2d)):
            continue
        bn = node.layer
        nodes[v - 1] = Node(prev.name, fold_bn_into(prev.layer, bn.scale, bn.shift), prev.inputs)
        nodes[i] = None
        alias[i + 1] = v
    if not alias:
        return net
    return rebuild(net, nodes, alias)


def resolve_adaptive_pools(net: Graph, sample_shape: Sequence[int] | None = None) -> Graph:
    """Replace every ``AdaptiveAvgPool2d`` whose input size is a multiple of its output size by the
    equal ``AvgPool2d(kernel = stride = input // output)``. Needs the input shape: ``sample_shape``
    or the graph's declared one (without either, the graph is returned unchanged)."""
    if not any(isinstance(n.layer, AdaptiveAvgPool2d) for n in net.nodes):
        return net
    shape = tuple(sample_shape) if sample_shape is not None else net.input_shape
    if not shape:
        return net
    shapes = net.shapes((1,) + tuple(int(s) for s in shape))
    nodes: list[Node | None] = list(net.nodes)
    changed = False
    for i, node in enumerate(net.nodes):
        if not isinstance(node.layer, AdaptiveAvgPool2d):
            continue
        _, _, h, w = shapes[node.inputs[0]]
        oh, ow = node.layer.output_size
        if h % oh == 0 and w % ow == 0:
            k = (h // oh, w // ow)
            nodes[i] = Node(node.name, AvgPool2d(k, k), node.inputs)
            changed = True
    return rebuild(net, nodes) if changed else net


PASSES: tuple[Callable[[Graph], Graph], ...] = (drop_identities, fold_batchnorm)


def canonicalize(net: Graph, sample_shape: Sequence[int] | None = None) -> Graph:
    """The canonical graph every backend runs: Identity/Dropout removed, BatchNorm folded where exact,
    adaptive pools resolved where exact (when the input shape is known: ``sample_shape`` or the
    graph's declared input shape). Returns ``net`` itself when nothing changes."""
    for p in PASSES:
        net = p(net)
    return resolve_adaptive_pools(net, sample_shape)
