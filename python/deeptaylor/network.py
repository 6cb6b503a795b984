"""Networks: :class:`Graph` (a DAG of layers) and :class:`Sequential` (the one-chain graph).

A graph is built by calling layers on symbolic tensors::

    x   = dt.Input((3, 32, 32))                  # per-sample shape
    h   = dt.ReLU()(dt.Conv2d(w1, b1, padding=1)(x, name="conv1"))
    y   = dt.Add()(h, x)                         # residual
    out = dt.Dense(w2, b2)(dt.Flatten()(y))
    net = dt.Graph(x, out)

Representation (shared by the reference, the compiled plan, the native file format and the
importers): ``Graph.nodes`` is a tuple of :class:`Node` in topological order; **value ids** number
the tensors: 0 is the graph input, ``i + 1`` the output of node ``i``; ``nodes[i].inputs`` are value
ids. The network's output is the output of the last node.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputTypeError, ShapeError, UnsupportedError
from .layers import Hardsigmoid, Layer, Mul, Sigmoid

__all__ = ["Tensor", "Input", "Node", "Graph", "Sequential"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/\-\[\]]+$")
_counter = itertools.count()


class Tensor:
    """A symbolic tensor: the graph input (:func:`Input`) or the output of a layer called on
    symbolic tensors. ``shape`` is the per-sample shape (no batch axis)."""

    __slots__ = ("shape", "layer", "inputs", "name", "_id")

    def __init__(self, shape: tuple[int, ...], layer: Layer | None, inputs: tuple[Tensor, ...],
                 name: str | None) -> None:
        self.shape = shape
        self.layer = layer
        self.inputs = inputs
        self.name = name
        self._id = next(_counter)

    def __repr__(self) -> str:
        what = "Input" if self.layer is None else f"{self.layer.kind} {self.name!r}"
        return f"Tensor({what}, shape={self.shape})"


def Input(shape: Sequence[int]) -> Tensor:  # noqa: N802 - a constructor-like factory, as Keras' Input
    """The graph's input: a symbolic tensor of per-sample ``shape`` ``(F,)`` or ``(C, H, W)``."""
    try:
        s = tuple(int(v) for v in shape)
    except TypeError as exc:
        raise InputTypeError(f"Input: shape must be a sequence of ints, got {shape!r}") from exc
    if len(s) not in (1, 3) or min(s) < 1:
        raise ShapeError(f"Input: a per-sample shape (F,) or (C, H, W) of positive sizes, got {s}")
    return Tensor(s, None, (), None)


def _is_gate(t: Tensor) -> bool:
    return isinstance(t.layer, (Sigmoid, Hardsigmoid))


def _apply(layer: Layer, inputs: tuple[Any, ...], name: str | None) -> Tensor:
    """Symbolic call of ``layer`` on ``inputs`` (see :meth:`Layer.__call__`)."""
    for k, t in enumerate(inputs):
        if not isinstance(t, Tensor):
            raise InputTypeError(f"{layer.kind}: input {k} is {type(t).__name__}, not a symbolic tensor "
                                 "(start from dt.Input(shape))")
    n = len(inputs)
    if layer.arity is None and n < 2:
        raise ShapeError(f"{layer.kind} takes two or more inputs, got {n}")
    if layer.arity is not None and n != layer.arity:
        raise ShapeError(f"{layer.kind} takes {layer.arity} input(s), got {n}")
    if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name)):
        raise InputTypeError(f"{layer.kind}: node name must be a non-empty string of letters, digits and "
                             f"'_.:/-[]', got {name!r}")
    if isinstance(layer, Mul):
        a, b = inputs
        broadcast = len(a.shape) == 3 and b.shape == (a.shape[0], 1, 1) and a.shape != b.shape
        broadcast_a = len(b.shape) == 3 and a.shape == (b.shape[0], 1, 1) and a.shape != b.shape
        if _is_gate(b) or broadcast:
            pass
        elif _is_gate(a) or broadcast_a:
            inputs = (b, a)
        else:
            raise UnsupportedError(
                f"Mul{'' if name is None else ' ' + repr(name)}: neither operand is a gate (a tensor from "
                "Sigmoid/Hardsigmoid, or a (C, 1, 1) tensor broadcast over a larger signal); deeptaylor "
                "explains only gated products (relevance to the signal, none to the gate)")
    shapes = [(1,) + t.shape for t in inputs]
    try:
        out = layer.output_shape(*shapes)
    except ShapeError as exc:
        where = layer.kind if name is None else f"{layer.kind} {name!r}"
        raise ShapeError(f"{where}: {exc}") from None
    return Tensor(tuple(int(v) for v in out[1:]), layer, tuple(inputs), name)


@dataclass(frozen=True)
class Node:
    """One node of a :class:`Graph`: ``layer`` applied to the values ``inputs`` (value ids: 0 is the
    graph input, ``i + 1`` the output of node ``i``)."""

    name: str
    layer: Layer
    inputs: tuple[int, ...]

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.layer!r}, inputs={self.inputs})"


def _short(layer: Layer) -> str:
    """A one-line description of a layer for graph listings: ``Conv2d 3->64 7x7 /2 p3``."""
    kind = layer.kind
    if kind in ("Conv2d", "ConvTranspose2d"):
        kh, kw = layer.kernel_size
        out = f"{kind} {layer.in_channels}->{layer.out_channels} {kh}x{kw}"
        if layer.stride != (1, 1):
            out += f" /{layer.stride[0]}" if layer.stride[0] == layer.stride[1] else f" /{layer.stride}"
        pads = set(layer.padding)
        if pads != {0}:
            out += f" p{layer.padding[0]}" if len(pads) == 1 else f" p{layer.padding}"
        if layer.dilation != (1, 1):
            out += f" d{layer.dilation[0]}"
        if layer.groups != 1:
            out += f" g{layer.groups}"
        return out
    if kind == "Dense":
        return f"Dense {layer.in_features}->{layer.out_features}"
    if kind in ("MaxPool2d", "AvgPool2d", "SumPool2d"):
        (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
        out = f"{kind} {kh}x{kw} /{sh if sh == sw else (sh, sw)}"
        pads = set(layer.padding)
        if pads != {0}:
            out += f" p{layer.padding[0]}" if len(pads) == 1 else f" p{layer.padding}"
        return out + (" ceil" if layer.ceil_mode else "")
    return repr(layer)


def _auto_name(layer: Layer, used: set[str]) -> str:
    base = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", layer.kind).lower().replace("2d", "").replace("1d", "")
    base = base.strip("_") or "node"
    k = 1
    while f"{base}{k}" in used:
        k += 1
    return f"{base}{k}"


class Graph:
    """An immutable directed acyclic graph of layers with one input and one output.

    Parameters
    ----------
    inputs : Tensor
        The symbolic input, from :func:`Input`.
    outputs : Tensor
        The symbolic output; every layer it depends on becomes a node (nodes that do not lead to
        the output are not part of the graph).

    Nodes keep the names given at the call (``layer(x, name="conv1")``); unnamed nodes get
    ``"<kind><k>"`` (``"conv1"``, ``"relu3"``). Names are unique. See the module docstring for the
    representation.

    Raises :class:`~deeptaylor.errors.ShapeError` naming the node when the output does not depend on
    the input, a node reads a tensor of another graph's input, or two nodes share a name.
    """

    __slots__ = ("_nodes", "_input_shape", "_index")

    def __init__(self, inputs: Tensor, outputs: Tensor) -> None:
        if not isinstance(inputs, Tensor) or inputs.layer is not None:
            raise InputTypeError("Graph: inputs must be the tensor returned by dt.Input(shape)")
        if not isinstance(outputs, Tensor):
            raise InputTypeError(f"Graph: outputs must be a symbolic tensor, got {type(outputs).__name__}")
        if outputs is inputs:
            raise ShapeError("Graph: the output is the input itself (no layers)")
        # depth-first post-order from the output: a topological order
        order: list[Tensor] = []
        state: dict[int, int] = {}
        stack: list[tuple[Tensor, int]] = [(outputs, 0)]
        while stack:
            t, k = stack.pop()
            if k == 0:
                if state.get(t._id) == 2:
                    continue
                state[t._id] = 1
            if t.layer is None:
                if t is not inputs:
                    raise ShapeError(f"Graph: a node reads an input tensor {t} that is not this graph's input")
                state[t._id] = 2
                continue
            if k < len(t.inputs):
                stack.append((t, k + 1))
                child = t.inputs[k]
                if state.get(child._id) != 2:
                    stack.append((child, 0))
                continue
            state[t._id] = 2
            order.append(t)
        if state.get(inputs._id) != 2:
            raise ShapeError(f"Graph: the output {outputs} does not depend on the input")
        ids = {inputs._id: 0}
        nodes: list[Node] = []
        used: set[str] = set()
        for t in order:
            if t.name is not None and t.name in used:
                raise ShapeError(f"Graph: two nodes are named {t.name!r}")
            if t.name is not None:
                used.add(t.name)
        for t in order:
            name = t.name if t.name is not None else _auto_name(t.layer, used)
            used.add(name)
            nodes.append(Node(name, t.layer, tuple(ids[c._id] for c in t.inputs)))
            ids[t._id] = len(nodes)
        self._init(inputs.shape, nodes)

    def _init(self, input_shape: tuple[int, ...], nodes: Iterable[Node]) -> None:
        nodes = tuple(nodes)
        object.__setattr__(self, "_nodes", nodes)
        object.__setattr__(self, "_input_shape", tuple(input_shape))
        object.__setattr__(self, "_index", {n.name: i for i, n in enumerate(nodes)})

    @classmethod
    def from_nodes(cls, input_shape: Sequence[int] | None, nodes: Iterable[Node]) -> Graph:
        """A graph from its representation: ``nodes`` in topological order (checked), value ids as in
        the module docstring, the last node's output as the network's output. Used by the passes
        and the file format; raises :class:`~deeptaylor.errors.ShapeError` naming the node for a
        dangling value, a duplicate name, an arity mismatch or (with ``input_shape``) bad shapes."""
        nodes = tuple(nodes)
        if not nodes:
            raise ShapeError("Graph: a graph needs at least one node")
        names: set[str] = set()
        used = [False] * (len(nodes) + 1)
        for i, node in enumerate(nodes):
            if not isinstance(node, Node) or not isinstance(node.layer, Layer):
                raise InputTypeError(f"Graph: node {i} is {node!r}, not a deeptaylor Node with a layer")
            if node.name in names:
                raise ShapeError(f"Graph: two nodes are named {node.name!r}")
            names.add(node.name)
            arity = node.layer.arity
            if (arity is None and len(node.inputs) < 2) or (arity is not None and len(node.inputs) != arity):
                raise ShapeError(f"Graph: node {node.name!r} ({node.layer.kind}) has {len(node.inputs)} input(s)")
            for v in node.inputs:
                if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v <= i:
                    raise ShapeError(f"Graph: node {node.name!r} reads value {v!r}, which is not the input "
                                     f"or an earlier node's output (a cycle or a dangling input)")
                used[int(v)] = True
        if not used[0]:
            raise ShapeError("Graph: no node reads the graph input")
        g = cls.__new__(cls)
        g._init(tuple(input_shape) if input_shape is not None else (), nodes)
        for i in range(len(nodes) - 1):
            if not used[i + 1]:
                raise ShapeError(f"Graph: the output of node {nodes[i].name!r} is never used (only the "
                                 "last node may be unread: it is the output)")
        # every node must depend on the input; the output must too
        dep = [True] + [False] * len(nodes)
        for i, node in enumerate(nodes):
            dep[i + 1] = any(dep[v] for v in node.inputs)
        if not dep[-1]:
            raise ShapeError("Graph: the output does not depend on the input")
        if input_shape is not None and len(g._input_shape):
            g.shapes((1,) + g._input_shape)
        return g

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    # -- the representation ---------------------------------------------------------------
    @property
    def nodes(self) -> tuple[Node, ...]:
        """The nodes in topological order."""
        return self._nodes

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-sample input shape declared with :func:`Input` (``()`` for a Sequential, which
        takes any shape its layers accept)."""
        return self._input_shape

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The layers of the nodes, in node order."""
        return tuple(n.layer for n in self._nodes)

    def node(self, name: str) -> Node:
        """The node called ``name`` (:class:`KeyError` naming the known names otherwise)."""
        try:
            return self._nodes[self._index[name]]
        except KeyError:
            raise KeyError(f"no node named {name!r}; nodes: {', '.join(self._index)}") from None

    def index(self, name: str) -> int:
        """Topological index of the node called ``name``."""
        self.node(name)
        return self._index[name]

    @property
    def names(self) -> tuple[str, ...]:
        """Node names in node order."""
        return tuple(n.name for n in self._nodes)

    def consumers(self) -> list[list[int]]:
        """``consumers()[v]``: the indices of the nodes that read value ``v`` (0 .. L)."""
        out: list[list[int]] = [[] for _ in range(len(self._nodes) + 1)]
        for i, node in enumerate(self._nodes):
            for v in node.inputs:
                out[v].append(i)
        return out

    @property
    def is_chain(self) -> bool:
        """True when node i reads exactly value i (a Sequential's structure)."""
        return all(node.inputs == (i,) for i, node in enumerate(self._nodes))

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self) -> Iterator[Layer]:
        return (n.layer for n in self._nodes)

    def __getitem__(self, index: int) -> Layer:
        return self._nodes[index].layer

    # -- shapes ---------------------------------------------------------------------------
    def shapes(self, input_shape: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
        """Full shapes (batch first) of every value: ``[input, out_0, ..., out_last]``.

        ``input_shape`` defaults to ``(1,) + input_shape``. Raises
        :class:`~deeptaylor.errors.ShapeError` naming the failing node, its type and input shapes."""
        if input_shape is None:
            if not self._input_shape:
                raise ShapeError("shapes() needs an input shape")
            input_shape = (1,) + self._input_shape
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (2, 4):
            raise ShapeError(f"network input must be (N, features) or (N, C, H, W), got shape {shape}")
        out = [shape]
        for i, node in enumerate(self._nodes):
            ins = [out[v] for v in node.inputs]
            try:
                shape = tuple(int(s) for s in node.layer.output_shape(*ins))
            except ShapeError as exc:
                shown = ins[0] if len(ins) == 1 else ins
                raise ShapeError(f"{self._where(i)} cannot take input of shape {shown}: {exc}") from None
            out.append(shape)
        return out

    def _where(self, i: int) -> str:
        node = self._nodes[i]
        return f"layer {i} ({node.layer.kind})" if isinstance(self, Sequential) else \
            f"node {i} {node.name!r} ({node.layer.kind})"

    def output_shape(self, input_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """Shape of the network's output for ``input_shape`` (batch dimension included)."""
        return self.shapes(input_shape)[-1]

    def linear_layers(self) -> list[int]:
        """Indices of the nodes whose layer takes a relevance rule (Dense, Conv2d, ConvTranspose2d)."""
        return [i for i, n in enumerate(self._nodes) if n.layer.linear]

    def first_linear(self) -> list[int]:
        """Indices of the linear nodes that read the input: reachable from it through non-linear
        nodes only (for a Sequential, the first linear layer). These are the nodes a composite's
        ``first`` rule (e.g. zB on the pixels) applies to."""
        reach = [True] + [False] * len(self._nodes)
        out = []
        for i, node in enumerate(self._nodes):
            r = any(reach[v] for v in node.inputs)
            if node.layer.linear:
                if r:
                    out.append(i)
            else:
                reach[i + 1] = r
        return out

    def forward(self, x: Any) -> np.ndarray:
        """Network output in float64 (NumPy reference), ``x`` of shape ``(N, ...)``.

        Raises :class:`~deeptaylor.errors.ShapeError` (naming the node) if a node cannot take the
        shape of its input."""
        from .reference import forward as _forward

        x = np.asarray(x, dtype=np.float64)
        self.shapes(x.shape)
        return _forward(self, x)

    def __repr__(self) -> str:
        head = f"Graph(input {self._input_shape}, {len(self._nodes)} nodes)"
        try:
            shapes = self.shapes() if self._input_shape else None
        except ShapeError:
            shapes = None
        names = ["input"] + [n.name for n in self._nodes]
        w = max(len(n) for n in names)
        lines = [head]
        for i, node in enumerate(self._nodes):
            ins = ", ".join(names[v] for v in node.inputs)
            shp = f" -> {shapes[i + 1][1:]}" if shapes else ""
            lines.append(f"  {node.name:<{w}}  {_short(node.layer):<24} <- {ins}{shp}")
        return "\n".join(lines)


class Sequential(Graph):
    """An immutable chain of layers: the one-chain :class:`Graph` (node ``i`` is layer ``i``, named
    ``str(i)``, reading value ``i``). Takes any input shape its layers accept.

    Parameters
    ----------
    layers : iterable of :class:`~deeptaylor.layers.Layer` (single-input layers)

    Examples
    --------
    >>> import numpy as np, deeptaylor as dt
    >>> net = dt.Sequential([dt.Dense(np.ones((3, 4))), dt.ReLU(), dt.GlobalSumPool()])
    >>> net.output_shape((10, 4))
    (10, 1)
    """

    __slots__ = ()

    def __init__(self, layers: Iterable[Layer]) -> None:
        items = tuple(layers)
        if not items:
            raise ShapeError("Sequential needs at least one layer")
        for i, layer in enumerate(items):
            if not isinstance(layer, Layer):
                raise InputTypeError(f"Sequential: item {i} is {type(layer).__name__}, not a deeptaylor layer")
            if layer.arity != 1:
                raise ShapeError(f"Sequential: item {i} ({layer.kind}) takes several inputs; build a dt.Graph")
        self._init((), (Node(str(i), layer, (i,)) for i, layer in enumerate(items)))

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n  {inner}\n])"

    def shapes(self, input_shape: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
        """All intermediate shapes: ``[input_shape, out_0, out_1, ..., out_last]``.

        Raises :class:`~deeptaylor.errors.ShapeError` naming the failing layer's index, type and shapes.
        """
        if input_shape is None:
            raise ShapeError("Sequential.shapes() needs an input shape (N, ...)")
        return super().shapes(input_shape)
