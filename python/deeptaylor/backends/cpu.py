"""The compiled C++ backend (float32): fused forward + relevance passes over batch tiles.

The network and its rules are described once per input sample-shape as a list of plain op specs and
compiled by the C++ core into a ``Plan`` (rule matrices derived, weights packed for the GEMM, tile
and arena sizes fixed). ``run`` hands the whole batch to the plan with the GIL released: the loop
over layers and tiles is in C++. See docs/engine.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UnsupportedError
from ..layers import (
    AvgPool2d,
    Conv2d,
    Dense,
    Flatten,
    GlobalSumPool,
    LpPool,
    MaxPool2d,
    ReLU,
    SumPool2d,
)
from ..methods import GradientXInput, Method, Sensitivity
from ..network import Sequential
from ..rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox, ZPlus
from ._support import refuse_unsupported

_LAYERS = (Dense, Conv2d, ReLU, MaxPool2d, AvgPool2d, SumPool2d, GlobalSumPool, LpPool, Flatten)
_RULES = (Z, Epsilon, ZPlus, Gamma, AlphaBeta, WSquare, Flat, ZBox)
_METHODS = (Sensitivity, GradientXInput)


def _core() -> Any:
    try:
        from .. import _core
    except ImportError as exc:  # pragma: no cover - only without a build
        raise UnsupportedError("the compiled core (deeptaylor._core) is not built; reinstall with "
                               "`pip install .` or use backend='numpy'") from exc
    return _core


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _rule_spec(rule: Rule, in_shape: tuple[int, ...]) -> dict[str, Any]:
    spec: dict[str, Any] = {"rule": rule.name}
    if isinstance(rule, Epsilon):
        spec["eps"] = rule.eps
    elif isinstance(rule, ZPlus):
        spec["use_bias"] = rule.use_bias
    elif isinstance(rule, Gamma):
        spec["gamma"] = rule.gamma
    elif isinstance(rule, AlphaBeta):
        spec["alpha"], spec["beta"] = rule.alpha, rule.beta
    elif isinstance(rule, ZBox):
        lo, hi = rule.bounds_for(in_shape)
        spec["low"], spec["high"] = _f32(lo), _f32(hi)
    return spec


def op_specs(net: Sequential, assignment: list[Rule | None] | Method,
             sample_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Describe every layer as a plain dict for the C++ ``Plan``: ``kind``, per-sample ``in_shape`` /
    ``out_shape``, int window parameters, float32 ``weight``/``bias`` and the rule's kind and
    parameters (ZBox bounds broadcast to the layer's input shape)."""
    shapes = [s[1:] for s in net.shapes((1,) + tuple(sample_shape))]
    rules = [None] * len(net) if isinstance(assignment, Method) else assignment
    ops = []
    for i, (layer, rule) in enumerate(zip(net, rules, strict=True)):
        spec: dict[str, Any] = {"kind": layer.kind, "in_shape": shapes[i], "out_shape": shapes[i + 1]}
        if isinstance(layer, (Dense, Conv2d)):
            # the layer's own arrays: the core converts them to float32 one layer at a time (no
            # float32 copy of the whole network alongside the plan while it is built)
            spec["weight"], spec["bias"] = layer.weight, layer.bias
            if isinstance(layer, Conv2d):
                spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                            dilation=layer.dilation)
            if rule is not None:
                spec.update(_rule_spec(rule, shapes[i]))
        elif isinstance(layer, (MaxPool2d, AvgPool2d, SumPool2d)):
            spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, LpPool):
            spec["p"] = layer.p
            spec["global"] = layer.kernel_size is None
            if layer.kernel_size is not None:
                spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding)
        ops.append(spec)
    return ops


def _mode(assignment: list[Rule | None] | Method) -> str:
    if isinstance(assignment, Sensitivity):
        return "sensitivity"
    if isinstance(assignment, GradientXInput):
        return "gradient_x_input"
    return "rules"


class CpuBackend:
    """The C++/OpenMP engine, float32. Supports every layer, rule and method of the NumPy reference.

    Parameters
    ----------
    threads : int, optional
        OpenMP threads (default: OpenMP's default, ``OMP_NUM_THREADS`` or the core count).

    Compiled plans are cached per input sample-shape (``plans`` counts them); an Explainer makes one
    backend, so its plans live as long as the Explainer.
    """

    name = "cpu"
    #: the precision it computes in (float64 inputs are converted)
    dtype = np.dtype(np.float32)

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._core = _core()
        self._plans: dict[tuple[int, ...], Any] = {}
        self._owner: tuple[Any, Any] | None = None

    @property
    def plans(self) -> int:
        """Number of compiled plans held (one per input sample-shape seen)."""
        return len(self._plans)

    def check(self, net: Sequential, assignment: list[Rule | None] | Method) -> None:
        """Raise :class:`UnsupportedError` naming the layer index, type and rule for a layer, rule or
        method this backend cannot run. Types are matched exactly: the plan dispatches on the type's
        name, so a subclass (of ZPlus, of ReLU...) is refused here rather than in the compiled plan."""
        refuse_unsupported(self.name, net, assignment, _LAYERS, _RULES, _METHODS)

    def plan(self, net: Sequential, assignment: list[Rule | None] | Method, sample_shape: tuple[int, ...]) -> Any:
        """The compiled plan for ``sample_shape`` (the input shape without the batch), cached."""
        if self._owner is None or self._owner[0] is not net or self._owner[1] is not assignment:
            self._plans.clear()
            self._owner = (net, assignment)
        key = tuple(int(s) for s in sample_shape)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._core.Plan(op_specs(net, assignment, key), key, _mode(assignment))
            self._plans[key] = plan
        return plan

    def run(self, net: Sequential, assignment: list[Rule | None] | Method, x: np.ndarray,
            targets: np.ndarray | None, return_layers: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        """Forward + relevance for x (N, ...) float32/float64 (copied to C-contiguous float32 if it is
        not already). Returns ``(output (N, K), relevance (shape of x), layers | None)``, float32."""
        plan = self.plan(net, assignment, x.shape[1:])
        xc = np.ascontiguousarray(x, dtype=np.float32)
        t = None if targets is None else np.ascontiguousarray(targets, dtype=np.int64)
        output, relevance, layers = plan.run(xc, t, bool(return_layers), int(self.threads or 0))
        return output, relevance, layers

