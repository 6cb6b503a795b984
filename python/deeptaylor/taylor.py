"""First-order Taylor decomposition at a root point (slides 003, "Taylor Decomposition"; Montavon et
al. 2017 §2, 2018 §3): :class:`Taylor`.

For the explained output ``f`` (one logit) and a root point ``ξ`` with ``f(ξ) = 0``,

    f(x) = f(ξ) + Σ_p ∂f/∂x_p|_ξ · (x_p − ξ_p) + ε  =  Σ_p R_p + ε,
    R_p  = ∂f/∂x_p|_ξ · (x_p − ξ_p),

where ``ε`` collects the higher-order terms. Every sample's ``residual = f(x) − Σ_p R_p`` (``= ε +
f(ξ)``) is reported in :attr:`Explanation.extras <deeptaylor.Explanation>`.

The root
--------
``root="zero"``: ``ξ = 0`` (for a linear model ``R = x ⊙ ∇f``, gradient × input; ``f(0) = b`` need
not be 0, so the residual is the bias). An array: a given point, of the per-sample shape (one root
for every sample) or of the batch's shape (one per sample).

``root="nearest"``: the point of ``{ξ : f(ξ) = 0}`` (within ``box``, if given) closest to ``x`` in
the Euclidean norm, searched for the whole batch at once (one gradient pass per iteration for all
samples still searching, plus forward passes for the line searches). From ``ξ_0 = x``, each
iteration linearises ``f`` at the current iterate, ``f(y) ≈ f(ξ_k) + g·(y − ξ_k)``, ``g = ∇f(ξ_k)``,
and takes one of two steps:

1. **Newton step** while ``|f(ξ_k)| > tol`` (off the zero set): to the nearest point of the
   linearised zero set, ``y = ξ_k − f(ξ_k) g / ‖g‖²`` (the slides' step along the gradient; the
   first one, from x, is the projection of x onto the tangent hyperplane). Backtracking line search
   on ``ξ_k + t (y − ξ_k)``, ``t = 1, 1/2, 1/4, ...`` (at most ``max_halvings`` halvings, forward
   passes only), accepting Armijo's decrease ``|f(new)| ≤ (1 − 10⁻⁴ t) |f(ξ_k)|`` or ``|f(new)| ≤ tol``.
   A full step that falls short (``f`` keeps its sign, as for a convex ``f`` such as a sum of ReLUs,
   where Newton steps approach the zero set only linearly) is doubled, up to 6 times, while ``|f|``
   keeps decreasing.
2. **Refinement step** once ``|f(ξ_k)| ≤ tol`` (on the zero set): towards the point of the linearised
   zero set nearest to *x*, ``y = x − c g``, ``c = (f(ξ_k) + g·(x − ξ_k)) / ‖g‖²`` (it slides along
   the set towards x; its fixed points are the Karush-Kuhn-Tucker points of
   ``min ‖ξ − x‖² s.t. f(ξ) = 0``: ``f(ξ) = 0`` and ``x − ξ`` parallel to ``∇f(ξ)``). Accepted when
   the new point is closer to x than the best root so far and ``|f| ≤ max(tol, 0.1 |f(x)|)``
   (at most 4 halvings); a Newton step then brings the iterate back onto the set.

Before the iteration, the segment from x to the origin (the box point nearest to it, with a box)
is searched wherever ``f`` changes sign on it (regula falsi, Illinois variant, at most 40 forward
passes); a root found there is the first candidate. For a network with ``f(0) = 0``, such as ReLU
layers with ``b ≤ 0``, this guarantees a root even where kinks block the Newton iteration.

Whenever a root is reached (by a Newton step or on that segment) it is **pulled back** towards x:
bisection on the segment from ξ to x (16 halvings, forward passes) for the farthest point where
``|f|`` is still at most ``|f(ξ)|``. Where ``f`` crosses zero transversally ξ barely moves; where the
zero set is a flat region (``f = 0`` on a set with interior -- a detection-pooling network
``Σ_j max(0, z_j)`` with every unit off), a step overshoots into the region's interior, where the
gradient is 0, and the pull-back moves the root to within ``2⁻¹⁶`` of the segment from the region's
boundary.

With a box, coordinates that a step would push beyond a bound are fixed at it and the step is
recomputed over the free coordinates (active-set projection). The result is the closest root seen
(``|f| ≤ tol``), so refinement never makes it worse than the plain Newton iteration.

The gradient at the root
------------------------
The relevance uses the gradient **approached from x**, at ``ξ + η (x − ξ)`` with ``η = 2⁻¹⁴``, for
every kind of root (refinement steps use it too). For a smooth ``f`` this changes the relevance by
a relative ``O(η)`` (and the residual by ``O(η)`` of the second-order term); at a kink of a ReLU
network (a root on the boundary of a flat zero region, or ``ξ = 0`` for a bias-free network, where
``ReLU'(0) = 0`` would give a zero gradient) it is the one-sided derivative along the segment, the
one the first-order expansion ``f(ξ + t (x − ξ))`` for small ``t > 0`` uses. The same ``η`` on both
backends, so that they agree.

Stopping rule, per sample: stop when on the zero set and the refinement step is at most
``xtol · ‖x − ξ_k‖``, or no refinement step is accepted, or three iterations on the set in a row
bring no root closer to x by more than the fraction ``max(xtol, 10⁻³)``; stop off the set when the
line search finds no decrease, or three Newton steps in a row are cut below ``2⁻¹⁰`` (a kink blocks
the way), or the gradient vanishes (and no coordinate is at a bound), or the step is zero; in any
case stop after ``max_iter`` iterations. ``tol = rtol · |f(x)| + atol``. Defaults by the backend's
precision: float64 (numpy) ``rtol = 1e-9``, ``xtol = 1e-7``; float32 (cpu) ``rtol = 1e-4``,
``xtol = 1e-3`` (a float32 forward pass carries relative errors of ~1e-6 of the magnitudes it sums,
so tighter values would mostly measure rounding); ``atol = 0``. The steps are computed in float64,
the network is evaluated in the backend's precision. An input with ``f(x) = 0`` is its own root
(``R = 0``, 0 iterations).

The search is local: it finds a root near ``x`` reached by these steps -- the nearest one when ``f``
is smooth enough, or for a ReLU network when the zero set near ``x`` lies in few linear regions. It
is not a global optimiser.

When no root is found
---------------------
A sample whose last iterate has ``|f(ξ)| > tol`` gets ``root_found = False``; its relevance is still
computed at the last iterate ``ξ`` (so ``residual`` includes ``f(ξ) ≠ 0``). Then ``on_failure``
decides: ``"warn"`` (default) emits one :class:`~deeptaylor.errors.RootNotFoundWarning` per batch
naming how many samples and the first one; ``"raise"`` raises
:class:`~deeptaylor.errors.RootNotFoundError` instead; ``"ignore"`` only sets the flag. A given root
(``"zero"`` or an array) is used as it is: ``root_found`` reports whether ``|f(ξ)| ≤ tol``, without
a warning.

Extras (per sample, first axis N; :attr:`Explanation.extras`)
-------------------------------------------------------------
``residual`` (float64) ``f(x) − Σ_p R_p``; ``root_distance`` (float64) ``‖x − ξ‖₂``; ``f_root``
(float64) ``f(ξ)``; ``root_found`` (bool); ``iterations`` (int64, 0 for a given root); ``root`` (the
root point, shape of x, backend dtype).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, RootNotFoundError, RootNotFoundWarning, ShapeError
from .methods import CompoundMethod, Passes

__all__ = ["Taylor"]

#: default tolerances by the backend's precision: (rtol, xtol)
_DEFAULT_TOL = {np.dtype(np.float64): (1e-9, 1e-7), np.dtype(np.float32): (1e-4, 1e-3)}
_ARMIJO = 1e-4
#: the gradient is taken at ξ + η (x − ξ): at the root, approached from x's side (one-sided where ξ
#: lies on a kink); the same on both backends
_ETA = 2.0 ** -14
#: bisection steps of the pull-back along the segment ξ -> x (bracket 2^-k of the segment, below η)
_BISECTIONS = 16
#: a refinement step (on the zero set, towards x) may leave the set by up to this fraction of |f(x)|;
#: the next Newton step brings the iterate back, and only roots closer to x than the best are kept
_RELAX = 0.1
#: the search stops after _STALL iterations on the zero set in a row that bring no root closer to x by
#: more than the fraction max(xtol, _MIN_GAIN)
_STALL = 3
_MIN_GAIN = 1e-3
#: most halvings of a refinement step
_REFINE_HALVINGS = 4
#: most doublings of a Newton step that fell short of the zero set
_EXPANSIONS = 6
#: a Newton step cut below this size counts as blocked (_STALL in a row stop the sample)
_SHORT = 2.0 ** -10
#: most regula-falsi steps on the segment from x to the origin
_SEGMENT_STEPS = 40
#: most rounds of the box's active-set projection (each fixes every coordinate that crossed a bound);
#: beyond them the step is clipped to the box
_ACTIVE_SET_ROUNDS = 32


def _as_float(value: Any, name: str, positive: bool = False, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise InputTypeError(f"Taylor: {name} must be a real number, got {value!r}")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        bound = "> 0" if positive else ">= 0"
        raise InputError(f"Taylor: {name} must be a finite number {bound}, got {value!r}")
    return v


def _as_int(value: Any, name: str, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise InputTypeError(f"Taylor: {name} must be an int, got {value!r}")
    if int(value) < minimum:
        raise InputError(f"Taylor: {name} must be >= {minimum}, got {value!r}")
    return int(value)


def _as_array(value: Any, name: str) -> np.ndarray:
    try:
        a = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"Taylor: {name} must be a float array or number, "
                             f"got {type(value).__name__}") from exc
    if not np.all(np.isfinite(a)):
        raise InputError(f"Taylor: {name} contains {int((~np.isfinite(a)).sum())} NaN/Inf value(s)")
    a.setflags(write=False)
    return a


class Taylor(CompoundMethod):
    """First-order Taylor decomposition of the explained output at a root point:
    ``R_p = ∂f/∂x_p|_ξ · (x_p − ξ_p)``, shape of x, units of f. See the module docstring
    (:mod:`deeptaylor.taylor`) for the root search, its stopping rule and the failure behaviour;
    docs/theory.md §6 for the theory.

    Parameters
    ----------
    root : "nearest", "zero", or float array
        ``"nearest"`` (default): the nearest root point ``f(ξ) = 0``, searched per sample by Newton
        steps along the gradient with a backtracking line search. ``"zero"``: ``ξ = 0``. An array: the
        per-sample shape (one root for every sample) or ``(N, *sample_shape)`` (one per sample; then
        explain the batch in one piece, without ``batch_size``).
    box : (low, high), optional
        Bounds of the input domain for the ``"nearest"`` search (e.g. ``(0, 1)`` for pixels): numbers
        or arrays broadcastable to the per-sample shape, ``low <= high``. The input must lie inside.
    max_iter : int
        Most iterations (gradient passes) of the search, default 50.
    rtol, atol : float, optional
        ``|f(ξ)| ≤ rtol · |f(x)| + atol`` counts as a root. ``rtol`` None: 1e-9 (float64 backend) or
        1e-4 (float32 backend).
    xtol : float, optional
        Converged once on the zero set and a step is at most ``xtol · ‖x − ξ‖``. None: 1e-7 (float64)
        or 1e-3 (float32).
    max_halvings : int
        Most step halvings per line search, default 30.
    on_failure : {"warn", "raise", "ignore"}
        What a ``"nearest"`` search that finds no root does (the relevance is computed at the last
        iterate in every case): :class:`~deeptaylor.errors.RootNotFoundWarning`,
        :class:`~deeptaylor.errors.RootNotFoundError`, or only ``extras["root_found"] = False``.

    Examples
    --------
    >>> res = dt.Explainer(net, dt.methods.Taylor(), backend="numpy").explain(x)
    >>> res.extras["residual"]          # f(x) - sum_p R_p per sample (0 for a locally linear f)
    """

    __slots__ = ("root", "box", "max_iter", "rtol", "atol", "xtol", "max_halvings", "on_failure")

    def __init__(self, root: Any = "nearest", box: Any = None, max_iter: int = 50, rtol: float | None = None,
                 atol: float = 0.0, xtol: float | None = None, max_halvings: int = 30,
                 on_failure: str = "warn") -> None:
        if isinstance(root, str):
            if root not in ("nearest", "zero"):
                raise InputError(f"Taylor: root must be 'nearest', 'zero' or an array, got {root!r}")
        else:
            root = _as_array(root, "root")
            if root.ndim == 0:
                raise ShapeError("Taylor: a root array must have the per-sample shape or (N, *sample_shape), "
                                 "got a scalar (use root='zero' for the origin)")
        if box is not None:
            if isinstance(root, np.ndarray) or root == "zero":
                raise InputError("Taylor: box applies to the root search (root='nearest') only")
            if not isinstance(box, (tuple, list)) or len(box) != 2:
                raise InputTypeError(f"Taylor: box must be a pair (low, high), got {box!r}")
            low, high = _as_array(box[0], "box low"), _as_array(box[1], "box high")
            try:
                np.broadcast_shapes(low.shape, high.shape)
            except ValueError as exc:
                raise ShapeError(f"Taylor: box low {low.shape} and high {high.shape} do not "
                                 "broadcast") from exc
            if np.any(low > high):
                raise InputError("Taylor: box needs low <= high everywhere")
            box = (low, high)
        if on_failure not in ("warn", "raise", "ignore"):
            raise InputError(f"Taylor: on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
        object.__setattr__(self, "root", root)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "max_iter", _as_int(max_iter, "max_iter", 1))
        object.__setattr__(self, "rtol", _as_float(rtol, "rtol", allow_none=True))
        object.__setattr__(self, "atol", _as_float(atol, "atol"))
        object.__setattr__(self, "xtol", _as_float(xtol, "xtol", positive=True, allow_none=True))
        object.__setattr__(self, "max_halvings", _as_int(max_halvings, "max_halvings", 0))
        object.__setattr__(self, "on_failure", on_failure)

    def params(self) -> dict[str, Any]:
        """The parameters by name (for ``repr``, ``==`` and ``hash``)."""
        p: dict[str, Any] = {"root": self.root}
        if self.box is not None:
            p["box"] = self.box
        if isinstance(self.root, str) and self.root == "nearest":
            p.update(max_iter=self.max_iter, rtol=self.rtol, atol=self.atol, xtol=self.xtol,
                     max_halvings=self.max_halvings, on_failure=self.on_failure)
        return p

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return False
        a, b = self.params(), other.params()  # type: ignore[attr-defined]
        if a.keys() != b.keys():
            return False
        for k in a:
            x, y = a[k], b[k]
            if k == "box":
                if not all(np.array_equal(u, v) and np.shape(u) == np.shape(v) for u, v in zip(x, y)):
                    return False
            elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and x.shape == y.shape
                        and np.array_equal(x, y)):
                    return False
            elif x != y:
                return False
        return True

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.params())))

    def __repr__(self) -> str:
        def short(v: Any) -> str:
            if isinstance(v, np.ndarray):
                return f"array{v.shape}"
            if isinstance(v, tuple):
                return "(" + ", ".join(short(u) for u in v) + ")"
            return repr(v)
        return f"{self.name}(" + ", ".join(f"{k}={short(v)}" for k, v in self.params().items()) + ")"

    # ------------------------------------------------------------------------------------------------

    def _tolerances(self, dtype: np.dtype) -> tuple[float, float]:
        rtol_d, xtol_d = _DEFAULT_TOL.get(np.dtype(dtype), _DEFAULT_TOL[np.dtype(np.float32)])
        rtol = self.rtol if self.rtol is not None else rtol_d
        return rtol, (self.xtol if self.xtol is not None else xtol_d)

    def compute(self, passes: Passes, x: np.ndarray, targets: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Relevance for one batch (see :meth:`CompoundMethod.compute`): ``(output (N, K) at x,
        relevance (shape of x, backend dtype), extras)``; the extras are listed in the module
        docstring."""
        n = x.shape[0]
        rows = np.arange(n)
        dtype = passes.dtype
        rtol, xtol = self._tolerances(dtype)
        if isinstance(self.root, str) and self.root == "nearest":
            out0, g0 = passes.gradient(x, targets)
            tgt = np.argmax(out0, axis=1) if targets is None else np.asarray(targets)
            f0 = out0[rows, tgt].astype(np.float64)
            tol = rtol * np.abs(f0) + self.atol
            low, high = self._bounds(x)
            xi, f_root, iters = self._search(passes, x, tgt, f0, g0, tol, xtol, low, high)
        else:
            out0 = passes.forward(x)
            tgt = np.argmax(out0, axis=1) if targets is None else np.asarray(targets)
            f0 = out0[rows, tgt].astype(np.float64)
            tol = rtol * np.abs(f0) + self.atol
            xi = self._given_root(x)
            f_root = passes.forward(xi.astype(dtype))[rows, tgt].astype(np.float64)
            iters = np.zeros(n, dtype=np.int64)
        x64 = x.astype(np.float64)
        diff = x64 - xi
        # the gradient at the root, approached from x (one-sided along the segment ξ -> x)
        _, grad = passes.gradient((xi + _ETA * diff).astype(dtype), tgt)
        rel64 = grad.astype(np.float64) * diff
        relevance = rel64.astype(dtype)
        found = np.abs(f_root) <= tol
        extras = {
            "residual": f0 - rel64.reshape(n, -1).sum(axis=1),
            "root_distance": np.sqrt((diff.reshape(n, -1) ** 2).sum(axis=1)),
            "f_root": f_root,
            "root_found": found,
            "iterations": iters,
            "root": xi.astype(dtype),
        }
        if isinstance(self.root, str) and self.root == "nearest" and not found.all():
            bad = np.flatnonzero(~found)
            first = int(bad[0])
            msg = (f"Taylor(root='nearest'): no root point found for {bad.size} of {n} sample(s) of this "
                   f"batch (first: sample {first} of the batch, |f(ξ)| = {abs(f_root[first]):.3g} > "
                   f"tolerance {tol[first]:.3g} after {int(iters[first])} iteration(s)); their relevance is "
                   "computed at the last iterate and extras['root_found'] is False for them (raise max_iter "
                   "or rtol, or pass on_failure='ignore')")
            if self.on_failure == "raise":
                raise RootNotFoundError(msg)
            if self.on_failure == "warn":
                warnings.warn(msg, RootNotFoundWarning, stacklevel=3)   # at the explain() call
        return out0, relevance, extras

    def _given_root(self, x: np.ndarray) -> np.ndarray:
        """The root array for batch ``x`` (float64, shape of x)."""
        if isinstance(self.root, str):   # "zero"
            return np.zeros(x.shape, dtype=np.float64)
        r = self.root
        if r.shape == x.shape[1:]:
            return np.broadcast_to(r, x.shape).astype(np.float64)
        if r.shape == x.shape:
            return r.astype(np.float64)
        if r.shape[1:] == x.shape[1:]:
            raise ShapeError(f"Taylor: the root array has {r.shape[0]} samples but the batch has "
                             f"{x.shape[0]}: one root per sample needs the whole batch in one piece (no "
                             f"batch_size), or pass one root of the per-sample shape {x.shape[1:]}")
        raise ShapeError(f"Taylor: the root array has shape {r.shape}; the input needs the per-sample shape "
                         f"{x.shape[1:]} or the batch shape {x.shape}")

    def _bounds(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The box broadcast to the per-sample shape (float64), checked against ``x``."""
        if self.box is None:
            return None, None
        sample = x.shape[1:]
        try:
            low = np.broadcast_to(self.box[0], sample).astype(np.float64)
            high = np.broadcast_to(self.box[1], sample).astype(np.float64)
        except ValueError as exc:
            raise ShapeError(f"Taylor: box bounds of shapes {self.box[0].shape}, {self.box[1].shape} do not "
                             f"broadcast to the per-sample input shape {sample}") from exc
        scale = 1e-6 * max(1.0, float(np.abs(low).max()), float(np.abs(high).max()))
        if np.any(x.min(axis=0) < low - scale) or np.any(x.max(axis=0) > high + scale):
            raise InputError(f"Taylor: the input has values in [{float(x.min()):.4g}, {float(x.max()):.4g}], "
                             "outside the box given for the root search")
        return low, high

    @staticmethod
    def _candidate(anchor: np.ndarray, xi: np.ndarray, f: np.ndarray, g: np.ndarray,
                   low: np.ndarray | None, high: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """For m samples (flattened, float64): the point ``y`` nearest to ``anchor`` on the linearised
        zero set ``f + g·(y − ξ) = 0``, within the box (active-set projection: coordinates pushed
        beyond a bound are fixed there and the step recomputed over the others). ``anchor = ξ`` gives
        the Newton step along the gradient, ``anchor = x`` the projection of x. Returns ``(y, ok)``;
        ``ok`` is False where the gradient vanishes and no coordinate is at a bound."""
        fixed = np.zeros(anchor.shape, dtype=bool)
        target = anchor.copy()
        for _ in range(min(anchor.shape[1] + 1, _ACTIVE_SET_ROUNDS)):
            gf = np.where(fixed, 0.0, g)
            gg = (gf * gf).sum(axis=1)
            # no free gradient: with every useful coordinate at a bound the step goes to the bounds
            ok = (gg > 0) | fixed.any(axis=1)
            c = (f + (g * (target - xi)).sum(axis=1)) / np.where(gg > 0, gg, 1.0)
            y = target - c[:, None] * gf
            if low is None:
                return y, ok
            clipped = np.clip(y, low, high)
            new = (clipped != y) & ~fixed
            if not new.any():
                return y, ok
            fixed |= new
            target = np.where(new, clipped, target)
        return np.clip(y, low, high), ok

    def _search(self, passes: Passes, x: np.ndarray, tgt: np.ndarray, f0: np.ndarray, g0: np.ndarray,
                tol: np.ndarray, xtol: float, low: np.ndarray | None, high: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batched nearest-root search. Returns ``(ξ float64 shape of x, f(ξ) (N,), iterations
        (N,))``: the closest iterate to x with ``|f| <= tol`` if there is one, else the last iterate."""
        n = x.shape[0]
        shape = x.shape
        dtype = passes.dtype
        eta = _ETA
        xf = x.reshape(n, -1).astype(np.float64)
        lo = None if low is None else low.reshape(1, -1)
        hi = None if high is None else high.reshape(1, -1)
        xi = xf.copy()
        f = f0.copy()                              # f at the current iterate
        grad = g0.reshape(n, -1).astype(np.float64)
        fresh = np.ones(n, dtype=bool)             # grad is the gradient at the current iterate
        iters = np.zeros(n, dtype=np.int64)
        best_xi, best_f = xi.copy(), f.copy()
        best_dist = np.full(n, np.inf)
        relax = np.maximum(_RELAX * np.abs(f0), tol)   # how far a refinement step may leave the zero set
        active = np.ones(n, dtype=bool)
        stall = np.zeros(n, dtype=np.int64)        # iterations on the zero set without a better root
        crawl = np.zeros(n, dtype=np.int64)        # Newton steps in a row cut below _SHORT

        def record(idx: np.ndarray) -> None:
            """Keep the roots (``|f| <= tol``) among the iterates of ``idx`` closer to x than the best."""
            dist = np.sqrt(((xf[idx] - xi[idx]) ** 2).sum(axis=1))
            feasible = np.abs(f[idx]) <= tol[idx]
            gain = feasible & (dist < (1.0 - max(xtol, _MIN_GAIN)) * best_dist[idx])
            stall[idx[feasible & ~gain]] += 1
            stall[idx[gain]] = 0
            better = feasible & (dist < best_dist[idx])
            b = idx[better]
            best_xi[b], best_f[b], best_dist[b] = xi[b], f[b], dist[better]

        # the segment from x to the origin (the box point nearest to it): where f changes sign on it, a
        # root on it by bisection is a first candidate (the Newton iteration keeps it only if it finds
        # no closer root)
        origin = np.zeros((1, xf.shape[1])) if lo is None else np.clip(0.0, lo, hi)
        seg, f_seg = self._segment_root(passes, shape, tgt, xf, f0, np.broadcast_to(origin, xf.shape), tol)
        have = np.abs(f_seg) <= tol
        if have.any():
            d_seg = np.sqrt(((xf - seg) ** 2).sum(axis=1))
            best_xi[have], best_f[have], best_dist[have] = seg[have], f_seg[have], d_seg[have]

        for _ in range(self.max_iter):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            stale = idx[~fresh[idx]]
            if stale.size:   # one gradient pass for every sample still searching
                # on the zero set the gradient approached from x (one-sided at a kink), else at ξ
                shift = np.where(np.abs(f[stale]) <= tol[stale], eta, 0.0)
                at = xi[stale] + shift[:, None] * (xf[stale] - xi[stale])
                _, g = passes.gradient(at.reshape((stale.size,) + shape[1:]).astype(dtype), tgt[stale])
                grad[stale] = g.reshape(stale.size, -1)
                fresh[stale] = True
            record(idx)
            on_set = np.abs(f[idx]) <= tol[idx]
            # off the zero set: a Newton step along the gradient; on it: the projection of x onto the
            # linearised zero set (moves along the set towards x)
            anchor = np.where(on_set[:, None], xf[idx], xi[idx])
            y, ok = self._candidate(anchor, xi[idx], f[idx], grad[idx], lo, hi)
            step = y - xi[idx]
            dist = np.sqrt(((xf[idx] - xi[idx]) ** 2).sum(axis=1))
            step_len = np.sqrt((step * step).sum(axis=1))
            converged = on_set & (step_len <= xtol * dist)
            stop = converged | ~ok | (step_len == 0) | (stall[idx] >= _STALL)
            active[idx[stop]] = False
            keep = ~stop
            idx, step, on_set = idx[keep], step[keep], on_set[keep]
            if idx.size == 0:
                continue
            accepted, new_xi, new_f, t = self._line_search(passes, shape, tgt[idx], xi[idx], xf[idx], f[idx],
                                                        step, on_set, best_dist[idx], tol[idx], relax[idx],
                                                        lo, hi)
            iters[idx] += 1
            acc = idx[accepted]
            xi[acc], f[acc] = new_xi[accepted], new_f[accepted]
            fresh[acc] = False
            active[idx[~accepted]] = False      # no step size helps: on the zero set, done; off it, failed
            # Newton steps cut down to slivers: a kink of f blocks the way (f decreases along the step by
            # next to nothing); after _STALL such steps in a row the sample stops
            short = ~on_set & (t < _SHORT)
            crawl[idx[short]] += 1
            crawl[idx[~short]] = 0
            active[idx[crawl[idx] >= _STALL]] = False
            # a Newton step that reached the zero set: pull the root back towards x along the segment
            entered = idx[accepted & ~on_set & (np.abs(new_f) <= tol[idx])]
            if entered.size:
                xi[entered], f[entered] = self._pull_back(passes, shape, tgt[entered], xi[entered],
                                                          xf[entered], f[entered])
        record(np.arange(n))
        use = np.isfinite(best_dist)
        xi[use], f[use] = best_xi[use], best_f[use]
        return xi.reshape(shape), f, iters

    @staticmethod
    def _segment_root(passes: Passes, shape: tuple[int, ...], tgt: np.ndarray, x: np.ndarray, fx: np.ndarray,
                      o: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A root on the segment from ``x`` (m, P) to ``o`` (m, P) where ``f(o)`` is 0 or of the other
        sign than ``f(x)``: one forward pass at ``o``, then the Illinois variant of regula falsi on
        those samples (each step one forward pass for the samples not yet within ``tol``), then the
        pull-back where ``f = 0`` exactly. Returns ``(point, f(point))``: the root (or the end of the
        final bracket on ``o``'s side), or ``x`` and ``f(x)`` where f does not change sign."""
        m = x.shape[0]
        dtype = passes.dtype
        point, fp = x.copy(), fx.copy()
        fo = passes.forward(o.reshape((m,) + shape[1:]).astype(dtype))[np.arange(m), tgt].astype(np.float64)
        idx = np.flatnonzero((fo * fx <= 0) & (np.abs(fx) > tol))
        if idx.size == 0:
            return point, fp
        # bracket [a, b] in units of the segment: f(a) has f(x)'s sign, f(b) is 0 or of the other sign;
        # ga, gb: the values regula falsi uses (Illinois: halved at an end kept twice in a row)
        a, b = np.zeros(idx.size), np.ones(idx.size)
        fb = fo[idx].copy()
        ga, gb = fx[idx].copy(), fo[idx].copy()
        last = np.zeros(idx.size, dtype=np.int8)              # 1: a moved last, 2: b moved last
        xs, d = x[idx], o[idx] - x[idx]
        todo = np.flatnonzero(np.abs(fb) > tol[idx])
        for _ in range(_SEGMENT_STEPS):
            if todo.size == 0:
                break
            at, bt = a[todo], b[todo]
            c = bt - gb[todo] * (bt - at) / (gb[todo] - ga[todo])
            c = np.clip(c, at + 1e-3 * (bt - at), bt - 1e-3 * (bt - at))   # strictly inside the bracket
            pts = (xs[todo] + c[:, None] * d[todo]).reshape((todo.size,) + shape[1:])
            fc = passes.forward(pts.astype(dtype))
            fc = fc[np.arange(todo.size), tgt[idx[todo]]].astype(np.float64)
            same = fc * fx[idx[todo]] > 0
            ia, ib = todo[same], todo[~same]
            gb[ia[last[ia] == 1]] *= 0.5
            a[ia], ga[ia], last[ia] = c[same], fc[same], 1
            ga[ib[last[ib] == 2]] *= 0.5
            b[ib], gb[ib], fb[ib], last[ib] = c[~same], fc[~same], fc[~same], 2
            todo = todo[np.abs(fb[todo]) > tol[idx[todo]]]
        point[idx] = xs + b[:, None] * d
        fp[idx] = fb
        zero = idx[np.abs(fb) <= tol[idx]]
        if zero.size:
            point[zero], fp[zero] = Taylor._pull_back(passes, shape, tgt[zero], point[zero], x[zero],
                                                      fp[zero])
        return point, fp

    @staticmethod
    def _pull_back(passes: Passes, shape: tuple[int, ...], tgt: np.ndarray, xi: np.ndarray, x: np.ndarray,
                   f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bisection (:data:`_BISECTIONS` halvings, forward passes only) on the segment from the roots
        ``ξ`` (m, P) towards ``x`` (m, P) for the farthest point where ``|f|`` is still at most
        ``|f(ξ)|`` (a root no worse, closer to x; where f crosses zero transversally ξ barely moves).
        Where the zero set is a flat region (``f = 0`` on a set with interior, e.g. every unit of a
        ReLU network off) this moves ξ to within ``2^-16`` of the segment from the region's boundary,
        where the gradient from x's side (at ``ξ + η (x − ξ)``, ``η = 2^-14``) is not zero. Returns
        ``(ξ, f(ξ))``."""
        m = xi.shape[0]
        dtype = passes.dtype
        lo, hi = np.zeros(m), np.ones(m)
        f_lo, level = f.copy(), np.abs(f)
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            pts = xi + mid[:, None] * (x - xi)
            fm = passes.forward(pts.reshape((m,) + shape[1:]).astype(dtype))[np.arange(m), tgt]
            fm = fm.astype(np.float64)
            inside = np.abs(fm) <= level
            lo = np.where(inside, mid, lo)
            hi = np.where(inside, hi, mid)
            f_lo = np.where(inside, fm, f_lo)
        return xi + lo[:, None] * (x - xi), f_lo

    def _line_search(self, passes: Passes, shape: tuple[int, ...], tgt: np.ndarray, xi: np.ndarray,
                     x: np.ndarray, f: np.ndarray, step: np.ndarray, on_set: np.ndarray,
                     best_dist: np.ndarray, tol: np.ndarray, relax: np.ndarray, lo: np.ndarray | None,
                     hi: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Backtracking on ``ξ + t·step``, ``t = 1, 1/2, ...``, for m samples at once (forward passes on
        the samples still halving). Off the zero set a step is accepted on Armijo's condition on
        ``|f|`` or when it reaches the set; on the set (a refinement step) when it comes strictly closer
        to x than the best root so far and keeps ``|f| <= relax``. Returns ``(accepted (m,), new ξ
        (m, P), f(new ξ) (m,), step size t (m,))``."""
        m = xi.shape[0]
        t = np.ones(m)
        accepted = np.zeros(m, dtype=bool)
        new_xi = xi.copy()
        new_f = f.copy()
        pending = np.arange(m)
        for _ in range(self.max_halvings + 1):
            if pending.size == 0:
                break
            cand = xi[pending] + t[pending, None] * step[pending]
            if lo is not None:
                cand = np.clip(cand, lo, hi)
            out = passes.forward(cand.reshape((pending.size,) + shape[1:]).astype(passes.dtype))
            fc = out[np.arange(pending.size), tgt[pending]].astype(np.float64)
            afc = np.abs(fc)
            closer = np.sqrt(((cand - x[pending]) ** 2).sum(axis=1)) < best_dist[pending]
            decrease = (afc <= tol[pending]) | (afc <= (1.0 - _ARMIJO * t[pending]) * np.abs(f[pending]))
            ok = np.where(on_set[pending], closer & (afc <= relax[pending]), decrease)
            good = pending[ok]
            accepted[good] = True
            new_xi[good] = cand[ok]
            new_f[good] = fc[ok]
            pending = pending[~ok]
            t[pending] *= 0.5
            # a refinement step shrunk _REFINE_HALVINGS times gains little: give up on it
            pending = pending[~on_set[pending] | (t[pending] >= 0.5 ** _REFINE_HALVINGS)]
        # a full Newton step that fell short of the zero set (f kept its sign: f is convex along the
        # step, e.g. a sum of ReLUs): try doubling it while |f| keeps decreasing
        grow = np.flatnonzero(accepted & ~on_set & (t == 1.0) & (np.abs(new_f) > tol) & (new_f * f > 0))
        for k in range(1, _EXPANSIONS + 1):
            if grow.size == 0:
                break
            cand = xi[grow] + 2.0 ** k * step[grow]
            if lo is not None:
                cand = np.clip(cand, lo, hi)
            out = passes.forward(cand.reshape((grow.size,) + shape[1:]).astype(passes.dtype))
            fc = out[np.arange(grow.size), tgt[grow]].astype(np.float64)
            ok = np.abs(fc) < np.abs(new_f[grow])
            good = grow[ok]
            new_xi[good] = cand[ok]
            new_f[good] = fc[ok]
            grow = good[(np.abs(fc[ok]) > tol[good]) & (fc[ok] * f[good] > 0)]
        return accepted, new_xi, new_f, t
