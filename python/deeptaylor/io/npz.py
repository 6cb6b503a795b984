"""deeptaylor's native model file: a ``.npz`` of arrays plus a versioned JSON layer description.

Layout of the archive (plain ``numpy.savez``, read back with ``allow_pickle=False``):

* ``__deeptaylor__``: uint8 array holding UTF-8 JSON
  ``{"format": "deeptaylor.model", "version": 1, "layers": [{"kind": "Conv2d", "params": {...}}, ...]}``
* ``layer{i}.weight`` / ``layer{i}.bias``: float arrays of layer ``i`` (Dense, Conv2d).

Nothing in the file is executed; every field is validated and any inconsistency raises
:class:`~deeptaylor.errors.ModelFormatError` naming it.
"""

from __future__ import annotations

import io as _io
import json
import os
import zipfile
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, ModelFormatError
from ..layers import AvgPool2d, Conv2d, Dense, Flatten, GlobalSumPool, LpPool, MaxPool2d, ReLU, SumPool2d
from ..network import Sequential

__all__ = ["save_npz", "load_npz", "FORMAT", "VERSION"]

FORMAT = "deeptaylor.model"
VERSION = 1
_META = "__deeptaylor__"
_KINDS = {cls.__name__: cls for cls in (Dense, Conv2d, ReLU, MaxPool2d, AvgPool2d, SumPool2d, GlobalSumPool,
                                         LpPool, Flatten)}


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


def save_npz(net: Sequential, path: str | os.PathLike[str]) -> None:
    """Write ``net`` to ``path`` (``.npz``). Weights are stored as float32 unless they need float64
    to round-trip exactly (they are always float64 in memory)."""
    if not isinstance(net, Sequential):
        raise TypeError(f"save expects a deeptaylor.Sequential, got {type(net).__name__}")
    arrays: dict[str, np.ndarray] = {}
    layers = []
    for i, layer in enumerate(net):
        layers.append(_describe(layer))
        if isinstance(layer, (Dense, Conv2d)):
            for name in ("weight", "bias"):
                v = getattr(layer, name)
                v32 = v.astype(np.float32)
                arrays[f"layer{i}.{name}"] = v32 if np.array_equal(v32.astype(np.float64), v) else v
    meta = json.dumps({"format": FORMAT, "version": VERSION, "layers": layers})
    arrays[_META] = np.frombuffer(meta.encode("utf-8"), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def _pairs(value: Any, what: str, n: int) -> list[int]:
    if not (isinstance(value, list) and len(value) == n and all(isinstance(v, int) and not isinstance(v, bool)
                                                                 for v in value)):
        raise ModelFormatError(f"{what} must be a list of {n} ints, got {value!r}")
    return value


def _build(i: int, spec: Any, arrays: dict[str, np.ndarray]) -> Any:
    if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
        raise ModelFormatError(f"layer {i}: description must be an object with a 'kind', got {spec!r}")
    kind = spec["kind"]
    if kind not in _KINDS:
        raise ModelFormatError(f"layer {i}: unknown layer kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ModelFormatError(f"layer {i} ({kind}): params must be an object")
    where = f"layer {i} ({kind})"
    try:
        if kind in ("Dense", "Conv2d"):
            w = arrays.get(f"layer{i}.weight")
            b = arrays.get(f"layer{i}.bias")
            if w is None or b is None:
                raise ModelFormatError(f"{where}: missing array layer{i}.weight or layer{i}.bias")
            if kind == "Dense":
                return Dense(w, b)
            return Conv2d(w, b, stride=tuple(_pairs(params.get("stride"), f"{where} stride", 2)),
                          padding=tuple(_pairs(params.get("padding"), f"{where} padding", 4)),
                          dilation=tuple(_pairs(params.get("dilation"), f"{where} dilation", 2)))
        if kind in ("MaxPool2d", "AvgPool2d", "SumPool2d"):
            return _KINDS[kind](tuple(_pairs(params.get("kernel_size"), f"{where} kernel_size", 2)),
                                stride=tuple(_pairs(params.get("stride"), f"{where} stride", 2)),
                                padding=tuple(_pairs(params.get("padding"), f"{where} padding", 4)))
        if kind == "LpPool":
            p = params.get("p")
            if isinstance(p, bool) or not isinstance(p, (int, float)):
                raise ModelFormatError(f"{where}: p must be a number, got {p!r}")
            k = params.get("kernel_size")
            s = params.get("stride")
            return LpPool(p, None if k is None else tuple(_pairs(k, f"{where} kernel_size", 2)),
                          None if s is None else tuple(_pairs(s, f"{where} stride", 2)))
        return _KINDS[kind]()
    except ModelFormatError:
        raise
    except (DeepTaylorError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"{where}: {exc}") from None


def load_npz(source: str | os.PathLike[str] | bytes) -> Sequential:
    """Read a network written by :func:`save_npz` (a path or the file's bytes).

    Raises :class:`~deeptaylor.errors.ModelFormatError` for truncated, corrupt or inconsistent files,
    unknown layer kinds and future format versions; never unpickles anything.
    """
    try:
        fh: Any = _io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except OSError as exc:
        raise ModelFormatError(f"cannot open model file {source!r}: {exc.strerror}") from None
    try:
        with fh, np.load(fh, allow_pickle=False) as z:
            names = set(z.files)
            if _META not in names:
                raise ModelFormatError("not a deeptaylor model: the archive has no '__deeptaylor__' entry")
            arrays = {name: z[name] for name in names}
    except ModelFormatError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, RuntimeError) as exc:
        raise ModelFormatError(f"corrupt or truncated model file: {exc}") from None
    meta_arr = arrays.pop(_META)
    if meta_arr.dtype != np.uint8 or meta_arr.ndim != 1:
        raise ModelFormatError("corrupt model file: '__deeptaylor__' must be a 1-D uint8 array")
    try:
        meta = json.loads(meta_arr.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"corrupt model description (bad JSON): {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFormatError("not a deeptaylor model description (format field missing or wrong)")
    version = meta.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFormatError(f"model description has no integer version: {version!r}")
    if version > VERSION:
        raise ModelFormatError(f"model file format version {version} is newer than this deeptaylor "
                               f"understands ({VERSION}); upgrade deeptaylor")
    if version < 1:
        raise ModelFormatError(f"invalid model format version {version}")
    specs = meta.get("layers")
    if not isinstance(specs, list) or not specs:
        raise ModelFormatError("model description has no layers")
    for name, arr in arrays.items():
        if arr.dtype.kind != "f":
            raise ModelFormatError(f"array {name!r} has dtype {arr.dtype}, expected float")
    layers = [_build(i, spec, arrays) for i, spec in enumerate(specs)]
    expected = {f"layer{i}.{p}" for i, layer in enumerate(layers) if layer.linear for p in ("weight", "bias")}
    extra = set(arrays) - expected
    if extra:
        raise ModelFormatError(f"model file has arrays no layer uses: {sorted(extra)}")
    return Sequential(layers)
