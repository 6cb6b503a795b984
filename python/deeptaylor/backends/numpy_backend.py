"""The NumPy reference backend (float64)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import reference
from ..layers import BUILTIN_LAYERS
from ..methods import GradientXInput, Method, Sensitivity
from ..network import Graph
from ..reference.relevance import RULE_FUNCTIONS
from ..rules import Rule
from ._support import refuse_unsupported

_LAYERS = BUILTIN_LAYERS
_METHODS = (Sensitivity, GradientXInput)


class NumpyBackend:
    """Runs :func:`deeptaylor.reference.run` in float64. Supports every built-in layer, rule and method
    (matched by exact type: subclasses and custom rules or layers are refused by :meth:`check`)."""

    name = "numpy"
    #: the precision it computes in
    dtype = np.dtype(np.float64)

    def check(self, net: Graph, assignment: list[Rule | None] | Method) -> None:
        """Raise :class:`~deeptaylor.errors.UnsupportedError` naming the layer index, type and rule for
        a layer, rule or method that is not one of the built-in types."""
        refuse_unsupported(self.name, net, assignment, _LAYERS, tuple(RULE_FUNCTIONS), _METHODS)

    def run(self, net: Graph, assignment: Any, x: np.ndarray, targets: np.ndarray | None,
            return_layers: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        # overflow (inf) and inf - inf (NaN) are not warned about here: the Explainer checks the
        # output and the relevance once after the pass and raises a clear error instead
        with np.errstate(over="ignore", invalid="ignore"):
            p = reference.run(net, assignment, x.astype(np.float64, copy=False), targets)
        return p.output, p.relevance, (p.layers if return_layers else None)
