"""Backends execute a network's forward and relevance passes.

A backend is an object with

* ``name`` (str),
* ``check(net, assignment)``: raise :class:`~deeptaylor.errors.UnsupportedError` naming the layer
  and rule it cannot run, before any data is seen,
* ``run(net, assignment, x, targets, return_layers) -> (output, relevance, layers | None)``.

``assignment`` is the per-layer list of rules (None for non-linear layers) or a gradient method;
``targets`` is an (N,) int64 array or None for argmax. The Explainer validates every input before
calling ``run``, so backends may assume well-formed arrays.

A backend with ``many_targets = True`` (both built-in ones) also takes (N, K) ``targets`` and the
keywords ``top`` (the K largest outputs), ``seed`` ((N, *out) or (N, K, *out)) and
``seed_times_output``, and returns relevances with a K axis for them (``Explainer.explain(target=
"all" | ("top", k) | (N, K), seed=...)``, docs/engine.md "Many targets and seeds"); the Explainer
refuses those calls on other backends.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError

__all__ = ["get_backend", "available"]


def available() -> list[str]:
    """Names of the backends usable in this installation."""
    names = ["numpy"]
    try:
        from .. import _core  # noqa: F401

        names.append("cpu")
    except ImportError:
        pass
    return names


def get_backend(backend: Any, threads: int | None = None) -> Any:
    """Backend object for ``"numpy"`` / ``"cpu"``, or ``backend`` itself if it is one already."""
    if not isinstance(backend, str):
        if all(hasattr(backend, a) for a in ("name", "check", "run")):
            return backend
        raise InputError(f"backend must be 'numpy', 'cpu' or a backend object, got {backend!r}")
    if backend == "numpy":
        from .numpy_backend import NumpyBackend

        return NumpyBackend()
    if backend == "cpu":
        from .cpu import CpuBackend  # validates threads (cpu.check_threads: at most cpu.max_threads())

        return CpuBackend(threads=threads)
    raise InputError(f"unknown backend {backend!r}; available: {', '.join(available())}")
