"""Is the heatmap faithful? Perturbation curves and AOPC (Bach et al. 2015; Samek et al., IEEE TNNLS 2017).

Replace the input's positions in the order a heatmap ranks them and watch the explained output fall:
a heatmap that puts the evidence first makes it fall fast.

* :func:`pixel_flipping` - step k replaces the ``k * features_per_step`` first positions (pixels).
* :func:`region_perturbation` - step k replaces the ``k * regions_per_step`` first k x k regions of a
  non-overlapping grid, ranked by their summed relevance (Samek et al.: 9 x 9).
* :func:`compare` - both for several methods at once (heatmaps computed here), as the
  ``deeptaylor evaluate`` command does.

Both return a :class:`PerturbationCurves`: ``curves`` (N, L+1), the explained output ``f_t(x^(k))``
after step k = 0..L (``x^(0) = x``), and ``aopc`` (N,), the area over the perturbation curve,
``1/(L+1) * sum_{k=0..L} (f_t(x^(0)) - f_t(x^(k)))`` (Samek et al. eq. 12, per sample; its mean over
the samples is their AOPC). Units: those of the network's output (logits unless the network ends in a
softmax). With ``order="morf"`` (most relevant first) a larger AOPC is better; with ``"lerf"`` (least
relevant first) a smaller one.

Conventions
-----------
* A *position* is one pixel (all channels) of an (N, C, H, W) input, or one feature of an (N, F)
  input. Its relevance is the heatmap summed over the channels; it is replaced in all channels.
* Ranking: ``morf`` sorts positions (regions) by decreasing relevance, ``lerf`` by increasing
  relevance; ties are broken by the position's (region's) index, row-major, lowest first (a stable
  sort), so the order is deterministic. ``random`` draws one permutation per sample from
  ``numpy.random.default_rng(seed)`` (the heatmap is not needed).
* Baseline, the value a replaced position takes: a number; an array of the sample's shape (or of
  x's shape, one per sample); ``"mean"``: each sample's mean over all its values (of the unperturbed
  x); ``"uniform"``: values drawn uniformly from ``[min, max]`` of each sample (Samek et al.),
  independently per value, once per sample from ``default_rng(seed)`` (after the random order's
  draws), so a position keeps its replacement value from its step on.
* Quantus 0.6.0 (``PixelFlipping``, ``RegionPerturbation``) computes the same curves for a numeric
  baseline (bench/quantus_compare.py): its ``PixelFlipping`` curve is ``curves[:, 1:]`` with
  ``steps = ceil(P / features_per_step)``, its ``RegionPerturbation`` result is
  ``curves[:, :1] - curves[:, 1:]``, on the same centred grid. Its ``"mean"`` is recomputed on the
  already perturbed image at every step; ours is fixed.

Speed and memory
----------------
All perturbed inputs, every step of every sample, run through ``Explainer.forward`` - the compiled
engine's forward-only pass over tiles, no relevance pass - in batches of about
:data:`MAX_BATCH_VALUES` input values (``batch_size`` rows when given): a batch is generated from x,
the baseline and each position's step number right before it runs, so memory stays bounded by the
batch and by a few arrays of x's size, whatever the number of steps. A step that changes no value of
a sample (every position it replaces already holds the baseline value, as black background pixels
replaced by 0) gives the previous step's input again: it is not run, its output is the previous one
(``reuse_unchanged=False`` runs every step).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, ShapeError

__all__ = [
    "PerturbationCurves",
    "pixel_flipping",
    "region_perturbation",
    "compare",
    "summary",
    "plot_curves",
    "resolve_method",
    "METHOD_NAMES",
    "MAX_BATCH_VALUES",
]

#: bound on the input values of one perturbed batch (rows x values per sample): 2**24, 64 MiB of float32
MAX_BATCH_VALUES = 1 << 24

ORDERS = ("morf", "lerf", "random")


@dataclass
class PerturbationCurves:
    """Result of :func:`pixel_flipping` / :func:`region_perturbation`.

    Attributes
    ----------
    curves : ndarray (N, L+1) float64
        ``f_t(x^(k))``, the explained output after step k = 0..L; ``curves[:, 0]`` is ``f_t(x)``.
    aopc : ndarray (N,) float64
        ``mean_k (curves[:, 0] - curves[:, k])`` over k = 0..L (units of f).
    target : ndarray (N,) int
        The explained output per sample.
    removed : ndarray (L+1,) int
        Positions (pixel flipping) or regions (region perturbation) replaced after each step.
    order : str
        ``"morf"``, ``"lerf"`` or ``"random"``.
    kind : str
        ``"pixel_flipping"`` or ``"region_perturbation"``.
    units : int
        Positions (or regions) per sample.
    evaluated : int
        Perturbed inputs actually run through the network (steps that changed nothing are reused).
    """

    curves: np.ndarray
    aopc: np.ndarray
    target: np.ndarray
    removed: np.ndarray
    order: str
    kind: str
    units: int
    evaluated: int = field(default=0)

    @property
    def mean_curve(self) -> np.ndarray:
        """The curve averaged over the samples, (L+1,)."""
        return self.curves.mean(axis=0)

    @property
    def mean_aopc(self) -> float:
        """The AOPC of Samek et al.: :attr:`aopc` averaged over the samples."""
        return float(self.aopc.mean())

    def __repr__(self) -> str:
        n, steps = self.curves.shape
        return (f"PerturbationCurves({self.kind}, order={self.order}, {n} samples, {steps - 1} steps, "
                f"AOPC {self.mean_aopc:.6g})")


# ------------------------------------------------------------------------------------------ inputs


def _explainer(model: Any, backend: Any, x: np.ndarray) -> Any:
    from .explain import Explainer
    from .methods import Gradient
    from .network import Graph

    if isinstance(model, Explainer):
        return model
    torch = sys.modules.get("torch")
    if isinstance(model, Graph) or (torch is not None and isinstance(model, torch.nn.Module)):
        shape = tuple(np.shape(x)[1:]) if not isinstance(model, Graph) else None
        return Explainer(model, Gradient(), backend=backend, input_shape=shape)
    raise InputTypeError(f"model must be a deeptaylor network (Graph/Sequential) or an Explainer, got "
                         f"{type(model).__module__}.{type(model).__qualname__}")


def _int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _relevance(relevance: Any, x: np.ndarray) -> np.ndarray:
    """Position relevance (N, P) float64: the heatmap summed over the channels. Accepts x's shape,
    (N, H, W) for image input, or (N, P)."""
    from .explain import Explanation

    if isinstance(relevance, Explanation):
        relevance = relevance.relevance
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(relevance, torch.Tensor):
        relevance = relevance.detach().cpu().numpy()
    try:
        r = np.asarray(relevance, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"relevance must be a float array, got {type(relevance).__name__}") from exc
    n = x.shape[0]
    if r.shape == x.shape:
        r = r.reshape(n, x.shape[1], -1).sum(axis=1) if x.ndim == 4 else r
    elif x.ndim == 4 and r.shape in ((n, *x.shape[2:]), (n, x.shape[2] * x.shape[3])):
        r = r.reshape(n, -1)
    else:
        want = f"{x.shape}" + (f" or {(n, *x.shape[2:])}" if x.ndim == 4 else "")
        raise ShapeError(f"relevance has shape {r.shape}; expected the input's shape {want}")
    if not np.isfinite(r).all():
        raise InputError(f"relevance contains {int((~np.isfinite(r)).sum())} NaN/Inf value(s)")
    return r


def _baseline(baseline: Any, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The replacement values: a 0-d array (one number for all) or an array of x's shape."""
    if isinstance(baseline, str):
        flat = x.reshape(x.shape[0], -1)
        if baseline == "mean":
            return np.broadcast_to(flat.mean(axis=1).reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
        if baseline == "uniform":
            lo = flat.min(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
            hi = flat.max(axis=1).reshape((-1,) + (1,) * (x.ndim - 1))
            return lo + (hi - lo) * rng.random(x.shape)
        raise InputError(f"baseline must be a number, an array, 'mean' or 'uniform', got {baseline!r}")
    if isinstance(baseline, bool):
        raise InputTypeError(f"baseline must be a number or an array, got {baseline!r}")
    try:
        b = np.asarray(baseline, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputTypeError(f"baseline must be a number, an array, 'mean' or 'uniform', got "
                             f"{type(baseline).__name__}") from exc
    if not np.isfinite(b).all():
        raise InputError("baseline contains NaN/Inf values")
    if b.ndim == 0:
        return b
    if b.shape not in (x.shape, x.shape[1:]):
        raise ShapeError(f"baseline of shape {b.shape} must be a number or of the sample shape {x.shape[1:]} "
                         f"or the input shape {x.shape}")
    return np.broadcast_to(b, x.shape)


def _order(units: np.ndarray | None, order: str, n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """(N, U) unit indices, first replaced first (stable: ties by index)."""
    if order == "random":
        return rng.permuted(np.tile(np.arange(count), (n, 1)), axis=1)
    assert units is not None
    return np.argsort(-units if order == "morf" else units, axis=1, kind="stable")


def _progress(it: Any, total: int, enabled: bool, desc: str) -> Any:
    if not enabled or total <= 1:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, unit="batch")


# ------------------------------------------------------------------------------------------- engine


def _run(ex: Any, x: np.ndarray, step_of: np.ndarray, base: np.ndarray, target: np.ndarray, steps: int,
         batch_size: int | None, reuse: bool, progress: bool, desc: str) -> tuple[np.ndarray, int]:
    """Curves (N, steps+1): ``x^(k) = where(step_of <= k, base, x)`` per position (broadcast over
    channels), ``step_of`` (N, P) int. Returns (curves, inputs run)."""
    n = x.shape[0]
    sample = x.shape[1:]
    dtype = np.dtype(getattr(ex.backend, "dtype", np.float64))
    xs = x.astype(dtype, copy=False)
    positions = step_of.shape[1]
    chan = x.shape[1] if x.ndim == 4 else 1
    xv = xs.reshape(n, chan, positions)
    scalar = base.ndim == 0
    bv = base.astype(dtype) if scalar else np.ascontiguousarray(base, dtype=dtype).reshape(n, chan, positions)
    # which (sample, step) pairs change the input: step k changes sample n if one of the positions it
    # replaces differs from its baseline value in some channel (step 0, the input itself, always runs)
    run = np.zeros((n, steps + 1), dtype=bool)
    run[:, 0] = True
    if reuse:
        differs = (xv != bv).any(axis=1)
        rows, cols = np.nonzero(differs & (step_of <= steps))
        run[rows, step_of[rows, cols]] = True
    else:
        run[:] = True
    ns, ks = np.nonzero(run)                      # sample-major: the rows of one sample are together
    per_row = int(np.prod(sample))
    rows_per_batch = batch_size or max(1, MAX_BATCH_VALUES // max(1, per_row))
    curves = np.full((n, steps + 1), np.nan)
    starts = range(0, ns.size, rows_per_batch)
    for s in _progress(starts, len(starts), progress, desc):
        bn, bk = ns[s:s + rows_per_batch], ks[s:s + rows_per_batch]
        mask = (step_of[bn] <= bk[:, None])[:, None, :]                  # (B, 1, P)
        batch = np.where(mask, bv if scalar else bv[bn], xv[bn])          # (B, C, P)
        out = ex.forward(batch.reshape((-1,) + sample), incremental=True)
        curves[bn, bk] = out[np.arange(bn.size), target[bn]]
    # steps that were not run repeat the last step that was
    last = np.maximum.accumulate(np.where(run, np.arange(steps + 1), 0), axis=1)
    return np.take_along_axis(curves, last, axis=1), int(ns.size)


def _prepare(model: Any, x: Any, relevance: Any, target: Any, order: str, backend: Any
             ) -> tuple[Any, np.ndarray, np.ndarray | None, np.ndarray]:
    from .explain import Explanation, validate_input, validate_targets

    if order not in ORDERS:
        raise InputError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    ex = _explainer(model, backend, x)
    x, shapes = validate_input(ex.graph, x)
    n, k = shapes[-1]
    if target is None and isinstance(relevance, Explanation):
        target = relevance.target
    t = validate_targets(target, n, k)
    if t is None:
        t = np.argmax(ex.forward(x), axis=1)
    if relevance is None:
        if order != "random":
            raise InputError(f"order={order!r} needs a relevance map (only order='random' does without)")
        r = None
    else:
        r = _relevance(relevance, x)
    return ex, x, r, np.asarray(t, dtype=np.int64)


def _steps(steps: Any, units: int, per_step: int, what: str) -> int:
    most = -(-units // per_step)
    if steps is None:
        return most
    steps = _int(steps, "steps")
    if steps > most:
        raise InputError(f"steps={steps} is more than the {most} steps that replace all {units} {what} "
                         f"({per_step} per step)")
    return steps


def _finish(curves: np.ndarray, t: np.ndarray, steps: int, per_step: int, units: int, order: str, kind: str,
            evaluated: int) -> PerturbationCurves:
    aopc = (curves[:, :1] - curves).mean(axis=1)
    removed = np.minimum(np.arange(steps + 1) * per_step, units)
    return PerturbationCurves(curves=curves, aopc=aopc, target=t, removed=removed, order=order, kind=kind,
                              units=units, evaluated=evaluated)


# ------------------------------------------------------------------------------------------ public


def pixel_flipping(model: Any, x: Any, relevance: Any = None, target: Any = None, *, steps: int | None = None,
                   features_per_step: int = 1, order: str = "morf", baseline: Any = 0.0, seed: int = 0,
                   backend: Any = "auto", batch_size: int | None = None, reuse_unchanged: bool = True,
                   progress: bool = False) -> PerturbationCurves:
    """Pixel flipping: replace positions in the heatmap's order, ``features_per_step`` per step.

    Parameters
    ----------
    model : Graph, Sequential or Explainer
        The network (a deeptaylor network is run on ``backend`` through a forward-only Explainer).
    x : float array (N, C, H, W) or (N, F)
        The explained inputs.
    relevance : array of x's shape, (N, H, W), or an Explanation
        The heatmaps (summed over channels per position). Not needed for ``order="random"``.
    target : None, int or int array (N,)
        The explained output per sample; None: the Explanation's target, else the largest output.
    steps : int, optional
        L, the number of steps (default: until every position is replaced, ``ceil(P / features_per_step)``).
    features_per_step : int
        Positions replaced per step (default 1).
    order : {"morf", "lerf", "random"}
        Most relevant first, least relevant first, or a random permutation (see the module docstring
        for ties).
    baseline : number, array, "mean" or "uniform"
        The replacement values (module docstring).
    seed : int
        Seeds the random order and the uniform baseline.
    backend : str
        The backend for a network given as a Graph (ignored for an Explainer).
    batch_size : int, optional
        Perturbed inputs per forward pass (default: :data:`MAX_BATCH_VALUES` input values).
    reuse_unchanged : bool
        Do not rerun a step that changes no input value (default True).
    progress : bool
        A progress bar over batches (tqdm, when installed).

    Returns
    -------
    PerturbationCurves
        ``curves`` (N, L+1), ``aopc`` (N,).
    """
    ex, x, r, t = _prepare(model, x, relevance, target, order, backend)
    per_step = _int(features_per_step, "features_per_step")
    if batch_size is not None:
        batch_size = _int(batch_size, "batch_size")
    n = x.shape[0]
    positions = x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]
    if r is not None and r.shape[1] != positions:
        raise ShapeError(f"relevance has {r.shape[1]} positions per sample, the input {positions}")
    steps = _steps(steps, positions, per_step, "positions")
    rng = np.random.default_rng(seed)
    idx = _order(r, order, n, positions, rng)
    step_of = np.empty((n, positions), dtype=np.int64)
    np.put_along_axis(step_of, idx, np.arange(positions)[None] // per_step + 1, axis=1)
    base = _baseline(baseline, x, rng)
    curves, evaluated = _run(ex, x, step_of, base, t, steps, batch_size, reuse_unchanged, progress,
                             "pixel flipping")
    return _finish(curves, t, steps, per_step, positions, order, "pixel_flipping", evaluated)


def _grid(size: int, k: int) -> tuple[int, int]:
    """(offset, cells) of the centred grid of k-wide cells along one axis: the (k - size mod k) missing
    indices are split floor/ceil before/after (as Quantus pads), so index i lies in cell (i + offset) // k."""
    missing = (-size) % k
    return missing // 2, (size + missing) // k


def region_perturbation(model: Any, x: Any, relevance: Any = None, target: Any = None, *, region_size: int = 9,
                        steps: int | None = None, regions_per_step: int = 1, order: str = "morf",
                        baseline: Any = 0.0, seed: int = 0, backend: Any = "auto", batch_size: int | None = None,
                        reuse_unchanged: bool = True, progress: bool = False) -> PerturbationCurves:
    """Region perturbation (Samek et al. 2017): replace k x k regions in the order of their summed
    relevance, ``regions_per_step`` per step.

    The regions tile the image without overlap: a grid of ``region_size`` x ``region_size`` cells,
    centred (when H is not a multiple of k, the ``k - H mod k`` missing rows are split floor/ceil above
    and below, so the border regions are cut; likewise for W; Quantus's grid). A region's relevance is
    the sum of its pixels' (all channels); it is replaced in all channels. Needs image input
    (N, C, H, W); every other parameter as in :func:`pixel_flipping`, with regions for positions.

    Returns
    -------
    PerturbationCurves
        ``curves`` (N, L+1), ``aopc`` (N,); ``units`` is the number of regions.
    """
    ex, x, r, t = _prepare(model, x, relevance, target, order, backend)
    if x.ndim != 4:
        raise ShapeError(f"region_perturbation needs image input (N, C, H, W), got shape {x.shape}")
    k = _int(region_size, "region_size")
    per_step = _int(regions_per_step, "regions_per_step")
    if batch_size is not None:
        batch_size = _int(batch_size, "batch_size")
    n, _, h, w = x.shape
    if k > max(h, w):
        raise InputError(f"region_size {k} is larger than the {h}x{w} image")
    (oy, gy), (ox, gx) = _grid(h, k), _grid(w, k)
    regions = gy * gx
    region_of = (((np.arange(h) + oy) // k)[:, None] * gx + ((np.arange(w) + ox) // k)[None, :]).reshape(-1)
    steps = _steps(steps, regions, per_step, "regions")
    rng = np.random.default_rng(seed)
    reg_rel = None
    if r is not None:
        padded = np.zeros((n, gy * k, gx * k))
        padded[:, oy:oy + h, ox:ox + w] = r.reshape(n, h, w)
        reg_rel = padded.reshape(n, gy, k, gx, k).sum(axis=(2, 4)).reshape(n, regions)
    idx = _order(reg_rel, order, n, regions, rng)
    step_of_region = np.empty((n, regions), dtype=np.int64)
    np.put_along_axis(step_of_region, idx, np.arange(regions)[None] // per_step + 1, axis=1)
    step_of = step_of_region[:, region_of]
    base = _baseline(baseline, x, rng)
    curves, evaluated = _run(ex, x, step_of, base, t, steps, batch_size, reuse_unchanged, progress,
                             "region perturbation")
    return _finish(curves, t, steps, per_step, regions, order, "region_perturbation", evaluated)


# ----------------------------------------------------------------------------------------- methods


def _extra_methods() -> dict[str, Any]:
    from .attribution import IntegratedGradients, Occlusion, SmoothGrad

    return {"integrated-gradients": IntegratedGradients, "smoothgrad": SmoothGrad, "occlusion": Occlusion}


#: what :func:`compare` and ``deeptaylor evaluate --methods`` accept besides the composite names
#: (deeptaylor.composites.names()): the baselines with their default parameters, and "random"
METHOD_NAMES = ("integrated-gradients", "smoothgrad", "occlusion", "random")


def resolve_method(name: str, low: float = 0.0, high: float = 1.0) -> Any:
    """A composite or method by name: a registered composite (``deep-taylor`` with the box
    ``[low, high]``, ``epsilon-plus-flat``, ``sensitivity``, ``gradient-x-input``...), or one of
    ``integrated-gradients``, ``smoothgrad``, ``occlusion`` (default parameters). ``"random"`` is not a
    method (it is the random order): None."""
    from . import composites

    key = name.strip().lower().replace("_", "-")
    if key == "random":
        return None
    extra = _extra_methods()
    if key in extra:
        return extra[key]()
    if key in ("deep-taylor", "epsilon-gamma-box"):
        return composites.get(key, low=low, high=high)
    try:
        return composites.get(key)
    except Exception:  # noqa: BLE001 - the registry's KeyError/RuleError: say what exists
        known = sorted(set(composites.names()) | set(METHOD_NAMES))
        raise InputError(f"unknown method {name!r}; one of: {', '.join(known)}") from None


def compare(net: Any, x: Any, methods: Iterable[Any] | Mapping[str, Any], target: Any = None, *,
            measure: str = "pixel_flipping", backend: Any = "auto", progress: bool = False,
            **kwargs: Any) -> dict[str, PerturbationCurves]:
    """Explain ``x`` with each method and evaluate the heatmaps with the same perturbations.

    Parameters
    ----------
    net : Graph or Sequential
        The network.
    x : float array (N, C, H, W) or (N, F)
    methods : iterable of names, or mapping name -> composite/method
        Names as :func:`resolve_method` takes them (``"random"``: the random order, no heatmap).
    target : None, int or int array (N,)
        The explained output; None: the largest output per sample (the same for every method).
    measure : {"pixel_flipping", "region_perturbation"}
    backend : str
        The backend of every explanation and of the evaluation.
    **kwargs
        Passed to the measure (steps, features_per_step / region_size, order, baseline, seed...);
        ``order`` applies to every method but "random".

    Returns
    -------
    dict name -> PerturbationCurves, in the order given.
    """
    from .explain import Explainer
    from .methods import Gradient

    fn = {"pixel_flipping": pixel_flipping, "region_perturbation": region_perturbation}.get(
        measure.replace("-", "_"))
    if fn is None:
        raise InputError(f"measure must be 'pixel_flipping' or 'region_perturbation', got {measure!r}")
    items = list(methods.items()) if isinstance(methods, Mapping) else [
        (str(m), resolve_method(m) if isinstance(m, str) else m) for m in methods]
    if not items:
        raise InputError("no methods to compare")
    fwd = Explainer(net, Gradient(), backend=backend)
    x = np.asarray(x) if not hasattr(x, "detach") else x.detach().cpu().numpy()
    if target is None:
        target = np.argmax(fwd.forward(x), axis=1)
    results: dict[str, PerturbationCurves] = {}
    for name, method in items:
        if method is None:
            results[name] = fn(fwd, x, None, target, **{**kwargs, "order": "random"}, progress=progress)
            continue
        rel = Explainer(net, method, backend=fwd.backend.name).explain(x, target=target).relevance
        results[name] = fn(fwd, x, rel, target, progress=progress, **kwargs)
    return results


def summary(results: Mapping[str, PerturbationCurves]) -> dict[str, Any]:
    """A JSON-ready summary of :func:`compare`'s results: per method the mean AOPC, its standard error
    over the samples, the mean curve and the inputs run; plus the removal counts of the steps."""
    out: dict[str, Any] = {"methods": {}}
    for name, r in results.items():
        n = r.aopc.size
        sem = float(r.aopc.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        out["methods"][name] = {"aopc": r.mean_aopc, "aopc_sem": sem if np.isfinite(sem) else None,
                                "order": r.order, "mean_curve": [float(v) for v in r.mean_curve],
                                "evaluated": r.evaluated}
        out["removed"] = [int(v) for v in r.removed]
        out["units"] = r.units
        out["kind"] = r.kind
        out["samples"] = int(n)
    return out


def plot_curves(results: Mapping[str, PerturbationCurves], path: Any, title: str | None = None) -> str:
    """Save the mean perturbation curve of every method (x: share of positions or regions replaced,
    y: mean explained output) as a PNG with matplotlib (an :class:`~deeptaylor.errors.UnsupportedError`
    without it). Returns the path."""
    from .errors import UnsupportedError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UnsupportedError("plotting needs matplotlib: pip install 'deeptaylor[plot]'") from exc
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for name, r in results.items():
        share = r.removed / r.units
        ax.plot(share, r.mean_curve, label=f"{name} (AOPC {r.mean_aopc:.3g})",
                linestyle="--" if r.order == "random" else "-")
    first = next(iter(results.values()))
    what = "positions" if first.kind == "pixel_flipping" else "regions"
    ax.set_xlabel(f"share of {what} replaced")
    ax.set_ylabel("explained output f(x), mean")
    ax.set_title(title or first.kind.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return str(path)
