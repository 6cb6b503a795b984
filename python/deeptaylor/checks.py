"""Property checks on explanations: conservation and positivity (Montavon et al. 2017, Defs. 1-2).

* Conservation: ``sum_p R_p(x) = f(x)`` per sample, and layer by layer ``sum_i R_i = sum_j R_j``.
* Positivity: ``R_p(x) >= 0`` for every p.

Both return small report objects that print as tables and can be asserted on.

Per-layer reports (``Explanation.layers``, from ``return_layers=True``):

* a :class:`~deeptaylor.Sequential` gives a list, the relevance at the input of every layer and at
  the output: each must sum to f(x);
* a :class:`~deeptaylor.Graph` gives a dict keyed by node name (``"input"`` plus every node's
  output). In a graph one node's output need not carry all of f(x) (a residual branch carries a
  part), so conservation is checked on the *clean cuts* of the topological order: cut ``k``
  separates nodes ``0..k-1`` from ``k..L-1``; it is clean when every value crossing it (computed
  before it, read after it or the output) is read only by nodes after it. The relevance of the
  crossing values then sums to f(x) under a conservative method (the input and the output are
  always clean cuts; every cut of a chain is clean). Cuts are found from the graph: pass it
  (``conservation(res, graph=explainer.graph)``, the original network works too); without it only
  the input and the output are checked. Positivity is reported per node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .explain import Explanation

__all__ = ["ConservationReport", "PositivityReport", "clean_cuts", "conservation", "positivity"]


def _sums(r: np.ndarray, lead: int = 1) -> np.ndarray:
    """Sum over the sample axes: (N, ...) -> (N,), or with lead=2 (N, K, ...) -> (N, K)."""
    return r.reshape(r.shape[:lead] + (-1,)).astype(np.float64).sum(axis=-1)


@dataclass
class ConservationReport:
    """Per-sample conservation of an explanation.

    Attributes
    ----------
    total : (N,) sum of the input relevance per sample; (N, K) per sample and target for an
        explanation of K targets or seeds per sample
    explained : (N,) the explained output f(x) (or (N, K); with a seed: the seed's total)
    abs_error : (N,) ``|total - explained|`` (or (N, K))
    rel_error : (N,) ``abs_error / max(|explained|, tiny)`` (or (N, K))
    layer_totals : (N, C) or None: sum of relevance at every layer's input and at the output
        (a Sequential: C = L + 1), or on every clean cut of a Graph (see the module docstring);
        (N, K, C) for K targets per sample
    layer_rel_error : (K,) or None: worst relative deviation of each total from f(x)
    layer_names : list of K str, or None: for a Graph, what each column sums: the names of the
        values crossing the cut joined by ``+`` (``"input"``, ``"add3"``, ``"relu2+relu5"``, ...);
        None for a Sequential (columns: input of layer 0..L-1, output)
    """

    total: np.ndarray
    explained: np.ndarray
    abs_error: np.ndarray
    rel_error: np.ndarray
    layer_totals: np.ndarray | None
    layer_rel_error: np.ndarray | None
    method: str
    layer_names: list[str] | None = None

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
            dev = np.abs(self.layer_totals - self.explained[..., None])
            good = good and bool(np.all(dev <= lim[..., None]))
        return good

    def __str__(self) -> str:
        lines = [f"conservation ({self.method}, {self.total.shape[0]} samples)",
                 f"  sum R (mean)   {self.total.mean():.6g}",
                 f"  f(x) (mean)    {self.explained.mean():.6g}",
                 f"  max |sum R - f(x)|          {self.max_abs_error:.3e}",
                 f"  max |sum R - f(x)| / |f(x)| {self.max_rel_error:.3e}"]
        if self.layer_rel_error is not None and self.layer_names is None:
            errs = "  ".join(f"{e:.1e}" for e in self.layer_rel_error)
            lines.append(f"  per layer (input of 0..L-1, output): {errs}")
        elif self.layer_rel_error is not None and self.layer_names is not None:
            lines.append("  per cut (values crossing it: max |sum R - f(x)| / |f(x)|):")
            w = max(len(n) for n in self.layer_names)
            lines += [f"    {n:<{w}}  {e:.1e}" for n, e in zip(self.layer_names, self.layer_rel_error, strict=True)]
        return "\n".join(lines)


@dataclass
class PositivityReport:
    """Share and size of negative relevance.

    Attributes
    ----------
    negative_fraction : share of entries with R < 0 (over all samples)
    negative_mass : sum of |R| over the negative entries / sum of |R| (0 = fully positive)
    min_value : the most negative entry (or 0)
    layer_negative_fraction : (L+1,) or None: per layer input and output (Sequential), or per value
        (Graph: the input, then every node's output, in the order of ``layer_names``)
    layer_names : list of str, or None: for a Graph, ``"input"`` and the node names
    """

    negative_fraction: float
    negative_mass: float
    min_value: float
    layer_negative_fraction: np.ndarray | None
    method: str
    layer_names: list[str] | None = None

    def ok(self, tol: float = 0.0) -> bool:
        """True if no entry is below ``-tol`` (at the input, and at every layer if known)."""
        return self.min_value >= -tol

    def __str__(self) -> str:
        lines = [f"positivity ({self.method})",
                 f"  negative entries   {100 * self.negative_fraction:.2f} %",
                 f"  negative |R| mass  {100 * self.negative_mass:.2f} %",
                 f"  min R              {self.min_value:.3e}"]
        if self.layer_negative_fraction is not None and self.layer_names is None:
            lines.append("  negative entries per layer: "
                         + "  ".join(f"{100 * f:.1f}%" for f in self.layer_negative_fraction))
        elif self.layer_negative_fraction is not None and self.layer_names is not None:
            lines.append("  negative entries per node (at its output):")
            w = max(len(n) for n in self.layer_names)
            lines += [f"    {n:<{w}}  {100 * f:.1f}%"
                      for n, f in zip(self.layer_names, self.layer_negative_fraction, strict=True)]
        return "\n".join(lines)


def clean_cuts(graph: Any) -> list[tuple[int, ...]]:
    """The clean cuts of ``graph``'s topological order, as tuples of the value ids crossing them.

    Cut ``k`` (0..L) separates nodes ``0..k-1`` from nodes ``k..L-1``; the values crossing it are
    those computed before it (ids ``0..k``) that a node after it reads, or the output (value L) at
    cut L. The cut is clean when each crossing value is read by nodes after the cut only; then a
    conservative relevance pass holds all of f(x) on those values. Cut 0 is ``(0,)`` (the input),
    cut L ``(L,)`` (the output); for a chain, cut k is ``(k,)``."""
    nodes = graph.nodes
    L = len(nodes)
    readers = graph.consumers()
    cuts: list[tuple[int, ...]] = []
    for k in range(L + 1):
        crossing = tuple(v for v in range(k + 1) if (v == L == k) or any(c >= k for c in readers[v]))
        if crossing and all(min(readers[v], default=L) >= k for v in crossing):
            cuts.append(crossing)
    return cuts


def _graph_for(res: Explanation, graph: Any) -> Any:
    """The graph whose node names are the keys of ``res.layers`` (``graph`` or its canonical form)."""
    from .network import Graph

    graph = graph if graph is not None else getattr(res, "graph", None)
    if graph is None:
        return None
    if not isinstance(graph, Graph):
        from .errors import InputTypeError

        raise InputTypeError(f"graph must be a deeptaylor Graph, got {type(graph).__name__}")
    keys = list(res.layers)
    if keys[1:] != list(graph.names):
        from .passes import canonicalize

        graph = canonicalize(graph)
    if keys[1:] != list(graph.names) or keys[0] != "input":
        from .errors import InputError

        raise InputError("the explanation's per-node relevance does not match the graph's nodes (explained with "
                         "another network?)")
    return graph


def conservation(res: Explanation, graph: Any = None) -> ConservationReport:
    """Conservation of ``res`` per sample (and per layer when ``res.layers`` is set).

    Parameters
    ----------
    res : Explanation
        ``res.relevance`` (N, ...) and ``res.explained`` (N,); ``res.layers`` optional. For K targets
        or seeds per sample (``res.explained`` (N, K), relevance (N, K, ...)) conservation is checked
        per sample and target: the report's arrays are (N, K).
    graph : Graph, optional
        For an explanation of a Graph with ``return_layers=True`` (``res.layers`` a dict): the
        network (or the explainer's canonical ``explainer.graph``), whose structure gives the clean
        cuts on which per-node totals are compared with f(x). Defaults to ``res.graph`` (set by
        :meth:`Explainer.explain`); without either, only ``"input"`` and the output node are.
    """
    f = np.asarray(res.explained, dtype=np.float64)
    lead = f.ndim   # 2: K targets (or seeds) per sample, every relevance array (N, K, ...)
    total = _sums(res.relevance, lead)
    abs_err = np.abs(total - f)
    rel_err = abs_err / np.maximum(np.abs(f), np.finfo(np.float64).tiny)
    lt = lre = None
    names = None
    if res.layers is not None:
        if isinstance(res.layers, dict):
            keys = list(res.layers)
            g = _graph_for(res, graph if graph is not None else getattr(res, "graph", None))
            if g is None:
                cuts = [(0,), (len(keys) - 1,)]
            else:
                cuts = clean_cuts(g)
            vals = [res.layers[k] for k in keys]
            lt = np.stack([sum(_sums(vals[v], lead) for v in cut) for cut in cuts], axis=-1)
            names = ["+".join(keys[v] for v in cut) for cut in cuts]
        else:
            lt = np.stack([_sums(r, lead) for r in res.layers], axis=-1)
        lre = (np.abs(lt - f[..., None]) / np.maximum(np.abs(f[..., None]), np.finfo(np.float64).tiny))
        lre = lre.reshape(-1, lre.shape[-1]).max(axis=0)
    return ConservationReport(total, f, abs_err, rel_err, lt, lre, res.method, names)


def positivity(res: Explanation) -> PositivityReport:
    """Share and size of negative relevance in ``res`` (input, and per layer -- per node for a
    Graph -- when ``res.layers`` is set)."""
    r = res.relevance.astype(np.float64)
    neg = r < 0
    absmass = np.abs(r).sum()
    neg_mass = float(np.abs(r[neg]).sum() / absmass) if absmass > 0 else 0.0
    mins = [float(r.min(initial=0.0))]
    lnf = names = None
    if res.layers is not None:
        values = list(res.layers.values()) if isinstance(res.layers, dict) else list(res.layers)
        if isinstance(res.layers, dict):
            names = list(res.layers)
        lnf = np.array([float((layer < 0).mean()) for layer in values])
        mins += [float(np.min(layer, initial=0.0)) for layer in values]
    return PositivityReport(float(neg.mean()), neg_mass, min(mins), lnf, res.method, names)
