"""Property checks on explanations: conservation and positivity (Montavon et al. 2017, Defs. 1-2).

* Conservation: ``sum_p R_p(x) = f(x)`` per sample, and layer by layer ``sum_i R_i = sum_j R_j``.
* Positivity: ``R_p(x) >= 0`` for every p.

Both return small report objects that print as tables and can be asserted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .explain import Explanation

__all__ = ["conservation", "positivity", "ConservationReport", "PositivityReport"]


def _sums(r: np.ndarray) -> np.ndarray:
    return r.reshape(r.shape[0], -1).astype(np.float64).sum(axis=1)


@dataclass
class ConservationReport:
    """Per-sample conservation of an explanation.

    Attributes
    ----------
    total : (N,) sum of the input relevance per sample
    explained : (N,) the explained output f(x)
    abs_error : (N,) ``|total - explained|``
    rel_error : (N,) ``abs_error / max(|explained|, tiny)``
    layer_totals : (N, L+1) or None: sum of relevance at every layer's input and at the output
    layer_rel_error : (L+1,) or None: worst relative deviation of each layer's total from f(x)
    """

    total: np.ndarray
    explained: np.ndarray
    abs_error: np.ndarray
    rel_error: np.ndarray
    layer_totals: np.ndarray | None
    layer_rel_error: np.ndarray | None
    method: str

    @property
    def max_abs_error(self) -> float:
        """Largest ``|sum R - f(x)|`` over the samples, in the units of f (the explained output)."""
        return float(self.abs_error.max())

    @property
    def max_rel_error(self) -> float:
        """Largest ``|sum R - f(x)| / |f(x)|`` over the samples (dimensionless; ``|f(x)|`` floored at the
        smallest positive float64, so an f(x) = 0 with lost relevance shows as a huge error)."""
        return float(self.rel_error.max())

    def ok(self, rtol: float = 1e-5, atol: float = 0.0) -> bool:
        """True if every sample (and every layer, if known) conserves within ``atol + rtol * |f(x)|``."""
        lim = atol + rtol * np.abs(self.explained)
        good = bool(np.all(self.abs_error <= lim))
        if self.layer_totals is not None:
            dev = np.abs(self.layer_totals - self.explained[:, None])
            good = good and bool(np.all(dev <= lim[:, None]))
        return good

    def __str__(self) -> str:
        lines = [f"conservation ({self.method}, {self.total.shape[0]} samples)",
                 f"  sum R (mean)   {self.total.mean():.6g}",
                 f"  f(x) (mean)    {self.explained.mean():.6g}",
                 f"  max |sum R - f(x)|          {self.max_abs_error:.3e}",
                 f"  max |sum R - f(x)| / |f(x)| {self.max_rel_error:.3e}"]
        if self.layer_rel_error is not None:
            errs = "  ".join(f"{e:.1e}" for e in self.layer_rel_error)
            lines.append(f"  per layer (input of 0..L-1, output): {errs}")
        return "\n".join(lines)


@dataclass
class PositivityReport:
    """Share and size of negative relevance.

    Attributes
    ----------
    negative_fraction : share of entries with R < 0 (over all samples)
    negative_mass : sum of |R| over the negative entries / sum of |R| (0 = fully positive)
    min_value : the most negative entry (or 0)
    layer_negative_fraction : (L+1,) or None
    """

    negative_fraction: float
    negative_mass: float
    min_value: float
    layer_negative_fraction: np.ndarray | None
    method: str

    def ok(self, tol: float = 0.0) -> bool:
        """True if no entry is below ``-tol`` (at the input, and at every layer if known)."""
        return self.min_value >= -tol

    def __str__(self) -> str:
        lines = [f"positivity ({self.method})",
                 f"  negative entries   {100 * self.negative_fraction:.2f} %",
                 f"  negative |R| mass  {100 * self.negative_mass:.2f} %",
                 f"  min R              {self.min_value:.3e}"]
        if self.layer_negative_fraction is not None:
            lines.append("  negative entries per layer: "
                         + "  ".join(f"{100 * f:.1f}%" for f in self.layer_negative_fraction))
        return "\n".join(lines)


def conservation(res: Explanation) -> ConservationReport:
    """Conservation of ``res`` per sample (and per layer when ``res.layers`` is set)."""
    total = _sums(res.relevance)
    f = res.explained.astype(np.float64)
    abs_err = np.abs(total - f)
    rel_err = abs_err / np.maximum(np.abs(f), np.finfo(np.float64).tiny)
    lt = lre = None
    if res.layers is not None:
        lt = np.stack([_sums(r) for r in res.layers], axis=1)
        lre = (np.abs(lt - f[:, None]) / np.maximum(np.abs(f[:, None]), np.finfo(np.float64).tiny)).max(axis=0)
    return ConservationReport(total, f, abs_err, rel_err, lt, lre, res.method)


def positivity(res: Explanation) -> PositivityReport:
    """Share and size of negative relevance in ``res`` (input, and per layer when known)."""
    r = res.relevance.astype(np.float64)
    neg = r < 0
    absmass = np.abs(r).sum()
    neg_mass = float(np.abs(r[neg]).sum() / absmass) if absmass > 0 else 0.0
    mins = [float(r.min(initial=0.0))]
    lnf = None
    if res.layers is not None:
        lnf = np.array([float((layer < 0).mean()) for layer in res.layers])
        mins += [float(np.min(layer, initial=0.0)) for layer in res.layers]
    return PositivityReport(float(neg.mean()), neg_mass, min(mins), lnf, res.method)
