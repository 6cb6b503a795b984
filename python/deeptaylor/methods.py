"""Gradient-based attribution methods (not layer rules): pass one in place of a composite.

* :class:`Sensitivity` - ``R_p = (df/dx_p)^2`` (sensitivity analysis; Baehrens et al. 2010,
  Simonyan et al. 2014; slides 003 "Sensitivity Analysis"). Positive, not conservative: it explains
  a *variation* of f, sum_p R_p = ||grad f||^2.
* :class:`GradientXInput` - ``R_p = x_p * df/dx_p``. For a ReLU network with zero biases this equals
  LRP-0 and is conservative (f is then positively homogeneous).
* :class:`Gradient` - ``R_p = df/dx_p``, the plain (signed) gradient, units of f / x.

Methods made of several passes (Taylor decomposition at a root point, integrated gradients, SmoothGrad,
occlusion) derive from :class:`CompoundMethod`: the :class:`~deeptaylor.Explainer` hands them a
:class:`Passes` object (forward and gradient passes of the network on the Explainer's backend) and they
combine the passes' results in NumPy.

Gradients follow PyTorch's conventions at the kinks: ReLU'(0) = 0, max pooling routes to the first
maximal entry.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Method", "Sensitivity", "GradientXInput", "Gradient", "CompoundMethod", "Passes", "Taylor",
           "IntegratedGradients", "SmoothGrad", "Occlusion"]


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


class Gradient(Method):
    """The plain gradient ``R = df_t/dx`` of the explained output, shape of x, units of f / x (signed;
    not conservative). The building block of the compound methods."""

    __slots__ = ()


class Passes:
    """The passes a :class:`CompoundMethod` may run: forward and gradient passes of one (canonical)
    network on one backend. Made by the :class:`~deeptaylor.Explainer`; batches are passed whole to
    the backend (the compiled engine tiles them in bounded memory).

    Attributes
    ----------
    graph : Graph
        The canonical network.
    backend : str
        ``"cpu"`` (float32) or ``"numpy"`` (float64).
    dtype : numpy.dtype
        The precision the backend computes in; arrays returned are of it.
    """

    def __init__(self, graph: Any, backend: Any, gradient: Gradient) -> None:
        self.graph = graph
        self._backend = backend
        self._gradient = gradient
        self.backend = backend.name
        self.dtype = np.dtype(backend.dtype)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """The network's output ``(N, K)`` for ``x`` ``(N, *sample_shape)`` (no relevance pass)."""
        return self._backend.forward(self.graph, self._gradient, x)

    def gradient(self, x: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """``(output (N, K), grad (shape of x))``: the gradient of ``output[n, targets[n]]`` with respect
        to ``x[n]`` (``targets`` None: the largest output per sample), units of f / x."""
        output, grad, _ = self._backend.run(self.graph, self._gradient, x, targets, False)
        return output, grad


class CompoundMethod(Method):
    """Base class of methods computed from several forward/gradient passes (pass one to an
    :class:`~deeptaylor.Explainer` in place of a composite). Subclasses implement :meth:`compute`; they
    run on every backend that runs :class:`Gradient`. Unlike the other methods they may carry
    parameters: subclasses define ``__slots__``, set them with ``object.__setattr__`` in ``__init__``
    and list them in :meth:`params` (used for equality, hashing and the repr)."""

    __slots__ = ()

    def params(self) -> dict[str, Any]:
        """The method's parameters by name (for ``repr``, ``==`` and ``hash``)."""
        return {}

    def compute(self, passes: Passes, x: np.ndarray, targets: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Relevance for one batch.

        Parameters
        ----------
        passes : Passes
            Forward and gradient passes on the Explainer's backend.
        x : ndarray (N, *sample_shape)
            The validated input, in the backend's dtype.
        targets : int ndarray (N,) or None
            The explained output per sample; None: the largest output per sample.

        Returns
        -------
        (output (N, K), relevance (shape of x), extras)
            ``extras``: per-sample arrays (first axis N) the method reports besides the relevance
            (e.g. the Taylor residual); they become :attr:`Explanation.extras`.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.params().items())
        return f"{self.name}({args})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return False
        a, b = self.params(), other.params()  # type: ignore[attr-defined]
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.params())))


def _short(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"array{v.shape}"
    return repr(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and bool(
            np.array_equal(a, b))
    return bool(a == b)


from .taylor import Taylor  # noqa: E402
from .attribution import IntegratedGradients, Occlusion, SmoothGrad  # noqa: E402
