"""The paper's deep-network experiment (Montavon et al. 2017, Pattern Recognition 65, arXiv 1512.02479,
Sec. 5; slides 003 "Application to Deep Networks"), end to end.

A deeper detection-pooling network with p-norm pooling (:func:`deeptaylor.relevance_models.training_free_network`)
is trained with :func:`deeptaylor.train.train_network` on the 28x56 detection task of
:func:`deeptaylor.datasets.mnist_detection` (a digit 0-3 beside a distractor 4-9), and the same test
images are explained with

* ``sensitivity`` - ``(df/dx)^2`` (:class:`deeptaylor.methods.Sensitivity`);
* ``taylor`` - first-order Taylor decomposition at the nearest root point in the pixel box [0, 1]
  (:class:`deeptaylor.methods.Taylor`, ``root="nearest"``), on the first ``n_taylor`` test images
  (the root search costs tens of gradient passes per image);
* ``min_max`` - the min-max relevance model (:class:`deeptaylor.relevance_models.MinMax`) of the
  relevance of the 32 pooled detectors of the second stage, with the relevance of the Dense layer
  above as context, fitted to the engine's z+ relevance and explained with z+ on the pixels (>= 0);
  z+ above;
  its detection units see 28x28 windows (stride 14), 4 per window and neuron;
* ``min_max_dense`` - the same model with 8 units per neuron that see the whole image (the ablation of
  the windows: about as good a fit, heatmaps not localised);
* ``training_free`` - the training-free relevance model (:func:`deeptaylor.composites.training_free`:
  zB on the first convolution, z+ above, p-norm pooling in proportion to its inputs);
* ``one_layer_dtd`` - the baseline the paper starts from: the one-layer 1568-400-1 detection network
  (:func:`deeptaylor.train.train_detection`, same data and number of steps) with the zB rule. It is a
  different network: its f(x) is not the deep network's.

Per method (``results.json`` under ``methods``): ``conservation_rel_err_median`` / ``_max`` (per
image ``|sum_p R_p - f(x)| / f(x)`` over the test images with ``f(x) > 0``), ``negative_mass`` (the
share of the heatmaps' absolute mass that is negative), ``sum_vs_output_corr`` (correlation of
``sum_p R_p`` with ``f(x)`` over the images), ``on_target_share`` (on images with a target digit, the
share of the positive relevance on the target's half; 0.5 = no preference), and more (``table.txt``
explains the columns). Used by ``deeptaylor experiment deep-mnist-detection`` and
``examples/deep_mnist_detection.py``; docs/experiments.md shows a run.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import heatmap as hm
from .errors import InputError

__all__ = [
    "ARCHITECTURE",
    "DEFAULTS",
    "METHOD_NAMES",
    "PAPER_STEPS",
    "consistency_figure",
    "consistency_stats",
    "run_deep_mnist_detection",
]

#: the deep network (arguments of :func:`deeptaylor.relevance_models.training_free_network`)
ARCHITECTURE: dict[str, Any] = {"input_shape": (1, 28, 56), "channels": (16, 32), "kernel_size": 5,
                                "pool": (2, None), "hidden": (32,), "p": 2.0, "top_p": 1.0}
#: the default schedule (a few minutes on 2 cores)
DEFAULTS: dict[str, Any] = {"steps": 3000, "n_train": 20000, "n_test": 1000, "n_taylor": 200, "lr": 0.01,
                            "momentum": 0.9, "minmax_train": 5000, "minmax_steps": 2000, "minmax_hidden": 4}
#: the min-max model's detection units see digit-sized windows: 28x28 at stride 14 (left half, middle,
#: right half), ``minmax_hidden`` units per window and modelled neuron (docs/experiments.md: with units
#: that see the whole image the fit is as good but the heatmaps are not localised)
MINMAX_TILE, MINMAX_TILE_STRIDE = (28, 28), (14, 14)
#: ``--paper``: the paper's 300,000 SGD steps of minibatches of 20 on 60,000 training images
PAPER_STEPS = 300000
#: the methods, in display order
METHOD_NAMES = ("sensitivity", "taylor", "min_max", "min_max_dense", "training_free", "one_layer_dtd")
#: the modelled value of the min-max model (relevance at the input of layer 6: the 32 pooled detectors
#: of the second stage) and its context (the output of the Dense layer above)
MINMAX_LAYER, MINMAX_CONTEXT = 6, 8


def consistency_stats(relevance: np.ndarray, f: np.ndarray, target_mask: np.ndarray | None = None) -> dict[str, Any]:
    """Conservation, positivity and localisation of heatmaps ``relevance`` (N, ...) of outputs ``f`` (N,).

    ``target_mask`` (N, ...) marks the target digit's half of each image (rows without one are skipped
    for ``on_target_share``). Relative conservation errors are over the images with ``f > 0`` (NaN
    when there is none); ``negative_mass`` = sum |R_p < 0| / sum |R_p|; ``negative_per_image`` =
    mean over images of ``-sum_p min(0, R_p)``.
    """
    r = np.asarray(relevance, dtype=np.float64).reshape(len(f), -1)
    f = np.asarray(f, dtype=np.float64)
    s = r.sum(axis=1)
    pos = f > 0
    rel = np.abs(s[pos] - f[pos]) / f[pos]
    from .experiment import target_share

    absmass = float(np.abs(r).sum())
    neg_per_image = -np.minimum(r, 0).sum(axis=1)
    neg = float(neg_per_image.sum())
    corr = float(np.corrcoef(s, f)[0, 1]) if s.std() > 0 and f.std() > 0 else float("nan")
    share = float("nan") if target_mask is None else target_share(r, target_mask)
    nan = float("nan")
    return {"conservation_rel_err_median": float(np.median(rel)) if rel.size else nan,
            "conservation_rel_err_p90": float(np.quantile(rel, 0.9)) if rel.size else nan,
            "conservation_rel_err_max": float(rel.max()) if rel.size else nan,
            "negative_mass": neg / absmass if absmass > 0 else 0.0,
            "sum_vs_output_corr": corr,
            "on_target_share": share,
            "negative_per_image": float(neg_per_image.mean()),
            "min_relevance": float(r.min()),
            "mean_f": float(f.mean()), "mean_sum_r": float(s.mean()),
            "n_images": int(len(f)), "n_positive_output": int(pos.sum())}


def consistency_figure(path: str | os.PathLike[str], results: dict[str, tuple[np.ndarray, np.ndarray]],
                       title: str | None = None) -> str | None:
    """The paper's consistency plots, one column per method: ``sum_p R_p`` against ``f(x)`` (top; the
    dashed line is conservation) and the negative relevance ``-sum_p min(0, R_p)`` against ``f(x)``
    (bottom). ``results``: name -> (relevance (N, ...), f (N,)). Needs matplotlib (else None)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(2.7 * len(names), 5.0), squeeze=False)
    for c, name in enumerate(names):
        rel, f = results[name]
        r = np.asarray(rel, dtype=np.float64).reshape(len(f), -1)
        s, neg = r.sum(axis=1), -np.minimum(r, 0).sum(axis=1)
        colour = "tab:red" if name == "sensitivity" else "tab:blue"
        top, bottom = axes[0, c], axes[1, c]
        top.scatter(f, s, s=4, alpha=0.6, color=colour)
        lim = max(float(np.max(f)), float(np.max(s)), 1e-6) * 1.05
        low = min(0.0, float(np.min(s)) * 1.05)
        top.plot([0, lim], [0, lim], color="grey", lw=0.8, ls="--")
        top.set_xlim(0, max(float(np.max(f)), 1e-6) * 1.05)
        top.set_ylim(low, lim)
        top.set_title(name, fontsize=9)
        bottom.scatter(f, neg, s=4, alpha=0.6, color=colour)
        bottom.set_xlim(0, max(float(np.max(f)), 1e-6) * 1.05)
        bottom.set_ylim(-0.05 * max(float(np.max(neg)), 1e-6), max(float(np.max(neg)), 1e-6) * 1.1)
        bottom.set_xlabel("f(x)", fontsize=8)
        for ax in (top, bottom):
            ax.tick_params(labelsize=7)
        if c == 0:
            top.set_ylabel("sum_p R_p", fontsize=8)
            bottom.set_ylabel("-sum_p min(0, R_p)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)


def _table(methods: dict[str, dict[str, Any]]) -> str:
    head = (f"{'method':<14} {'network':<9} {'backend':<11} {'images':>6} {'f(x) mean':>9} {'sumR mean':>10} "
            f"{'rel.err med':>11} {'rel.err max':>11} {'corr':>6} {'neg.mass':>8} {'target':>7}")
    lines = [head, "-" * len(head)]
    for name, m in methods.items():
        lines.append(f"{name:<14} {m['network']:<9} {m['backend']:<11} {m['n_images']:>6} {m['mean_f']:>9.4f} "
                     f"{m['mean_sum_r']:>10.4g} {m['conservation_rel_err_median']:>11.2e} "
                     f"{m['conservation_rel_err_max']:>11.2e} {m['sum_vs_output_corr']:>6.3f} "
                     f"{m['negative_mass']:>8.2%} {m['on_target_share']:>7.1%}")
    return "\n".join(lines)


TABLE_NOTE = """columns: rel.err = |sum_p R_p - f(x)| / f(x) per image (median, max over the images with f(x) > 0);
corr = correlation of sum_p R_p with f(x) over the images; neg.mass = share of the heatmaps' absolute mass that
is negative; target = on images with a target digit, share of the positive relevance on the target's half.
one_layer_dtd explains its own network (1568-400-1), the other methods the deep one."""


def run_deep_mnist_detection(out: str | os.PathLike[str], *, steps: int = DEFAULTS["steps"],
                             mnist: str | os.PathLike[str] | None = None, seed: int = 0, backend: str = "auto",
                             n_train: int = DEFAULTS["n_train"], n_test: int = DEFAULTS["n_test"],
                             n_taylor: int = DEFAULTS["n_taylor"], n_show: int = 6, lr: float = DEFAULTS["lr"],
                             momentum: float = DEFAULTS["momentum"], minmax_train: int = DEFAULTS["minmax_train"],
                             minmax_steps: int = DEFAULTS["minmax_steps"],
                             minmax_hidden: int = DEFAULTS["minmax_hidden"], minmax_dense: bool = True,
                             one_layer_lr: float = 0.005, positive_fraction: float | None = 0.5,
                             progress: bool = True, log: Callable[[str], None] = print,
                             warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the deep detection-pooling network, explain fixed test images with every method, write the
    figures, the table and ``results.json`` into ``out``.

    Parameters
    ----------
    out : directory (created): ``heatmaps.png`` (rows: test images, those with a target first; columns:
        input and each method), ``consistency.png`` (all methods) and ``consistency_<method>.png``
        (with matplotlib), ``table.txt``, ``train_log.txt``, ``results.json`` (strict JSON, undefined
        numbers ``null``) and the trained ``deep_network.npz``
    steps : SGD steps (minibatches of 20) of the deep network and of the one-layer baseline
    mnist : directory of the MNIST IDX files (default :func:`deeptaylor.datasets.find_mnist`)
    seed : seeds the data (``seed + 1`` train, ``seed + 2`` test), the weights and the minibatch orders
    backend : ``"auto"``, ``"cpu"`` or ``"numpy"``: where the network's passes run (the min-max model
        itself is NumPy)
    n_train, n_test : generated training images (from MNIST train) and test images (from t10k)
    n_taylor : test images explained with the Taylor method (the first ones; its root search is costly)
    n_show : test images in the heatmap grid (picked among the first ``n_taylor``)
    lr, momentum : SGD of the deep network
    minmax_train, minmax_steps, minmax_hidden : training images, Adam steps and detection units per
        window and modelled neuron of the min-max model
    minmax_dense : also fit and explain ``min_max_dense``, the min-max model without tiles (2 x
        ``minmax_hidden`` units per neuron, each seeing the whole image): the ablation of the tiles
    one_layer_lr : SGD learning rate of the one-layer baseline (the seeds' experiment's)
    positive_fraction : share of images with a target digit (exact; default half), or None for natural
        sampling (:func:`deeptaylor.datasets.mnist_detection`)
    progress : progress bars (tqdm)
    log, warn : where progress lines and warnings go (default ``print`` / stderr)

    Returns
    -------
    dict, as ``results.json``: ``methods`` (name -> the numbers of :func:`consistency_stats` plus
    ``backend``, ``network``, ``seconds``), ``training`` (logs, times, accuracies of the deep network,
    the one-layer baseline and the min-max fit), ``network``, ``config``, ``files``, ``warnings``,
    ``seconds``.
    """
    from . import composites, relevance_models, train
    from .explain import Explainer
    from .experiment import _json_safe, detection_sets, heatmap_panel, pick_rows
    from .io import save
    from .methods import Sensitivity
    from .rules import ZPlus

    emit = warn if warn is not None else (lambda m: print(f"deeptaylor: warning: {m}", file=sys.stderr))
    for name, value in (("steps", steps), ("n_train", n_train), ("n_test", n_test), ("n_taylor", n_taylor),
                        ("minmax_train", minmax_train), ("minmax_steps", minmax_steps),
                        ("minmax_hidden", minmax_hidden), ("n_show", n_show)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if name in (
                "steps", "minmax_steps", "n_taylor") else 1):
            raise InputError(f"{name} must be a {'non-negative' if name in ('steps', 'minmax_steps', 'n_taylor') else 'positive'} "
                             f"int, got {value!r}")
    out_dir = Path(out)
    t0 = time.perf_counter()
    train_set, test_set, directory = detection_sets(
        mnist, n_train, n_test, seed, positive_fraction,
        " (the bundled 300-digit sample is too small to train the deep network on)")
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train = train_set.images[:, None]
    x_test = test_set.images[:, None]
    mask = test_set.target_mask()
    n_taylor = min(n_taylor, n_test)
    log(f"data: {n_train} training and {n_test} test images of 28x56 from {directory} "
        f"({time.perf_counter() - t0:.1f} s)")
    warn_list: list[str] = []
    files: list[str] = []

    # -- the deep network -------------------------------------------------------------------------
    t1 = time.perf_counter()
    net0 = relevance_models.training_free_network(**ARCHITECTURE, seed=seed)
    net0 = relevance_models.rescale_output(net0, x_train[:min(500, n_train)], mean=0.5)
    deep = train.train_network(net0, x_train, train_set.labels, steps, lr=lr, momentum=momentum, seed=seed,
                               log_every=max(1, min(500, max(steps, 1) // 6)), val=(x_test, test_set.labels),
                               progress=progress)
    net = deep.net
    t_deep = time.perf_counter() - t1
    acc_deep = _accuracy(Explainer(net, composites.training_free(), backend=backend), x_test, test_set.labels)
    log(f"deep network: {steps} SGD steps of batch 20 in {t_deep:.1f} s, test accuracy {acc_deep:.1%}")
    t1 = time.perf_counter()
    one = train.train_detection(train_set.flat(), train_set.labels, steps, seed=seed, lr=one_layer_lr,
                                log_every=max(1, min(500, max(steps, 1) // 6)),
                                val=(test_set.flat(), test_set.labels), progress=progress)
    t_one = time.perf_counter() - t1
    acc_one = train.detection_accuracy(one.net, test_set.flat(), test_set.labels)
    log(f"one-layer baseline: {steps} SGD steps in {t_one:.1f} s, test accuracy {acc_one:.1%}")

    # -- the min-max model ------------------------------------------------------------------------
    t1 = time.perf_counter()
    mm = relevance_models.MinMax(net, ARCHITECTURE["input_shape"], MINMAX_LAYER, hidden=minmax_hidden,
                                 context=MINMAX_CONTEXT, rule=ZPlus(), tile=MINMAX_TILE,
                                 tile_stride=MINMAX_TILE_STRIDE, seed=seed)
    m_train = min(minmax_train, n_train)
    targets = mm.upper_relevance(x_train[:m_train], backend=backend)
    val_targets = mm.upper_relevance(x_test, backend=backend)
    fit = mm.fit(x_train[:m_train], targets=targets, val=(x_test, val_targets), steps=minmax_steps,
                 log_every=max(1, min(250, max(minmax_steps, 1) // 8)), progress=progress)
    t_mm = time.perf_counter() - t1
    log(f"min-max model: {mm.n_out} neurons x {mm.v.shape[2]} detection units fitted on {m_train} images "
        f"({minmax_steps} Adam steps) in {t_mm:.1f} s")

    # -- explanations -----------------------------------------------------------------------------
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    extras: dict[str, dict[str, Any]] = {}

    def run(name: str, network: Any, method: Any, x: np.ndarray) -> None:
        t = time.perf_counter()
        results[name] = Explainer(network, method, backend=backend).explain(x)
        seconds[name] = time.perf_counter() - t

    run("sensitivity", net, Sensitivity(), x_test)
    try:
        from .methods import Taylor
    except ImportError:   # pragma: no cover - the method ships with the library
        Taylor = None
    if Taylor is not None and n_taylor > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # a failed root search is recorded per image (extras)
            run("taylor", net, Taylor(root="nearest", box=(0.0, 1.0), on_failure="ignore"), x_test[:n_taylor])
        ext = results["taylor"].extras
        extras["taylor"] = {"root_found_share": float(np.mean(ext["root_found"])),
                            "iterations_median": float(np.median(ext["iterations"])),
                            "residual_over_f_median": float(np.median(
                                np.abs(ext["residual"]) / np.maximum(np.abs(results["taylor"].explained), 1e-300)))}
    elif n_taylor > 0:
        msg = "dt.methods.Taylor is not available: the taylor column is left out"
        warn_list.append(msg)
        emit(msg)
    fits = {"min_max": (mm, fit, t_mm)}
    if minmax_dense:   # the ablation: detection units that see the whole image
        t1 = time.perf_counter()
        dense = relevance_models.MinMax(net, ARCHITECTURE["input_shape"], MINMAX_LAYER, hidden=2 * minmax_hidden,
                                        context=MINMAX_CONTEXT, rule=ZPlus(), seed=seed)
        dfit = dense.fit(x_train[:m_train], targets=targets, val=(x_test, val_targets), steps=minmax_steps,
                         log_every=max(1, min(250, max(minmax_steps, 1) // 8)), progress=progress)
        fits["min_max_dense"] = (dense, dfit, time.perf_counter() - t1)
        log(f"min-max model without tiles: {dense.n_out} neurons x {dense.v.shape[2]} units seeing the whole "
            f"image, fitted in {fits['min_max_dense'][2]:.1f} s")
    for name, (model, _, _) in fits.items():
        run(name, net, model.composite(), x_test)
        r_hat = model.predict(x_test, val_targets.context)[0]
        extras[name] = {
            "r_hat_vs_engine_rel_rmse": float(np.sqrt(np.mean((r_hat - val_targets.relevance) ** 2)
                                                      / np.mean(val_targets.relevance ** 2))),
            "explanation_sum_minus_r_hat_max": float(np.max(np.abs(
                results[name].relevance.reshape(n_test, -1).sum(axis=1) - r_hat.sum(axis=1))))}
    run("training_free", net, composites.training_free(0.0, 1.0), x_test)
    run("one_layer_dtd", one.net, composites.deep_taylor(0.0, 1.0), test_set.flat())

    methods: dict[str, dict[str, Any]] = {}
    for name, res in results.items():
        n = res.relevance.shape[0]
        st = consistency_stats(res.relevance, res.explained, mask[:n])
        st.update(backend=res.backend, network="one-layer" if name == "one_layer_dtd" else "deep",
                  seconds=seconds[name], **extras.get(name, {}))
        methods[name] = st
        if not np.any(res.explained > 0):
            msg = f"{name}: f(x) = 0 on every test image (dead network?); the relative errors are undefined"
            warn_list.append(msg)
            emit(msg)

    # -- figures and files -------------------------------------------------------------------------
    show = pick_rows(test_set.side[:max(n_taylor, 1)] if "taylor" in results else test_set.side, n_show)
    panel = heatmap_panel(test_set.images, {k: v for k, v in results.items()}, rows=show)
    files.append(hm.save_png(out_dir / "heatmaps.png", panel))
    pairs = {k: (v.relevance, v.explained) for k, v in results.items()}
    fig = consistency_figure(out_dir / "consistency.png", pairs)
    if fig:
        files.append(fig)
        for k, v in pairs.items():
            files.append(str(consistency_figure(out_dir / f"consistency_{k}.png", {k: v})))
    else:
        log("consistency plots skipped (matplotlib not installed: pip install 'deeptaylor[plot]')")
    table = _table(methods)
    acc = f"test accuracy: deep network {acc_deep:.1%}, one-layer baseline {acc_one:.1%}"
    (out_dir / "table.txt").write_text(table + "\n\n" + TABLE_NOTE + "\n" + acc + "\n"
                                       + "".join(f"warning: {w}\n" for w in warn_list))
    (out_dir / "train_log.txt").write_text(f"deep network\n{deep.log}\n\none-layer baseline\n{one.log}\n\n"
                                           + "".join(f"{name}\n{f}\n\n" for name, (_, f, _) in fits.items()))
    files += [str(out_dir / "table.txt"), str(out_dir / "train_log.txt")]
    mpath = out_dir / "deep_network.npz"
    save(net, mpath)
    files.append(str(mpath))
    summary: dict[str, Any] = {
        "experiment": "deep-mnist-detection",
        "methods": methods,
        "training": {
            "deep": {"log": deep.log.rows(), "seconds": t_deep, "test_accuracy": acc_deep, "steps": steps,
                     "lr": lr, "momentum": momentum, "batch_size": 20},
            "one_layer": {"log": one.log.rows(), "seconds": t_one, "test_accuracy": acc_one, "steps": steps,
                          "lr": one_layer_lr, "batch_size": 20},
            **{name: {"log": f.rows(), "seconds": t, "train_images": m_train, "steps": minmax_steps,
                      "layer": model.layer, "context": model.context, "neurons": model.n_out,
                      "units_per_neuron": int(model.v.shape[2]),
                      "tile": list(MINMAX_TILE) if model.mask is not None else None,
                      "tile_stride": list(MINMAX_TILE_STRIDE) if model.mask is not None else None,
                      "rule": repr(model.rule)} for name, (model, f, t) in fits.items()},
        },
        "network": {"architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCHITECTURE.items()},
                    "layers": [repr(layer) for layer in net.layers]},
        "config": {"seed": seed, "n_train": n_train, "n_test": n_test, "n_taylor": n_taylor,
                   "positive_fraction": positive_fraction,
                   "backend": backend, "mnist": str(directory)},
        "shown_test_images": show,
        "columns": ["input", *results],
        "warnings": warn_list,
        "files": files,
        "seconds": time.perf_counter() - t0,
    }
    (out_dir / "results.json").write_text(json.dumps(_json_safe(summary), indent=1, allow_nan=False))
    files.append(str(out_dir / "results.json"))
    log(table)
    log(acc)
    log(f"heatmaps.png: one row per shown test image (with a target digit first, then without); columns: "
        f"{' | '.join(['input', *results])}")
    return summary


def _accuracy(explainer: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Share of images where ``f(x) > 0.5`` agrees with the label (the forward pass on the explainer's
    backend, chunks of 500)."""
    out = explainer.forward(x, batch_size=500)[:, 0]
    return float(np.mean((out > 0.5) == (np.asarray(y) > 0.5)))
