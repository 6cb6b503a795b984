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
    "DeepTaylorWarning",
    "BackendFallbackWarning",
    "RootNotFoundError",
    "RootNotFoundWarning",
]


class DeepTaylorError(Exception):
    """Base class of every exception raised by deeptaylor."""


class InputError(DeepTaylorError, ValueError):
    """An input array or argument has a bad value: NaN/Inf, empty batch, out-of-range target, outside
    a rule's domain, an unknown backend name, a non-positive ``threads`` or ``batch_size``."""


class InputTypeError(DeepTaylorError, TypeError):
    """An input or argument has the wrong type or dtype (integer, float16, complex, object arrays; a
    network that is not a :class:`~deeptaylor.Sequential`, a Sequential item that is not a layer, a
    weight shape that is not a sequence of ints...)."""


class ShapeError(DeepTaylorError, ValueError):
    """Shapes do not fit: wrong rank, channel count, feature count, or a layer chain that does not compose."""


class RuleError(DeepTaylorError, ValueError):
    """A rule or composite is invalid, or is assigned to a layer it cannot serve."""


class UnsupportedError(DeepTaylorError, NotImplementedError):
    """A layer, rule or model construct that deeptaylor (or the chosen backend) does not support."""


class ModelFormatError(DeepTaylorError, ValueError):
    """A model file is truncated, corrupt, inconsistent or of an unknown/future format."""


class DeepTaylorWarning(UserWarning):
    """Base class of every warning deeptaylor emits."""


class BackendFallbackWarning(DeepTaylorWarning):
    """``backend="auto"`` (the default) chose the NumPy reference because the compiled engine is not
    built or cannot run this network and these rules; the message says why. Shown once per reason
    (Python's default warning filter); pass ``backend="numpy"`` or ``backend="cpu"`` to choose
    explicitly."""


class RootNotFoundError(DeepTaylorError, RuntimeError):
    """``dt.methods.Taylor(root="nearest", on_failure="raise")`` found no root point ``f(ξ) = 0`` within
    its tolerance for some sample (the message names how many and the first one)."""


class RootNotFoundWarning(DeepTaylorWarning):
    """``dt.methods.Taylor(root="nearest")`` (default ``on_failure="warn"``) found no root point for some
    sample; their relevance is computed at the last iterate and ``extras["root_found"]`` is False."""
