"""Gradient-based attribution methods (not layer rules): pass one in place of a composite.

* :class:`Sensitivity` - ``R_p = (df/dx_p)^2`` (sensitivity analysis; Baehrens et al. 2010,
  Simonyan et al. 2014; slides 003 "Sensitivity Analysis"). Positive, not conservative: it explains
  a *variation* of f, sum_p R_p = ||grad f||^2.
* :class:`GradientXInput` - ``R_p = x_p * df/dx_p``. For a ReLU network with zero biases this equals
  LRP-0 and is conservative (f is then positively homogeneous).

Gradients follow PyTorch's conventions at the kinks: ReLU'(0) = 0, max pooling routes to the first
maximal entry.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Method", "Sensitivity", "GradientXInput"]


class Method:
    """Base class of gradient methods. Immutable values."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @property
    def name(self) -> str:
        """The method's class name, e.g. ``"Sensitivity"`` (used in reprs and error messages, and as
        :attr:`Explanation.method <deeptaylor.Explanation>` when it is explained with)."""
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return hash(self.name)


class Sensitivity(Method):
    """Sensitivity analysis ``R = (df/dx)^2``, shape of x, units of f² / x²."""

    __slots__ = ()


class GradientXInput(Method):
    """Gradient times input ``R = x * df/dx``, shape of x, units of f."""

    __slots__ = ()
