"""The NumPy reference backend (float64)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import reference
from ..methods import Method
from ..network import Sequential
from ..rules import Rule


class NumpyBackend:
    """Runs :func:`deeptaylor.reference.run` in float64. Supports every layer, rule and method."""

    name = "numpy"

    def check(self, net: Sequential, assignment: list[Rule | None] | Method) -> None:
        return None

    def run(self, net: Sequential, assignment: Any, x: np.ndarray, targets: np.ndarray | None,
            return_layers: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        p = reference.run(net, assignment, x.astype(np.float64, copy=False), targets)
        return p.output, p.relevance, (p.layers if return_layers else None)
