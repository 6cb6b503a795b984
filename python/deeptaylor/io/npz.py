"""deeptaylor's native model file: a ``.npz`` of arrays plus a versioned JSON graph description.

Layout of the archive (a plain ``numpy.savez`` zip of ``.npy`` members; see docs/importing.md):

* ``__deeptaylor__.npy``: 1-D uint8 array holding UTF-8 JSON. Version 2 (written since 0.2)::

      {"format": "deeptaylor.model", "version": 2,
       "network": "Graph" | "Sequential",
       "input_shape": [3, 32, 32] | null,      # per sample (no batch dimension); optional
       "nodes": [{"name": "conv1", "kind": "Conv2d", "inputs": [0],
                  "params": {"stride": [1, 1], ...}},
                 {"name": "conv1_again", "inputs": [1], "shares": 0},   # the same layer object
                 ...]}

  ``inputs`` are value ids (0: the network input, ``i + 1``: the output of node ``i``); the
  network's output is the last node's. ``shares: j`` marks a node whose layer is node ``j``'s (a
  layer called twice: one set of arrays). A Sequential's node ``i`` is named ``"i"`` and reads
  value ``i``.

  Version 1 (0.1) files hold ``"layers": [{"kind": ..., "params": {...}}, ...]`` instead of
  ``network``/``nodes``, a chain; they still load (as a :class:`~deeptaylor.Sequential`).

* ``node{i}.weight.npy``, ``node{i}.bias.npy`` (Dense, Conv2d, ConvTranspose2d) and
  ``node{i}.running_mean/running_var/weight/bias.npy`` (BatchNorm): float32 where float32 holds the
  values exactly, float64 otherwise (version 1: ``layer{i}.weight/bias.npy``).

Reading never unpickles and never trusts a size it has not checked: first only each member's ``.npy``
header is decompressed and parsed (NumPy's literal-only parser); its dtype must be a plain float (or
uint8 for the description) and ``prod(shape) * itemsize`` must equal the member's size in the zip
directory. The whole model is then built and checked on zero-memory stand-ins of the declared shapes
(every array against its layer, the graph, the shapes composing, the limits below) before any array
body is decompressed; each body is then streamed into its preallocated array, never past its declared
size. Loader limits (a tiny file must not ask for huge work): a kernel side <= 1024, a dilated kernel
extent <= 4096, strides and dilations <= 1024, a convolution's padding per side at most its dilated
kernel extent (16 for smaller kernels), Upsample factors <= 64, AdaptiveAvgPool2d outputs <= 4096, at
most 2**31 values per sample in any activation (for a stored input shape), 16 GiB of arrays. Every field of the description is type-checked, arrays are checked against
the layers that use them, the graph's structure is checked (names, input ids that refer only to
earlier values, so no cycle can be written, the arity of every node, no unused node) and the layers
are checked to compose. Any problem raises :class:`~deeptaylor.errors.ModelFormatError` naming the
file, the node and the problem.
"""

from __future__ import annotations

import io as _io
import json
import lzma
import os
import re
import zipfile
import zlib
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, ModelFormatError
from ..layers import (
    ELU,
    GELU,
    AdaptiveAvgPool2d,
    Add,
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
    Hardsigmoid,
    Hardswish,
    Identity,
    LeakyReLU,
    LpPool,
    MaxPool2d,
    Mul,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Slice,
    SumPool2d,
    Tanh,
    Upsample,
)
from ..network import Graph, Node, Sequential

__all__ = ["FORMAT", "VERSION", "load_npz", "read_npz", "save_npz"]

FORMAT = "deeptaylor.model"
#: the version this deeptaylor writes; it reads 1 and 2
VERSION = 2
_META = "__deeptaylor__"

_CLASSES: tuple[type, ...] = (
    Dense, Conv2d, ConvTranspose2d, ReLU, MaxPool2d, AvgPool2d, SumPool2d, GlobalSumPool, LpPool, Flatten,
    BatchNorm2d, BatchNorm1d, LeakyReLU, ReLU6, ELU, GELU, SiLU, Hardswish, Hardsigmoid, Tanh, Sigmoid,
    AdaptiveAvgPool2d, GlobalAvgPool, Upsample, ChannelShuffle, Identity, Dropout, Add, Concat, Slice, Mul,
)
_KINDS: dict[str, type] = {cls.__name__: cls for cls in _CLASSES}
_V1_KINDS = ("Dense", "Conv2d", "ReLU", "MaxPool2d", "AvgPool2d", "SumPool2d", "GlobalSumPool", "LpPool",
             "Flatten")
_POOL = {"kernel_size", "stride", "padding", "ceil_mode"}
#: The parameter names each layer kind's description holds (version 2); every one is required.
_PARAMS: dict[str, set[str]] = {
    "Dense": set(),
    "Conv2d": {"stride", "padding", "dilation", "groups"},
    "ConvTranspose2d": {"stride", "padding", "output_padding", "dilation", "groups"},
    "MaxPool2d": _POOL,
    "AvgPool2d": _POOL | {"count_include_pad"},
    "SumPool2d": _POOL,
    "LpPool": {"p", "kernel_size", "stride"},
    "BatchNorm2d": {"eps"},
    "BatchNorm1d": {"eps"},
    "LeakyReLU": {"negative_slope"},
    "ELU": {"alpha"},
    "GELU": {"approximate"},
    "AdaptiveAvgPool2d": {"output_size"},
    "Upsample": {"scale_factor", "mode"},
    "ChannelShuffle": {"groups"},
    "Dropout": {"p"},
    "Concat": {"axis"},
    "Slice": {"axis", "start", "stop"},
}
#: Version 1's parameter sets (0.1 files: no groups, no ceil_mode).
_PARAMS_V1: dict[str, set[str]] = {
    "Dense": set(),
    "Conv2d": {"stride", "padding", "dilation"},
    "MaxPool2d": {"kernel_size", "stride", "padding"},
    "AvgPool2d": {"kernel_size", "stride", "padding"},
    "SumPool2d": {"kernel_size", "stride", "padding"},
    "LpPool": {"p", "kernel_size", "stride"},
}
#: The arrays each kind stores, in this order.
_ARRAYS: dict[str, tuple[str, ...]] = {
    "Dense": ("weight", "bias"),
    "Conv2d": ("weight", "bias"),
    "ConvTranspose2d": ("weight", "bias"),
    "BatchNorm2d": ("running_mean", "running_var", "weight", "bias"),
    "BatchNorm1d": ("running_mean", "running_var", "weight", "bias"),
}
_NODE_FIELDS = {"name", "kind", "inputs", "params"}
_SHARED_FIELDS = {"name", "inputs", "shares"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:/\-\[\]]{1,256}$")
#: Hyper-parameters (strides, paddings, sizes) above this are treated as corrupt.
_MAX_INT = 1 << 24
#: Largest per-sample activation accepted (elements): 2**31, 8 GiB of float32 for ONE sample.
_MAX_VALUES = 1 << 31
#: Loader limits on hyper-parameters (docs/importing.md): a convolution's or pool's kernel side, its
#: dilated extent ``d * (k - 1) + 1``, strides and dilations, Upsample's factor; a convolution's
#: padding per side is at most its dilated kernel extent (or 16 for small kernels): more only adds
#: outputs that see nothing but zeros, and lets a tiny file ask for huge work.
_MAX_KERNEL = 1024
_MAX_EXTENT = 4096
_MAX_STRIDE = 1024
_MAX_DILATION = 1024
_MAX_UPSAMPLE = 64
_MIN_PAD_LIMIT = 16
#: Largest archive member accepted (bytes, uncompressed): 16 GiB, far above any model we can run.
_MAX_MEMBER = 1 << 34
#: Largest sum of the members' declared sizes (bytes, uncompressed).
_MAX_TOTAL = 1 << 34


# ---------------------------------------------------------------------------------------------- writing


def _params(layer: Any) -> dict[str, Any]:
    """The JSON parameters of ``layer`` (its constructor's keyword arguments)."""
    if isinstance(layer, Conv2d):
        return {"stride": list(layer.stride), "padding": list(layer.padding), "dilation": list(layer.dilation),
                "groups": layer.groups}
    if isinstance(layer, ConvTranspose2d):
        return {"stride": list(layer.stride), "padding": list(layer.padding),
                "output_padding": list(layer.output_padding), "dilation": list(layer.dilation),
                "groups": layer.groups}
    if isinstance(layer, (MaxPool2d, AvgPool2d, SumPool2d)):
        out = {"kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
               "padding": list(layer.padding), "ceil_mode": layer.ceil_mode}
        if isinstance(layer, AvgPool2d):
            out["count_include_pad"] = layer.count_include_pad
        return out
    if isinstance(layer, LpPool):
        return {"p": layer.p,
                "kernel_size": None if layer.kernel_size is None else list(layer.kernel_size),
                "stride": None if layer.stride is None else list(layer.stride)}
    if isinstance(layer, (BatchNorm2d, BatchNorm1d)):
        return {"eps": layer.eps}
    if isinstance(layer, LeakyReLU):
        return {"negative_slope": layer.negative_slope}
    if isinstance(layer, ELU):
        return {"alpha": layer.alpha}
    if isinstance(layer, GELU):
        return {"approximate": layer.approximate}
    if isinstance(layer, AdaptiveAvgPool2d):
        return {"output_size": list(layer.output_size)}
    if isinstance(layer, Upsample):
        return {"scale_factor": list(layer.scale_factor), "mode": layer.mode}
    if isinstance(layer, ChannelShuffle):
        return {"groups": layer.groups}
    if isinstance(layer, Dropout):
        return {"p": layer.p}
    if isinstance(layer, Concat):
        return {"axis": layer.axis}
    if isinstance(layer, Slice):
        return {"axis": layer.axis, "start": layer.start, "stop": layer.stop}
    return {}


def _store(v: np.ndarray) -> np.ndarray:
    """float32 when float32 holds ``v`` exactly, else float64."""
    if v.dtype == np.float32:
        return v
    v32 = v.astype(np.float32)
    return v32 if np.array_equal(v32.astype(np.float64), v) else v


def save_npz(net: Graph, path: Any, input_shape: Any = None) -> None:
    """Write ``net`` (a :class:`~deeptaylor.Graph` or :class:`~deeptaylor.Sequential`) to ``path`` (``.npz``).

    Arrays are stored as float32 when float32 holds their values exactly, float64 otherwise, so
    ``load_npz`` reproduces every parameter bit for bit (a float64 weight that float32 holds exactly
    comes back as float32, with the same values). A layer object used by several nodes is stored
    once and shared again on load.

    Parameters
    ----------
    net : Graph or Sequential
        Every layer must be one of deeptaylor's built-in layer classes (exact type).
    path : str, path-like or binary file object
    input_shape : tuple of int, optional
        The per-sample input shape (``(F,)`` or ``(C, H, W)``, no batch dimension), stored and
        checked on load. A Graph stores its declared input shape; ``input_shape`` must then be equal
        (or the graph have none).

    Raises
    ------
    InputTypeError (a TypeError)
        ``net`` is not a Graph.
    ModelFormatError
        A layer is not a built-in layer class.
    ShapeError
        The layers do not compose for ``input_shape``, or it differs from the Graph's declared one.
    """
    arrays = model_arrays(net, input_shape)
    if hasattr(path, "write"):  # a binary file object
        np.savez(path, **arrays)
        return
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def model_arrays(net: Graph, input_shape: Any = None) -> dict[str, np.ndarray]:
    """The members of ``net``'s native file, by name (without ``.npy``): the description
    (``__deeptaylor__``, UTF-8 JSON as uint8) and every parameter array; what :func:`save_npz` writes.
    Raises as :func:`save_npz`."""
    from ..errors import InputTypeError, ShapeError

    if not isinstance(net, Graph):
        raise InputTypeError(f"save expects a deeptaylor.Graph or Sequential, got {type(net).__name__}")
    shape = None
    if input_shape is not None:
        try:
            shape = [int(s) for s in input_shape]
        except (TypeError, ValueError):
            raise InputTypeError(f"save: input_shape must be a sequence of ints, got {input_shape!r}") from None
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ShapeError(f"save: input_shape must be (F,) or (C, H, W) of positive sizes, got {tuple(shape)}")
    declared = list(net.input_shape)
    if declared:
        if shape is not None and shape != declared:
            raise ShapeError(f"save: input_shape {tuple(shape)} differs from the graph's declared input shape "
                             f"{tuple(declared)}")
        shape = declared
    if shape is not None:
        net.shapes((1, *shape))  # raises ShapeError naming the node if the layers do not compose
    arrays: dict[str, np.ndarray] = {}
    nodes: list[dict[str, Any]] = []
    first_use: dict[int, int] = {}
    for i, node in enumerate(net.nodes):
        layer = node.layer
        entry: dict[str, Any] = {"name": node.name, "inputs": [int(v) for v in node.inputs]}
        if id(layer) in first_use:
            entry["shares"] = first_use[id(layer)]
            nodes.append(entry)
            continue
        kind = type(layer).__name__
        if _KINDS.get(kind) is not type(layer):
            raise ModelFormatError(f"cannot save node {node.name!r}: layer type {type(layer).__module__}."
                                   f"{type(layer).__qualname__} is not a built-in deeptaylor layer")
        first_use[id(layer)] = i
        entry["kind"] = kind
        entry["params"] = _params(layer)
        nodes.append(entry)
        for name in _ARRAYS.get(kind, ()):
            arrays[f"node{i}.{name}"] = _store(getattr(layer, name))
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                            "network": "Sequential" if isinstance(net, Sequential) else "Graph",
                            "input_shape": shape, "nodes": nodes}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    return arrays


# ---------------------------------------------------------------------------------------------- reading


class _Member:
    """One ``.npy`` member of the archive whose header was read and checked (its body is not)."""

    __slots__ = ("dtype", "fortran", "info", "offset", "shape")

    def __init__(self, info: zipfile.ZipInfo, offset: int, shape: tuple[int, ...], fortran: bool,
                 dtype: np.dtype) -> None:
        self.info, self.offset, self.shape, self.fortran, self.dtype = info, offset, shape, fortran, dtype

    @property
    def nbytes(self) -> int:
        return self.info.file_size - self.offset

    def stand_in(self) -> np.ndarray:
        """A read-only array of the declared shape and dtype that costs no memory (all strides 0):
        enough to build and check the network before any body is decompressed."""
        base = np.zeros(1, dtype=self.dtype.newbyteorder("="))
        view = np.lib.stride_tricks.as_strided(base, shape=self.shape, strides=(0,) * len(self.shape),
                                               writeable=False)
        return view.view(_StandIn)


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> _Member:
    """Parse one ``.npy`` member's header from the start of its stream (at most a few KiB are
    decompressed), check its dtype and shape, and that the size it declares is the member's size
    in the zip directory. Nothing else of the member is read."""
    member = info.filename
    with zf.open(info) as raw:
        fh = _io.BufferedReader(raw, buffer_size=1 << 16)  # type: ignore[arg-type]
        try:
            major, _minor = np.lib.format.read_magic(fh)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif major in (2, 3):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=1 << 16)
            else:
                raise ValueError(f"unsupported .npy version {major}")
        except (ValueError, OSError, EOFError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:
            raise ModelFormatError(f"{where}: corrupt array header in {member!r}: {exc}") from None
        offset = fh.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ModelFormatError(f"{where}: array {member!r} has a non-numeric dtype {dtype} (refused)")
    if dtype.kind not in "fu" or dtype.itemsize > 8:
        raise ModelFormatError(f"{where}: array {member!r} has unsupported dtype {dtype}")
    if not all(isinstance(d, int) and 0 <= d < 1 << 40 for d in shape) or len(shape) > 8:
        raise ModelFormatError(f"{where}: array {member!r} has an invalid shape {shape!r}")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != info.file_size - offset:
        raise ModelFormatError(f"{where}: array {member!r} declares shape {shape} ({count * dtype.itemsize} "
                               f"bytes of {dtype}) but holds {info.file_size - offset} bytes (truncated or corrupt)")
    return _Member(info, offset, tuple(shape), bool(fortran), dtype)


_CHUNK = 1 << 22


def _read_body(zf: zipfile.ZipFile, m: _Member, where: str) -> np.ndarray:
    """Decompress member ``m`` straight into a preallocated array of its declared size (in chunks of
    4 MiB, never more than declared), check that the stream ends there (and its CRC), and return it
    in native byte order."""
    arr = np.empty(m.shape[::-1] if m.fortran else m.shape, dtype=m.dtype)
    buf = memoryview(arr.reshape(-1)).cast("B") if arr.size else memoryview(b"")
    with zf.open(m.info) as fh:
        skip = fh.read(m.offset)
        if len(skip) != m.offset:
            raise ModelFormatError(f"{where}: array {m.info.filename!r} is truncated")
        pos, total = 0, len(buf)
        while pos < total:
            chunk = fh.read(min(_CHUNK, total - pos))
            if not chunk:
                raise ModelFormatError(f"{where}: array {m.info.filename!r} holds fewer bytes than its header "
                                       "declares (truncated or corrupt)")
            buf[pos:pos + len(chunk)] = chunk
            pos += len(chunk)
        if fh.read(1):  # also makes zipfile check the member's CRC
            raise ModelFormatError(f"{where}: array {m.info.filename!r} holds more bytes than its header declares")
    if m.fortran:
        arr = arr.T
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


#: Largest model description accepted (bytes of JSON).
_MAX_META = 1 << 24


def _archive_errors() -> tuple[type[BaseException], ...]:
    return (zipfile.BadZipFile, zlib.error, lzma.LZMAError, ValueError, OSError, EOFError, KeyError, RuntimeError,
            NotImplementedError, OverflowError, IndexError, UnicodeDecodeError, MemoryError)


def _open_archive(source: str | os.PathLike[str] | bytes, where: str) -> tuple[zipfile.ZipFile, dict[str, _Member]]:
    """Open the zip and read every member's ``.npy`` header (no body)."""
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            fh: Any = _io.BytesIO(bytes(source))
        else:
            fh = open(source, "rb")  # noqa: SIM115 - closed with the ZipFile (or below on error)
    except OSError as exc:
        raise ModelFormatError(f"cannot open model file {where}: {exc.strerror or exc}") from None
    try:
        zf = zipfile.ZipFile(fh)
        zf._deeptaylor_fh = fh  # type: ignore[attr-defined]  # closed by _close
        infos = zf.infolist()
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise ModelFormatError(f"{where}: the archive has duplicate members")
        members: dict[str, _Member] = {}
        total = 0
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise ModelFormatError(f"{where}: unexpected archive member {info.filename!r} "
                                       "(a deeptaylor model holds only .npy arrays)")
            if info.file_size > _MAX_MEMBER or info.file_size > 2048 * max(info.compress_size, 1):
                raise ModelFormatError(f"{where}: archive member {info.filename!r} declares an implausible "
                                       f"size ({info.file_size} bytes from {info.compress_size} compressed)")
            if info.filename == _META + ".npy" and info.file_size > _MAX_META:
                raise ModelFormatError(f"{where}: the model description is implausibly large "
                                       f"({info.file_size} bytes)")
            total += info.file_size
            if total > _MAX_TOTAL:
                raise ModelFormatError(f"{where}: the archive's members declare more than {_MAX_TOTAL} bytes "
                                       "in all (the limit of a model file)")
            members[info.filename[:-4]] = _read_header(zf, info, where)
    except ModelFormatError:
        fh.close()
        raise
    except _archive_errors() as exc:
        fh.close()
        raise ModelFormatError(f"{where}: corrupt or truncated model file ({type(exc).__name__}: {exc})") from None
    return zf, members


def _read_bodies(zf: zipfile.ZipFile, members: dict[str, _Member], where: str) -> dict[str, np.ndarray]:
    try:
        return {name: _read_body(zf, m, where) for name, m in members.items()}
    except ModelFormatError:
        raise
    except _archive_errors() as exc:
        raise ModelFormatError(f"{where}: corrupt or truncated model file ({type(exc).__name__}: {exc})") from None


def _close(zf: zipfile.ZipFile) -> None:
    zf.close()
    zf._deeptaylor_fh.close()  # type: ignore[attr-defined]


def _int(value: Any, what: str, minimum: int, maximum: int = 0) -> int:
    maximum = maximum or _MAX_INT
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        limit = " (the loader's limit)" if maximum != _MAX_INT else ""
        raise ModelFormatError(f"{what} must be an int in [{minimum}, {maximum}]{limit}, got {value!r:.100}")
    return value


def _ints(value: Any, what: str, n: int, minimum: int, maximum: int = 0) -> tuple[int, ...]:
    if not (isinstance(value, list) and len(value) == n):
        raise ModelFormatError(f"{what} must be a list of {n} ints, got {value!r:.100}")
    return tuple(_int(v, what, minimum, maximum) for v in value)


class _StandIn(np.ndarray):
    """Marks the zero-memory arrays of the dry run (:meth:`_Member.stand_in`)."""


def _shape_only(cls: type, **attrs: Any) -> Any:
    """A layer of type ``cls`` holding ``attrs`` as they are (stand-in arrays): it answers
    ``output_shape`` like the real layer, so the graph can be checked before any array is read."""
    layer = cls.__new__(cls)
    layer._set(**attrs)
    return layer


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ModelFormatError(f"{what} must be true or false, got {value!r:.100}")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ModelFormatError(f"{what} must be a finite number, got {value!r:.100}")
    return float(value)


def _str(value: Any, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed or not isinstance(value, str):
        raise ModelFormatError(f"{what} must be one of {list(allowed)}, got {value!r:.100}")
    return value


def _array(arrays: dict[str, np.ndarray], key: str, where: str, ndim: int) -> np.ndarray:
    a = arrays.get(key)
    if a is None:
        raise ModelFormatError(f"{where}: missing array {key}")
    if a.dtype.kind != "f":
        raise ModelFormatError(f"{where}: array {key} must be float, got {a.dtype}")
    if a.ndim != ndim:
        raise ModelFormatError(f"{where}: array {key} has shape {a.shape}; expected {ndim} dimensions "
                               "(weight/bias shapes are inconsistent)")
    return a


def _build(kind: str, params: dict[str, Any], arrays: dict[str, np.ndarray], prefix: str, where: str) -> Any:
    """The layer of kind ``kind`` from its (checked) parameter names; every value is type-checked."""
    p = params
    if kind in ("Dense", "Conv2d", "ConvTranspose2d"):
        ndim = 2 if kind == "Dense" else 4
        w = _array(arrays, f"{prefix}.weight", where, ndim)
        b = _array(arrays, f"{prefix}.bias", where, 1)
        if (kind == "Dense" or kind == "Conv2d") and b.shape[0] != w.shape[0]:
            raise ModelFormatError(f"{where}: weight shape {w.shape} / bias shape {b.shape} are inconsistent "
                                   f"(expected a {ndim}-D weight and a bias of its first dimension)")
        dry = isinstance(w, _StandIn)
        if kind == "Dense":
            return _shape_only(Dense, weight=w, bias=b) if dry else Dense(w, b)
        kw: dict[str, Any] = {"stride": _ints(p["stride"], f"{where} stride", 2, 1, _MAX_STRIDE),
                              "padding": _ints(p["padding"], f"{where} padding", 4, 0),
                              "dilation": _ints(p["dilation"], f"{where} dilation", 2, 1, _MAX_DILATION)}
        kernel = tuple(int(k) for k in w.shape[2:])
        extent = [kw["dilation"][i] * (kernel[i] - 1) + 1 for i in (0, 1)]
        if max(kernel) > _MAX_KERNEL or max(extent) > _MAX_EXTENT:
            raise ModelFormatError(f"{where}: kernel {kernel} with dilation {kw['dilation']} is beyond the loader's "
                                   f"limits (kernel <= {_MAX_KERNEL}, dilated extent <= {_MAX_EXTENT})")
        t, bt, lf, rt = kw["padding"]
        if max(t, bt) > max(extent[0], _MIN_PAD_LIMIT) or max(lf, rt) > max(extent[1], _MIN_PAD_LIMIT):
            raise ModelFormatError(
                f"{where}: padding {kw['padding']} is beyond the loader's limit for a {kernel[0]}x{kernel[1]} "
                f"kernel with dilation {kw['dilation']}: at most the dilated kernel extent "
                f"({extent[0]}x{extent[1]}; {_MIN_PAD_LIMIT} for small kernels) per side")
        groups = _int(p["groups"], f"{where} groups", 1) if "groups" in p else 1
        if "groups" in p:
            kw["groups"] = groups
        if kind == "Conv2d":
            if dry:
                if w.shape[0] % groups:
                    raise ModelFormatError(f"{where}: {w.shape[0]} output channels are not divisible by "
                                           f"groups={groups}")
                return _shape_only(Conv2d, weight=w, bias=b, stride=kw["stride"], padding=kw["padding"],
                                   dilation=kw["dilation"], groups=groups)
            return Conv2d(w, b, **kw)
        op = _ints(p["output_padding"], f"{where} output_padding", 2, 0, _MAX_STRIDE)
        if dry:
            if w.shape[0] % groups or b.shape[0] != w.shape[1] * groups:
                raise ModelFormatError(f"{where}: weight shape {w.shape} / bias shape {b.shape} / groups {groups} "
                                       "are inconsistent")
            return _shape_only(ConvTranspose2d, weight=w, bias=b, stride=kw["stride"], padding=kw["padding"],
                               output_padding=op, dilation=kw["dilation"], groups=groups)
        return ConvTranspose2d(w, b, output_padding=op, **kw)
    if kind in ("MaxPool2d", "AvgPool2d", "SumPool2d"):
        kw = {"stride": _ints(p["stride"], f"{where} stride", 2, 1, _MAX_STRIDE),
              "padding": _ints(p["padding"], f"{where} padding", 4, 0, _MAX_KERNEL)}
        if "ceil_mode" in p:
            kw["ceil_mode"] = _bool(p["ceil_mode"], f"{where} ceil_mode")
        if "count_include_pad" in p:
            kw["count_include_pad"] = _bool(p["count_include_pad"], f"{where} count_include_pad")
        return _KINDS[kind](_ints(p["kernel_size"], f"{where} kernel_size", 2, 1, _MAX_KERNEL), **kw)
    if kind == "LpPool":
        pp = p["p"]
        if isinstance(pp, bool) or not isinstance(pp, (int, float)):
            raise ModelFormatError(f"{where}: p must be a number, got {pp!r:.100}")
        k, s = p["kernel_size"], p["stride"]
        return LpPool(pp, None if k is None else _ints(k, f"{where} kernel_size", 2, 1, _MAX_KERNEL),
                      None if s is None else _ints(s, f"{where} stride", 2, 1, _MAX_STRIDE))
    if kind in ("BatchNorm2d", "BatchNorm1d"):
        vals = [_array(arrays, f"{prefix}.{n}", where, 1) for n in _ARRAYS[kind]]
        eps = _float(p["eps"], f"{where} eps")
        if isinstance(vals[0], _StandIn):
            if len({v.shape for v in vals}) != 1:
                raise ModelFormatError(f"{where}: the BatchNorm arrays have different lengths "
                                       f"{[v.shape[0] for v in vals]}")
            return _shape_only(_KINDS[kind], **dict(zip(_ARRAYS[kind], vals, strict=True)), eps=eps)
        return _KINDS[kind](*vals, eps=eps)
    if kind == "LeakyReLU":
        return LeakyReLU(_float(p["negative_slope"], f"{where} negative_slope"))
    if kind == "ELU":
        return ELU(_float(p["alpha"], f"{where} alpha"))
    if kind == "GELU":
        return GELU(_str(p["approximate"], f"{where} approximate", ("none", "tanh")))
    if kind == "AdaptiveAvgPool2d":
        return AdaptiveAvgPool2d(_ints(p["output_size"], f"{where} output_size", 2, 1, _MAX_EXTENT))
    if kind == "Upsample":
        return Upsample(_ints(p["scale_factor"], f"{where} scale_factor", 2, 1, _MAX_UPSAMPLE),
                        mode=_str(p["mode"], f"{where} mode", ("nearest",)))
    if kind == "ChannelShuffle":
        return ChannelShuffle(_int(p["groups"], f"{where} groups", 1))
    if kind == "Dropout":
        prob = _float(p["p"], f"{where} p")
        return Dropout(prob)
    if kind == "Concat":
        if _int(p["axis"], f"{where} axis", 1) != 1:
            raise ModelFormatError(f"{where}: axis must be 1, got {p['axis']!r:.100}")
        return Concat(axis=1)
    if kind == "Slice":
        if _int(p["axis"], f"{where} axis", 1) != 1:
            raise ModelFormatError(f"{where}: axis must be 1, got {p['axis']!r:.100}")
        start = _int(p["start"], f"{where} start", 0)
        return Slice(start, _int(p["stop"], f"{where} stop", start + 1))
    return _KINDS[kind]()


def _layer(spec: dict[str, Any], kinds: dict[str, set[str]], arrays: dict[str, np.ndarray], prefix: str,
           where: str) -> Any:
    """Check a layer's ``kind`` and ``params`` against ``kinds`` and build it."""
    kind = spec.get("kind")
    if not isinstance(kind, str):
        raise ModelFormatError(f"{where}: 'kind' must be a string, got {kind!r:.100}")
    if kind not in _KINDS or (kinds is _PARAMS_V1 and kind not in _V1_KINDS):
        known = _KINDS if kinds is _PARAMS else _V1_KINDS
        raise ModelFormatError(f"{where}: unknown layer kind {kind!r:.100} (known: {', '.join(sorted(known))})")
    where = f"{where} ({kind})"
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ModelFormatError(f"{where}: params must be an object, got {params!r:.100}")
    expected = kinds.get(kind, set())
    unknown = set(params) - expected
    if unknown:
        raise ModelFormatError(f"{where}: unknown parameters {sorted(unknown)!r:.200}")
    missing = expected - set(params)
    if missing:
        raise ModelFormatError(f"{where}: missing parameters {sorted(missing)}")
    try:
        return _build(kind, params, arrays, prefix, where)
    except ModelFormatError:
        raise
    except (DeepTaylorError, TypeError, ValueError, OverflowError, ZeroDivisionError) as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def _input_shape(meta: dict[str, Any]) -> list[int] | None:
    shape = meta.get("input_shape")
    if shape is None:
        return None
    if not isinstance(shape, list) or len(shape) not in (1, 3):
        raise ModelFormatError(f"input_shape must be a list of 1 or 3 ints, got {shape!r:.100}")
    return [_int(s, "input_shape", 1) for s in shape]


def _check_shapes(net: Graph, shape: list[int]) -> None:
    try:
        shapes = net.shapes((1, *shape))
    except DeepTaylorError as exc:
        raise ModelFormatError(f"the layers do not compose for input shape {tuple(shape)}: {exc}") from None
    for i, s in enumerate(shapes[1:]):
        count = 1
        for d in s[1:]:
            count *= int(d)
        if min(s) < 1 or count > _MAX_VALUES:
            raise ModelFormatError(f"node {i} {net.nodes[i].name!r} ({net.nodes[i].layer.kind}): implausible output "
                                   f"shape {s[1:]} for input shape {tuple(shape)}")


def _load_v1(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Sequential, list[int] | None]:
    unknown = set(meta) - {"format", "version", "layers", "input_shape"}
    if unknown:
        raise ModelFormatError(f"unknown fields in the model description: {sorted(unknown)!r:.200}")
    specs = meta.get("layers")
    if not isinstance(specs, list) or not specs:
        raise ModelFormatError("model description has no layers")
    layers = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ModelFormatError(f"layer {i}: description must be an object with a string 'kind', "
                                   f"got {spec!r:.200}")
        if set(spec) - {"kind", "params"}:
            raise ModelFormatError(f"layer {i} ({spec.get('kind')!r:.50}): unknown fields "
                                   f"{sorted(set(spec) - {'kind', 'params'})!r:.200}")
        layers.append(_layer(spec, _PARAMS_V1, arrays, f"layer{i}", f"layer {i}"))
    expected = {f"layer{i}.{p}" for i, layer in enumerate(layers) if layer.linear for p in ("weight", "bias")}
    extra = set(arrays) - expected
    if extra:
        raise ModelFormatError(f"model file has arrays no layer uses: {sorted(extra)!r:.200}")
    net = Sequential(layers)
    shape = _input_shape(meta)
    if shape is None and isinstance(layers[0], Dense):
        shape = [layers[0].in_features]
    if shape is not None:
        _check_shapes(net, shape)
    return net, shape


def _load_v2(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[Graph, list[int] | None]:
    unknown = set(meta) - {"format", "version", "network", "input_shape", "nodes"}
    if unknown:
        raise ModelFormatError(f"unknown fields in the model description: {sorted(unknown)!r:.200}")
    network = meta.get("network")
    if network not in ("Graph", "Sequential"):
        raise ModelFormatError(f"'network' must be \"Graph\" or \"Sequential\", got {network!r:.100}")
    specs = meta.get("nodes")
    if not isinstance(specs, list) or not specs:
        raise ModelFormatError("model description has no nodes")
    shape = _input_shape(meta)
    nodes: list[Node] = []
    names: set[str] = set()
    used_arrays: set[str] = set()
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ModelFormatError(f"node {i}: description must be an object, got {spec!r:.200}")
        name = spec.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ModelFormatError(f"node {i}: name must be 1-256 letters, digits or '_.:/-[]', got {name!r:.100}")
        where = f"node {i} {name!r}"
        if name in names:
            raise ModelFormatError(f"{where}: two nodes are named {name!r}")
        names.add(name)
        fields = _SHARED_FIELDS if "shares" in spec else _NODE_FIELDS
        extra, missing = set(spec) - fields, fields - set(spec)
        if extra:
            raise ModelFormatError(f"{where}: unknown fields {sorted(extra)!r:.200}")
        if missing:
            raise ModelFormatError(f"{where}: missing fields {sorted(missing)}")
        inputs = spec["inputs"]
        if not isinstance(inputs, list) or not inputs:
            raise ModelFormatError(f"{where}: inputs must be a non-empty list of value ids, got {inputs!r:.100}")
        for v in inputs:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= i:
                raise ModelFormatError(f"{where}: input {v!r:.50} is not the network input (0) or an earlier "
                                       f"node's output (1..{i}): a forward reference, a cycle or a dangling input")
        if "shares" in spec:
            j = spec["shares"]
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < i or "shares" in specs[j]:
                raise ModelFormatError(f"{where}: 'shares' must be the index of an earlier node that holds its own "
                                       f"layer, got {j!r:.50}")
            layer = nodes[j].layer
        else:
            layer = _layer(spec, _PARAMS, arrays, f"node{i}", where)
            used_arrays.update(f"node{i}.{a}" for a in _ARRAYS.get(type(layer).__name__, ()))
        arity = layer.arity
        if (arity is None and len(inputs) < 2) or (arity is not None and len(inputs) != arity):
            want = "two or more" if arity is None else str(arity)
            raise ModelFormatError(f"{where} ({layer.kind}): takes {want} input(s), the file gives {len(inputs)}")
        nodes.append(Node(name, layer, tuple(inputs)))
    extra = set(arrays) - used_arrays
    if extra:
        raise ModelFormatError(f"model file has arrays no node uses: {sorted(extra)!r:.200}")
    if network == "Sequential":
        for i, node in enumerate(nodes):
            if node.name != str(i) or node.inputs != (i,):
                raise ModelFormatError(f"node {i} {node.name!r}: a Sequential's node {i} must be named '{i}' and read "
                                       f"value {i} (got inputs {list(node.inputs)})")
        try:
            net: Graph = Sequential([n.layer for n in nodes])
        except DeepTaylorError as exc:
            raise ModelFormatError(f"invalid Sequential: {exc}") from None
        if shape is None and isinstance(nodes[0].layer, Dense):
            shape = [nodes[0].layer.in_features]
    else:
        try:
            net = Graph.from_nodes(None, nodes)
        except DeepTaylorError as exc:
            raise ModelFormatError(f"invalid graph: {exc}") from None
        if shape is not None:
            _check_shapes(net, shape)  # raises ModelFormatError naming the node
            net = Graph.from_nodes(shape, nodes)  # the declared input shape
        return net, shape
    if shape is not None:
        _check_shapes(net, shape)
    return net, shape


def _json_entry(zf: Any, name: str, member: Any, fmt: str, what: str, where: str) -> dict[str, Any]:
    """The JSON object stored as the uint8 array ``name`` of the archive, checked to be a dict whose
    ``"format"`` is ``fmt``; :class:`ModelFormatError` naming ``what`` otherwise."""
    raw = _read_bodies(zf, {name: member}, where)[name]
    try:
        obj = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{where}: corrupt {what} (bad JSON: {exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise ModelFormatError(f"{where}: not a deeptaylor {what} (format field missing or wrong)")
    return obj


def _read_model(zf: zipfile.ZipFile, members: dict[str, _Member], where: str) -> tuple[Graph, int, list[int] | None]:
    """Read the description, check the whole model on zero-memory stand-ins of the declared array
    shapes (every array against its layer, the graph's structure, the shapes composing), and only
    then decompress the arrays and build the model."""
    if _META not in members:
        raise ModelFormatError(f"{where}: not a deeptaylor model (the archive has no '{_META}' entry)")
    meta_m = members.pop(_META)
    if meta_m.dtype != np.uint8 or len(meta_m.shape) != 1:
        raise ModelFormatError(f"{where}: corrupt model file: '{_META}' must be a 1-D uint8 array")
    meta = _json_entry(zf, _META, meta_m, FORMAT, "model description", where)
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFormatError(f"{where}: model description has no integer version: {version!r:.100}")
    if version > VERSION:
        raise ModelFormatError(f"{where}: model file format version {version} is newer than this deeptaylor "
                               f"understands ({VERSION}); upgrade deeptaylor")
    if version < 1:
        raise ModelFormatError(f"{where}: invalid model format version {version}")
    for name, m in members.items():
        if m.dtype.kind != "f":
            raise ModelFormatError(f"{where}: array {name!r} has dtype {m.dtype}, expected float")
    load = _load_v1 if version == 1 else _load_v2
    try:
        load(meta, {name: m.stand_in() for name, m in members.items()})  # the dry run: nothing decompressed
        net, shape = load(meta, _read_bodies(zf, members, where))
    except ModelFormatError as exc:
        if str(exc).startswith(where):
            raise
        raise ModelFormatError(f"{where}: {exc}") from None
    except RecursionError:  # pragma: no cover - the JSON parser refuses deep nesting first
        raise ModelFormatError(f"{where}: model description nested too deeply") from None
    return net, version, shape


def read_npz(source: str | os.PathLike[str] | bytes) -> tuple[Graph, dict[str, Any]]:
    """Read a model file and its description: ``(net, info)`` with ``info`` holding ``"version"``
    (int), ``"network"`` (``"Graph"`` or ``"Sequential"``) and ``"input_shape"`` (tuple or None: the
    stored per-sample shape, or the first Dense layer's features). Raises as :func:`load_npz`."""
    where = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else repr(os.fspath(source))
    zf, members = _open_archive(source, where)
    try:
        net, version, shape = _read_model(zf, members, where)
    finally:
        _close(zf)
    info = {"version": version, "network": "Sequential" if isinstance(net, Sequential) else "Graph",
            "input_shape": None if shape is None else tuple(shape)}
    return net, info


def load_npz(source: str | os.PathLike[str] | bytes) -> Graph:
    """Read a network written by :func:`save_npz` (a path or the file's bytes), any format version.

    Returns
    -------
    Sequential or Graph
        What was saved: a Sequential comes back as a Sequential (version 1 files always do), a Graph
        as a Graph with its node names and its declared input shape. Parameters as in the file
        (float32 where stored as float32 and the layer keeps float32 weights, else float64).

    Raises
    ------
    ModelFormatError
        For unreadable, truncated, corrupt or inconsistent files (bad zip, bad ``.npy`` headers,
        non-float arrays, wrong shapes, missing or extra arrays, bad JSON, wrong field types, unknown
        layer kinds, future format versions, bad graph structure -- a duplicate or invalid name, an
        input that is not an earlier value, a wrong number of inputs, an unused node --, layers that
        do not compose). The message names the node. Nothing is ever unpickled or executed.
    """
    return read_npz(source)[0]


# ------------------------------------------------------------------------------------- explainer payloads

#: the member holding an explainer's description (UTF-8 JSON as uint8) in a payload
EXPLAINER_META = "__explainer__"
#: prefix of the members holding an explainer's arrays (ZBox bounds, method parameters)
EXPLAINER_PREFIX = "explainer."
#: largest explainer description accepted (bytes of JSON)
_MAX_EXPLAINER_META = 1 << 20


def write_payload(arrays: dict[str, np.ndarray]) -> bytes:
    """A zip archive of ``.npy`` members (uncompressed, as :func:`numpy.savez`) with fixed member
    timestamps, so the same arrays always give the same bytes (a payload's hash identifies it)."""
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            with zf.open(info, "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asanyarray(arr), allow_pickle=False)
    return buf.getvalue()


def read_payload(data: bytes) -> tuple[Graph, dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """Read a payload written by :func:`write_payload` from a model's :func:`model_arrays` plus an
    explainer description (``__explainer__``) and its arrays (``explainer.*``): ``(net, info, spec,
    arrays)``. The model part is read and checked exactly as a model file (:func:`read_npz`); the
    description must be a JSON object with ``"format": "deeptaylor.explainer"`` and the arrays plain
    floats. Anything else raises :class:`~deeptaylor.errors.ModelFormatError`; nothing is unpickled."""
    where = "<explainer payload>"
    zf, members = _open_archive(data, where)
    try:
        if EXPLAINER_META not in members:
            raise ModelFormatError(f"{where}: not an explainer payload (no '{EXPLAINER_META}' entry)")
        meta_m = members.pop(EXPLAINER_META)
        if meta_m.dtype != np.uint8 or len(meta_m.shape) != 1 or meta_m.nbytes > _MAX_EXPLAINER_META:
            raise ModelFormatError(f"{where}: '{EXPLAINER_META}' must be a 1-D uint8 array of at most "
                                   f"{_MAX_EXPLAINER_META} bytes")
        mine = {k: members.pop(k) for k in list(members) if k.startswith(EXPLAINER_PREFIX)}
        for name, m in mine.items():
            if m.dtype.kind != "f":
                raise ModelFormatError(f"{where}: array {name!r} has dtype {m.dtype}, expected float")
        spec = _json_entry(zf, EXPLAINER_META, meta_m, "deeptaylor.explainer", "explainer description", where)
        net, version, shape = _read_model(zf, members, where)
        arrays = _read_bodies(zf, mine, where)
    finally:
        _close(zf)
    info = {"version": version, "network": "Sequential" if isinstance(net, Sequential) else "Graph",
            "input_shape": None if shape is None else tuple(shape)}
    return net, info, spec, arrays
