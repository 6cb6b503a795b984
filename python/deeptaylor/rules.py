"""Relevance rules for linear layers (Dense, Conv2d), as data.

Every rule redistributes the relevance ``R_j`` of a layer's outputs onto its inputs as

    R_i = sum_j q_ij / (sum_i' q_i'j) * R_j                                    (DESIGN.md §1)

and each rule is a choice of ``q``. Written with the layer's forward operator ``L_W`` (``a @ W.T``
or a convolution) and its transpose ``L_W^T``, every rule is the same four steps: a modified forward
``z = L_rho(W)(a')``, ``s = R / z``, ``c = L_rho(W)^T(s)``, ``R_in = a' * c`` (summed over a few terms
for zB and alpha-beta). The backends resolve a rule into those terms once, at plan time.

Bias conventions (documented, tested): the deep Taylor rules (z+, w², flat, zB) are derived for
``b <= 0`` (Montavon et al. 2017) and ignore the bias, so they conserve relevance exactly; Z, Epsilon,
Gamma and AlphaBeta include the bias in the denominator as Zennit does, so relevance is absorbed by
the bias (and by epsilon). ``ZPlus(use_bias=True)`` adds the positive part of the bias to the z+
denominator, which is what Zennit's ZPlus does; the composite ``epsilon_plus_flat`` uses it.

References: Bach et al. 2015 (PLoS ONE 10(7), LRP-0, epsilon, alpha-beta); Montavon et al. 2017
(Pattern Recognition 65, w², z+, zB; arXiv:1512.02479); Montavon et al. 2019 (LRP overview, gamma);
Lapuschkin et al. 2019 (flat).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from .errors import RuleError

__all__ = ["Rule", "Z", "Epsilon", "ZPlus", "Gamma", "AlphaBeta", "WSquare", "Flat", "ZBox"]


class Rule:
    """Base class of relevance rules. Rules are immutable values.

    Class attributes state what theory promises: ``conservative`` (sum of input relevance equals sum
    of output relevance, when the ``domain`` holds) and ``positive`` (non-negative relevance in,
    non-negative relevance out).
    """

    conservative: ClassVar[bool] = False
    positive: ClassVar[bool] = False
    domain: ClassVar[str] = "any input"
    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **kwargs: Any) -> None:
        for k, v in kwargs.items():
            object.__setattr__(self, k, v)

    @property
    def name(self) -> str:
        """The rule's class name, e.g. ``"ZPlus"`` (used in reprs, error messages, the cpu plan's
        dispatch and saved files)."""
        return type(self).__name__

    def params(self) -> dict[str, Any]:
        """The rule's parameters (for printing and saving)."""
        return {}

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in self.params().items())})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        a, b = self.params(), other.params()  # type: ignore[attr-defined]
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    def __hash__(self) -> int:
        return hash((self.name, tuple((k, repr(v)) for k, v in self.params().items())))


def _number(value: Any, name: str, rule: str, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RuleError(f"{rule}: {name} must be a number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or (minimum is not None and v < minimum):
        raise RuleError(f"{rule}: {name} must be finite and >= {minimum}, got {value!r}")
    return v


def _bound(value: Any, name: str) -> np.ndarray:
    """A ZBox bound as a float64 copy; RuleError naming ZBox for anything that is not real numbers."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):  # ragged nested sequences
        arr = None
    if arr is None or arr.dtype.kind not in "iuf":
        raise RuleError(f"ZBox: {name} must be a real number or a numeric array, got {value!r}")
    return np.array(arr, dtype=np.float64, copy=True)


class Z(Rule):
    """LRP-0 (Bach et al. 2015): ``q_ij = a_i w_ij``; ``z_j = sum_i a_i w_ij + b_j``.

    The bias absorbs relevance, so conservation holds only for ``b = 0``. Where ``z_j = 0`` the
    output's relevance is dropped (``s_j = 0``).
    """

    __slots__ = ()


class Epsilon(Rule):
    """LRP-epsilon (Bach et al. 2015): as :class:`Z` with ``z_j + eps * sign(z_j)`` (sign(0) = +1).

    Epsilon and the bias absorb relevance, exactly
    ``sum_i R_i = sum_j R_j (z_j - b_j) / (z_j + eps sign z_j)``: not conservative, not positive.
    ``Epsilon(0)`` is :class:`Z` (an output with ``z_j = 0`` passes nothing).
    """

    __slots__ = ("eps",)

    def __init__(self, eps: float = 1e-6) -> None:
        self._set(eps=_number(eps, "eps", "Epsilon"))

    def params(self) -> dict[str, Any]:
        return {"eps": self.eps}


class ZPlus(Rule):
    """Deep Taylor z+ rule (Montavon et al. 2017, eq. for X = R+^d):

        R_i = sum_j  a_i w+_ij / (sum_i' a_i' w+_i'j) R_j

    for ``a >= 0`` (the layer follows a ReLU). For inputs of either sign it is applied to the
    positive *contributions* ``(a_i w_ij)+ = a+_i w+_ij + a-_i w-_ij`` (Zennit's generalisation,
    identical on ``a >= 0``). A zero denominator means ``R_j = 0`` there (no NaN).

    ``use_bias=True`` adds ``max(0, b_j)`` to the denominator (Zennit's ZPlus); relevance is then
    absorbed by positive biases.
    """

    conservative = True
    positive = True
    domain = "a >= 0 (or any sign, on positive contributions); b ignored unless use_bias"
    __slots__ = ("use_bias",)

    def __init__(self, use_bias: bool = False) -> None:
        self._set(use_bias=bool(use_bias))

    def params(self) -> dict[str, Any]:
        return {"use_bias": self.use_bias}


class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019): ``q_ij = a_i (w_ij + gamma w+_ij)`` for a >= 0, z > 0.

    Implemented as Zennit's generalised Gamma, exact on positive inputs: outputs with ``z_j > 0``
    use the positive contributions boosted by gamma (bias ``b + gamma b+`` included), outputs with
    ``z_j < 0`` the negative ones (``b + gamma b-``), outputs with ``z_j = 0`` pass nothing.
    """

    __slots__ = ("gamma",)

    def __init__(self, gamma: float = 0.25) -> None:
        self._set(gamma=_number(gamma, "gamma", "Gamma"))

    def params(self) -> dict[str, Any]:
        return {"gamma": self.gamma}


class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015): ``R_i = sum_j (alpha q+_ij/sum q+_j - beta q-_ij/sum q-_j) R_j``
    with ``q+ = (a w)+`` (positive bias included), ``q- = (a w)-`` (negative bias included), as Zennit.

    Requires ``alpha - beta = 1`` and ``alpha, beta >= 0``. Not positive for beta > 0.
    """

    __slots__ = ("alpha", "beta")

    def __init__(self, alpha: float = 2.0, beta: float = 1.0) -> None:
        a = _number(alpha, "alpha", "AlphaBeta")
        b = _number(beta, "beta", "AlphaBeta")
        if abs((a - b) - 1.0) > 1e-12:
            raise RuleError(f"AlphaBeta: alpha - beta must equal 1, got alpha={a}, beta={b}")
        self._set(alpha=a, beta=b)

    def params(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "beta": self.beta}


class WSquare(Rule):
    """Deep Taylor w² rule (Montavon et al. 2017, X = R^d): ``R_i = sum_j w_ij² / sum_i' w_i'j² R_j``.

    Independent of the input and the bias; conservative and positive on any input. For convolutions
    the denominator sums over the taps that fall on the image (zero padding excluded), so that
    conservation stays exact at the borders.
    """

    conservative = True
    positive = True
    __slots__ = ()


class Flat(Rule):
    """Flat rule (Lapuschkin et al. 2019): w² with all weights set to one: ``R_i = sum_j R_j / fan_in_j``.

    Conservative and positive on any input; bias ignored.
    """

    conservative = True
    positive = True
    __slots__ = ()


class ZBox(Rule):
    """Deep Taylor zB rule for a box domain ``low <= a <= high`` (Montavon et al. 2017):

        q_ij = a_i w_ij - l_i w+_ij - h_i w-_ij

    ``low`` and ``high`` are scalars or arrays broadcastable to the layer's per-sample input shape
    (e.g. ``(C, 1, 1)`` per channel). Conservative and positive when the input lies in the box and
    ``low <= 0 <= high``; bias ignored.

    Domain check: the :class:`~deeptaylor.Explainer` refuses inputs outside the box only where the
    ZBox sees the network's input, i.e. on layer 0 or on the first layer after leading
    :class:`~deeptaylor.Flatten` layers (which only reshape). It does not trace the box through
    pooling or any other layer: a ZBox deeper in the network (or after a pooling layer) sees
    activations, and its bounds are the user's unchecked statement about them.
    """

    conservative = True
    positive = True
    domain = "low <= a <= high"
    __slots__ = ("low", "high")

    def __init__(self, low: Any = 0.0, high: Any = 1.0) -> None:
        lo = _bound(low, "low")
        hi = _bound(high, "high")
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            raise RuleError("ZBox: low and high must be finite")
        try:
            np.broadcast_shapes(lo.shape, hi.shape)
        except ValueError:
            raise RuleError(f"ZBox: low {lo.shape} and high {hi.shape} do not broadcast") from None
        if np.any(lo > hi):
            raise RuleError("ZBox: low must be <= high everywhere")
        lo.setflags(write=False)
        hi.setflags(write=False)
        self._set(low=lo, high=hi)

    def params(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}

    def __repr__(self) -> str:
        def fmt(v: np.ndarray) -> str:
            return repr(float(v)) if v.ndim == 0 else f"array{v.shape}"

        return f"ZBox(low={fmt(self.low)}, high={fmt(self.high)})"

    def bounds_for(self, sample_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """``low`` and ``high`` broadcast to ``sample_shape`` (the input shape without the batch)."""
        try:
            lo = np.broadcast_to(self.low, sample_shape)
            hi = np.broadcast_to(self.high, sample_shape)
        except ValueError:
            raise RuleError(
                f"ZBox: low {self.low.shape} / high {self.high.shape} do not broadcast to the layer's "
                f"input shape {tuple(sample_shape)}"
            ) from None
        return lo, hi
