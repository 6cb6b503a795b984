"""An :class:`~deeptaylor.Explainer` as bytes of deeptaylor's own format, never a pickle of its internals.

``pickle.dumps(explainer)`` (and so every transfer to a Dask worker, a ``multiprocessing`` pool, ...)
calls :meth:`Explainer.__reduce__ <deeptaylor.Explainer>`, which hands over :func:`dumps_explainer`'s
bytes and :func:`loads_explainer` to rebuild from them. The payload is a native model file (the
``.npz`` zip of ``.npy`` arrays and a JSON description, :mod:`deeptaylor.io.npz`) with two more kinds
of members:

* ``__explainer__.npy``: 1-D uint8, UTF-8 JSON::

      {"format": "deeptaylor.explainer", "version": 1,
       "backend": "cpu" | "numpy", "threads": 2 | null,
       "composite": {"name": "deep_taylor",
                     "first": {"rule": "ZBox", "params": {"low": {"array": "explainer.r0.low"}, ...}},
                     "default": {"rule": "ZPlus", "params": {"use_bias": false}},
                     "by_index": [[0, RULE], ...], "by_name": [["layer4.*", RULE], ...],
                     "by_type": [["Dense", RULE], ...], "first_types": ["Conv2d", ...] | null}
                   | null,
       "method": {"method": "Sensitivity", "params": {...}} | null}

  A rule or method parameter is a JSON number, bool, string or null, ``{"array": NAME}`` or
  ``{"tuple": [...]}`` (of such values);
* ``explainer.*.npy``: those arrays (float).

Reading checks the model part exactly as a model file (:func:`deeptaylor.io.npz.read_npz`: headers
before bodies, CRCs, every field typed, the graph's structure, the layers composing) and every field
of the description (known rule, method and layer names only, built by their constructors); a
tampered or truncated payload raises :class:`~deeptaylor.errors.ModelFormatError` as a tampered file
does. Only the built-in rules (:mod:`deeptaylor.rules`), methods (:mod:`deeptaylor.methods`), layer
classes and the ``"cpu"``/``"numpy"`` backends can be written; anything else raises
:class:`~deeptaylor.errors.UnsupportedError` when pickled.

The same payload always gives the same bytes (fixed zip timestamps), so its SHA-256 identifies an
Explainer: :func:`loads_explainer` keeps the last :data:`CACHE_SIZE` Explainers it built by that hash,
so a process that receives the same Explainer many times (a Dask worker, once per task) builds it
-- and its compiled plan -- once.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import DeepTaylorError, ModelFormatError, UnsupportedError
from .npz import _KINDS, EXPLAINER_META, EXPLAINER_PREFIX, model_arrays, read_payload, write_payload

__all__ = ["CACHE_SIZE", "clear_cache", "dumps_explainer", "loads_explainer", "payload_key", "remember"]

#: Explainers :func:`loads_explainer` keeps per process, by payload hash (least recently used dropped)
CACHE_SIZE = 4
_CACHE: OrderedDict[str, Any] = OrderedDict()
_LOCK = threading.Lock()
_VERSION = 1
_BACKENDS = ("cpu", "numpy")


# ------------------------------------------------------------------------------------------ writing


class _Writer:
    """Collects the arrays of a description as ``explainer.<n>.<param>`` members."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def value(self, v: Any, where: str, key: str) -> Any:
        if isinstance(v, np.ndarray):
            if v.dtype.kind not in "fiu" or v.dtype.itemsize > 8:
                raise UnsupportedError(f"cannot serialise {where}: parameter {key!r} has dtype {v.dtype}")
            name = f"{EXPLAINER_PREFIX}{len(self.arrays)}.{key}"
            self.arrays[name] = np.array(v, dtype=np.float64, order="C")  # 0-d stays 0-d
            return {"array": name}
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            return float(v)
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, tuple) and len(v) <= 64:
            return {"tuple": [self.value(item, where, key) for item in v]}
        raise UnsupportedError(f"cannot serialise {where}: parameter {key!r} is a {type(v).__name__}")

    def rule(self, rule: Any, where: str) -> dict[str, Any]:
        from .. import rules

        name = type(rule).__name__
        if getattr(rules, name, None) is not type(rule) or name not in rules.__all__:
            raise UnsupportedError(f"cannot serialise {where}: {type(rule).__module__}.{type(rule).__qualname__} "
                                   "is not a built-in deeptaylor rule")
        return {"rule": name, "params": {k: self.value(v, f"{where} ({name})", k) for k, v in rule.params().items()}}

    def method(self, method: Any) -> dict[str, Any]:
        from .. import methods

        name = type(method).__name__
        if getattr(methods, name, None) is not type(method):
            raise UnsupportedError(f"cannot serialise method {type(method).__module__}.{type(method).__qualname__}: "
                                   "not a method of deeptaylor.methods")
        params = method.params() if hasattr(method, "params") else {}
        return {"method": name, "params": {k: self.value(v, f"method {name}", k) for k, v in params.items()}}


def _layer_kind(cls: Any, where: str) -> str:
    if not isinstance(cls, type) or _KINDS.get(cls.__name__) is not cls:
        raise UnsupportedError(f"cannot serialise {where}: {cls!r} is not a built-in deeptaylor layer class")
    return cls.__name__


def _composite_spec(c: Any, w: _Writer) -> dict[str, Any]:
    where = f"composite '{c.name}'"
    return {
        "name": c.name,
        "first": None if c.first is None else w.rule(c.first, f"{where} first"),
        "default": None if c.default is None else w.rule(c.default, f"{where} default"),
        "by_index": [[int(k), w.rule(r, f"{where} by_index[{k}]")] for k, r in c.by_index.items()],
        "by_name": [[k, w.rule(r, f"{where} by_name[{k!r}]")] for k, r in c.by_name.items()],
        "by_type": [[_layer_kind(k, where), w.rule(r, f"{where} by_type")] for k, r in c.by_type.items()],
        "first_types": None if c.first_types is None else [_layer_kind(t, where) for t in c.first_types],
    }


def dumps_explainer(ex: Any, threads: Any = "keep") -> bytes:
    """The payload of Explainer ``ex`` (bytes; the module docstring gives the layout): its network as
    given (:attr:`Explainer.net`), its composite or method, its backend's name and thread count
    (``threads``: ``"keep"`` (default) the backend's own, None OpenMP's default, or an int).

    Raises :class:`~deeptaylor.errors.UnsupportedError` for what the format cannot hold: a custom
    backend object, rule, method or layer class (only the built-in ones have names the reader knows)."""
    from ..backends.cpu import check_threads
    from ..methods import Method

    backend = ex.backend.name
    if backend not in _BACKENDS or type(ex.backend).__module__.split(".")[0] != "deeptaylor":
        raise UnsupportedError(f"cannot serialise an Explainer on backend {ex.backend!r}: only the built-in "
                               f"backends {list(_BACKENDS)} travel as a payload")
    if isinstance(threads, str) and threads == "keep":
        threads = getattr(ex.backend, "threads", None)
    threads = check_threads(threads)
    w = _Writer()
    spec: dict[str, Any] = {"format": "deeptaylor.explainer", "version": _VERSION, "backend": backend,
                            "threads": threads, "composite": None, "method": None}
    from ..composites import Composite

    if isinstance(ex.composite, Method):
        spec["method"] = w.method(ex.composite)
    elif type(ex.composite) is Composite:
        spec["composite"] = _composite_spec(ex.composite, w)
    else:   # a subclass may hold more than the rules (a fitted relevance model...): not written
        raise UnsupportedError(f"cannot serialise composite {type(ex.composite).__module__}."
                               f"{type(ex.composite).__qualname__}: only deeptaylor.Composite and the methods "
                               "of deeptaylor.methods travel as a payload")
    arrays = model_arrays(ex.net)
    arrays.update(w.arrays)
    arrays[EXPLAINER_META] = np.frombuffer(json.dumps(spec, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    # what is written must come back equal (a rule or method whose constructor does not take its params())
    back = json.loads(json.dumps(spec, sort_keys=True))
    if _composite_or_method(back, w.arrays) != _comparable(ex.composite):
        raise UnsupportedError(f"cannot serialise {ex.composite!r}: it does not rebuild from its parameters")
    return write_payload(arrays)


def _comparable(c: Any) -> Any:
    from ..methods import Method

    if isinstance(c, Method):
        return ("method", c)
    return ("composite", c.name, c.first, c.default, tuple(c.by_index.items()), tuple(c.by_name.items()),
            tuple(c.by_type.items()), c.first_types)


# ------------------------------------------------------------------------------------------ reading


def _obj(v: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict) or set(v) != keys:
        raise ModelFormatError(f"explainer payload: {what} must be an object with keys {sorted(keys)}, got {v!r:.200}")
    return v


def _param(v: Any, arrays: dict[str, np.ndarray], what: str, depth: int = 0) -> Any:
    if isinstance(v, dict) and set(v) == {"tuple"} and depth < 4:
        items = v["tuple"]
        if not isinstance(items, list) or len(items) > 64:
            raise ModelFormatError(f"explainer payload: {what} has an invalid tuple {items!r:.100}")
        return tuple(_param(item, arrays, what, depth + 1) for item in items)
    if isinstance(v, dict):
        name = _obj(v, what, {"array"})["array"]
        if not isinstance(name, str) or name not in arrays:
            raise ModelFormatError(f"explainer payload: {what} refers to a missing array {name!r:.100}")
        return arrays[name]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ModelFormatError(f"explainer payload: {what} has an invalid value {v!r:.100}")


def _build(kind: str, registry: Any, base: type, entry: dict[str, Any], arrays: dict[str, np.ndarray],
           what: str) -> Any:
    name = entry[kind]
    cls = getattr(registry, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, base)) or cls is base or name.startswith("_"):
        raise ModelFormatError(f"explainer payload: {what}: unknown {kind} {name!r:.100}")
    params = entry["params"]
    if not isinstance(params, dict) or not all(isinstance(k, str) and k.isidentifier() for k in params):
        raise ModelFormatError(f"explainer payload: {what}: params must be an object of named values")
    kwargs = {k: _param(v, arrays, f"{what} parameter {k!r}") for k, v in params.items()}
    try:
        obj = cls(**kwargs)
    except (DeepTaylorError, TypeError, ValueError) as exc:
        raise ModelFormatError(f"explainer payload: {what}: invalid {name} parameters ({exc})") from None
    # canonical form only: the object must hold exactly the values given, of the types written
    back = obj.params() if hasattr(obj, "params") else {}
    if set(back) != set(kwargs) or not all(_same_param(back[k], v) for k, v in kwargs.items()):
        raise ModelFormatError(f"explainer payload: {what}: {name} parameters {params!r:.200} are not what "
                               "deeptaylor writes")
    return obj


def _same_param(held: Any, given: Any) -> bool:
    if isinstance(given, tuple) or isinstance(held, tuple):
        return (isinstance(held, tuple) and isinstance(given, tuple) and len(held) == len(given)
                and all(_same_param(a, b) for a, b in zip(held, given, strict=True)))
    if isinstance(given, np.ndarray) or isinstance(held, np.ndarray):
        return (isinstance(held, np.ndarray) and isinstance(given, np.ndarray) and held.shape == given.shape
                and bool(np.array_equal(held, given)))
    return type(held) is type(given) and held == given


def _rule(entry: Any, arrays: dict[str, np.ndarray], what: str) -> Any:
    from .. import rules

    return _build("rule", rules, rules.Rule, _obj(entry, what, {"rule", "params"}), arrays, what)


def _layer_cls(name: Any, what: str) -> type:
    cls = _KINDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ModelFormatError(f"explainer payload: {what}: unknown layer kind {name!r:.100}")
    return cls


def _pairs(v: Any, what: str) -> list[list[Any]]:
    if not isinstance(v, list) or not all(isinstance(p, list) and len(p) == 2 for p in v):
        raise ModelFormatError(f"explainer payload: {what} must be a list of [key, rule] pairs")
    return v


def _composite_or_method(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    """``("method", method)`` or ``("composite", name, first, default, by_index, by_name, by_type,
    first_types)`` from a checked description."""
    from .. import methods

    if spec.get("method") is not None:
        if spec.get("composite") is not None:
            raise ModelFormatError("explainer payload: both a method and a composite")
        entry = _obj(spec["method"], "method", {"method", "params"})
        return ("method", _build("method", methods, methods.Method, entry, arrays, "method"))
    c = _obj(spec.get("composite"), "composite", {"name", "first", "default", "by_index", "by_name", "by_type",
                                                  "first_types"})
    if not isinstance(c["name"], str):
        raise ModelFormatError("explainer payload: composite name must be a string")
    first = None if c["first"] is None else _rule(c["first"], arrays, "composite first")
    default = None if c["default"] is None else _rule(c["default"], arrays, "composite default")
    by_index = []
    for k, r in _pairs(c["by_index"], "composite by_index"):
        if not isinstance(k, int) or isinstance(k, bool):
            raise ModelFormatError(f"explainer payload: composite by_index key {k!r:.50} is not an int")
        by_index.append((k, _rule(r, arrays, f"composite by_index[{k}]")))
    by_name = []
    for k, r in _pairs(c["by_name"], "composite by_name"):
        if not isinstance(k, str) or not k:
            raise ModelFormatError(f"explainer payload: composite by_name key {k!r:.50} is not a name")
        by_name.append((k, _rule(r, arrays, f"composite by_name[{k!r}]")))
    by_type = [(_layer_cls(k, "composite by_type"), _rule(r, arrays, "composite by_type"))
               for k, r in _pairs(c["by_type"], "composite by_type")]
    ft = c["first_types"]
    if ft is not None:
        if not isinstance(ft, list):
            raise ModelFormatError("explainer payload: composite first_types must be a list or null")
        ft = tuple(_layer_cls(t, "composite first_types") for t in ft)
    return ("composite", c["name"], first, default, tuple(by_index), tuple(by_name), tuple(by_type), ft)


def _explainer(data: bytes) -> Any:
    from ..composites import Composite
    from ..explain import Explainer

    net, _info, spec, arrays = read_payload(data)
    if spec.get("version") != _VERSION:
        raise ModelFormatError(f"explainer payload: version {spec.get('version')!r:.20} is not {_VERSION} "
                               "(written by another deeptaylor?)")
    extra = set(spec) - {"format", "version", "backend", "threads", "composite", "method"}
    if extra:
        raise ModelFormatError(f"explainer payload: unknown fields {sorted(extra)!r:.200}")
    backend, threads = spec.get("backend"), spec.get("threads")
    if backend not in _BACKENDS:
        raise ModelFormatError(f"explainer payload: backend must be one of {list(_BACKENDS)}, got {backend!r:.50}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ModelFormatError(f"explainer payload: threads must be a positive int or null, got {threads!r:.50}")
    used = {v["array"] for v in _array_refs(spec)}
    if set(arrays) - used:
        raise ModelFormatError(f"explainer payload: arrays nothing refers to: {sorted(set(arrays) - used)!r:.200}")
    what = _composite_or_method(spec, arrays)
    if what[0] == "method":
        composite = what[1]
    else:
        _, name, first, default, by_index, by_name, by_type, ft = what
        try:
            composite = Composite(by_index=dict(by_index), first=first, by_type=dict(by_type), default=default,
                                  name=name, by_name=dict(by_name), first_types=ft)
        except DeepTaylorError as exc:
            raise ModelFormatError(f"explainer payload: invalid composite ({exc})") from None
    try:
        return Explainer(net, composite, backend=backend, threads=threads)
    except UnsupportedError:
        raise
    except DeepTaylorError as exc:
        raise ModelFormatError(f"explainer payload: the composite does not fit the network ({exc})") from None


def _array_refs(v: Any) -> list[dict[str, Any]]:
    if isinstance(v, dict):
        if set(v) == {"array"} and isinstance(v["array"], str):
            return [v]
        return [r for x in v.values() for r in _array_refs(x)]
    if isinstance(v, list):
        return [r for x in v for r in _array_refs(x)]
    return []


def payload_key(data: bytes) -> str:
    """The SHA-256 (hex) of a payload: the cache key of :func:`loads_explainer`."""
    return hashlib.sha256(data).hexdigest()


def loads_explainer(data: bytes) -> Any:
    """The Explainer of a payload from :func:`dumps_explainer` (what unpickling an Explainer calls).

    Explainers built here are kept by the payload's SHA-256, the last :data:`CACHE_SIZE` of them per
    process (thread-safe): the same payload again returns the same Explainer, with the compiled plans
    its backend already holds. Raises :class:`~deeptaylor.errors.ModelFormatError` for a payload that
    is not one, is truncated or was tampered with (as a tampered model file);
    :class:`~deeptaylor.errors.UnsupportedError` when this process cannot run its backend."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ModelFormatError(f"explainer payload: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    key = payload_key(data)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit
    ex = _explainer(data)
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is not None:   # another thread built it meanwhile: keep one
            _CACHE.move_to_end(key)
            return hit
        _CACHE[key] = ex
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return ex


def remember(ex: Any, key: str) -> None:
    """Keep Explainer ``ex`` in this process's cache under payload hash ``key`` (the hash of
    ``dumps_explainer(ex)``), so that loading that payload here returns ``ex`` itself."""
    with _LOCK:
        _CACHE[key] = ex
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)


def clear_cache() -> None:
    """Forget the Explainers :func:`loads_explainer` keeps (and so their compiled plans)."""
    with _LOCK:
        _CACHE.clear()
