"""ONNX import (extra ``onnx``): :func:`load_onnx` turns a chain-shaped ONNX graph into a
:class:`~deeptaylor.Sequential`.

Parsing uses the ``onnx`` package only (``onnx.load_model_from_string``,
``onnx.numpy_helper.to_array``); no runtime is needed and nothing in the file is executed. External
tensor data is refused (it would make the loader read other files).

Supported (default-domain operators, opset 7 to the installed onnx's newest):

==========================  ====================================================================
ONNX op                     deeptaylor layer
==========================  ====================================================================
Gemm                        Dense (``transA = 0``; ``transB``, ``alpha``, ``beta`` folded)
MatMul (+ Add)              Dense; a following constant Add becomes its bias
Conv                        Conv2d (``group = 1``; pads, strides, dilations, ``auto_pad``)
Relu                        ReLU
MaxPool                     MaxPool2d (``dilations = 1``; no Indices output; ``ceil_mode`` only where
                            it gives the floor size)
AveragePool                 AvgPool2d (``count_include_pad = 0`` only without padding)
Pad                         folded into the following Conv / AveragePool (value 0) or MaxPool (value
                            -inf); constant mode, spatial axes only
GlobalAveragePool           AvgPool2d over the whole map (needs static H, W)
ReduceMean                  the same, for the mean over axes (2, 3) (``keepdims = 0``: then a Flatten)
Flatten / Reshape           Flatten, when it flattens to ``(N, -1)`` (``axis = 1``; shape ``(0, -1)``,
                            ``(N, -1)``, ``(-1, F)`` or ``(N, F)``)
BatchNormalization          folded into the preceding Conv / Gemm / MatMul
Dropout, Identity           dropped
Constant                    a constant (initializers are read from ``graph.initializer`` too)
Shape, Gather, Unsqueeze,   evaluated on constants (the shape arithmetic of ``x.view(x.size(0), -1)``
Squeeze, Concat, Cast,      and of exported padding); ``Shape`` of the chain tensor gives the batch
Reshape, Slice, Transpose,  size as a marker that only a flattening ``Reshape`` may use
ConstantOfShape, Shape,
Add, Sub, Mul
==========================  ====================================================================

The graph must have one input, one output, and be a single chain: every operator takes the previous
operator's output as its only non-constant input.
"""

from __future__ import annotations

import heapq
import math
import os
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, ModelFormatError, ShapeError, UnsupportedError
from ..layers import AvgPool2d, Conv2d, Dense, Flatten, Layer, MaxPool2d, ReLU
from ..network import Sequential

__all__ = ["MIN_OPSET", "SUPPORTED_OPS", "load_onnx"]

SUPPORTED_OPS = ("Gemm", "MatMul", "Add (bias after MatMul/Conv)", "Conv", "Relu", "MaxPool", "AveragePool",
                 "Pad (constant, H/W only; folded into the next Conv/AveragePool, or MaxPool for -inf)",
                 "GlobalAveragePool", "ReduceMean (over axes 2, 3)", "Flatten", "Reshape (to 2-D)",
                 "BatchNormalization (folded)", "Dropout", "Identity", "Constant",
                 ("Shape/Gather/Unsqueeze/Squeeze/Concat/Cast/Reshape/Slice/Transpose/ConstantOfShape/Add/Sub/Mul "
                  "(integer shape arithmetic on constants)"))
MIN_OPSET = 7
_MAX_ELEMENTS = 1 << 34
# evaluated on constants (shape arithmetic)
_FOLDABLE = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Slice", "Transpose", "ConstantOfShape",
             "Shape", "Add", "Sub", "Mul")
_MAX_ARITH = 1 << 31  # Add/Sub/Mul are evaluated on values up to this size only (no int64 overflow)
_PAD_USERS = ("Conv", "AveragePool", "MaxPool")  # ops a preceding constant Pad is folded into
_MAX_FOLD = 64  # elements of a tensor that shape arithmetic may take or make
# What ``Shape`` of the chain tensor gives for the batch size, which is not known at import: a value no
# real size and no Reshape/Slice code (-1, 0, INT64_MIN/MAX) takes, so wherever it ends up (Reshape's
# target: the batch; anywhere else: an error) it cannot be mistaken for a number.
_BATCH = -(1 << 60) - 12345
_MAX_SIZE = 1 << 24  # kernel sizes, strides, pads, dilations beyond this are treated as corrupt


def _onnx() -> Any:
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as exc:  # pragma: no cover - only without onnx
        raise ModelFormatError("ONNX support needs the onnx package: pip install 'deeptaylor[onnx]'") from exc
    return onnx


def load_onnx(source: str | os.PathLike[str] | bytes, input_shape: Any = None) -> Sequential:
    """Import an ONNX model.

    Parameters
    ----------
    source : path or bytes
        The ``.onnx`` file (or its content).
    input_shape : tuple of int, optional
        The input shape, per sample (``(F,)``, ``(C, H, W)``) or with a batch dimension. Overrides
        symbolic dimensions of the graph's declared input; must agree with its static ones. Needed
        when the graph declares no static spatial size but uses GlobalAveragePool, ``auto_pad`` SAME,
        ``ceil_mode`` or a Reshape whose target must be checked against the feature count.

    Returns
    -------
    Sequential
        float64 parameters; its forward equals the ONNX model's output up to float rounding.

    Raises
    ------
    ModelFormatError
        Unreadable, corrupt or inconsistent files (bad protobuf, undefined tensors, wrong shapes,
        missing graph, external data, cycles), naming the file and the problem.
    UnsupportedError
        Valid ONNX that deeptaylor cannot represent (other ops, branches, grouped convolutions, ...),
        naming the node, its op type and what is supported.
    ShapeError
        ``input_shape`` contradicts the graph's declared input.
    """
    onnx = _onnx()
    if isinstance(source, (bytes, bytearray, memoryview)):
        where, data = "<bytes>", bytes(source)
    else:
        where = repr(os.fspath(source))
        try:
            with open(source, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ModelFormatError(f"cannot open model file {where}: {exc.strerror or exc}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: any parse failure is a format error
        raise ModelFormatError(f"{where}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    try:
        return _Importer(onnx, model, where, input_shape).run()
    except DeepTaylorError:
        raise
    except RecursionError:
        raise ModelFormatError(f"{where}: ONNX model is nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, MemoryError) as exc:
        # Defence in depth for corrupt files: decoding helpers of the onnx package raising on bad fields.
        raise ModelFormatError(f"{where}: corrupt ONNX model ({type(exc).__name__}: {exc})") from None


class _Importer:
    def __init__(self, onnx: Any, model: Any, where: str, input_shape: Any) -> None:
        self.onnx = onnx
        self.model = model
        self.where = where
        self.user_shape = input_shape
        self.consts: dict[str, np.ndarray] = {}
        self.layers: list[Layer] = []
        self.foldable = False  # the last layer is linear and nothing came after it (bias / BatchNorm fold)
        self.rank = 0
        self.shape: tuple[int, ...] | None = None  # full shape with batch 1, when every per-sample dim is known
        self.batch: int | None = None  # the declared static batch size, if any
        # a Pad node waiting to be folded into the next Conv/AveragePool/MaxPool: (node, (t, b, l, r), value)
        self.pad: tuple[Any, tuple[int, int, int, int], float] | None = None

    # ------------------------------------------------------------------------------------------ errors

    def fmt(self, msg: str) -> ModelFormatError:
        return ModelFormatError(f"{self.where}: {msg}")

    def unsupported(self, node: Any, why: str = "") -> UnsupportedError:
        reason = f": {why}" if why else ""
        return UnsupportedError(f"{self.where}: node {node.name or '<unnamed>'!r} (op {node.op_type!r}) is not "
                                f"supported{reason}; supported ops: {', '.join(SUPPORTED_OPS)}")

    # ---------------------------------------------------------------------------------- tensors, attrs

    def tensor(self, t: Any, what: str) -> np.ndarray:
        T = self.onnx.TensorProto
        if t.data_location == T.EXTERNAL or len(t.external_data):
            raise self.fmt(f"{what} {t.name!r} uses external data, which deeptaylor refuses to read "
                           "(save the model with the weights inside the file)")
        allowed = {T.FLOAT: "float", T.DOUBLE: "double", T.FLOAT16: "float16", T.INT64: "int64", T.INT32: "int32"}
        if t.data_type not in allowed:
            raise self.fmt(f"{what} {t.name!r} has unsupported data type {t.data_type}")
        dims = list(t.dims)
        if any(d < 0 for d in dims) or len(dims) > 8 or math.prod(dims) > _MAX_ELEMENTS:
            raise self.fmt(f"{what} {t.name!r} has invalid dimensions {dims}")
        try:
            arr = self.onnx.numpy_helper.to_array(t)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises on corrupt data
            raise self.fmt(f"{what} {t.name!r} cannot be decoded ({type(exc).__name__}: {exc})") from None
        if tuple(arr.shape) != tuple(dims):
            raise self.fmt(f"{what} {t.name!r} holds shape {arr.shape}, declares {tuple(dims)}")
        if arr.dtype.kind == "f":
            with np.errstate(all="ignore"):  # NaN/Inf are reported below, not warned about
                arr = arr.astype(np.float64)
            # a scalar may be infinite (a Pad's -inf value before MaxPool); weights and biases are checked on use
            if np.any(np.isnan(arr)) or (arr.size != 1 and not np.all(np.isfinite(arr))):
                raise self.fmt(f"{what} {t.name!r} contains NaN or Inf")
        else:
            arr = arr.astype(np.int64)
        return arr

    def attrs(self, node: Any) -> dict[str, Any]:
        A = self.onnx.AttributeProto
        out: dict[str, Any] = {}
        for a in node.attribute:
            if a.name in out:
                raise self.fmt(f"node {node.name!r} ({node.op_type}) has attribute {a.name!r} twice")
            if a.ref_attr_name:
                raise self.unsupported(node, f"attribute {a.name!r} is a reference (functions are not supported)")
            if a.type == A.INT:
                out[a.name] = int(a.i)
            elif a.type == A.INTS:
                out[a.name] = [int(v) for v in a.ints]
            elif a.type == A.FLOAT:
                out[a.name] = float(a.f)
            elif a.type == A.FLOATS:
                out[a.name] = [float(v) for v in a.floats]
            elif a.type == A.STRING:
                out[a.name] = bytes(a.s)
            elif a.type == A.TENSOR:
                out[a.name] = a.t
            else:
                out[a.name] = a  # a kind no supported op uses; reading it below raises
        return out

    def attr(self, node: Any, attrs: dict[str, Any], name: str, default: Any, kind: type, n: int | None = None) -> Any:
        v = attrs.get(name, default)
        if kind is list:
            ok = (isinstance(v, list) and all(isinstance(x, int) and abs(x) <= _MAX_SIZE for x in v)
                  and (n is None or len(v) == n))
            if not ok:
                raise self.fmt(f"node {node.name!r} ({node.op_type}): attribute {name} must be {n} ints, got {v!r:.100}")
            return v
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind):
            raise self.fmt(f"node {node.name!r} ({node.op_type}): attribute {name} has the wrong type ({v!r:.100})")
        if kind is float and not math.isfinite(v):
            raise self.fmt(f"node {node.name!r} ({node.op_type}): attribute {name} is not finite")
        return v

    def const(self, node: Any, name: str, what: str) -> np.ndarray:
        if name not in self.consts:
            raise self.unsupported(node, f"its {what} ({name!r}) must be a constant (initializer or Constant node)")
        return self.consts[name]

    # ------------------------------------------------------------------------------------------- graph

    def run(self) -> Sequential:
        onnx, model = self.onnx, self.model
        if not model.HasField("graph"):
            raise self.fmt("not an ONNX model (no graph)")
        graph = model.graph
        opset = None
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                opset = int(imp.version)
        if opset is None:
            raise self.fmt("the model declares no default-domain opset (opset_import)")
        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:
            raise UnsupportedError(f"{self.where}: opset {opset} is not supported (supported: {MIN_OPSET} to "
                                   f"{newest}, the newest the installed onnx package knows)")
        self.opset = opset
        if len(graph.sparse_initializer):
            raise UnsupportedError(f"{self.where}: sparse initializers are not supported")
        for t in graph.initializer:
            if t.name in self.consts:
                raise self.fmt(f"initializer {t.name!r} is defined twice")
            self.consts[t.name] = self.tensor(t, "initializer")
        inputs = [v for v in graph.input if v.name not in self.consts]
        if len(inputs) != 1:
            raise UnsupportedError(f"{self.where}: the graph must have exactly one (non-initializer) input, it has "
                                   f"{len(inputs)}: {[v.name for v in inputs][:10]}")
        if len(graph.output) != 1:
            raise UnsupportedError(f"{self.where}: the graph must have exactly one output, it has {len(graph.output)}")
        self.set_input(inputs[0])
        cur = inputs[0].name
        for node in self.toposort(graph, cur):
            if node.domain not in ("", "ai.onnx"):
                raise self.unsupported(node, f"custom domain {node.domain!r}")
            if node.op_type == "Constant":
                self.constant(node)
                continue
            if node.op_type == "Shape" and list(node.input) == [cur]:
                self.shape_of(node)
                continue
            if node.op_type == "Identity" and len(node.input) == 1 and node.input[0] in self.consts:
                if len(node.output) != 1 or not node.output[0] or node.output[0] in self.consts:
                    raise self.fmt(f"Identity node {node.name!r} must have one new output")
                self.consts[node.output[0]] = self.consts[node.input[0]]  # exporters alias weights this way
                continue
            if node.op_type in _FOLDABLE and node.input and all(i in self.consts for i in node.input if i):
                self.fold(node)
                continue
            data = [i for i in node.input if i and i not in self.consts]
            if data != [cur] or not node.input or node.input[0] != cur:
                raise UnsupportedError(
                    f"{self.where}: node {node.name or '<unnamed>'!r} (op {node.op_type!r}) takes {data[:4]} as "
                    f"non-constant inputs; deeptaylor imports a single chain of ops in which each op's first "
                    f"input is the previous op's output ({cur!r}) and all other inputs are constants")
            handler = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise self.unsupported(node)
            if not node.output or not node.output[0]:
                raise self.fmt(f"node {node.name!r} ({node.op_type}) has no output")
            if self.pad is not None and node.op_type not in _PAD_USERS + ("Pad", "Identity", "Dropout"):
                raise self.unsupported(self.pad[0], f"a Pad is folded into a directly following Conv, AveragePool "
                                                    f"or MaxPool, not into {node.op_type} ({node.name!r})")
            handler(node, self.attrs(node))
            cur = node.output[0]
        if self.pad is not None:
            raise self.unsupported(self.pad[0], "a Pad at the end of the graph (it is folded into a following Conv, "
                                                "AveragePool or MaxPool)")
        if graph.output[0].name != cur:
            raise UnsupportedError(f"{self.where}: the graph's output {graph.output[0].name!r} is not the end of "
                                   f"the chain ({cur!r})")
        if not self.layers:
            raise UnsupportedError(f"{self.where}: the graph has no layers deeptaylor can represent")
        net = Sequential(self.layers)
        self.check_output(graph.output[0], net)
        return net

    def toposort(self, graph: Any, input_name: str) -> list[Any]:
        """Nodes in dependency order (Kahn); undefined tensors, duplicate outputs and cycles are errors."""
        nodes = list(graph.node)
        producer: dict[str, int] = {}
        for i, node in enumerate(nodes):
            for out in node.output:
                if not out:
                    continue
                if out in producer or out in self.consts or out == input_name:
                    raise self.fmt(f"tensor {out!r} is defined more than once")
                producer[out] = i
        waiting = [0] * len(nodes)
        users: dict[int, list[int]] = {}
        for i, node in enumerate(nodes):
            deps = set()
            for name in node.input:
                if not name or name in self.consts or name == input_name:
                    continue
                if name not in producer:
                    raise self.fmt(f"node {node.name!r} ({node.op_type}) uses undefined tensor {name!r:.100}")
                deps.add(producer[name])
            waiting[i] = len(deps)
            for d in deps:
                users.setdefault(d, []).append(i)
        ready = [i for i in range(len(nodes)) if waiting[i] == 0]
        heapq.heapify(ready)  # smallest index first: the file's order wherever it is valid
        order: list[int] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(i)
            for u in users.get(i, []):
                waiting[u] -= 1
                if waiting[u] == 0:
                    heapq.heappush(ready, u)
        if len(order) != len(nodes):
            raise self.fmt("the graph has a cycle")
        return [nodes[i] for i in order]

    def set_input(self, value: Any) -> None:
        T = self.onnx.TensorProto
        tt = value.type.tensor_type if value.type.HasField("tensor_type") else None
        if tt is None:
            raise UnsupportedError(f"{self.where}: input {value.name!r} is not a tensor")
        if tt.elem_type not in (T.FLOAT, T.DOUBLE, T.FLOAT16):
            raise UnsupportedError(f"{self.where}: input {value.name!r} has element type {tt.elem_type}; "
                                   "only float inputs are supported")
        declared: list[int | None] | None = None
        if tt.HasField("shape"):
            declared = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                        for d in tt.shape.dim]
        user = None
        if self.user_shape is not None:
            try:
                user = [int(s) for s in self.user_shape]
            except (TypeError, ValueError):
                raise ShapeError(f"load_onnx: input_shape must be a tuple of ints, got {self.user_shape!r}") from None
            if len(user) in (1, 3):
                user = [None, *user]  # type: ignore[list-item]
            if len(user) not in (2, 4) or min(s for s in user if s is not None) < 1:
                raise ShapeError(f"load_onnx: input_shape must be (F,), (C, H, W), (N, F) or (N, C, H, W), "
                                 f"got {self.user_shape!r}")
        if declared is not None and len(declared) not in (2, 4):
            raise UnsupportedError(f"{self.where}: input {value.name!r} has rank {len(declared)}; deeptaylor takes "
                                   "(N, F) or (N, C, H, W)")
        if declared is None and user is None:
            raise ShapeError(f"{self.where}: the input {value.name!r} declares no shape; pass input_shape")
        if declared is not None and user is not None:
            if len(declared) != len(user):
                raise ShapeError(f"{self.where}: input_shape {tuple(self.user_shape)} does not match the declared "
                                 f"input shape {self.show(declared)}")
            for d, u in zip(declared, user, strict=True):
                if d is not None and u is not None and d != u:
                    raise ShapeError(f"{self.where}: input_shape {tuple(self.user_shape)} contradicts the declared "
                                     f"input shape {self.show(declared)}")
        dims = declared if declared is not None else user
        assert dims is not None
        if user is not None:
            dims = [u if u is not None else d for d, u in zip(dims, user, strict=True)]
        self.rank = len(dims)
        self.batch = dims[0]
        per_sample = dims[1:]
        self.shape = (1, *per_sample) if all(d is not None for d in per_sample) else None  # type: ignore[arg-type]
        self.input_dims = dims
        self.in_shape = self.shape

    @staticmethod
    def show(dims: list[int | None]) -> str:
        return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"

    def check_output(self, value: Any, net: Sequential) -> None:
        if self.in_shape is None:
            return
        try:
            out = net.shapes(self.in_shape)[-1]
        except ShapeError as exc:  # pragma: no cover - shapes are tracked op by op
            raise self.fmt(f"the imported layers do not compose: {exc}") from None
        tt = value.type.tensor_type if value.type.HasField("tensor_type") else None
        if tt is not None and tt.HasField("shape"):
            declared = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                        for d in tt.shape.dim]
            mismatch = len(declared) != len(out) or any(
                d is not None and d != o for d, o in zip(declared[1:], out[1:], strict=True))
            if mismatch:
                raise self.fmt(f"the graph declares output shape {self.show(declared)} but its layers give "
                               f"(N, {', '.join(map(str, out[1:]))}) for input {self.show(self.input_dims)}")

    def cur_shape(self) -> tuple[int, ...] | None:
        """The chain tensor's shape (batch 1), with a pending Pad applied."""
        if self.shape is None or self.pad is None:
            return self.shape
        t, b, lft, r = self.pad[1]
        n, c, h, w = self.shape
        return (n, c, h + t + b, w + lft + r)

    def need_shape(self, node: Any, why: str) -> tuple[int, ...]:
        shape = self.cur_shape()
        if shape is None:
            raise self.unsupported(node, f"{why} needs the input's spatial size; the graph declares none, pass "
                                         "input_shape=(C, H, W)")
        return shape

    def add(self, node: Any, layer: Layer) -> None:
        if self.shape is not None:
            try:
                self.shape = layer.output_shape(self.shape)
            except ShapeError as exc:
                raise self.fmt(f"node {node.name!r} ({node.op_type}) cannot take input of shape "
                               f"{self.show([self.batch, *self.shape[1:]])}: {exc}") from None
            self.rank = len(self.shape)
        else:
            self.rank = 2 if isinstance(layer, (Dense, Flatten)) else self.rank
        self.layers.append(layer)
        self.foldable = layer.linear

    def need_rank(self, node: Any, rank: int) -> None:
        if self.rank != rank:
            raise self.unsupported(node, f"expects a rank-{rank} input, the chain has rank {self.rank} there")

    # ------------------------------------------------------------------------------------------- ops

    def constant(self, node: Any) -> None:
        attrs = self.attrs(node)
        if len(node.output) != 1 or not node.output[0]:
            raise self.fmt(f"Constant node {node.name!r} must have one output")
        if node.output[0] in self.consts:
            raise self.fmt(f"tensor {node.output[0]!r} is defined more than once")
        if len(attrs) != 1:
            raise self.fmt(f"Constant node {node.name!r} must have exactly one value attribute")
        (key, v), = attrs.items()
        if key == "value" and isinstance(v, self.onnx.TensorProto):
            arr = self.tensor(v, "Constant")
        elif key in ("value_float", "value_floats") and isinstance(v, (float, list)):
            arr = np.asarray(v, dtype=np.float64)
        elif key in ("value_int", "value_ints") and isinstance(v, (int, list)):
            arr = np.asarray(v, dtype=np.int64)
        else:
            raise self.unsupported(node, f"Constant with attribute {key!r}")
        self.consts[node.output[0]] = arr

    def shape_of(self, node: Any) -> None:
        """``Shape`` of the chain tensor (``x.size()`` in a traced ``x.view(x.size(0), -1)``): the per-sample
        sizes, with the marker ``_BATCH`` in place of the batch size, which a ``Reshape`` target may hold
        in its first entry only ("the batch"). ``start``/``end`` (opset 15) slice it."""
        if len(node.output) != 1 or not node.output[0] or node.output[0] in self.consts:
            raise self.fmt(f"Shape node {node.name!r} must have one new output")
        attrs = self.attrs(node)
        shape = self.cur_shape()
        dims: list[int | None] = [_BATCH, *shape[1:]] if shape is not None else [_BATCH] + [None] * (self.rank - 1)
        r = len(dims)
        start = self.attr(node, attrs, "start", 0, int)
        end = self.attr(node, attrs, "end", r, int)
        start, end = (min(max(v + r if v < 0 else v, 0), r) for v in (start, end))
        picked = dims[start:end]
        if any(d is None for d in picked):
            raise self.unsupported(node, "Shape of a tensor whose size is not static; pass input_shape")
        self.consts[node.output[0]] = np.array(picked, dtype=np.int64)

    def fold(self, node: Any) -> None:
        """Evaluate a shape-arithmetic op whose inputs are all constants (small int64 tensors)."""
        ins = [self.consts[i] if i else None for i in node.input]  # positional: optional inputs may be ''
        attrs = self.attrs(node)
        op = node.op_type
        if len(node.output) != 1 or not node.output[0] or node.output[0] in self.consts:
            raise self.fmt(f"node {node.name!r} ({op}) must have one new output")
        if op == "Shape":  # of a constant (TorchScript without constant folding takes it of its own constants)
            if len(ins) != 1 or ins[0] is None:
                raise self.fmt(f"Shape node {node.name!r} needs one input")
            dims, r = list(ins[0].shape), ins[0].ndim
            start, end = self.attr(node, attrs, "start", 0, int), self.attr(node, attrs, "end", r, int)
            start, end = (min(max(v + r if v < 0 else v, 0), r) for v in (start, end))
            self.consts[node.output[0]] = np.array(dims[start:end], dtype=np.int64)
            return
        if any(a is not None and (a.dtype.kind != "i" or a.size > _MAX_FOLD) for a in ins):
            raise self.unsupported(node, "only small integer (shape) constants are evaluated")
        # the inputs that say how to compute (indices, axes, target shapes), as opposed to the data moved
        params = ins if op in ("ConstantOfShape", "Add", "Sub", "Mul") else [] if op == "Concat" else ins[1:]
        if any(a is not None and np.any(a == _BATCH) for a in params):
            raise self.unsupported(node, "its indices/axes/shape depend on the batch size")

        def ints(name: str, i: int | None = None) -> list[int] | None:
            """Optional int list: input ``i`` (newer opsets) or attribute ``name`` (older ones)."""
            if i is not None and i < len(ins) and ins[i] is not None:
                return [int(v) for v in ins[i].reshape(-1)]  # type: ignore[union-attr]
            v = attrs.get(name)
            if v is None:
                return None
            if not isinstance(v, list) or not all(isinstance(a, int) for a in v):
                raise self.fmt(f"node {node.name!r} ({op}): attribute {name} must be ints, got {v!r:.100}")
            return v

        try:
            x = ins[0]
            if x is None:
                raise ValueError("the first input is missing")
            if op == "Gather":
                out = np.take(x, ins[1], axis=self.attr(node, attrs, "axis", 0, int))
            elif op == "Unsqueeze":
                out = x
                for ax in sorted(int(a) for a in (ints("axes", 1) or [])):
                    out = np.expand_dims(out, ax)
            elif op == "Squeeze":
                axes = ints("axes", 1)
                out = np.squeeze(x, axis=None if axes is None else tuple(axes))
            elif op == "Concat":
                if any(a is None for a in ins):
                    raise ValueError("an input is missing")
                out = np.concatenate(ins, axis=self.attr(node, attrs, "axis", 0, int))  # type: ignore[arg-type]
            elif op == "Reshape":
                target = ints("shape", 1)
                if target is None:
                    raise ValueError("no target shape")
                copy = not self.attr(node, attrs, "allowzero", 0, int)
                target = [x.shape[i] if v == 0 and copy and i < x.ndim else v for i, v in enumerate(target)]
                out = x.reshape(target)
            elif op == "Slice":
                starts, ends = ints("starts", 1), ints("ends", 2)
                if starts is None or ends is None or len(starts) != len(ends):
                    raise ValueError("starts and ends must be given, of one length")
                axes = ints("axes", 3) or list(range(len(starts)))
                steps = ints("steps", 4) or [1] * len(starts)
                if len(axes) != len(starts) or len(steps) != len(starts) or 0 in steps:
                    raise ValueError(f"axes {axes} / steps {steps} do not fit starts {starts}")
                index = [slice(None)] * x.ndim
                for a, b, e, st in zip(axes, starts, ends, steps, strict=True):
                    index[a] = slice(b, e, st)  # Python's slice clamping is ONNX's
                out = x[tuple(index)]
            elif op in ("Add", "Sub", "Mul"):
                if len(ins) != 2 or ins[1] is None:
                    raise ValueError("needs two inputs")
                if any(np.any(np.abs(a) > _MAX_ARITH) for a in ins):  # type: ignore[arg-type]
                    raise self.unsupported(node, f"integer arithmetic on values beyond {_MAX_ARITH}")
                fn = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
                out = fn(ins[0], ins[1])
            elif op == "Transpose":
                perm = self.attr(node, attrs, "perm", list(range(x.ndim))[::-1], list)
                out = np.transpose(x, perm)
            elif op == "ConstantOfShape":
                value = attrs.get("value")
                if value is not None and not isinstance(value, self.onnx.TensorProto):
                    raise self.fmt(f"ConstantOfShape node {node.name!r}: attribute value must be a tensor")
                fill = np.zeros(1, np.float32) if value is None else self.tensor(value, "ConstantOfShape value")
                if fill.dtype.kind != "i" or fill.size != 1:
                    raise self.unsupported(node, "only an integer value is evaluated (shape arithmetic)")
                dims = [int(v) for v in x.reshape(-1)]
                if x.ndim != 1 or min(dims, default=0) < 0 or math.prod(dims) > _MAX_FOLD:
                    raise ValueError(f"shape {dims} is not a small non-negative shape")
                out = np.full(dims, fill.reshape(-1)[0], dtype=np.int64)
            else:  # Cast: shape values stay integers
                out = x
        except (ValueError, IndexError, TypeError, np.exceptions.AxisError) as exc:
            raise self.fmt(f"node {node.name!r} ({op}): {exc}") from None
        self.consts[node.output[0]] = np.asarray(out, dtype=np.int64)

    def weight(self, node: Any, name: str, what: str, ndim: int) -> np.ndarray:
        arr = self.const(node, name, what)
        if arr.dtype.kind != "f" or arr.ndim != ndim:
            raise self.fmt(f"node {node.name!r} ({node.op_type}): {what} must be a {ndim}-D float tensor, got "
                           f"{arr.dtype} shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise self.fmt(f"node {node.name!r} ({node.op_type}): {what} {name!r} contains NaN or Inf")
        return arr

    def make(self, node: Any, cls: type, *args: Any, **kwargs: Any) -> Layer:
        try:
            return cls(*args, **kwargs)
        except ShapeError as exc:
            raise self.unsupported(node, str(exc)) from None
        except DeepTaylorError as exc:
            raise self.fmt(f"node {node.name!r} ({node.op_type}): {exc}") from None

    def single_output(self, node: Any) -> None:
        if any(node.output[1:]):
            raise self.unsupported(node, f"its extra outputs {list(node.output[1:])} are used")

    def op_Relu(self, node: Any, attrs: dict[str, Any]) -> None:
        self.add(node, ReLU())

    def op_Identity(self, node: Any, attrs: dict[str, Any]) -> None:
        pass

    def op_Dropout(self, node: Any, attrs: dict[str, Any]) -> None:
        self.single_output(node)
        if len(node.input) > 2 and node.input[2]:
            mode = self.const(node, node.input[2], "training_mode")
            if mode.size != 1 or bool(mode.reshape(-1)[0]):
                raise self.unsupported(node, "training_mode=True")

    def op_Gemm(self, node: Any, attrs: dict[str, Any]) -> None:
        self.need_rank(node, 2)
        if len(node.input) < 2:
            raise self.fmt(f"Gemm node {node.name!r} needs inputs A and B")
        if self.attr(node, attrs, "transA", 0, int):
            raise self.unsupported(node, "transA=1 (the input would be transposed)")
        trans_b = self.attr(node, attrs, "transB", 0, int)
        alpha = self.attr(node, attrs, "alpha", 1.0, float)
        beta = self.attr(node, attrs, "beta", 1.0, float)
        B = self.weight(node, node.input[1], "B", 2)
        W = alpha * (B if trans_b else B.T)
        bias = np.zeros(W.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = beta * self.bias(node, self.const(node, node.input[2], "C"), W.shape[0], 2)
        self.add(node, self.make(node, Dense, W, bias))

    def op_MatMul(self, node: Any, attrs: dict[str, Any]) -> None:
        self.need_rank(node, 2)
        if len(node.input) != 2:
            raise self.fmt(f"MatMul node {node.name!r} needs two inputs")
        B = self.weight(node, node.input[1], "B", 2)
        self.add(node, self.make(node, Dense, B.T))

    def bias(self, node: Any, c: np.ndarray, channels: int, rank: int) -> np.ndarray:
        """A constant added to a (N, K) or (N, K, H, W) output as a per-channel vector, or an error."""
        if c.dtype.kind != "f" or c.ndim > rank:
            raise self.unsupported(node, f"a bias of shape {c.shape} ({c.dtype}) does not broadcast per channel")
        if not np.all(np.isfinite(c)):
            raise self.fmt(f"node {node.name!r} ({node.op_type}): the bias contains NaN or Inf")
        full = c.reshape((1,) * (rank - c.ndim) + c.shape)
        ok = full.shape[0] == 1 and full.shape[1] in (1, channels) and all(s == 1 for s in full.shape[2:])
        if not ok:
            raise self.unsupported(node, f"a constant of shape {c.shape} is not a per-channel bias for {channels} "
                                         "channels")
        return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)

    def op_Add(self, node: Any, attrs: dict[str, Any]) -> None:
        if not self.foldable:
            raise self.unsupported(node, "Add is supported only as the bias right after MatMul/Gemm/Conv")
        if len(node.input) != 2:
            raise self.fmt(f"Add node {node.name!r} needs two inputs")
        prev = self.layers[-1]
        rank = 2 if isinstance(prev, Dense) else 4
        b = self.bias(node, self.const(node, node.input[1], "addend"), prev.weight.shape[0], rank)  # type: ignore[attr-defined]
        new_bias = prev.bias + b  # type: ignore[attr-defined]
        if isinstance(prev, Dense):
            self.layers[-1] = self.make(node, Dense, prev.weight, new_bias)
        else:
            assert isinstance(prev, Conv2d)
            self.layers[-1] = self.make(node, Conv2d, prev.weight, new_bias, stride=prev.stride,
                                        padding=prev.padding, dilation=prev.dilation)

    def pads(self, node: Any, attrs: dict[str, Any], k: tuple[int, int], s: list[int], d: list[int]) -> tuple[int, ...]:
        """ONNX ``pads`` ``[x1_begin, x2_begin, x1_end, x2_end]`` or ``auto_pad`` -> (top, bottom, left, right)."""
        auto = self.attr(node, attrs, "auto_pad", b"NOTSET", bytes)
        if auto == b"NOTSET":
            p = self.attr(node, attrs, "pads", [0, 0, 0, 0], list, 4)
            if min(p) < 0:
                raise self.unsupported(node, f"negative pads {p}")
            return (p[0], p[2], p[1], p[3])
        if auto == b"VALID":
            return (0, 0, 0, 0)
        if auto in (b"SAME_UPPER", b"SAME_LOWER"):
            shape = self.need_shape(node, f"auto_pad={auto.decode()}")
            out = []
            for ax in range(2):
                size = shape[2 + ax]
                total = max((-(-size // s[ax]) - 1) * s[ax] + (k[ax] - 1) * d[ax] + 1 - size, 0)
                small, big = total // 2, total - total // 2
                out += [small, big] if auto == b"SAME_UPPER" else [big, small]
            return tuple(out)
        raise self.fmt(f"node {node.name!r} ({node.op_type}): unknown auto_pad {auto!r:.50}")

    def op_Pad(self, node: Any, attrs: dict[str, Any]) -> None:
        """A constant ``Pad`` of the spatial axes, kept until the next node folds it into its own padding:
        value 0 into ``Conv`` / ``AveragePool`` (the padded zeros are averaged as ``AvgPool2d``'s padding
        is), value -inf into ``MaxPool`` (max pooling's padding). A zero Pad before MaxPool is refused: the
        max over zeros is not the max over -inf where the inputs are negative. Pads of zero are dropped."""
        self.need_rank(node, 4)
        mode = self.attr(node, attrs, "mode", b"constant", bytes)
        value: Any = 0.0
        if self.opset < 11:  # pads and value are attributes
            pads = self.attr(node, attrs, "pads", None, list, 8)
            value = attrs.get("value", 0.0)
            axes: list[int] | None = None
        else:
            if len(node.input) < 2 or not node.input[1]:
                raise self.fmt(f"Pad node {node.name!r} needs the pads input")
            t = self.const(node, node.input[1], "pads")
            if t.dtype.kind != "i" or t.ndim != 1 or t.size > 8 or np.any(np.abs(t) > _MAX_SIZE):
                raise self.unsupported(node, f"pads must be a constant 1-D int64 tensor of sizes, got "
                                             f"{t.tolist()!r:.100}")
            pads = [int(v) for v in t]
            if len(node.input) > 2 and node.input[2]:
                c = self.const(node, node.input[2], "constant_value")
                if c.dtype.kind != "f" or c.size != 1:
                    raise self.unsupported(node, "constant_value must be a float scalar")
                value = float(c.reshape(-1)[0])
            axes = None
            if len(node.input) > 3 and node.input[3]:
                a = self.const(node, node.input[3], "axes")
                if a.dtype.kind != "i" or a.ndim != 1 or np.any(a == _BATCH):
                    raise self.unsupported(node, "axes must be a constant 1-D int64 tensor")
                axes = [int(v) + 4 if int(v) < 0 else int(v) for v in a]
                if sorted(set(axes)) != sorted(axes) or any(not 0 <= v < 4 for v in axes):
                    raise self.fmt(f"Pad node {node.name!r}: invalid axes {a.tolist()}")
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, float) or math.isnan(value):
            raise self.fmt(f"Pad node {node.name!r}: the constant value must be a number, got {value!r:.50}")
        ax = list(range(4)) if axes is None else axes
        if len(pads) != 2 * len(ax):
            raise self.fmt(f"Pad node {node.name!r}: {len(pads)} pads for {len(ax)} axes")
        full = [0] * 8  # [x1_begin, .., x4_begin, x1_end, .., x4_end] over (N, C, H, W)
        for j, a in enumerate(ax):
            full[a], full[a + 4] = pads[j], pads[j + len(ax)]
        if not any(full):
            return  # pads nothing: the identity, whatever the mode
        if mode != b"constant":
            raise self.unsupported(node, f"mode={mode.decode(errors='replace')!r}: only constant padding is folded")
        if any(full[i] for i in (0, 1, 4, 5)):
            raise self.unsupported(node, f"pads {pads} pad the batch or channel axis; only H and W can be folded")
        if min(full) < 0:
            raise self.unsupported(node, f"negative pads {pads} (cropping)")
        if value not in (0.0, -math.inf):
            raise self.unsupported(node, f"constant value {value}: only 0 (before Conv/AveragePool) or -inf (before "
                                         "MaxPool) is folded")
        pad = (full[2], full[6], full[3], full[7])
        if self.pad is not None:  # Pad after Pad: one Pad, if both pad with the same value
            if self.pad[2] != value:
                raise self.unsupported(self.pad[0], f"a Pad with value {self.pad[2]}, then one with value {value} "
                                                    f"({node.name!r})")
            pad = tuple(a + b for a, b in zip(self.pad[1], pad, strict=True))  # type: ignore[assignment]
            node = self.pad[0]
        self.pad = (node, pad, value)

    def add_pad(self, node: Any, pads: tuple[int, ...]) -> tuple[int, ...]:
        """``pads`` (top, bottom, left, right) plus a pending Pad's, which this node absorbs."""
        if self.pad is None:
            return pads
        pnode, extra, value = self.pad
        self.pad = None
        if node.op_type == "MaxPool" and value != -math.inf:
            raise self.unsupported(pnode, f"a Pad with value {value} before MaxPool ({node.name!r}): max pooling pads "
                                          "with -inf, and the max over zeros differs wherever the inputs are negative; "
                                          "only a -inf Pad is folded into MaxPool")
        if node.op_type != "MaxPool" and value != 0.0:
            raise self.unsupported(pnode, f"a Pad with value {value} before {node.op_type} ({node.name!r}): only zero "
                                          "padding is folded into Conv and AveragePool")
        return tuple(a + b for a, b in zip(pads, extra, strict=True))

    def op_Conv(self, node: Any, attrs: dict[str, Any]) -> None:
        self.need_rank(node, 4)
        if len(node.input) < 2:
            raise self.fmt(f"Conv node {node.name!r} needs inputs X and W")
        W = self.weight(node, node.input[1], "W", 4)
        group = self.attr(node, attrs, "group", 1, int)
        if group != 1:
            raise self.unsupported(node, f"group={group}: grouped/depthwise convolutions are not supported")
        k = (int(W.shape[2]), int(W.shape[3]))
        ks = self.attr(node, attrs, "kernel_shape", list(k), list, 2)
        if tuple(ks) != k:
            raise self.fmt(f"Conv node {node.name!r}: kernel_shape {ks} does not match the weight {W.shape}")
        s = self.attr(node, attrs, "strides", [1, 1], list, 2)
        d = self.attr(node, attrs, "dilations", [1, 1], list, 2)
        if min(s) < 1 or min(d) < 1:
            raise self.fmt(f"Conv node {node.name!r}: strides {s} / dilations {d} must be positive")
        pads = self.add_pad(node, self.pads(node, attrs, k, s, d))
        b = None
        if len(node.input) > 2 and node.input[2]:
            b = self.weight(node, node.input[2], "B", 1)
        self.add(node, self.make(node, Conv2d, W, b, stride=tuple(s), padding=pads, dilation=tuple(d)))

    def pool(self, node: Any, attrs: dict[str, Any], cls: type) -> None:
        self.need_rank(node, 4)
        self.single_output(node)
        k = self.attr(node, attrs, "kernel_shape", None, list, 2)
        s = self.attr(node, attrs, "strides", [1, 1], list, 2)
        d = self.attr(node, attrs, "dilations", [1, 1], list, 2)
        if d != [1, 1]:
            raise self.unsupported(node, f"dilations={d}")
        if min(k) < 1 or min(s) < 1:
            raise self.fmt(f"node {node.name!r} ({node.op_type}): kernel_shape {k} / strides {s} must be positive")
        pads = self.pads(node, attrs, (k[0], k[1]), s, d)
        if cls is AvgPool2d and not self.attr(node, attrs, "count_include_pad", 0, int) and any(pads):
            raise self.unsupported(node, "count_include_pad=0 with padding (deeptaylor's AvgPool2d counts the "
                                         "padding, as PyTorch's default)")
        if self.attr(node, attrs, "ceil_mode", 0, int):
            shape = self.need_shape(node, "ceil_mode=1")
            for ax in range(2):
                size, b, e = shape[2 + ax], pads[2 * ax], pads[2 * ax + 1]
                num = size + b + e - k[ax]
                floor_out = num // s[ax] + 1
                ceil_out = -(-num // s[ax]) + 1
                if (ceil_out - 1) * s[ax] >= size + b:  # the last window would start in the end padding
                    ceil_out -= 1
                if ceil_out != floor_out:
                    raise self.unsupported(node, f"ceil_mode=1 changes the output size for input "
                                                 f"{self.show([self.batch, *shape[1:]])}")
        pads = self.add_pad(node, pads)
        self.add(node, self.make(node, cls, tuple(k), stride=tuple(s), padding=pads))

    def op_MaxPool(self, node: Any, attrs: dict[str, Any]) -> None:
        self.pool(node, attrs, MaxPool2d)

    def op_AveragePool(self, node: Any, attrs: dict[str, Any]) -> None:
        self.pool(node, attrs, AvgPool2d)

    def op_GlobalAveragePool(self, node: Any, attrs: dict[str, Any]) -> None:
        self.need_rank(node, 4)
        shape = self.need_shape(node, "GlobalAveragePool")
        hw = (shape[2], shape[3])
        self.add(node, self.make(node, AvgPool2d, hw, stride=hw))

    def op_ReduceMean(self, node: Any, attrs: dict[str, Any]) -> None:
        """The mean over the spatial axes (2, 3) of an ``(N, C, H, W)`` tensor, as the dynamo exporter writes
        ``AdaptiveAvgPool2d(1)`` / ``x.mean((2, 3))``: an ``AvgPool2d`` over the whole map, then a ``Flatten``
        when ``keepdims = 0`` (output ``(N, C)``; with ``keepdims = 1`` it is ``(N, C, 1, 1)``). The axes are
        an attribute (opset < 18) or a constant second input (opset >= 18)."""
        keepdims = self.attr(node, attrs, "keepdims", 1, int)
        noop = self.attr(node, attrs, "noop_with_empty_axes", 0, int)
        axes: list[int] | None = None
        if len(node.input) > 1 and node.input[1]:
            if "axes" in attrs:
                raise self.fmt(f"ReduceMean node {node.name!r} has axes both as an attribute and an input")
            t = self.const(node, node.input[1], "axes")
            if t.dtype.kind != "i" or t.ndim > 1 or np.any(t == _BATCH):
                raise self.unsupported(node, "axes must be a constant 1-D int64 tensor")
            axes = [int(v) for v in t.reshape(-1)]
        elif "axes" in attrs:
            axes = self.attr(node, attrs, "axes", None, list)
        if not axes:
            if noop:
                return  # reduces nothing: the identity
            raise self.unsupported(node, "ReduceMean over all axes (the batch too)")
        norm = sorted(a + self.rank if a < 0 else a for a in axes)
        if self.rank != 4 or norm != [2, 3]:
            raise self.unsupported(node, f"axes={axes} on a rank-{self.rank} input: only the mean over the spatial "
                                         "axes (2, 3) of an (N, C, H, W) tensor (global average pooling)")
        shape = self.need_shape(node, "ReduceMean")
        hw = (shape[2], shape[3])
        self.add(node, self.make(node, AvgPool2d, hw, stride=hw))
        if not keepdims:
            self.add(node, Flatten())

    def op_Flatten(self, node: Any, attrs: dict[str, Any]) -> None:
        axis = self.attr(node, attrs, "axis", 1, int)
        if axis < 0:
            axis += self.rank
        if axis != 1:
            raise self.unsupported(node, f"axis={attrs.get('axis')}: only a flatten to (N, -1) (axis=1)")
        if self.rank == 4:
            self.add(node, Flatten())

    def op_Reshape(self, node: Any, attrs: dict[str, Any]) -> None:
        if len(node.input) != 2:
            raise self.unsupported(node, "Reshape needs a constant shape input (opset >= 5)")
        t = self.const(node, node.input[1], "shape")
        if t.dtype.kind != "i" or t.ndim != 1:
            raise self.fmt(f"Reshape node {node.name!r}: shape must be a 1-D int64 tensor")
        target = [int(v) for v in t]
        allowzero = self.attr(node, attrs, "allowzero", 0, int)
        feats = None if self.shape is None else math.prod(self.shape[1:])
        ok = False
        if len(target) == 2:
            n, f = target
            if n == _BATCH or (n == 0 and not allowzero):  # the batch size from Shape, or "copy the batch"
                n_ok = True
            elif n == -1:  # inferred: a flatten only if the feature count is given and right
                n_ok = feats is not None and f == feats
            else:  # a literal batch size: only the graph's own static batch
                n_ok = n > 0 and n == self.batch
            if f == -1:
                f_ok = n != -1
            elif f == 0 and not allowzero:  # copy dimension 1: a flatten only of a rank-2 input
                f_ok = self.rank == 2
            else:
                f_ok = f > 0 and f == feats
            ok = n_ok and f_ok
        if not ok:
            have = "unknown" if feats is None else str(feats)
            target = ["batch" if v == _BATCH else v for v in target]  # type: ignore[misc]
            raise self.unsupported(node, f"Reshape to {target} is not a flatten to (batch, features) for an input of "
                                         f"rank {self.rank} with {have} features per sample (use shape (0, -1))")
        if self.rank == 4:
            self.add(node, Flatten())

    def op_BatchNormalization(self, node: Any, attrs: dict[str, Any]) -> None:
        self.single_output(node)
        if not self.foldable:
            raise self.unsupported(node, "BatchNormalization is folded into the preceding Conv/Gemm/MatMul, and "
                                         "there is none directly before it")
        if len(node.input) != 5:
            raise self.fmt(f"BatchNormalization node {node.name!r} needs 5 inputs")
        if self.attr(node, attrs, "training_mode", 0, int):
            raise self.unsupported(node, "training_mode=1")
        if self.attr(node, attrs, "spatial", 1, int) != 1:
            raise self.unsupported(node, "spatial=0")
        eps = self.attr(node, attrs, "epsilon", 1e-5, float)
        prev = self.layers[-1]
        c = prev.weight.shape[0]  # type: ignore[attr-defined]
        gamma, beta, mean, var = (self.weight(node, name, what, 1) for name, what in
                                  zip(node.input[1:], ("scale", "B", "mean", "var"), strict=True))
        if not all(v.shape == (c,) for v in (gamma, beta, mean, var)):
            raise self.fmt(f"BatchNormalization node {node.name!r}: parameters must have shape ({c},)")
        if np.any(var + eps <= 0):
            raise self.fmt(f"BatchNormalization node {node.name!r}: var + epsilon must be positive")
        scale = gamma / np.sqrt(var + eps)
        w = prev.weight * scale.reshape((-1,) + (1,) * (prev.weight.ndim - 1))  # type: ignore[attr-defined]
        b = (prev.bias - mean) * scale + beta  # type: ignore[attr-defined]
        if isinstance(prev, Dense):
            self.layers[-1] = self.make(node, Dense, w, b)
        else:
            assert isinstance(prev, Conv2d)
            self.layers[-1] = self.make(node, Conv2d, w, b, stride=prev.stride, padding=prev.padding,
                                        dilation=prev.dilation)
