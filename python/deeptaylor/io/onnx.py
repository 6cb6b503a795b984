"""ONNX import (extra ``onnx``): :func:`load_onnx` turns an ONNX graph into a :class:`~deeptaylor.Graph`.

Parsing uses the ``onnx`` package only (``onnx.load_model_from_string``, ``onnx.numpy_helper.to_array``);
no runtime is needed and nothing in the file is executed. Tensors stored as external data (the default
of ``torch.onnx.export`` in torch 2.13: ``model.onnx`` + ``model.onnx.data``) are read by this module
itself, only from regular files inside the model's own directory, with every offset and size checked.

The graph is translated node by node into a :class:`~deeptaylor.Graph` built from :func:`~deeptaylor.Input`
and symbolic layer calls, the node names taken from the ONNX node names (sanitised, made unique). It
needs the static per-sample input shape (declared by the graph or passed as ``input_shape``); without it
only a single chain of ops can be imported, as a :class:`~deeptaylor.Sequential` that takes any size.
See docs/importing.md for the op table; :data:`SUPPORTED_OPS` lists the ops.
"""

from __future__ import annotations

import heapq
import math
import os
import re
import stat
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, ModelFormatError, ShapeError, UnsupportedError
from ..layers import (
    ELU,
    GELU,
    Add,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    ChannelShuffle,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dense,
    Flatten,
    Hardsigmoid,
    Hardswish,
    Layer,
    LeakyReLU,
    MaxPool2d,
    Mul,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Slice,
    Tanh,
    Upsample,
)
from ..network import Graph, Input, Sequential

__all__ = ["MIN_OPSET", "SUPPORTED_OPS", "load_onnx"]

SUPPORTED_OPS = ("Conv (grouped too)", "ConvTranspose", "Gemm", "MatMul", "Add/Sum", ("Sub/Mul/Div (by constants; "
                 "Mul of a signal and a gate)"), "Concat (axis 1)", "Split/Slice (channels)", "BatchNormalization",
                 "Relu", "LeakyRelu", "Elu", "Gelu (and the Erf form)", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
                 "Clip (ReLU, ReLU6)", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean (over axes 2, 3)",
                 "Pad (constant, H/W only; folded into the next Conv/AveragePool, or MaxPool for -inf)",
                 "Resize/Upsample (nearest, integer scales)", "Flatten", ("Reshape (flatten; channel shuffle with "
                 "Transpose)"), "Dropout", "Identity", "Constant",
                 ("Shape/Gather/Unsqueeze/Squeeze/Concat/Cast/CastLike/Reshape/Slice/Transpose/ConstantOfShape/Expand/"
                  "Add/Sub/Mul/Div (shape arithmetic on constants)"))
MIN_OPSET = 7
_MAX_ELEMENTS = 1 << 34
# evaluated on constants (shape arithmetic)
_FOLDABLE = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Slice", "Transpose", "ConstantOfShape",
             "Shape", "Add", "Sub", "Mul", "Div")
_MAX_ARITH = 1 << 31  # Add/Sub/Mul/Div are evaluated on values up to this size only (no int64 overflow)
_PAD_USERS = ("Conv", "AveragePool", "MaxPool")  # ops a preceding constant Pad is folded into
_MAX_FOLD = 64  # elements of a tensor that shape arithmetic may take or make
# What ``Shape`` of a computed tensor gives for the batch size, which is not known at import: a value no
# real size and no Reshape/Slice code (-1, 0, INT64_MIN/MAX) takes, so wherever it ends up (Reshape's
# target: the batch; anywhere else: an error) it cannot be mistaken for a number.
_BATCH = -(1 << 60) - 12345
_MAX_SIZE = 1 << 24  # kernel sizes, strides, pads, dilations beyond this are treated as corrupt
_NAME_BAD = re.compile(r"[^A-Za-z0-9_.:/\-\[\]]")
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_ITEMSIZE = {1: 4, 11: 8, 10: 2, 7: 8, 6: 4}  # TensorProto FLOAT, DOUBLE, FLOAT16, INT64, INT32


def _onnx() -> Any:
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as exc:  # pragma: no cover - only without onnx
        raise ModelFormatError("ONNX support needs the onnx package: pip install 'deeptaylor[onnx]'") from exc
    return onnx


def load_onnx(source: str | os.PathLike[str] | bytes, input_shape: Any = None) -> Graph:
    """Import an ONNX model.

    Parameters
    ----------
    source : path or bytes
        The ``.onnx`` file (or its content). Weights stored as external data (``model.onnx.data``)
        are read from the model's directory, so such a model must be given by its path.
    input_shape : tuple of int, optional
        The input shape, per sample (``(F,)``, ``(C, H, W)``) or with a batch dimension. Overrides
        symbolic dimensions of the graph's declared input; must agree with its static ones. Needed
        when the graph declares no static per-sample shape and is not a single chain, or uses
        GlobalAveragePool, ``auto_pad`` SAME, ``ceil_mode``, Split, a channel shuffle, ...

    Returns
    -------
    Graph
        float64 parameters; its forward equals the ONNX model's output up to float rounding. A
        :class:`~deeptaylor.Graph` with input shape ``(C, H, W)`` / ``(F,)`` whose nodes are named after
        the ONNX nodes, or, for a single chain whose per-sample size the graph does not declare, a
        :class:`~deeptaylor.Sequential` (which takes any size its layers accept). BatchNormalization
        stays a node; :func:`deeptaylor.passes.canonicalize` folds it where that is exact.

    Raises
    ------
    ModelFormatError
        Unreadable, corrupt or inconsistent files (bad protobuf, undefined tensors, wrong shapes,
        missing graph, cycles, external data outside the model's directory, missing or truncated,
        or external data in a model given as bytes), naming the file and the problem.
    UnsupportedError
        Valid ONNX that deeptaylor cannot represent (other ops, non-gate products, ...), naming the
        node, its op type and what is supported.
    ShapeError
        ``input_shape`` contradicts the graph's declared input.
    """
    onnx = _onnx()
    base_dir = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        where, data = "<bytes>", bytes(source)
    else:
        where = repr(os.fspath(source))
        try:
            with open(source, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise ModelFormatError(f"cannot open model file {where}: {exc.strerror or exc}") from None
        base_dir = os.path.dirname(os.path.abspath(os.fspath(source)))
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: any parse failure is a format error
        raise ModelFormatError(f"{where}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    try:
        return _Importer(onnx, model, where, input_shape, base_dir).run()
    except DeepTaylorError:
        raise
    except RecursionError:
        raise ModelFormatError(f"{where}: ONNX model is nested too deeply") from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, MemoryError) as exc:
        # Defence in depth for corrupt files: decoding helpers of the onnx package raising on bad fields.
        raise ModelFormatError(f"{where}: corrupt ONNX model ({type(exc).__name__}: {exc})") from None


class _Val:
    """A computed tensor: the graph input or a node's output. ``t`` is its symbolic
    :class:`~deeptaylor.network.Tensor` (graph mode) or its value id in the chain (chain mode);
    ``shape`` the full shape with batch 1 (None in chain mode); ``layer`` / ``src`` the producing layer
    and its input values (None / () for the graph input); ``name`` the ONNX tensor name."""

    __slots__ = ("layer", "name", "rank", "shape", "src", "t")

    def __init__(self, t: Any, rank: int, shape: tuple[int, ...] | None, layer: Layer | None,
                 src: tuple[_Val, ...], name: str) -> None:
        self.t, self.rank, self.shape, self.layer, self.src, self.name = t, rank, shape, layer, src, name


class _Virtual:
    """A tensor the importer has not turned into a node (yet): a pending constant Pad (``pad``), a
    scalar multiple ``c * src`` (``scale``), ``k * erf(src / sqrt 2) + p`` on the way to a GELU
    (``erf``), or the rank-5 steps of a channel shuffle (``grouped``: ``(N, g, C/g, H, W)``;
    ``shuffled``: ``(N, C/g, g, H, W)``). Only some ops can read one; see ``_Importer.val``."""

    __slots__ = ("c", "g", "k", "kind", "mat", "node", "p", "pads", "src", "value")

    def __init__(self, kind: str, src: _Val, node: Any = None, **kw: Any) -> None:
        self.kind, self.src, self.node, self.mat = kind, src, node, None
        self.pads, self.value = kw.get("pads"), kw.get("value")
        self.c, self.k, self.p, self.g = kw.get("c", 1.0), kw.get("k", 1.0), kw.get("p", 0.0), kw.get("g", 1)

    @property
    def rank(self) -> int:
        return 5 if self.kind in ("grouped", "shuffled") else self.src.rank

    @property
    def shape(self) -> tuple[int, ...] | None:
        s = self.src.shape
        if s is None:
            return None
        if self.kind == "pad":
            t, b, lft, r = self.pads
            return (s[0], s[1], s[2] + t + b, s[3] + lft + r)
        if self.kind == "grouped":
            return (s[0], self.g, s[1] // self.g, s[2], s[3])
        if self.kind == "shuffled":
            return (s[0], s[1] // self.g, self.g, s[2], s[3])
        return s


def _close(a: float, b: float, tol: float = 1e-6) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


class _Importer:
    def __init__(self, onnx: Any, model: Any, where: str, input_shape: Any, base_dir: str | None) -> None:
        self.onnx = onnx
        self.model = model
        self.where = where
        self.user_shape = input_shape
        self.base_dir = base_dir
        self.consts: dict[str, np.ndarray] = {}
        self.vals: dict[str, _Val | _Virtual] = {}
        self.batch: int | None = None  # the declared static batch size, if any
        self.graph_mode = False  # the per-sample input shape is known: build a Graph (else a chain)
        self.chain: list[Layer] = []
        self.chain_end: _Val | None = None
        self.used_names: set[str] = set()
        self.n_users: dict[str, int] = {}

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
        allowed = {T.FLOAT: "float", T.DOUBLE: "double", T.FLOAT16: "float16", T.INT64: "int64", T.INT32: "int32"}
        if t.data_type not in allowed:
            raise self.fmt(f"{what} {t.name!r} has unsupported data type {t.data_type}")
        dims = list(t.dims)
        if any(d < 0 for d in dims) or len(dims) > 8 or math.prod(dims) > _MAX_ELEMENTS:
            raise self.fmt(f"{what} {t.name!r} has invalid dimensions {dims}")
        if t.data_location == T.EXTERNAL or len(t.external_data):
            t = self.external(t, what, dims)
        try:
            arr = self.onnx.numpy_helper.to_array(t)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises on corrupt data
            raise self.fmt(f"{what} {t.name!r} cannot be decoded ({type(exc).__name__}: {exc})") from None
        if tuple(arr.shape) != tuple(dims):
            raise self.fmt(f"{what} {t.name!r} holds shape {arr.shape}, declares {tuple(dims)}")
        if arr.dtype.kind == "f":
            f32 = arr.dtype == np.float32
            with np.errstate(all="ignore"):  # NaN/Inf are reported below, not warned about
                arr = arr.astype(np.float64)
            # a scalar may be infinite (a Pad's -inf value before MaxPool); weights and biases are checked on use
            if np.any(np.isnan(arr)) or (arr.size != 1 and not np.all(np.isfinite(arr))):
                raise self.fmt(f"{what} {t.name!r} contains NaN or Inf")
            if f32:  # float32 weights stay float32 in the layers, as from_torch keeps them (exact either way)
                arr = arr.astype(np.float32)
        else:
            arr = arr.astype(np.int64)
        return arr

    def external(self, t: Any, what: str, dims: list[int]) -> Any:
        """A copy of the TensorProto ``t`` with its external bytes read in as ``raw_data``, after checking
        that the file is a regular file inside the model's directory (no absolute path, no ``..``, no
        link leading out) and that offset and length lie in it and match the tensor's size."""
        T = self.onnx.TensorProto
        name = t.name
        if t.data_location != T.EXTERNAL:
            raise self.fmt(f"{what} {name!r} lists external data but is not marked external")
        info: dict[str, str] = {}
        for entry in t.external_data:
            if entry.key in info:
                raise self.fmt(f"{what} {name!r}: external data key {entry.key!r} given twice")
            info[entry.key] = entry.value
        loc = info.get("location", "")
        if self.base_dir is None:
            raise self.fmt(f"{what} {name!r} uses external data (file {loc!r:.200}); a model given as bytes cannot "
                           "read it: load the model from its path (dt.load('model.onnx')), with the data file "
                           "beside it")
        shown = f"{what} {name!r}: external data file {loc!r:.200}"
        parts = re.split(r"[/\\]", loc)
        if not loc or "\0" in loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", loc) \
                or ".." in parts:
            raise self.fmt(f"{shown} is not a relative path inside the model's directory (no absolute paths, "
                           "no '..')")
        path = os.path.join(self.base_dir, *[p for p in parts if p not in ("", ".")])
        base = os.path.realpath(self.base_dir)
        real = os.path.realpath(path)
        if os.path.commonpath([base, real]) != base or real == base:
            raise self.fmt(f"{shown} resolves to {real!r}, outside the model's directory {base!r} (a link leading "
                           "out?)")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise self.fmt(f"{shown}: offset/length are not integers") from None
        nbytes = math.prod(dims) * _ITEMSIZE[t.data_type]
        try:
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise self.fmt(f"{shown} (path {path!r}) cannot be opened: {exc.strerror or exc}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise self.fmt(f"{shown} (path {path!r}) is not a regular file")
        with os.fdopen(fd, "rb") as fh:
            size = st.st_size
            if length is None:
                length = size - offset
            if offset < 0 or length < 0 or offset + length > size:
                raise self.fmt(f"{shown} (path {path!r}): offset {offset} + length {length} is beyond the file's "
                               f"{size} bytes (truncated?)")
            if length != nbytes:
                raise self.fmt(f"{shown} (path {path!r}): {length} bytes for a tensor of shape {tuple(dims)} that "
                               f"needs {nbytes}")
            fh.seek(offset)
            raw = fh.read(nbytes)
        if len(raw) != nbytes:
            raise self.fmt(f"{shown} (path {path!r}): truncated ({len(raw)} of {nbytes} bytes)")
        inline = T()
        inline.name = name
        inline.data_type = t.data_type
        inline.dims.extend(dims)
        inline.raw_data = raw
        return inline
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

    def run(self) -> Graph:
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
        self.graph_mode = self.in_shape is not None
        in_name = inputs[0].name
        if self.graph_mode:
            self.x = Input(self.in_shape[1:])  # type: ignore[index]
            self.vals[in_name] = _Val(self.x, self.rank, self.in_shape, None, (), in_name)
        else:
            self.vals[in_name] = _Val(0, self.rank, None, None, (), in_name)
            self.chain_end = self.vals[in_name]  # type: ignore[assignment]
        order = self.toposort(graph, in_name)
        for node in order:
            for name in node.input:
                self.n_users[name] = self.n_users.get(name, 0) + 1
        out_name = graph.output[0].name
        self.n_users[out_name] = self.n_users.get(out_name, 0) + 1
        for node in order:
            self.step(node)
        if out_name not in self.vals:
            raise UnsupportedError(f"{self.where}: the graph's output {out_name!r} is a constant or undefined")
        v = self.vals[out_name]
        if isinstance(v, _Virtual) and v.kind == "pad":
            raise self.unsupported(v.node, "a Pad at the end of the graph (it is folded into a following Conv, "
                                           "AveragePool or MaxPool)")
        out = self.real(v, None)
        if out.layer is None:
            raise UnsupportedError(f"{self.where}: the graph has no layers deeptaylor can represent")
        if self.graph_mode:
            net: Graph = Graph(self.x, out.t)
        else:
            net = Sequential(self.chain[:out.t])
        self.check_output(graph.output[0], net)
        return net

    def step(self, node: Any) -> None:
        """Translate one ONNX node (in dependency order)."""
        if node.domain not in ("", "ai.onnx"):
            raise self.unsupported(node, f"custom domain {node.domain!r}")
        op = node.op_type
        if op == "Constant":
            self.constant(node)
            return
        if not node.output or not node.output[0]:
            raise self.fmt(f"node {node.name!r} ({op}) has no output")
        if op in ("Identity", "Dropout") and len(node.input) >= 1:
            if op == "Dropout":
                self.op_Dropout(node, self.attrs(node))
            if len(node.input) > 1 and op == "Identity":
                raise self.fmt(f"Identity node {node.name!r} takes one input")
            src = node.input[0]
            if src in self.consts:
                self.consts[node.output[0]] = self.consts[src]  # exporters alias weights this way
            elif src in self.vals:
                self.vals[node.output[0]] = self.vals[src]
            else:  # pragma: no cover - toposort rejects undefined tensors
                raise self.fmt(f"node {node.name!r} ({op}) uses undefined tensor {src!r:.100}")
            return
        if op == "Shape" and node.input and node.input[0] in self.vals:
            self.shape_of(node, self.vals[node.input[0]])
            return
        ins = [i for i in node.input if i]
        if ins and all(i in self.consts for i in ins):
            if op in _FOLDABLE:
                self.fold(node)
                return
            if op == "Expand":
                self.expand(node)
                return
            if hasattr(self, f"op_{op}"):
                raise self.unsupported(node, "it computes on constants only (only integer shape arithmetic is "
                                             "evaluated at import)")
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise self.unsupported(node)
        handler(node, self.attrs(node))

    # ----------------------------------------------------------------------------- values and nodes

    def val(self, node: Any, i: int = 0) -> _Val:
        """Input ``i`` of ``node`` as a computed tensor (a pending scalar multiple becomes a node here);
        an error naming the node when it is a constant, a pending Pad or a step of a pattern that only
        certain ops complete."""
        name = node.input[i] if i < len(node.input) else ""
        if not name:
            raise self.fmt(f"node {node.name!r} ({node.op_type}) lacks input {i}")
        if name not in self.vals:
            raise self.unsupported(node, f"its input {i} ({name!r:.100}) must be a computed tensor, not a constant")
        return self.real(self.vals[name], node)

    def real(self, v: _Val | _Virtual, node: Any) -> _Val:
        if isinstance(v, _Val):
            return v
        if v.kind == "pad":
            op = node.op_type if node is not None else "the output"
            raise self.unsupported(v.node, f"a Pad is folded into a directly following Conv, AveragePool or MaxPool, "
                                           f"not into {op} ({'' if node is None else node.name!r})")
        if v.kind == "scale":
            if v.mat is None:
                if v.c == 1.0:
                    v.mat = v.src
                else:
                    c = self.channels(v.node, v.src)
                    v.mat = self.affine(v.node, v.src, np.full(c, v.c), np.zeros(c))
            return v.mat
        what = {"erf": "Erf is supported only inside the GELU pattern x * 0.5 * (1 + erf(x / sqrt 2))",
                "grouped": "a Reshape to (N, g, C/g, H, W) is supported only as the first step of a channel shuffle "
                           "(Reshape, Transpose perm (0, 2, 1, 3, 4), Reshape back)",
                "shuffled": "a Transpose of grouped channels is supported only before the Reshape back to (N, C, H, W) "
                            "of a channel shuffle"}[v.kind]
        raise self.unsupported(node if node is not None else v.node, what)

    def node_name(self, node: Any, suffix: str = "") -> str:
        base = node.name or (node.output[0] if node.output else "") or node.op_type
        base = _NAME_BAD.sub("_", base).lstrip("/")[:200] or node.op_type
        if suffix:
            base = f"{base}:{suffix}"
        name, k = base, 1
        while name in self.used_names:
            k += 1
            name = f"{base}_{k}"
        self.used_names.add(name)
        return name

    def emit(self, node: Any, layer: Layer, ins: list[_Val], suffix: str = "", out: str | None = None) -> _Val:
        """Add ``layer`` applied to ``ins`` as a node named after ``node``; returns its output value (also
        stored as the ONNX tensor ``out``, default ``node.output[0]``)."""
        out = node.output[0] if out is None else out
        if self.graph_mode:
            try:
                t = layer(*[v.t for v in ins], name=self.node_name(node, suffix))
            except ShapeError as exc:
                shapes = ", ".join(self.show([self.batch, *v.shape[1:]]) for v in ins)  # type: ignore[index]
                raise self.fmt(f"node {node.name!r} ({node.op_type}) cannot take input of shape {shapes}: "
                               f"{exc}") from None
            except UnsupportedError as exc:
                raise self.unsupported(node, str(exc)) from None
            shape = (1, *t.shape)
            v = _Val(t, len(shape), shape, layer, tuple(ins), out)
        else:
            if len(ins) != 1 or ins[0] is not self.chain_end:
                raise UnsupportedError(
                    f"{self.where}: node {node.name or '<unnamed>'!r} (op {node.op_type!r}) does not continue a "
                    "single chain of ops; the graph declares no static per-sample input shape, and only a chain "
                    "can be imported without one: pass input_shape=(C, H, W) (or (F,))")
            rank = 2 if isinstance(layer, (Dense, Flatten)) else ins[0].rank
            self.chain.append(layer)
            v = _Val(len(self.chain), rank, None, layer, tuple(ins), out)
            self.chain_end = v
        self.vals[out] = v
        return v

    def replace(self, v: _Val, layer: Layer) -> None:
        """Give the node that produced ``v`` another layer of the same output shape (a bias folded in)."""
        if self.graph_mode:
            v.t.layer = layer
        else:
            self.chain[v.t - 1] = layer
        v.layer = layer

    def alias(self, node: Any, v: _Val | _Virtual) -> None:
        self.vals[node.output[0]] = v

    def channels(self, node: Any, v: _Val) -> int:
        if v.shape is None:
            raise self.unsupported(node, "it needs the number of channels; the graph declares no static input shape, "
                                         "pass input_shape")
        return int(v.shape[1])

    def affine(self, node: Any, v: _Val, w: np.ndarray, b: np.ndarray) -> _Val:
        """``x * w[c] + b[c]`` per channel as a BatchNorm node (mean 0, variance 1, eps 0: exact)."""
        cls = BatchNorm2d if v.rank == 4 else BatchNorm1d
        if v.rank not in (2, 4):
            raise self.unsupported(node, f"a per-channel affine map of a rank-{v.rank} tensor")
        c = len(w)
        layer = self.make(node, cls, np.zeros(c), np.ones(c), w, b, eps=0.0)
        return self.emit(node, layer, [v], suffix="affine" if node.op_type not in ("Add", "Sub", "Mul", "Div") else "")

    def check_output(self, value: Any, net: Graph) -> None:
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

    def need_shape(self, node: Any, v: _Val | _Virtual, why: str) -> tuple[int, ...]:
        shape = v.shape
        if shape is None:
            raise self.unsupported(node, f"{why} needs the input's spatial size; the graph declares none, pass "
                                         "input_shape=(C, H, W)")
        return shape

    def need_rank(self, node: Any, v: _Val | _Virtual, rank: int) -> None:
        if v.rank != rank:
            raise self.unsupported(node, f"expects a rank-{rank} input, its input has rank {v.rank}")

    def expand(self, node: Any) -> None:
        """``Expand`` of a constant to a constant shape (the dynamo exporter's unoptimised zero bias:
        ``Expand(CastLike(0, x), Shape(W)[:1])``), at most ``_MAX_SIZE`` elements."""
        if len(node.input) != 2 or len(node.output) != 1 or node.output[0] in self.consts:
            raise self.fmt(f"Expand node {node.name!r} needs two inputs and one new output")
        x, shape = self.consts[node.input[0]], self.consts[node.input[1]]
        if shape.dtype.kind != "i" or shape.ndim != 1 or shape.size > 8 or np.any(shape < 0):
            raise self.unsupported(node, "the shape must be a constant 1-D int64 tensor of sizes")
        try:
            dims = np.broadcast_shapes(x.shape, tuple(int(v) for v in shape))
        except ValueError as exc:
            raise self.fmt(f"Expand node {node.name!r}: {exc}") from None
        if math.prod(dims) > _MAX_SIZE:
            raise self.unsupported(node, f"an Expand to {math.prod(dims)} elements")
        self.consts[node.output[0]] = np.array(np.broadcast_to(x, dims))

    def op_CastLike(self, node: Any, attrs: dict[str, Any]) -> None:
        """``CastLike(constant, like)``: the constant, as a float when ``like`` is a computed tensor."""
        if len(node.input) != 2 or node.input[0] not in self.consts:
            raise self.unsupported(node, "only a CastLike of a constant is evaluated")
        c, like = self.consts[node.input[0]], self.consts.get(node.input[1])
        to_float = like is None or like.dtype.kind == "f"
        if not to_float and c.dtype.kind == "f" and not np.all(np.abs(c) < _MAX_ARITH):
            raise self.unsupported(node, f"a cast to an integer of values beyond {_MAX_ARITH}")
        self.consts[node.output[0]] = c.astype(np.float64) if to_float else np.trunc(c).astype(np.int64)

    def shape_of(self, node: Any, v: _Val | _Virtual) -> None:
        """``Shape`` of a computed tensor (``x.size()`` in a traced ``x.view(x.size(0), -1)``): the per-sample
        sizes, with the marker ``_BATCH`` in place of the batch size, which a ``Reshape`` target may hold
        in its first entry only ("the batch"). ``start``/``end`` (opset 15) slice it."""
        if len(node.output) != 1 or not node.output[0] or node.output[0] in self.consts:
            raise self.fmt(f"Shape node {node.name!r} must have one new output")
        attrs = self.attrs(node)
        shape = v.shape
        dims: list[int | None] = [_BATCH, *shape[1:]] if shape is not None else [_BATCH] + [None] * (v.rank - 1)
        r = len(dims)
        start = self.attr(node, attrs, "start", 0, int)
        end = self.attr(node, attrs, "end", r, int)
        start, end = (min(max(x + r if x < 0 else x, 0), r) for x in (start, end))
        picked = dims[start:end]
        if any(d is None for d in picked):
            raise self.unsupported(node, "Shape of a tensor whose size is not static; pass input_shape")
        self.consts[node.output[0]] = np.array(picked, dtype=np.int64)

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
        if any(a is not None and (a.dtype.kind not in "if" or a.size > _MAX_FOLD) for a in ins):
            raise self.unsupported(node, "only small (shape) constants are evaluated")
        is_float = any(a is not None and a.dtype.kind == "f" for a in ins)
        # the inputs that say how to compute (indices, axes, target shapes), as opposed to the data moved
        params = ins if op in ("ConstantOfShape", "Add", "Sub", "Mul", "Div") else [] if op == "Concat" else ins[1:]
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
            elif op in ("Add", "Sub", "Mul", "Div"):
                if len(ins) != 2 or ins[1] is None:
                    raise ValueError("needs two inputs")
                if any(np.any(np.abs(a) > _MAX_ARITH) for a in ins):  # type: ignore[arg-type]
                    raise self.unsupported(node, f"integer arithmetic on values beyond {_MAX_ARITH}")
                if op == "Div" and is_float:
                    if np.any(ins[1] == 0):
                        raise ValueError("division by zero")
                    out = np.divide(ins[0], ins[1])
                elif op == "Div":
                    if np.any(ins[1] == 0):
                        raise ValueError("integer division by zero")
                    a, b = np.broadcast_arrays(ins[0], ins[1])
                    out = np.abs(a) // np.abs(b) * np.sign(a) * np.sign(b)  # ONNX: truncation toward zero
                else:
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
                out = np.full(dims, fill.reshape(-1)[0], dtype=fill.dtype)
            else:  # Cast: to an integer (truncating, as ONNX) or a float type
                to = self.attr(node, attrs, "to", 0, int)
                T = self.onnx.TensorProto
                if to in (T.FLOAT, T.DOUBLE, T.FLOAT16):
                    if np.any(x == _BATCH):
                        raise self.unsupported(node, "a Cast of the batch size to float")
                    out, is_float = x.astype(np.float64), True
                elif to in (T.INT64, T.INT32, T.INT16, T.INT8, T.UINT8, T.UINT16, T.UINT32, T.UINT64):
                    if x.dtype.kind == "f" and not np.all(np.abs(x) < _MAX_ARITH):
                        raise self.unsupported(node, f"a Cast to an integer of values beyond {_MAX_ARITH}")
                    out, is_float = np.trunc(x).astype(np.int64), False
                else:
                    raise self.unsupported(node, f"a Cast to data type {to}")
        except (ValueError, IndexError, TypeError, np.exceptions.AxisError) as exc:
            raise self.fmt(f"node {node.name!r} ({op}): {exc}") from None
        self.consts[node.output[0]] = np.asarray(out, dtype=np.float64 if is_float else np.int64)

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

    def pads(self, node: Any, attrs: dict[str, Any], k: tuple[int, int], s: list[int], d: list[int],
             v: _Val | _Virtual) -> tuple[int, ...]:
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
            shape = self.need_shape(node, v, f"auto_pad={auto.decode()}")
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
        name = node.input[0] if node.input else ""
        if name not in self.vals:
            raise self.unsupported(node, "Pad of a constant")
        src = self.vals[name]
        self.need_rank(node, src, 4)
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
            self.alias(node, src)  # pads nothing: the identity, whatever the mode
            return
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
        if isinstance(src, _Virtual) and src.kind == "pad":  # Pad after Pad: one Pad, if both pad with one value
            if src.value != value:
                raise self.unsupported(src.node, f"a Pad with value {src.value}, then one with value {value} "
                                                 f"({node.name!r})")
            pad = tuple(a + b for a, b in zip(src.pads, pad, strict=True))  # type: ignore[assignment]
            self.alias(node, _Virtual("pad", src.src, src.node, pads=pad, value=value))
            return
        self.alias(node, _Virtual("pad", self.real(src, node), node, pads=pad, value=value))

    # ------------------------------------------------------------------------------------------- ops

    def padded(self, node: Any) -> tuple[_Val, tuple[int, ...] | None, _Val | _Virtual]:
        """Input 0 of a Conv/AveragePool/MaxPool: ``(value, pads of a Pad folded in or None, what it reads)``."""
        name = node.input[0] if node.input else ""
        if name not in self.vals:
            raise self.unsupported(node, "its input X must be a computed tensor, not a constant")
        v = self.vals[name]
        if isinstance(v, _Virtual) and v.kind == "pad":
            op = node.op_type
            if op == "MaxPool" and v.value != -math.inf:
                raise self.unsupported(v.node, f"a Pad with value {v.value} before MaxPool ({node.name!r}): max pooling "
                                               "pads with -inf, and the max over zeros differs wherever the inputs are "
                                               "negative; only a -inf Pad is folded into MaxPool")
            if op != "MaxPool" and v.value != 0.0:
                raise self.unsupported(v.node, f"a Pad with value {v.value} before {op} ({node.name!r}): only zero "
                                               "padding is folded into Conv and AveragePool")
            return v.src, v.pads, v
        return self.real(v, node), None, v

    def op_Conv(self, node: Any, attrs: dict[str, Any]) -> None:
        x, extra, xv = self.padded(node)
        self.need_rank(node, x, 4)
        if len(node.input) < 2:
            raise self.fmt(f"Conv node {node.name!r} needs inputs X and W")
        W = self.weight(node, node.input[1], "W", 4)
        group = self.attr(node, attrs, "group", 1, int)
        if group < 1:
            raise self.fmt(f"Conv node {node.name!r}: group {group} must be positive")
        k = (int(W.shape[2]), int(W.shape[3]))
        ks = self.attr(node, attrs, "kernel_shape", list(k), list, 2)
        if tuple(ks) != k:
            raise self.fmt(f"Conv node {node.name!r}: kernel_shape {ks} does not match the weight {W.shape}")
        s = self.attr(node, attrs, "strides", [1, 1], list, 2)
        d = self.attr(node, attrs, "dilations", [1, 1], list, 2)
        if min(s) < 1 or min(d) < 1:
            raise self.fmt(f"Conv node {node.name!r}: strides {s} / dilations {d} must be positive")
        pads = self.pads(node, attrs, k, s, d, xv)
        if extra is not None:
            pads = tuple(a + b for a, b in zip(pads, extra, strict=True))
        b = None
        if len(node.input) > 2 and node.input[2]:
            b = self.weight(node, node.input[2], "B", 1)
        self.emit(node, self.make(node, Conv2d, W, b, stride=tuple(s), padding=pads, dilation=tuple(d),
                                  groups=group), [x])

    def op_ConvTranspose(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        self.need_rank(node, x, 4)
        if len(node.input) < 2:
            raise self.fmt(f"ConvTranspose node {node.name!r} needs inputs X and W")
        W = self.weight(node, node.input[1], "W", 4)
        group = self.attr(node, attrs, "group", 1, int)
        if group < 1:
            raise self.fmt(f"ConvTranspose node {node.name!r}: group {group} must be positive")
        k = (int(W.shape[2]), int(W.shape[3]))
        if tuple(self.attr(node, attrs, "kernel_shape", list(k), list, 2)) != k:
            raise self.fmt(f"ConvTranspose node {node.name!r}: kernel_shape does not match the weight {W.shape}")
        if "output_shape" in attrs:
            raise self.unsupported(node, "output_shape (give pads and output_padding instead)")
        auto = self.attr(node, attrs, "auto_pad", b"NOTSET", bytes)
        if auto not in (b"NOTSET", b"VALID"):
            raise self.unsupported(node, f"auto_pad={auto.decode(errors='replace')!r}")
        s = self.attr(node, attrs, "strides", [1, 1], list, 2)
        d = self.attr(node, attrs, "dilations", [1, 1], list, 2)
        op = self.attr(node, attrs, "output_padding", [0, 0], list, 2)
        p = [0, 0, 0, 0] if auto == b"VALID" else self.attr(node, attrs, "pads", [0, 0, 0, 0], list, 4)
        if min(s) < 1 or min(d) < 1 or min(op) < 0 or min(p) < 0:
            raise self.fmt(f"ConvTranspose node {node.name!r}: strides {s}, dilations {d}, pads {p}, output_padding "
                           f"{op} out of range")
        b = None
        if len(node.input) > 2 and node.input[2]:
            b = self.weight(node, node.input[2], "B", 1)
        self.emit(node, self.make(node, ConvTranspose2d, W, b, stride=tuple(s), padding=(p[0], p[2], p[1], p[3]),
                                  output_padding=tuple(op), dilation=tuple(d), groups=group), [x])

    def pool(self, node: Any, attrs: dict[str, Any], cls: type) -> None:
        x, extra, xv = self.padded(node)
        self.need_rank(node, x, 4)
        self.single_output(node)
        k = self.attr(node, attrs, "kernel_shape", None, list, 2)
        s = self.attr(node, attrs, "strides", [1, 1], list, 2)
        d = self.attr(node, attrs, "dilations", [1, 1], list, 2)
        if d != [1, 1]:
            raise self.unsupported(node, f"dilations={d}")
        if min(k) < 1 or min(s) < 1:
            raise self.fmt(f"node {node.name!r} ({node.op_type}): kernel_shape {k} / strides {s} must be positive")
        pads = self.pads(node, attrs, (k[0], k[1]), s, d, xv)
        ceil = bool(self.attr(node, attrs, "ceil_mode", 0, int))
        cip = bool(self.attr(node, attrs, "count_include_pad", 0, int))
        if extra is not None:
            if cls is AvgPool2d and not cip and any(pads):
                raise self.unsupported(node, "a Pad before an AveragePool with count_include_pad=0 and padding of its "
                                             "own (the Pad's zeros are averaged, its own padding is not)")
            if ceil:  # the windows torch's ceil_mode adds depend on which rows are padding: only the no-op case
                shape = self.need_shape(node, xv, "ceil_mode=1")
                for ax in range(2):
                    size, b, e = shape[2 + ax], pads[2 * ax], pads[2 * ax + 1]
                    num = size + b + e - k[ax]
                    ceil_out = -(-num // s[ax]) + 1
                    if (ceil_out - 1) * s[ax] >= size + b:  # the last window would start in the end padding
                        ceil_out -= 1
                    if ceil_out != num // s[ax] + 1:
                        raise self.unsupported(node, f"ceil_mode=1 after a Pad changes the output size for input "
                                                     f"{self.show([self.batch, *shape[1:]])}")
                ceil = False
            pads = tuple(a + b for a, b in zip(pads, extra, strict=True))
            cip = True
        kw: dict[str, Any] = {"stride": tuple(s), "padding": pads, "ceil_mode": ceil}
        if cls is AvgPool2d:
            kw["count_include_pad"] = cip or not any(pads)
        self.emit(node, self.make(node, cls, tuple(k), **kw), [x])

    def op_MaxPool(self, node: Any, attrs: dict[str, Any]) -> None:
        self.pool(node, attrs, MaxPool2d)

    def op_AveragePool(self, node: Any, attrs: dict[str, Any]) -> None:
        self.pool(node, attrs, AvgPool2d)

    def global_pool(self, node: Any, x: _Val, why: str) -> _Val:
        shape = self.need_shape(node, x, why)
        hw = (shape[2], shape[3])
        return self.emit(node, self.make(node, AvgPool2d, hw, stride=hw), [x])

    def op_GlobalAveragePool(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        self.need_rank(node, x, 4)
        self.global_pool(node, x, "GlobalAveragePool")

    def op_ReduceMean(self, node: Any, attrs: dict[str, Any]) -> None:
        """The mean over the spatial axes (2, 3) of an ``(N, C, H, W)`` tensor, as the exporters write
        ``AdaptiveAvgPool2d(1)`` / ``x.mean((2, 3))``: an ``AvgPool2d`` over the whole map, then a ``Flatten``
        when ``keepdims = 0`` (output ``(N, C)``; with ``keepdims = 1`` it is ``(N, C, 1, 1)``). The axes are
        an attribute (opset < 18) or a constant second input (opset >= 18)."""
        x = self.val(node, 0)
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
                self.alias(node, x)  # reduces nothing: the identity
                return
            raise self.unsupported(node, "ReduceMean over all axes (the batch too)")
        norm = sorted(a + x.rank if a < 0 else a for a in axes)
        if x.rank != 4 or norm != [2, 3]:
            raise self.unsupported(node, f"axes={axes} on a rank-{x.rank} input: only the mean over the spatial "
                                         "axes (2, 3) of an (N, C, H, W) tensor (global average pooling)")
        g = self.global_pool(node, x, "ReduceMean")
        if not keepdims:
            self.emit(node, Flatten(), [g], suffix="flatten")

    def op_Flatten(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        axis = self.attr(node, attrs, "axis", 1, int)
        if axis < 0:
            axis += x.rank
        if axis != 1:
            raise self.unsupported(node, f"axis={attrs.get('axis')}: only a flatten to (N, -1) (axis=1)")
        if x.rank == 4:
            self.emit(node, Flatten(), [x])
        else:
            self.alias(node, x)

    def reshape_target(self, node: Any, target: list[int], shape: tuple[int, ...], allowzero: int) -> tuple[int, ...]:
        """The per-sample shape a Reshape to ``target`` gives a tensor of full ``shape``, when it keeps the
        batch axis (its first entry is the batch size from ``Shape``, ``0`` = copy, the graph's static
        batch, or ``-1`` where the rest takes all the features); otherwise an error."""
        feats = math.prod(shape[1:])
        shown = ["batch" if v == _BATCH else v for v in target]

        def fail() -> UnsupportedError:
            return self.unsupported(node, f"Reshape to {shown} is not a flatten to (batch, features) (use shape "
                                          f"(0, -1)) or a step of a channel shuffle, for an input of shape "
                                          f"{self.show([self.batch, *shape[1:]])}")

        if not target or any(v == _BATCH for v in target[1:]):
            raise fail()
        n, rest = target[0], list(target[1:])
        if not allowzero:
            rest = [shape[i + 1] if v == 0 and i + 1 < len(shape) else v for i, v in enumerate(rest)]
        if any(v < -1 or v == 0 for v in rest) or rest.count(-1) > 1:
            raise fail()
        known = math.prod(v for v in rest if v != -1)
        if n == -1:
            ok = -1 not in rest and known == feats
        else:
            ok = n == _BATCH or (n == 0 and not allowzero) or (n > 0 and n == self.batch)
        if not ok:
            raise fail()
        if -1 in rest:
            if feats % known:
                raise fail()
            rest = [feats // known if v == -1 else v for v in rest]
        if math.prod(rest) != feats:
            raise fail()
        return tuple(rest)

    def op_Reshape(self, node: Any, attrs: dict[str, Any]) -> None:
        if len(node.input) != 2:
            raise self.unsupported(node, "Reshape needs a constant shape input (opset >= 5)")
        src = self.vals[node.input[0]] if node.input[0] in self.vals else self.val(node, 0)
        t = self.const(node, node.input[1], "shape")
        if t.dtype.kind != "i" or t.ndim != 1:
            raise self.fmt(f"Reshape node {node.name!r}: shape must be a 1-D int64 tensor")
        target = [int(v) for v in t]
        allowzero = self.attr(node, attrs, "allowzero", 0, int)
        if isinstance(src, _Virtual) and src.kind == "shuffled":
            per = self.reshape_target(node, target, src.shape, allowzero)  # type: ignore[arg-type]
            if per != src.src.shape[1:]:  # type: ignore[index]
                raise self.unsupported(node, f"a channel shuffle must end in a Reshape back to the input's shape "
                                             f"{src.src.shape[1:]}, not {per}")  # type: ignore[index]
            self.emit(node, self.make(node, ChannelShuffle, src.g), [src.src])
            return
        x = self.real(src, node)
        if x.shape is None:
            self.reshape_chain(node, x, target, allowzero)
            return
        per = self.reshape_target(node, target, x.shape, allowzero)
        if per == x.shape[1:]:
            self.alias(node, x)
        elif len(per) == 1:
            self.emit(node, Flatten(), [x])
        elif x.rank == 4 and len(per) == 4 and per[0] * per[1] == x.shape[1] and per[2:] == x.shape[2:]:
            self.alias(node, _Virtual("grouped", x, node, g=per[0]))
        else:
            raise self.unsupported(node, f"Reshape of {self.show([self.batch, *x.shape[1:]])} to per-sample shape "
                                         f"{per}: only flattening and the steps of a channel shuffle")

    def reshape_chain(self, node: Any, x: _Val, target: list[int], allowzero: int) -> None:
        """A Reshape where the per-sample size is unknown: only a flatten to (batch, features)."""
        ok = False
        if len(target) == 2:
            n, f = target
            if n == _BATCH or (n == 0 and not allowzero):  # the batch size from Shape, or "copy the batch"
                n_ok = True
            elif n == -1:  # inferred: a flatten only if the feature count is given and right (unknown here)
                n_ok = False
            else:  # a literal batch size: only the graph's own static batch
                n_ok = n > 0 and n == self.batch
            if f == -1:
                f_ok = n != -1
            elif f == 0 and not allowzero:  # copy dimension 1: a flatten only of a rank-2 input
                f_ok = x.rank == 2
            else:
                f_ok = False
            ok = n_ok and f_ok
        if not ok:
            shown = ["batch" if v == _BATCH else v for v in target]
            raise self.unsupported(node, f"Reshape to {shown} is not a flatten to (batch, features) for an input of "
                                         f"rank {x.rank} with unknown features per sample (use shape (0, -1), or pass "
                                         "input_shape)")
        if x.rank == 4:
            self.emit(node, Flatten(), [x])
        else:
            self.alias(node, x)

    def op_Transpose(self, node: Any, attrs: dict[str, Any]) -> None:
        src = self.vals.get(node.input[0]) if node.input else None
        if src is None:
            raise self.unsupported(node, "its input must be a computed tensor")
        perm = self.attr(node, attrs, "perm", list(range(src.rank))[::-1], list)
        if isinstance(src, _Virtual) and src.kind == "grouped" and perm == [0, 2, 1, 3, 4]:
            self.alias(node, _Virtual("shuffled", src.src, node, g=src.g))
            return
        x = self.real(src, node)
        if perm != list(range(x.rank)):
            raise self.unsupported(node, f"perm={perm}: only the channel shuffle's Transpose (0, 2, 1, 3, 4) of "
                                         "grouped channels")
        self.alias(node, x)

    def op_BatchNormalization(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        self.single_output(node)
        if len(node.input) != 5:
            raise self.fmt(f"BatchNormalization node {node.name!r} needs 5 inputs")
        if self.attr(node, attrs, "training_mode", 0, int):
            raise self.unsupported(node, "training_mode=1")
        if self.attr(node, attrs, "spatial", 1, int) != 1:
            raise self.unsupported(node, "spatial=0")
        eps = self.attr(node, attrs, "epsilon", 1e-5, float)
        if x.rank not in (2, 4):
            raise self.unsupported(node, f"a rank-{x.rank} input")
        gamma, beta, mean, var = (self.weight(node, name, what, 1) for name, what in
                                  zip(node.input[1:], ("scale", "B", "mean", "var"), strict=True))
        cls = BatchNorm2d if x.rank == 4 else BatchNorm1d
        self.emit(node, self.make(node, cls, mean, var, gamma, beta, eps=eps), [x])

    # -- activations

    def op_Relu(self, node: Any, attrs: dict[str, Any]) -> None:
        self.emit(node, ReLU(), [self.val(node, 0)])

    def op_Sigmoid(self, node: Any, attrs: dict[str, Any]) -> None:
        self.emit(node, Sigmoid(), [self.val(node, 0)])

    def op_Tanh(self, node: Any, attrs: dict[str, Any]) -> None:
        self.emit(node, Tanh(), [self.val(node, 0)])

    def op_HardSwish(self, node: Any, attrs: dict[str, Any]) -> None:
        self.emit(node, Hardswish(), [self.val(node, 0)])

    def op_LeakyRelu(self, node: Any, attrs: dict[str, Any]) -> None:
        alpha = self.attr(node, attrs, "alpha", 0.01, float)
        self.emit(node, self.make(node, LeakyReLU, alpha), [self.val(node, 0)])

    def op_Elu(self, node: Any, attrs: dict[str, Any]) -> None:
        alpha = self.attr(node, attrs, "alpha", 1.0, float)
        self.emit(node, self.make(node, ELU, alpha), [self.val(node, 0)])

    def op_Gelu(self, node: Any, attrs: dict[str, Any]) -> None:
        approx = self.attr(node, attrs, "approximate", b"none", bytes)
        if approx not in (b"none", b"tanh"):
            raise self.fmt(f"Gelu node {node.name!r}: approximate must be 'none' or 'tanh', got {approx!r:.50}")
        self.emit(node, GELU(approx.decode()), [self.val(node, 0)])

    def op_HardSigmoid(self, node: Any, attrs: dict[str, Any]) -> None:
        alpha = self.attr(node, attrs, "alpha", 0.2, float)
        beta = self.attr(node, attrs, "beta", 0.5, float)
        if not (_close(alpha, 1 / 6) and _close(beta, 0.5)):
            raise self.unsupported(node, f"alpha={alpha}, beta={beta}: only torch's hardsigmoid (alpha 1/6, beta 0.5)")
        self.emit(node, Hardsigmoid(), [self.val(node, 0)])

    def op_Clip(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        big = 3.4e38  # float32's maximum: "no bound"
        if self.opset < 11:
            lo = self.attr(node, attrs, "min", -big, float)
            hi = self.attr(node, attrs, "max", big, float)
        else:
            bounds = []
            for i, default in ((1, -math.inf), (2, math.inf)):
                if len(node.input) > i and node.input[i]:
                    c = self.const(node, node.input[i], "min" if i == 1 else "max")
                    if c.size != 1:
                        raise self.unsupported(node, "min/max must be scalars")
                    bounds.append(float(c.reshape(-1)[0]))
                else:
                    bounds.append(default)
            lo, hi = bounds
        if abs(hi) >= big:
            hi = math.copysign(math.inf, hi)
        if lo == 0.0 and hi == 6.0:
            self.emit(node, ReLU6(), [x])
        elif lo == 0.0 and hi == math.inf:
            self.emit(node, ReLU(), [x])
        else:
            raise self.unsupported(node, f"Clip to [{lo}, {hi}]: only [0, 6] (ReLU6) and [0, inf) (ReLU)")

    def op_Erf(self, node: Any, attrs: dict[str, Any]) -> None:
        src = self.vals.get(node.input[0]) if node.input else None
        if isinstance(src, _Virtual) and src.kind == "scale" and _close(src.c, _INV_SQRT2):
            self.alias(node, _Virtual("erf", src.src, node))
            return
        raise self.unsupported(node, "Erf is supported only inside the GELU pattern x * 0.5 * (1 + erf(x / sqrt 2))")

    # -- linear layers

    def op_Gemm(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        self.need_rank(node, x, 2)
        if len(node.input) < 2:
            raise self.fmt(f"Gemm node {node.name!r} needs inputs A and B")
        if self.attr(node, attrs, "transA", 0, int):
            raise self.unsupported(node, "transA=1 (the input would be transposed)")
        trans_b = self.attr(node, attrs, "transB", 0, int)
        alpha = self.attr(node, attrs, "alpha", 1.0, float)
        beta = self.attr(node, attrs, "beta", 1.0, float)
        B = self.weight(node, node.input[1], "B", 2)
        W = B if trans_b else B.T
        if alpha != 1.0:
            W = alpha * W.astype(np.float64)
        bias = np.zeros(W.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = beta * self.bias(node, self.const(node, node.input[2], "C"), W.shape[0], 2)
        self.emit(node, self.make(node, Dense, W, bias), [x])

    def op_MatMul(self, node: Any, attrs: dict[str, Any]) -> None:
        if len(node.input) != 2:
            raise self.fmt(f"MatMul node {node.name!r} needs two inputs")
        x = self.val(node, 0)
        if node.input[1] not in self.consts:
            raise self.unsupported(node, "MatMul of two computed tensors (only x @ constant, a Dense layer)")
        self.need_rank(node, x, 2)
        B = self.weight(node, node.input[1], "B", 2)
        self.emit(node, self.make(node, Dense, B.T), [x])

    def bias(self, node: Any, c: np.ndarray, channels: int, rank: int) -> np.ndarray:
        """A constant added to a (N, K) or (N, K, H, W) output as a per-channel vector, or an error."""
        if c.dtype.kind != "f" or c.ndim > rank:
            raise self.unsupported(node, f"a constant of shape {c.shape} ({c.dtype}) does not broadcast per channel")
        if not np.all(np.isfinite(c)):
            raise self.fmt(f"node {node.name!r} ({node.op_type}): the bias contains NaN or Inf")
        full = c.reshape((1,) * (rank - c.ndim) + c.shape)
        ok = full.shape[0] == 1 and full.shape[1] in (1, channels) and all(s == 1 for s in full.shape[2:])
        if not ok:
            raise self.unsupported(node, f"a constant of shape {c.shape} is not a per-channel bias for {channels} "
                                         "channels")
        return np.broadcast_to(full.reshape(-1), (channels,)).astype(np.float64)

    def with_bias(self, node: Any, layer: Layer, b: np.ndarray) -> Layer:
        if isinstance(layer, Dense):
            return self.make(node, Dense, layer.weight, b)
        if isinstance(layer, Conv2d):
            return self.make(node, Conv2d, layer.weight, b, stride=layer.stride, padding=layer.padding,
                             dilation=layer.dilation, groups=layer.groups)
        assert isinstance(layer, ConvTranspose2d)
        return self.make(node, ConvTranspose2d, layer.weight, b, stride=layer.stride, padding=layer.padding,
                         output_padding=layer.output_padding, dilation=layer.dilation, groups=layer.groups)

    # -- element-wise arithmetic

    def operands(self, node: Any) -> tuple[list[Any], list[np.ndarray | None]]:
        if len(node.input) != 2 or not all(node.input):
            raise self.fmt(f"{node.op_type} node {node.name!r} needs two inputs")
        return [self.vals.get(i) for i in node.input], [self.consts.get(i) for i in node.input]

    def scalar(self, node: Any, c: np.ndarray) -> float | None:
        if c.dtype.kind != "f" or c.size != 1:
            return None
        v = float(c.reshape(-1)[0])
        if not math.isfinite(v):
            raise self.fmt(f"node {node.name!r} ({node.op_type}): the constant contains NaN or Inf ({v})")
        return v

    def add_const(self, node: Any, v: Any, c: np.ndarray, used_as: str) -> None:
        """``v + c``: into the bias of the linear layer that computed ``v`` (when nothing else reads it), a
        step of the GELU pattern, or a per-channel affine node."""
        s = self.scalar(node, c)
        if isinstance(v, _Virtual) and v.kind == "erf" and s is not None:
            self.alias(node, _Virtual("erf", v.src, node, k=v.k, p=v.p + s))
            return
        x = self.real(v, node)
        if (isinstance(x.layer, (Dense, Conv2d, ConvTranspose2d)) and self.n_users.get(x.name) == 1
                and self.n_users.get(used_as) == 1 and (self.graph_mode or x is self.chain_end)):
            b = self.bias(node, c, int(x.layer.bias.shape[0]), x.rank)
            self.replace(x, self.with_bias(node, x.layer, x.layer.bias + b))
            self.alias(node, x)
            return
        ch = self.channels(node, x)
        self.affine(node, x, np.ones(ch), self.bias(node, c, ch, x.rank))

    def scale_const(self, node: Any, v: Any, c: np.ndarray) -> None:
        """``v * c``: a scalar is kept as a pending multiple (for the GELU pattern; it becomes a node when
        read), a per-channel constant becomes an affine node."""
        s = self.scalar(node, c)
        if s is None:
            x = self.real(v, node)
            ch = self.channels(node, x)
            self.affine(node, x, self.bias(node, c, ch, x.rank), np.zeros(ch))
        elif isinstance(v, _Virtual) and v.kind == "erf":
            self.alias(node, _Virtual("erf", v.src, node, k=v.k * s, p=v.p * s))
        elif isinstance(v, _Virtual) and v.kind == "scale":
            self.alias(node, _Virtual("scale", v.src, node, c=v.c * s))
        else:
            self.alias(node, _Virtual("scale", self.real(v, node), node, c=s))

    def op_Add(self, node: Any, attrs: dict[str, Any]) -> None:
        vs, cs = self.operands(node)
        if vs[0] is not None and vs[1] is not None:
            self.emit(node, Add(), [self.real(vs[0], node), self.real(vs[1], node)])
        elif vs[0] is not None:
            self.add_const(node, vs[0], cs[1], node.input[0])  # type: ignore[arg-type]
        else:
            self.add_const(node, vs[1], cs[0], node.input[1])  # type: ignore[arg-type]

    def op_Sum(self, node: Any, attrs: dict[str, Any]) -> None:
        if not node.input or not all(i in self.vals for i in node.input):
            raise self.unsupported(node, "Sum of constants and computed tensors (only of computed tensors)")
        xs = [self.val(node, i) for i in range(len(node.input))]
        if len(xs) == 1:
            self.alias(node, xs[0])
        else:
            self.emit(node, Add(), xs)

    def op_Sub(self, node: Any, attrs: dict[str, Any]) -> None:
        vs, cs = self.operands(node)
        if vs[0] is not None and vs[1] is not None:
            raise self.unsupported(node, "Sub of two computed tensors")
        if vs[0] is not None:
            self.add_const(node, vs[0], -cs[1], node.input[0])  # type: ignore[operator]
        else:
            x = self.real(vs[1], node)
            ch = self.channels(node, x)
            self.affine(node, x, -np.ones(ch), self.bias(node, cs[0], ch, x.rank))  # type: ignore[arg-type]

    def op_Div(self, node: Any, attrs: dict[str, Any]) -> None:
        vs, cs = self.operands(node)
        if vs[1] is not None:
            raise self.unsupported(node, "division by a computed tensor")
        c = cs[1]
        if c.dtype.kind != "f" or np.any(c == 0):  # type: ignore[union-attr]
            raise self.unsupported(node, "division by a constant that is not float or has zeros")
        self.scale_const(node, vs[0], 1.0 / c.astype(np.float64))  # type: ignore[union-attr]

    def op_Mul(self, node: Any, attrs: dict[str, Any]) -> None:
        vs, cs = self.operands(node)
        if vs[0] is None or vs[1] is None:
            v, c = (vs[0], cs[1]) if vs[0] is not None else (vs[1], cs[0])
            self.scale_const(node, v, c)  # type: ignore[arg-type]
            return
        for first, second in ((vs[0], vs[1]), (vs[1], vs[0])):
            if isinstance(second, _Virtual) and second.kind == "erf":  # x * (k erf(x / sqrt 2) + p): GELU
                x = second.src
                if first is x:
                    f = 1.0
                elif isinstance(first, _Virtual) and first.kind == "scale" and first.src is x:
                    f = first.c
                else:
                    raise self.unsupported(node, "Erf is supported only inside the GELU pattern "
                                                 "x * 0.5 * (1 + erf(x / sqrt 2))")
                if not _close(second.k, second.p):
                    raise self.unsupported(node, f"x * ({second.k} erf(x / sqrt 2) + {second.p}) is not a GELU")
                g = self.emit(node, GELU(), [x])
                if not _close(2 * f * second.k, 1.0):
                    self.alias(node, _Virtual("scale", g, node, c=2 * f * second.k))
                return
        a, b = self.real(vs[0], node), self.real(vs[1], node)
        for gate, sig, gname in ((b, a, node.input[1]), (a, b, node.input[0])):
            self_gated = (isinstance(gate.layer, (Sigmoid, Hardsigmoid)) and gate.src and gate.src[0] is sig
                          and self.n_users.get(gate.name) == 1 and self.n_users.get(gname) == 1)
            if self_gated:  # x * sigmoid(x): SiLU; x * hardsigmoid(x): Hardswish
                if not self.graph_mode:
                    if gate is not self.chain_end or sig is not gate.src[0]:
                        break
                    self.chain.pop()
                    self.chain_end = sig
                self.emit(node, SiLU() if isinstance(gate.layer, Sigmoid) else Hardswish(), [sig])
                return
        self.emit(node, Mul(), [a, b])

    # -- channels

    def op_Concat(self, node: Any, attrs: dict[str, Any]) -> None:
        names = [i for i in node.input if i]
        if not names or not all(i in self.vals for i in names):
            raise self.unsupported(node, "Concat of computed tensors and constants (only of computed tensors)")
        xs = [self.real(self.vals[i], node) for i in names]
        axis = self.attr(node, attrs, "axis", None, int)
        if axis < 0:
            axis += xs[0].rank
        if axis != 1:
            raise self.unsupported(node, f"axis={attrs.get('axis')}: only along the channels / features (axis 1)")
        if len(xs) == 1:
            self.alias(node, xs[0])
        else:
            self.emit(node, Concat(axis=1), xs)

    def op_Split(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        axis = self.attr(node, attrs, "axis", 0, int)
        if axis < 0:
            axis += x.rank
        if axis != 1:
            raise self.unsupported(node, f"axis={attrs.get('axis', 0)}: only along the channels / features (axis 1)")
        c = self.channels(node, x)
        n = len(node.output)
        if len(node.input) > 1 and node.input[1]:
            t = self.const(node, node.input[1], "split")
            if t.dtype.kind != "i" or t.ndim != 1:
                raise self.fmt(f"Split node {node.name!r}: split must be a 1-D int64 tensor")
            sizes = [int(v) for v in t]
        elif "split" in attrs:
            sizes = self.attr(node, attrs, "split", None, list)
        else:
            n = self.attr(node, attrs, "num_outputs", n, int)
            if n < 1:
                raise self.fmt(f"Split node {node.name!r}: num_outputs {n}")
            step = -(-c // n)
            sizes = [min(step, c - k * step) for k in range(n)]
        if len(sizes) != len(node.output) or sum(sizes) != c or min(sizes) < 1:
            raise self.fmt(f"Split node {node.name!r}: sizes {sizes} do not split {c} channels into "
                           f"{len(node.output)} outputs")
        start = 0
        for k, (out, size) in enumerate(zip(node.output, sizes, strict=True)):
            if out:
                self.emit(node, self.make(node, Slice, start, start + size), [x], suffix=str(k), out=out)
            start += size

    def op_Slice(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        shape = self.need_shape(node, x, "Slice")
        if self.opset < 10:
            starts = self.attr(node, attrs, "starts", None, list)
            ends = [int(min(max(v, -(1 << 62)), 1 << 62)) for v in attrs.get("ends", [])]
            axes = attrs.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            def ints(i: int, what: str) -> list[int] | None:
                if len(node.input) <= i or not node.input[i]:
                    return None
                t = self.const(node, node.input[i], what)
                if t.dtype.kind != "i" or t.ndim != 1 or np.any(t == _BATCH):
                    raise self.unsupported(node, f"{what} must be a constant 1-D int64 tensor")
                return [int(v) for v in t]
            starts, ends = ints(1, "starts"), ints(2, "ends")
            if starts is None or ends is None:
                raise self.fmt(f"Slice node {node.name!r} needs starts and ends")
            axes = ints(3, "axes") or list(range(len(starts)))
            steps = ints(4, "steps") or [1] * len(starts)
        if not (len(starts) == len(ends) == len(axes) == len(steps)):
            raise self.fmt(f"Slice node {node.name!r}: starts, ends, axes, steps differ in length")
        lo, hi = 0, shape[1]
        for a, b, e, st in zip(axes, starts, ends, steps, strict=True):
            a = a + x.rank if a < 0 else a
            if not 0 <= a < x.rank:
                raise self.fmt(f"Slice node {node.name!r}: axis {a} out of range")
            size = shape[a] if a > 0 else 1
            r = range(size)[slice(b, e, st)] if st else None
            if r is None:
                raise self.fmt(f"Slice node {node.name!r}: step 0")
            if a == 1 and st == 1 and len(r):
                lo, hi = r.start, r.stop
            elif a == 0 or r != range(size):
                raise self.unsupported(node, f"slicing axis {a} [{b}:{e}:{st}]: only a contiguous range of channels")
        if (lo, hi) == (0, shape[1]):
            self.alias(node, x)
        else:
            self.emit(node, self.make(node, Slice, lo, hi), [x])

    def op_Resize(self, node: Any, attrs: dict[str, Any]) -> None:
        x = self.val(node, 0)
        self.need_rank(node, x, 4)
        mode = self.attr(node, attrs, "mode", b"nearest", bytes)
        if mode != b"nearest":
            raise self.unsupported(node, f"mode={mode.decode(errors='replace')!r}: only nearest-neighbour upsampling")
        scales = sizes = None
        if node.op_type == "Upsample" and self.opset < 9:
            v = attrs.get("scales")
            if not isinstance(v, list) or not all(isinstance(f, float) for f in v):
                raise self.fmt(f"Upsample node {node.name!r}: attribute scales must be floats, got {v!r:.100}")
            scales = np.asarray(v, dtype=np.float64)
        elif node.op_type == "Upsample" or self.opset < 11:
            scales = self.const(node, node.input[1], "scales") if len(node.input) > 1 else None
        else:
            coord = self.attr(node, attrs, "coordinate_transformation_mode", b"half_pixel", bytes)
            nearest = self.attr(node, attrs, "nearest_mode", b"round_prefer_floor", bytes)
            exact = (coord in (b"half_pixel", b"pytorch_half_pixel") and nearest != b"ceil") or \
                (coord in (b"asymmetric", b"tf_half_pixel_for_nn") and nearest == b"floor")
            if not exact:
                raise self.unsupported(node, f"coordinate_transformation_mode={coord.decode(errors='replace')!r} with "
                                             f"nearest_mode={nearest.decode(errors='replace')!r} does not copy input "
                                             "(i // scale) for integer scales")
            if "axes" in attrs:
                raise self.unsupported(node, "the axes attribute")
            if len(node.input) > 2 and node.input[2]:
                scales = self.const(node, node.input[2], "scales")
            if len(node.input) > 3 and node.input[3]:
                sizes = self.const(node, node.input[3], "sizes")
        if scales is not None and scales.size:
            if scales.dtype.kind != "f" or scales.shape != (4,):
                raise self.unsupported(node, f"scales {scales.tolist()!r:.100}: four float scales (N, C, H, W)")
            s = [float(v) for v in scales]
        elif sizes is not None:
            shape = self.need_shape(node, x, "Resize to sizes")
            if sizes.dtype.kind != "i" or sizes.shape != (4,) or sizes[0] not in (_BATCH, self.batch) or \
                    sizes[1] != shape[1] or np.any(sizes[2:] < 1):
                raise self.unsupported(node, f"sizes {sizes.tolist()!r:.100}: only (N, C, H * s, W * s)")
            s = [1.0, 1.0, float(sizes[2]) / shape[2], float(sizes[3]) / shape[3]]
        else:
            raise self.fmt(f"{node.op_type} node {node.name!r} needs scales or sizes")
        if s[0] != 1.0 or s[1] != 1.0 or any(v != int(v) or not 1 <= v <= _MAX_SIZE for v in s[2:]):
            raise self.unsupported(node, f"scales {s}: only integer scales of H and W")
        self.emit(node, self.make(node, Upsample, (int(s[2]), int(s[3]))), [x])

    def op_Upsample(self, node: Any, attrs: dict[str, Any]) -> None:
        self.op_Resize(node, attrs)

    def op_Dropout(self, node: Any, attrs: dict[str, Any]) -> None:
        self.single_output(node)
        if len(node.input) > 2 and node.input[2]:
            mode = self.const(node, node.input[2], "training_mode")
            if mode.size != 1 or bool(mode.reshape(-1)[0]):
                raise self.unsupported(node, "training_mode=True")
