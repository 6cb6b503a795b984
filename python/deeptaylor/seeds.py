"""Output seeds: what a backward pass starts from (``Explainer.explain(x, seed=...)``).

By default a relevance pass starts from the explained output alone, ``R_out = f_t(x)`` at the target
``t`` and 0 at every other output (a gradient method starts from the one-hot gradient ``e_t``). A
*seed* replaces that start, so any linear read-out of the output can be explained: a class contrast,
a region of a segmentation map, a regression output times a mask.

``seed=`` takes three forms:

* **an array** ``S`` of the output's shape ``(N, *out)`` (or ``(N, K, *out)``: K seeds per sample,
  explained together like K targets): used as given -- the relevance at the output for a rule
  composite, the output gradient ``dg/dy`` for a gradient method (Sensitivity, GradientXInput,
  Gradient).
* **a** :class:`Seed` (the helpers :func:`contrast`, :func:`mask`, :func:`onehot`): a *linear objective*
  ``g(y) = sum_j w_j y_j`` of the output ``y = f(x)``, given by its weights ``w`` (which do not depend
  on ``y``). A rule composite starts from ``w * y`` (each output's share of ``g``), a gradient method
  from ``w`` (``dg/dy``); both inside the same pass as the forward, no extra work.
* **any other callable** ``fn(output) -> S``: called on the network's output for the batch (one extra
  forward pass), its array used as given (the first form).

:attr:`Explanation.explained <deeptaylor.Explanation>` is then what a conservative rule
redistributes: ``sum_j S_j`` for a rule composite (``checks.conservation`` compares the heatmap's sum
with it), and the objective's value ``sum_j w_j y_j`` (``sum_j S_j y_j`` for an array seed) for a
gradient method. ``Explanation.target`` is None.

Every rule of the library is linear in its seed once the input is fixed (activations, denominators
and max-pool winners depend on x only), and so are Gradient and GradientXInput (Sensitivity squares
the gradient, so it is not), so a seed is explained as the sum of its parts: the relevance
of :func:`contrast` ``(c, d)`` equals the relevance of target ``c`` minus that of target ``d``, exactly
up to float rounding (tests/test_seeds.py), and a one-hot seed ``onehot(t)`` gives exactly
``explain(x, target=t)``.

Examples
--------
>>> res = ex.explain(x, seed=dt.seeds.contrast(3, 5))    # why 3 rather than 5: f_3 - f_5 explained
>>> res.explained                                        # (N,) f_3(x) - f_5(x)
>>> m = np.zeros((1, 64, 64)); m[0, 20:40, 20:40] = 1
>>> res = ex.explain(x, seed=dt.seeds.mask(m))           # a segmentation network's region, summed
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, ShapeError

__all__ = ["Seed", "contrast", "mask", "onehot"]


def _indices(v: Any, name: str) -> np.ndarray:
    """An int or an integer array of output indices (flat, per sample), as int64."""
    if isinstance(v, (bool, np.bool_)):
        raise InputTypeError(f"{name} must be an int or an integer array, got a bool")
    a = np.asarray(v)
    if a.dtype.kind not in "iu":
        raise InputTypeError(f"{name} must be an int or an integer array (output indices), got dtype {a.dtype}")
    if a.ndim > 1:
        raise ShapeError(f"{name} must be an int or an (N,) array, got shape {a.shape}")
    return a.astype(np.int64)


class Seed:
    """A linear objective ``g(y) = sum_j w_j y_j`` of the network output ``y`` (per sample), by its
    weights. Pass one as ``Explainer.explain(x, seed=...)``; see the module docstring.

    Parameters
    ----------
    weights : callable
        ``weights(output_shape) -> w``: the weights for an output of shape ``(N, *out)``, an array
        that broadcasts to it (dimensionless: ``g`` has the output's units).
    name : str
        For the repr.
    """

    __slots__ = ("_weights", "name")

    def __init__(self, weights: Callable[[tuple[int, ...]], Any], name: str = "Seed") -> None:
        self._weights = weights
        self.name = name

    def weights(self, output_shape: tuple[int, ...]) -> np.ndarray:
        """``w`` (float64, exactly ``output_shape`` = (N, *out)), checked: it must broadcast to the
        output's shape (:class:`~deeptaylor.errors.ShapeError`) and be finite
        (:class:`~deeptaylor.errors.InputError`)."""
        shape = tuple(int(s) for s in output_shape)
        w = np.asarray(self._weights(shape))
        if w.dtype.kind not in "biuf":
            raise InputTypeError(f"{self!r}: weights must be numbers, got dtype {w.dtype}")
        try:
            w = np.broadcast_to(w.astype(np.float64, copy=False), shape)
        except ValueError:
            raise ShapeError(f"{self!r}: weights of shape {w.shape} do not match the network's output "
                             f"(N, *out) = {shape}") from None
        if not np.all(np.isfinite(w)):
            raise InputError(f"{self!r}: weights contain NaN/Inf")
        return w

    def __call__(self, output: np.ndarray) -> np.ndarray:
        """The relevance a rule composite starts from, ``w * output``, for an output ``(N, *out)``."""
        output = np.asarray(output)
        return self.weights(output.shape) * output

    def gradient(self, output: np.ndarray) -> np.ndarray:
        """The output gradient a gradient method starts from, ``dg/dy = w``, for an output ``(N, *out)``."""
        return np.array(self.weights(np.shape(output)))

    def __repr__(self) -> str:
        return self.name


def contrast(c: Any, d: Any) -> Seed:
    """Output ``c`` against output ``d``: the objective ``g = y_c - y_d`` (weights ``e_c - e_d``).

    A rule composite starts from ``R_c = f_c(x)``, ``R_d = -f_d(x)`` (0 elsewhere), so the heatmap is
    the heatmap of target ``c`` minus that of target ``d`` (every rule is linear in its seed) and sums
    to ``f_c(x) - f_d(x)`` under a conservative composite: positive evidence for c over d, negative
    for d over c. A gradient method explains the gradient of ``y_c - y_d``.

    Parameters
    ----------
    c, d : int or int array (N,)
        Output indices (flat indices into the per-sample output, C-order, for an output of rank > 1);
        per sample when arrays. ``c == d`` gives a zero seed.
    """
    ci, di = _indices(c, "contrast c"), _indices(d, "contrast d")

    def weights(shape: tuple[int, ...]) -> np.ndarray:
        n, f = shape[0], int(np.prod(shape[1:], dtype=np.int64))
        w = np.zeros((n, f))
        rows = np.arange(n)
        for idx, sign, name in ((ci, 1.0, "c"), (di, -1.0, "d")):
            if idx.ndim == 1 and idx.shape != (n,):
                raise ShapeError(f"contrast {name} has shape {idx.shape}, the batch has {n} samples")
            if idx.size and (idx.min() < 0 or idx.max() >= f):
                raise InputError(f"contrast {name} out of range: the network has {f} output(s) (0..{f - 1}), "
                                 f"got {idx.min() if idx.min() < 0 else idx.max()}")
            np.add.at(w, (rows, np.broadcast_to(idx, (n,))), sign)
        return w.reshape(shape)

    return Seed(weights, f"contrast({_short(c)}, {_short(d)})")


def mask(m: Any) -> Seed:
    """The masked sum of the output, ``g = sum_j m_j y_j``: a region of a segmentation map, a set of
    classes, a weighted read-out.

    Parameters
    ----------
    m : array
        Of the per-sample output shape ``out`` (one mask for every sample) or ``(N, *out)``, or
        anything that broadcasts to ``(N, *out)``; bool or numbers (weights, any sign).
    """
    arr = np.asarray(m)
    if arr.dtype.kind not in "biuf":
        raise InputTypeError(f"mask must be a bool or numeric array, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise InputError("mask contains NaN/Inf")

    def weights(shape: tuple[int, ...]) -> np.ndarray:
        a = arr.astype(np.float64)
        if a.ndim == len(shape) - 1 and a.shape == tuple(shape[1:]):
            a = a[None]
        return a

    return Seed(weights, f"mask(array{arr.shape})")


def onehot(t: Any) -> Seed:
    """Output ``t`` alone, ``g = y_t``: the default start of :meth:`~deeptaylor.Explainer.explain` for
    ``target=t``, as a seed.

    Parameters
    ----------
    t : int or int array (N,)
        Output indices (flat, C-order, per sample when an array).
    """
    ti = _indices(t, "onehot t")

    def weights(shape: tuple[int, ...]) -> np.ndarray:
        n, f = shape[0], int(np.prod(shape[1:], dtype=np.int64))
        if ti.ndim == 1 and ti.shape != (n,):
            raise ShapeError(f"onehot t has shape {ti.shape}, the batch has {n} samples")
        if ti.size and (ti.min() < 0 or ti.max() >= f):
            raise InputError(f"onehot t out of range: the network has {f} output(s) (0..{f - 1})")
        w = np.zeros((n, f))
        w[np.arange(n), np.broadcast_to(ti, (n,))] = 1.0
        return w.reshape(shape)

    return Seed(weights, f"onehot({_short(t)})")


def _short(v: Any) -> str:
    a = np.asarray(v)
    return repr(int(a)) if a.ndim == 0 else f"array{a.shape}"
