"""The compiled C++ backend (float32)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import UnsupportedError
from ..layers import Dense, GlobalSumPool, ReLU
from ..methods import Method
from ..network import Sequential
from ..rules import Rule, WSquare, ZPlus

_SUPPORTED_LAYERS = (Dense, ReLU, GlobalSumPool)
_SUPPORTED_RULES = {ZPlus: "ZPlus", WSquare: "WSquare"}


def _core() -> Any:
    try:
        from .. import _core
    except ImportError as exc:  # pragma: no cover - only without a build
        raise UnsupportedError("the compiled core (deeptaylor._core) is not built; reinstall with "
                               "`pip install .` or use backend='numpy'") from exc
    return _core


class CpuBackend:
    """C++ kernels, float32. Supports Dense/ReLU/GlobalSumPool with ZPlus and WSquare."""

    name = "cpu"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._k = _core().kernels

    def check(self, net: Sequential, assignment: list[Rule | None] | Method) -> None:
        if isinstance(assignment, Method):
            raise UnsupportedError(f"backend 'cpu' does not support the method {assignment.name} yet; "
                                   "use backend='numpy'")
        for i, (layer, rule) in enumerate(zip(net, assignment)):
            if not isinstance(layer, _SUPPORTED_LAYERS):
                raise UnsupportedError(f"backend 'cpu' does not support layer {i} ({layer.kind}) yet; "
                                       "supported: Dense, ReLU, GlobalSumPool; use backend='numpy'")
            if rule is not None and (type(rule) not in _SUPPORTED_RULES
                                     or (isinstance(rule, ZPlus) and rule.use_bias)):
                raise UnsupportedError(f"backend 'cpu' does not support rule {rule!r} on layer {i} "
                                       f"({layer.kind}) yet; supported: ZPlus(), WSquare()")

    def run(self, net: Sequential, assignment: list[Rule | None], x: np.ndarray, targets: np.ndarray | None,
            return_layers: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        k = self._k
        acts = [np.ascontiguousarray(x, dtype=np.float32)]
        weights = [np.ascontiguousarray(layer.weight, dtype=np.float32) if isinstance(layer, Dense) else None
                   for layer in net]
        for layer, w in zip(net, weights):
            a = acts[-1]
            if isinstance(layer, Dense):
                acts.append(k.dense_forward(a, w, np.ascontiguousarray(layer.bias, dtype=np.float32)))
            elif isinstance(layer, ReLU):
                acts.append(np.maximum(a, np.float32(0)))
            else:  # GlobalSumPool
                acts.append(a.reshape(a.shape[0], -1).sum(axis=1, keepdims=True, dtype=np.float32))
        output = acts[-1]
        n = output.shape[0]
        t = np.argmax(output, axis=1) if targets is None else targets
        R = np.zeros_like(output)
        R[np.arange(n), t] = output[np.arange(n), t]
        layers = [R]
        for i in range(len(net) - 1, -1, -1):
            layer, a = net[i], acts[i]
            if isinstance(layer, Dense):
                if isinstance(assignment[i], ZPlus):
                    R = k.dense_zplus_relevance(a, weights[i], R)
                else:
                    R = k.dense_wsquare_relevance(weights[i], R)
            elif isinstance(layer, GlobalSumPool):
                flat = np.ascontiguousarray(a.reshape(a.shape[0], -1))
                R = k.global_sum_relevance(flat, np.ascontiguousarray(R[:, 0])).reshape(a.shape)
            layers.append(R)
        layers.reverse()
        return output, R, (layers if return_layers else None)
