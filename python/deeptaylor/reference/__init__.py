"""Pure-NumPy reference implementation (float64): the oracle every compiled kernel is tested against.

:mod:`.ops` holds the forward operators and their transposes, :mod:`.relevance` one function per
rule, :mod:`.engine` the passes through a whole network.
"""

from .engine import Pass, forward, forward_layer, gradient_layer, relevance_layer, run, start_values
from .relevance import RULE_FUNCTIONS, linear_relevance, safe_divide

__all__ = [
    "Pass",
    "forward",
    "forward_layer",
    "gradient_layer",
    "relevance_layer",
    "run",
    "start_values",
    "RULE_FUNCTIONS",
    "linear_relevance",
    "safe_divide",
]
