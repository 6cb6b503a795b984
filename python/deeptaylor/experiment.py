"""The seeds' MNIST detection experiment (Montavon et al. 2017, slides 003 "Example MNIST"), end to end.

A detection-pooling network ``Dense(1568 -> 400), ReLU, GlobalSumPool`` with ``b <= 0`` is trained
on the 28x56 two-digit task of :func:`deeptaylor.datasets.mnist_detection` for a list of step
counts; after each, the same test images are explained with the four methods of the paper's
Figure 2 / Sec. 3 - sensitivity ``(df/dx)^2``, the w² rule, the z+ rule and the zB rule on
``[0, 1]`` - and for each method and step count we measure

* conservation: ``err = sum_n |sum_p R_p(x_n) - f(x_n)| / sum_n |f(x_n)|`` (0 = conservative)
  and the correlation of ``sum_p R_p`` with ``f`` over the test images;
* positivity: the share of the heatmaps' absolute mass that is negative (0 = positive);
* localisation: on images with a target digit, the share of the positive relevance that falls
  on the target digit's half of the image (0.5 = no preference).

Used by ``deeptaylor experiment mnist-detection``, ``deeptaylor demo`` and
``examples/mnist_detection.py``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import heatmap as hm
from .explain import Explainer, Explanation
from .methods import Sensitivity
from .network import Sequential
from .rules import WSquare, ZBox, ZPlus

__all__ = [
    "DEFAULT_STEPS",
    "DISPLAY_NAMES",
    "METHODS",
    "PAPER_STEPS",
    "MethodStats",
    "dead_network_warning",
    "explain_methods",
    "format_table",
    "heatmap_panel",
    "make_explainer",
    "method_stats",
    "panel_columns",
    "pick_rows",
    "run_mnist_detection",
]

#: the four methods compared in the paper, in display order: name -> what the Explainer gets
METHODS: dict[str, Callable[[], Any]] = {
    "sensitivity": Sensitivity,
    "w2": WSquare,
    "z+": ZPlus,
    "zB": lambda: ZBox(0.0, 1.0),
}
DEFAULT_STEPS = (0, 100, 1000, 10000)
PAPER_STEPS = (0, 100, 1000, 10000, 100000, 300000)


def make_explainer(net: Sequential, method: Any, backend: str = "auto") -> Explainer:
    """An Explainer on ``backend``: ``"auto"`` falls back to ``"numpy"`` where the compiled engine
    cannot run ``method`` or is not built, with a :class:`~deeptaylor.errors.BackendFallbackWarning`
    saying why (the command line prints it as a note on stderr); ``"cpu"`` raises
    :class:`~deeptaylor.errors.UnsupportedError` instead."""
    return Explainer(net, method, backend=backend)


def explain_methods(net: Sequential, x: np.ndarray, backend: str = "auto",
                    methods: Sequence[str] = tuple(METHODS)) -> dict[str, Explanation]:
    """Explain ``x`` (N, F) with each of ``methods`` (keys of :data:`METHODS`); returns name -> Explanation."""
    return {name: make_explainer(net, METHODS[name](), backend).explain(x) for name in methods}


@dataclass
class MethodStats:
    """Consistency numbers of one method on one network (see the module docstring)."""

    method: str
    backend: str
    conservation_error: float
    correlation: float
    negative_mass: float
    min_relevance: float
    target_share: float
    mean_f: float
    mean_sum_r: float


def target_share(r: np.ndarray, target_mask: np.ndarray) -> float:
    """Mean over images of the share of positive relevance on the target: ``r`` (N, P) heatmaps,
    ``target_mask`` (N, ...) boolean with P values per image; images whose mask is empty or whose
    positive relevance is 0 are skipped (NaN when none is left)."""
    m = np.asarray(target_mask).reshape(r.shape)
    rows = m.any(axis=1)
    pos = np.maximum(r[rows], 0)
    tot = pos.sum(axis=1)
    ok = tot > 0
    return float(np.mean((pos * m[rows]).sum(axis=1)[ok] / tot[ok])) if ok.any() else float("nan")


def method_stats(res: Explanation, target_mask: np.ndarray | None = None) -> MethodStats:
    """Conservation, positivity and localisation of ``res``; ``target_mask`` (N, ...) boolean marks the
    pixels of the target digit (rows without any True are skipped for the localisation share)."""
    r = res.relevance.reshape(res.relevance.shape[0], -1).astype(np.float64)
    f = res.explained.astype(np.float64)
    s = r.sum(axis=1)
    denom = np.abs(f).sum()
    cons = float(np.abs(s - f).sum() / denom) if denom > 0 else float("nan")
    corr = float(np.corrcoef(s, f)[0, 1]) if s.std() > 0 and f.std() > 0 else float("nan")
    absmass = np.abs(r).sum()
    neg = float(np.abs(r[r < 0]).sum() / absmass) if absmass > 0 else 0.0
    share = float("nan") if target_mask is None else target_share(r, target_mask)
    return MethodStats(method=res.method, backend=res.backend, conservation_error=cons, correlation=corr,
                       negative_mass=neg, min_relevance=float(r.min()), target_share=share,
                       mean_f=float(f.mean()), mean_sum_r=float(s.mean()))


def pick_rows(side: np.ndarray, n_show: int) -> list[int]:
    """Rows to display: ``n_show - n_show // 3`` images with a target digit, alternating target on the
    left and on the right, then images without one (first occurrences, so the choice is fixed)."""
    n_pos = n_show - n_show // 3
    left, right = list(np.flatnonzero(side == 0)), list(np.flatnonzero(side == 1))
    pos: list[int] = []
    while len(pos) < n_pos and (left or right):
        src = left if (len(pos) % 2 == 0 and left) or not right else right
        pos.append(int(src.pop(0)))
    neg = [int(i) for i in np.flatnonzero(side < 0)[:n_show - len(pos)]]
    return pos + neg


#: how the grids' column labels spell a method's name
DISPLAY_NAMES = {"w2": "w²"}


def panel_columns(results: dict[str, Explanation] | Sequence[str]) -> list[str]:
    """The column titles of :func:`heatmap_panel`: ``input``, then each method's display name."""
    return ["input", *(DISPLAY_NAMES.get(name, name) for name in results)]


def heatmap_panel(images: np.ndarray, results: dict[str, Explanation], cmap: str = "bwr", scale: int = 3,
                  rows: Sequence[int] | None = None, labels: bool = True) -> np.ndarray:
    """One RGB image: a row per input, columns = the input (grey) then each method's heatmap.

    ``images`` (N, H, W) in [0, 1]; each heatmap is scaled by its own ``max |R|`` (symmetric colour map,
    white = 0 with ``bwr``). With ``labels`` a header strip names the columns (:func:`panel_columns`).
    """
    idx = range(images.shape[0]) if rows is None else rows
    tiles = []
    for i in idx:
        tiles.append(hm.upscale(np.round(np.clip(images[i], 0, 1) * 255).astype(np.uint8), scale))
        for res in results.values():
            rel = res.relevance[i].reshape(images.shape[1:])
            tiles.append(hm.upscale(hm.to_rgb(rel, cmap=cmap), scale))
    return hm.grid(tiles, ncols=1 + len(results), pad=scale + 1, pad_value=128,
                   labels=panel_columns(results) if labels else None)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width text table of experiment rows (keys: steps, method, and MethodStats fields)."""
    head = (f"{'steps':>7} {'method':<12} {'backend':<7} {'f(x) mean':>9} {'sumR mean':>10} {'cons.err':>9} {'corr':>6} "
            f"{'neg.mass':>8} {'min R':>10} {'target':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['steps']:>7} {r['method']:<12} {r['backend']:<7} {r['mean_f']:>9.4f} {r['mean_sum_r']:>10.4g} "
                     f"{r['conservation_error']:>9.2e} {r['correlation']:>6.3f} {r['negative_mass']:>8.2%} "
                     f"{r['min_relevance']:>10.2e} {r['target_share']:>7.1%}")
    return "\n".join(lines)


def _scatter(path: Path, per_step: dict[int, dict[str, Explanation]]) -> str | None:
    """The paper's consistency figure: sum_p R_p against f(x), one panel per method (columns) and step
    count (rows), each test image a dot, the diagonal dashed (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(next(iter(per_step.values())))
    fig, axes = plt.subplots(len(per_step), len(names), figsize=(2.6 * len(names), 2.3 * len(per_step)),
                             squeeze=False)
    for r, (steps, results) in enumerate(per_step.items()):
        for c, name in enumerate(names):
            ax = axes[r, c]
            res = results[name]
            s = res.relevance.reshape(res.relevance.shape[0], -1).sum(axis=1)
            ax.scatter(res.explained, s, s=4, alpha=0.6, color="tab:red" if name == "sensitivity" else "tab:blue")
            lim = max(float(np.max(res.explained)), float(np.max(s)), 1e-6) * 1.05
            ax.plot([0, lim], [0, lim], color="grey", lw=0.8, ls="--")
            ax.set_xlim(0, lim)
            ax.set_ylim(0, lim)
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(name)
            if c == 0:
                ax.set_ylabel(f"{steps} steps\nsum_p R_p", fontsize=8)
            if r == len(per_step) - 1:
                ax.set_xlabel("f(x)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def _json_safe(obj: Any) -> Any:
    """``obj`` with NumPy scalars/arrays as Python values and NaN/Inf as None, for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _warn_stderr(msg: str) -> None:
    print(f"deeptaylor: warning: {msg}", file=sys.stderr)


def dead_network_warning(steps: int, f: np.ndarray, lr: float | None = None) -> str | None:
    """A one-line warning if the network's output ``f`` is 0 on every test image (all ReLUs dead), else None."""
    f = np.asarray(f)
    if f.size == 0 or np.any(f != 0):
        return None
    hint = f" (learning rate {lr:g} too large?)" if lr is not None else ""
    return (f"after {steps} steps f(x) = 0 on all {f.size} test images: every hidden ReLU is dead{hint}; "
            "conservation, correlation and target share are undefined (nan in the table, null in results.json)")


def detection_sets(mnist: str | os.PathLike[str] | None, n_train: int, n_test: int, seed: int,
                   positive_fraction: float | None, hint: str = "") -> tuple[Any, Any, Path]:
    """The 28x56 detection task's training and test sets (:func:`deeptaylor.datasets.mnist_detection`)
    from the real MNIST in ``mnist`` (default :func:`deeptaylor.datasets.find_mnist`), seeded with
    ``seed + 1`` and ``seed + 2``; returns ``(train, test, directory)``. Raises :class:`~deeptaylor.errors.InputError` (with ``hint``
    appended) when MNIST is not found."""
    from . import datasets as ds
    from .errors import InputError

    directory = Path(mnist) if mnist is not None else ds.find_mnist()
    if directory is None:
        raise InputError("MNIST not found: pass --mnist DIR (the directory with train-images-idx3-ubyte.gz "
                         "etc.) or set DEEPTAYLOR_MNIST" + hint)
    xi, yi = ds.load_mnist(directory, "train")
    xt, yt = ds.load_mnist(directory, "test")
    train_set = ds.mnist_detection(xi, yi, n_train, seed=seed + 1, positive_fraction=positive_fraction)
    test_set = ds.mnist_detection(xt, yt, n_test, seed=seed + 2, positive_fraction=positive_fraction)
    return train_set, test_set, directory


def run_mnist_detection(out: str | os.PathLike[str], steps: Sequence[int] = DEFAULT_STEPS,
                        mnist: str | os.PathLike[str] | None = None, seed: int = 0, backend: str = "auto",
                        n_train: int = 60000, n_test: int = 1000, n_show: int = 6, lr: float = 0.005,
                        positive_fraction: float | None = 0.5, progress: bool = True, save_model: bool = True,
                        log: Callable[[str], None] = print,
                        warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the detection net once, snapshotting after each of ``steps``, and explain fixed test images.

    Parameters
    ----------
    out : directory for the figures (created): ``steps_<k>.png`` per step count, ``scatter.png``
        (with matplotlib), ``results.json``, ``table.txt``, ``train_log.txt`` and (``save_model``) the
        final ``detection_<k>.npz``
    steps : step counts to report (minibatches of 20); the paper trains 300,000
    mnist : directory of the MNIST IDX files (default: :func:`deeptaylor.datasets.find_mnist`)
    seed : seeds the data sets (``seed + 1``, ``seed + 2``) and the training run (``seed``)
    backend : ``"auto"`` (the compiled engine; per method the NumPy reference where it cannot run, with a
        :class:`~deeptaylor.errors.BackendFallbackWarning`), ``"cpu"`` or ``"numpy"``
    n_train / n_test : sizes of the generated training set (from MNIST train) and test set (from t10k)
    n_show : test images in each PNG grid (see :func:`pick_rows`)
    lr : SGD learning rate
    positive_fraction : share of images with a target digit in both sets (exact; default half), or None
        for "natural" sampling (any digit next to a distractor; see :func:`deeptaylor.datasets.mnist_detection`)
    log : prints progress and the table (default ``print``)
    warn : prints warnings (default: ``deeptaylor: warning: ...`` on stderr), e.g. when the network's
        output is 0 on every test image at a step count (all ReLUs dead, as with a too large ``lr``)

    Returns
    -------
    dict with ``rows`` (one per step count and method), ``files``, ``log`` (training log rows),
    ``accuracy`` (test accuracy per step count), ``columns`` (of the PNG grids) and ``warnings``.
    ``results.json`` holds the same, as strict JSON: undefined numbers (NaN) are ``null``.
    """
    emit = warn if warn is not None else _warn_stderr

    from . import train as tr
    from .errors import InputError
    from .io import save

    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0:
        raise InputError(f"steps must be non-negative ints, got {steps}")
    out_dir = Path(out)
    t0 = time.perf_counter()
    train_set, test_set, directory = detection_sets(mnist, n_train, n_test, seed, positive_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    show = pick_rows(test_set.side, n_show)
    sampling = "natural sampling" if positive_fraction is None else f"{positive_fraction:.0%} with a target digit"
    log(f"data: {n_train} training and {n_test} test images of 28x56 from {directory}, {sampling} "
        f"(train {train_set.labels.mean():.1%}, test {test_set.labels.mean():.1%}) "
        f"({time.perf_counter() - t0:.1f} s)")
    t1 = time.perf_counter()
    result = tr.train_detection(train_set.flat(), train_set.labels, steps[-1], seed=seed, lr=lr,
                                checkpoints=steps, log_every=max(1, min(1000, max(steps[-1], 1) // 10)),
                                val=(test_set.flat(), test_set.labels), progress=progress)
    log(f"training: {steps[-1]} SGD steps of batch 20 in {time.perf_counter() - t1:.1f} s")
    x_test = test_set.flat().astype(np.float64)
    mask = test_set.target_mask()
    rows: list[dict[str, Any]] = []
    files: list[str] = []
    per_step: dict[int, dict[str, Explanation]] = {}
    accuracy: dict[int, float] = {}
    warnings: list[str] = []
    for k in steps:
        net = result.snapshots[k]
        accuracy[k] = tr.detection_accuracy(net, x_test, test_set.labels)
        results = explain_methods(net, x_test, backend)
        per_step[k] = results
        dead = dead_network_warning(k, next(iter(results.values())).explained, lr)
        if dead:
            warnings.append(dead)
            emit(dead)
        for name, res in results.items():
            st = method_stats(res, mask)
            row = {"steps": k, "accuracy": accuracy[k], **asdict(st)}
            row["method"] = name
            rows.append(row)
        panel = heatmap_panel(test_set.images, results, rows=show)
        files.append(hm.save_png(out_dir / f"steps_{k:06d}.png", panel))
    scatter = _scatter(out_dir / "scatter.png", per_step)
    if scatter:
        files.append(scatter)
    else:
        log("scatter plot skipped (matplotlib not installed: pip install 'deeptaylor[plot]')")
    table = format_table(rows)
    acc = "  ".join(f"{k}: {a:.1%}" for k, a in accuracy.items())
    notes = "".join(f"warning: {w}\n" for w in warnings)
    (out_dir / "table.txt").write_text(table + f"\n\ntest accuracy (f(x) > 0.5 <=> target present) {acc}\n"
                                       + notes)
    (out_dir / "train_log.txt").write_text(str(result.log) + "\n")
    files += [str(out_dir / "table.txt"), str(out_dir / "train_log.txt")]
    if save_model:
        mpath = out_dir / f"detection_{steps[-1]}.npz"
        save(result.net, mpath)
        files.append(str(mpath))
    summary = {"steps": steps, "seed": seed, "n_train": n_train, "n_test": n_test, "lr": lr,
               "positive_fraction": positive_fraction,
               "accuracy": {str(k): v for k, v in accuracy.items()}, "rows": rows,
               "log": result.log.rows(), "files": files, "shown_test_images": [int(i) for i in show],
               "columns": panel_columns(METHODS),
               "warnings": warnings, "seconds": time.perf_counter() - t0}
    (out_dir / "results.json").write_text(json.dumps(_json_safe(summary), indent=1, allow_nan=False))
    files.append(str(out_dir / "results.json"))
    log(table)
    log(f"test accuracy: {acc}")
    log(f"steps_<k>.png: one row per shown test image (those with a target digit first, alternately left and "
        f"right, then those without); columns: {' | '.join(['input', *METHODS])}")
    return summary
