"""Exceptions raised by deeptaylor.

Every error deeptaylor raises on bad input derives from :class:`DeepTaylorError` *and* from the
matching built-in exception (``ValueError``, ``TypeError``, ``NotImplementedError``), so code that
already catches the built-ins keeps working.
"""

from __future__ import annotations

__all__ = [
    "DeepTaylorError",
    "InputError",
    "InputTypeError",
    "ShapeError",
    "RuleError",
    "UnsupportedError",
    "ModelFormatError",
]


class DeepTaylorError(Exception):
    """Base class of every exception raised by deeptaylor."""


class InputError(DeepTaylorError, ValueError):
    """An input array has a bad value: NaN/Inf, empty batch, out-of-range target, outside a rule's domain."""


class InputTypeError(DeepTaylorError, TypeError):
    """An input has the wrong type or dtype (integer, float16, complex, object arrays...)."""


class ShapeError(DeepTaylorError, ValueError):
    """Shapes do not fit: wrong rank, channel count, feature count, or a layer chain that does not compose."""


class RuleError(DeepTaylorError, ValueError):
    """A rule or composite is invalid, or is assigned to a layer it cannot serve."""


class UnsupportedError(DeepTaylorError, NotImplementedError):
    """A layer, rule or model construct that deeptaylor (or the chosen backend) does not support."""


class ModelFormatError(DeepTaylorError, ValueError):
    """A model file is truncated, corrupt, inconsistent or of an unknown/future format."""
