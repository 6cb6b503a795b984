"""deeptaylor's native model file: a ``.npz`` of arrays plus a versioned JSON layer description.

Layout of the archive (a plain ``numpy.savez`` zip of ``.npy`` members; see docs/importing.md):

* ``__deeptaylor__.npy``: 1-D uint8 array holding UTF-8 JSON::

      {"format": "deeptaylor.model", "version": 1,
       "input_shape": [1, 28, 28] | null,            # optional, per sample (no batch dimension)
       "layers": [{"kind": "Conv2d", "params": {"stride": [1, 1], ...}}, ...]}

* ``layer{i}.weight.npy`` / ``layer{i}.bias.npy``: float32 (or float64 where float32 would not
  round-trip) arrays of layer ``i`` (Dense, Conv2d).

Reading never unpickles and never trusts a size it has not checked: the zip members are read one by
one, each ``.npy`` header is parsed with NumPy's literal-only parser, its dtype must be a plain float
(or uint8 for the description) and ``prod(shape) * itemsize`` must equal the bytes actually present
before any array is built. Every field of the description is type-checked, arrays are checked against
the layers that use them, and the layer chain is checked to compose. Any problem raises
:class:`~deeptaylor.errors.ModelFormatError` naming the file and the problem.
"""

from __future__ import annotations

import io as _io
import json
import os
import zipfile
import zlib
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, ModelFormatError
from ..layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalSumPool, LpPool, MaxPool2d, ReLU, SumPool2d
from ..network import Sequential

__all__ = ["FORMAT", "VERSION", "load_npz", "save_npz"]

FORMAT = "deeptaylor.model"
VERSION = 1
_META = "__deeptaylor__"
_KINDS = {cls.__name__: cls for cls in (Dense, Conv2d, ReLU, MaxPool2d, AvgPool2d, SumPool2d, GlobalSumPool,
                                         LpPool, Flatten)}
#: The parameter names each layer kind's description may hold (version 1).
_PARAMS = {
    "Dense": set(),
    "Conv2d": {"stride", "padding", "dilation"},
    "MaxPool2d": {"kernel_size", "stride", "padding"},
    "AvgPool2d": {"kernel_size", "stride", "padding"},
    "SumPool2d": {"kernel_size", "stride", "padding"},
    "LpPool": {"p", "kernel_size", "stride"},
    "ReLU": set(),
    "GlobalSumPool": set(),
    "Flatten": set(),
}
_FLOAT_DTYPES = ("f4", "f8")
#: Hyper-parameters (strides, paddings, sizes) above this are treated as corrupt.
_MAX_INT = 1 << 24
#: Largest archive member accepted (bytes, uncompressed): 16 GiB, far above any model we can run.
_MAX_MEMBER = 1 << 34


def _describe(layer: Any) -> dict[str, Any]:
    kind = type(layer).__name__
    if kind not in _KINDS:
        raise ModelFormatError(f"cannot save layer of type {kind}")
    params: dict[str, Any] = {}
    if isinstance(layer, Conv2d):
        params = {"stride": list(layer.stride), "padding": list(layer.padding), "dilation": list(layer.dilation)}
    elif isinstance(layer, (MaxPool2d, AvgPool2d, SumPool2d)):
        params = {"kernel_size": list(layer.kernel_size), "stride": list(layer.stride),
                  "padding": list(layer.padding)}
    elif isinstance(layer, LpPool):
        params = {"p": layer.p,
                  "kernel_size": None if layer.kernel_size is None else list(layer.kernel_size),
                  "stride": None if layer.stride is None else list(layer.stride)}
    return {"kind": kind, "params": params}


def save_npz(net: Sequential, path: str | os.PathLike[str], input_shape: Any = None) -> None:
    """Write ``net`` to ``path`` (``.npz``).

    Weights are stored as float32 unless they need float64 to round-trip exactly (they are always
    float64 in memory), so ``load_npz(save_npz(net))`` reproduces every parameter bit for bit.

    Parameters
    ----------
    net : Sequential
    path : str, path-like or binary file object
    input_shape : tuple of int, optional
        The per-sample input shape (``(F,)`` or ``(C, H, W)``, no batch dimension). Stored in the
        description; :func:`load_npz` then checks that the layers compose for it.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"save expects a deeptaylor.Sequential, got {type(net).__name__}")
    shape = None
    if input_shape is not None:
        shape = [int(s) for s in input_shape]
        net.shapes((1, *shape))  # raises ShapeError if the layers do not compose
    arrays: dict[str, np.ndarray] = {}
    layers = []
    for i, layer in enumerate(net):
        layers.append(_describe(layer))
        if isinstance(layer, (Dense, Conv2d)):
            for name in ("weight", "bias"):
                v = getattr(layer, name)
                v32 = v.astype(np.float32)
                arrays[f"layer{i}.{name}"] = v32 if np.array_equal(v32.astype(np.float64), v) else v
    meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "layers": layers}
    if shape is not None:
        meta["input_shape"] = shape
    arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    if hasattr(path, "write"):  # a binary file object
        np.savez(path, **arrays)
        return
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


# ---------------------------------------------------------------------------------------------- reading


def _read_npy(member: str, data: bytes, where: str) -> np.ndarray:
    """Parse one ``.npy`` member from its bytes without trusting its header."""
    fh = _io.BytesIO(data)
    try:
        major, _minor = np.lib.format.read_magic(fh)
        if major == 1:
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif major in (2, 3):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy version {major}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, RecursionError, MemoryError) as exc:
        raise ModelFormatError(f"{where}: corrupt array header in {member!r}: {exc}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ModelFormatError(f"{where}: array {member!r} has a non-numeric dtype {dtype} (refused)")
    if dtype.kind not in "fu" or dtype.itemsize > 8:
        raise ModelFormatError(f"{where}: array {member!r} has unsupported dtype {dtype}")
    if not all(isinstance(s, int) and 0 <= s < 1 << 40 for s in shape) or len(shape) > 8:
        raise ModelFormatError(f"{where}: array {member!r} has an invalid shape {shape!r}")
    count = 1
    for s in shape:
        count *= s
    body = data[fh.tell():]
    if count * dtype.itemsize != len(body):
        raise ModelFormatError(f"{where}: array {member!r} declares shape {shape} ({count * dtype.itemsize} "
                               f"bytes of {dtype}) but holds {len(body)} bytes (truncated or corrupt)")
    arr = np.frombuffer(body, dtype=dtype)
    arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
    return np.array(arr, dtype=arr.dtype.newbyteorder("="))


def _read_archive(source: str | os.PathLike[str] | bytes, where: str) -> dict[str, np.ndarray]:
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            raw = bytes(source)
        else:
            with open(source, "rb") as fh:
                raw = fh.read()
    except OSError as exc:
        raise ModelFormatError(f"cannot open model file {where}: {exc.strerror or exc}") from None
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(_io.BytesIO(raw)) as zf:
            infos = zf.infolist()
            names = [info.filename for info in infos]
            if len(set(names)) != len(names):
                raise ModelFormatError(f"{where}: the archive has duplicate members")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ModelFormatError(f"{where}: unexpected archive member {info.filename!r} "
                                           "(a deeptaylor model holds only .npy arrays)")
                if info.file_size > _MAX_MEMBER or info.file_size > 2048 * max(info.compress_size, 1):
                    raise ModelFormatError(f"{where}: archive member {info.filename!r} declares an implausible "
                                           f"size ({info.file_size} bytes)")
                data = zf.read(info)
                arrays[info.filename[:-4]] = _read_npy(info.filename, data, where)
    except ModelFormatError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, RuntimeError,
            NotImplementedError, OverflowError, IndexError, UnicodeDecodeError, MemoryError) as exc:
        raise ModelFormatError(f"{where}: corrupt or truncated model file ({type(exc).__name__}: {exc})") from None
    return arrays


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _MAX_INT:
        raise ModelFormatError(f"{what} must be an int in [{minimum}, {_MAX_INT}], got {value!r}")
    return value


def _ints(value: Any, what: str, n: int, minimum: int) -> tuple[int, ...]:
    if not (isinstance(value, list) and len(value) == n):
        raise ModelFormatError(f"{what} must be a list of {n} ints, got {value!r}")
    return tuple(_int(v, what, minimum) for v in value)


def _build(i: int, spec: Any, arrays: dict[str, np.ndarray]) -> Any:
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ModelFormatError(f"layer {i}: description must be an object with a string 'kind', got {spec!r:.200}")
    kind = spec["kind"]
    if kind not in _KINDS:
        raise ModelFormatError(f"layer {i}: unknown layer kind {kind!r:.100} (known: {', '.join(sorted(_KINDS))})")
    if set(spec) - {"kind", "params"}:
        raise ModelFormatError(f"layer {i} ({kind}): unknown fields {sorted(set(spec) - {'kind', 'params'})}")
    params = spec.get("params", {})
    where = f"layer {i} ({kind})"
    if not isinstance(params, dict):
        raise ModelFormatError(f"{where}: params must be an object, got {params!r:.100}")
    unknown = set(params) - _PARAMS[kind]
    if unknown:
        raise ModelFormatError(f"{where}: unknown parameters {sorted(unknown)!r:.200}")
    missing = _PARAMS[kind] - set(params)
    if missing:
        raise ModelFormatError(f"{where}: missing parameters {sorted(missing)}")
    try:
        if kind in ("Dense", "Conv2d"):
            w = arrays.get(f"layer{i}.weight")
            b = arrays.get(f"layer{i}.bias")
            if w is None or b is None:
                raise ModelFormatError(f"{where}: missing array layer{i}.weight or layer{i}.bias")
            ndim = 2 if kind == "Dense" else 4
            if w.dtype.kind != "f" or b.dtype.kind != "f":
                raise ModelFormatError(f"{where}: weight/bias must be float arrays, got {w.dtype}/{b.dtype}")
            if w.ndim != ndim or b.ndim != 1 or b.shape[0] != w.shape[0]:
                raise ModelFormatError(f"{where}: weight shape {w.shape} / bias shape {b.shape} are inconsistent "
                                       f"(expected a {ndim}-D weight and a bias of its first dimension)")
            if kind == "Dense":
                return Dense(w, b)
            return Conv2d(w, b, stride=_ints(params["stride"], f"{where} stride", 2, 1),
                          padding=_ints(params["padding"], f"{where} padding", 4, 0),
                          dilation=_ints(params["dilation"], f"{where} dilation", 2, 1))
        if kind in ("MaxPool2d", "AvgPool2d", "SumPool2d"):
            return _KINDS[kind](_ints(params["kernel_size"], f"{where} kernel_size", 2, 1),
                                stride=_ints(params["stride"], f"{where} stride", 2, 1),
                                padding=_ints(params["padding"], f"{where} padding", 4, 0))
        if kind == "LpPool":
            p = params["p"]
            if isinstance(p, bool) or not isinstance(p, (int, float)):
                raise ModelFormatError(f"{where}: p must be a number, got {p!r:.100}")
            k, s = params["kernel_size"], params["stride"]
            return LpPool(p, None if k is None else _ints(k, f"{where} kernel_size", 2, 1),
                          None if s is None else _ints(s, f"{where} stride", 2, 1))
        return _KINDS[kind]()
    except ModelFormatError:
        raise
    except (DeepTaylorError, TypeError, ValueError, OverflowError) as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def load_npz(source: str | os.PathLike[str] | bytes) -> Sequential:
    """Read a network written by :func:`save_npz` (a path or the file's bytes).

    Returns
    -------
    Sequential
        The network, parameters as float64.

    Raises
    ------
    ModelFormatError
        For unreadable, truncated, corrupt or inconsistent files (bad zip, bad ``.npy`` headers,
        non-float arrays, wrong shapes, missing or extra arrays, bad JSON, wrong field types, unknown
        layer kinds, future format versions, layers that do not compose). Nothing is ever unpickled
        or executed.
    """
    where = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else repr(os.fspath(source))
    arrays = _read_archive(source, where)
    if _META not in arrays:
        raise ModelFormatError(f"{where}: not a deeptaylor model (the archive has no '{_META}' entry)")
    meta_arr = arrays.pop(_META)
    if meta_arr.dtype != np.uint8 or meta_arr.ndim != 1:
        raise ModelFormatError(f"{where}: corrupt model file: '{_META}' must be a 1-D uint8 array")
    try:
        meta = json.loads(meta_arr.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"{where}: corrupt model description (bad JSON: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFormatError(f"{where}: not a deeptaylor model description (format field missing or wrong)")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFormatError(f"{where}: model description has no integer version: {version!r:.100}")
    if version > VERSION:
        raise ModelFormatError(f"{where}: model file format version {version} is newer than this deeptaylor "
                               f"understands ({VERSION}); upgrade deeptaylor")
    if version < 1:
        raise ModelFormatError(f"{where}: invalid model format version {version}")
    unknown = set(meta) - {"format", "version", "layers", "input_shape"}
    if unknown:
        raise ModelFormatError(f"{where}: unknown fields in the model description: {sorted(unknown)!r:.200}")
    specs = meta.get("layers")
    if not isinstance(specs, list) or not specs:
        raise ModelFormatError(f"{where}: model description has no layers")
    for name, arr in arrays.items():
        if arr.dtype.kind != "f":
            raise ModelFormatError(f"{where}: array {name!r} has dtype {arr.dtype}, expected float")
    try:
        layers = [_build(i, spec, arrays) for i, spec in enumerate(specs)]
    except ModelFormatError as exc:
        raise ModelFormatError(f"{where}: {exc}") from None
    expected = {f"layer{i}.{p}" for i, layer in enumerate(layers) if layer.linear for p in ("weight", "bias")}
    extra = set(arrays) - expected
    if extra:
        raise ModelFormatError(f"{where}: model file has arrays no layer uses: {sorted(extra)!r:.200}")
    net = Sequential(layers)
    shape = meta.get("input_shape")
    if shape is not None:
        if not isinstance(shape, list) or len(shape) not in (1, 3):
            raise ModelFormatError(f"{where}: input_shape must be a list of 1 or 3 ints, got {shape!r:.100}")
        shape = [_int(s, f"{where}: input_shape", 1) for s in shape]
    elif isinstance(layers[0], Dense):
        shape = [layers[0].in_features]
    if shape is not None:
        try:
            net.shapes((1, *shape))
        except DeepTaylorError as exc:
            raise ModelFormatError(f"{where}: the layers do not compose for input shape {tuple(shape)}: {exc}") from None
    return net
