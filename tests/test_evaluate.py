"""Faithfulness evaluation (deeptaylor.evaluate): pixel flipping and region perturbation against direct
loops of single forward passes, the removal count, the MoRF/LERF mirror on a linear model, reuse of
unchanged steps, chunking, compare(), the CLI, and bad input; both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import evaluate as ev


def _conv_net(rng: np.random.Generator) -> dt.Sequential:
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3) * 0.1, padding=1), dt.ReLU(),
        dt.MaxPool2d(2), dt.Flatten(), dt.Dense(rng.normal(size=(4, 3 * 3 * 3)), rng.normal(size=4) * 0.1)])


@pytest.fixture
def case():
    """A fixed tiny case: 3 images 2x6x7 (odd sizes), a conv net with 4 outputs, a signed heatmap."""
    rng = np.random.default_rng(3)
    net = _conv_net(rng)
    x = rng.uniform(0, 1, size=(3, 2, 6, 7))
    x[:, :, :2, :] = 0.0                       # a black band: steps there change nothing for baseline 0
    rel = rng.normal(size=x.shape)
    return net, x, rel, np.array([1, 0, 3])


def _loop_curves(net, x, rel, t, steps, per_step, order, base, seed=0):
    """The definition, one forward pass per perturbed image (float64 reference)."""
    n, c, h, w = x.shape
    pos = rel.reshape(n, c, -1).sum(1)
    curves = np.zeros((n, steps + 1))
    for i in range(n):
        if order == "random":
            perm = np.random.default_rng(seed).permuted(np.tile(np.arange(h * w), (n, 1)), axis=1)[i]
        else:
            perm = np.argsort(-pos[i] if order == "morf" else pos[i], kind="stable")
        for k in range(steps + 1):
            xi = x[i].reshape(c, -1).copy()
            idx = perm[:k * per_step]
            xi[:, idx] = base[i].reshape(c, -1)[:, idx] if np.ndim(base) else base
            curves[i, k] = dt.reference.forward(net, xi.reshape(1, c, h, w))[0, t[i]]
    return curves


@pytest.mark.parametrize("order", ["morf", "lerf", "random"])
def test_pixel_flipping_equals_direct_loop(case, backend, order):
    net, x, rel, t = case
    res = ev.pixel_flipping(net, x, rel, t, steps=9, features_per_step=4, order=order, baseline=0.25,
                            backend=backend, seed=5)
    ref = _loop_curves(net, x, rel, t, 9, 4, order, 0.25, seed=5)
    assert res.curves.shape == (3, 10) and res.aopc.shape == (3,)
    tol = 1e-12 if backend == "numpy" else 1e-5
    np.testing.assert_allclose(res.curves, ref, rtol=tol, atol=tol * np.abs(ref).max())
    np.testing.assert_allclose(res.aopc, (ref[:, :1] - ref).mean(1), rtol=tol, atol=tol * np.abs(ref).max())
    np.testing.assert_array_equal(res.removed, np.minimum(np.arange(10) * 4, 42))
    np.testing.assert_array_equal(res.target, t)


@pytest.mark.parametrize("baseline", ["mean", "uniform", "array"])
def test_pixel_flipping_baselines_and_channel_sum(case, baseline):
    """(N, H, W) relevance = x-shaped relevance summed over channels; the three baselines by hand."""
    net, x, rel, t = case
    if baseline == "mean":
        base = np.broadcast_to(x.mean(axis=(1, 2, 3))[:, None, None, None], x.shape)
    elif baseline == "uniform":
        lo, hi = x.min(axis=(1, 2, 3), keepdims=True), x.max(axis=(1, 2, 3), keepdims=True)
        base = lo + (hi - lo) * np.random.default_rng(2).random(x.shape)   # morf draws nothing before it
    else:
        base = np.broadcast_to(np.linspace(-1, 1, 84).reshape(2, 6, 7), x.shape)
    arg = base[0] if baseline == "array" else baseline
    res = ev.pixel_flipping(net, x, rel.sum(axis=1), t, steps=5, features_per_step=3, baseline=arg, seed=2,
                            backend="numpy")
    ref = _loop_curves(net, x, rel, t, 5, 3, "morf", base)
    np.testing.assert_allclose(res.curves, ref, rtol=1e-12, atol=1e-12)


def test_ties_broken_by_position_index(backend):
    """Equal relevance everywhere: MoRF and LERF both replace positions 0, 1, 2, ... in index order.
    A linear model with weight 2**p on position p shows which positions went."""
    p = 6
    net = dt.Sequential([dt.Dense(2.0 ** np.arange(p)[None], np.zeros(1))])
    x = np.ones((1, p))
    for order in ("morf", "lerf"):
        res = ev.pixel_flipping(net, x, np.zeros((1, p)), 0, order=order, backend=backend)
        removed = np.cumsum(np.r_[0, 2.0 ** np.arange(p)])
        np.testing.assert_allclose(res.curves[0], 63 - removed)


def test_removal_count_is_monotone(backend):
    """x = 1, baseline 0, all weights 1 (2 channels): f(x^(k)) = 2 (P - replaced positions), so the
    curve reads the count: min(k * features_per_step, P) positions, in all channels."""
    net = dt.Sequential([dt.Flatten(), dt.Dense(np.ones((1, 2 * 4 * 5)), np.zeros(1))])
    x = np.ones((2, 2, 4, 5))
    rel = np.random.default_rng(0).normal(size=(2, 4, 5))
    res = ev.pixel_flipping(net, x, rel, 0, features_per_step=3, backend=backend)
    assert res.curves.shape == (2, 8)                                 # ceil(20 / 3) = 7 steps
    replaced = (40 - res.curves) / 2
    np.testing.assert_allclose(replaced, np.broadcast_to(np.minimum(np.arange(8) * 3, 20), (2, 8)))
    assert np.all(np.diff(replaced, axis=1) > 0)


def test_morf_lerf_mirror_on_linear_model(backend):
    """f(x) = w.x, relevance = w * (x - b), the exact contributions: MoRF removes the largest first,
    LERF the smallest, and morf[k] + lerf[P - k] = f(x) + f(b) for every k; AOPC morf >= any order."""
    rng = np.random.default_rng(4)
    p = 12
    w = rng.normal(size=(1, p))
    net = dt.Sequential([dt.Dense(w, np.zeros(1))])
    x = rng.normal(size=(3, p))
    rel = w * (x - 0.5)
    morf = ev.pixel_flipping(net, x, rel, 0, order="morf", baseline=0.5, backend=backend)
    lerf = ev.pixel_flipping(net, x, rel, 0, order="lerf", baseline=0.5, backend=backend)
    rand = ev.pixel_flipping(net, x, None, 0, order="random", baseline=0.5, backend=backend)
    f0 = x @ w[0]
    fb = 0.5 * w.sum()
    tol = 1e-10 if backend == "numpy" else 1e-5
    np.testing.assert_allclose(morf.curves + lerf.curves[:, ::-1], (f0 + fb)[:, None] + 0 * morf.curves,
                               atol=tol * 10)
    expected = f0[:, None] - np.concatenate([np.zeros((3, 1)), np.cumsum(-np.sort(-rel, axis=1), 1)], 1)
    np.testing.assert_allclose(morf.curves, expected, atol=tol * 10)
    assert np.all(morf.aopc >= rand.aopc - tol) and np.all(rand.aopc >= lerf.aopc - tol)


def _loop_regions(net, x, rel, t, k, steps, order, base):
    n, c, h, w = x.shape
    oy, ox = ((-h) % k) // 2, ((-w) % k) // 2
    cells = [(i, j) for i in range(-(-(h + (-h) % k) // k)) for j in range(-(-(w + (-w) % k) // k))]
    boxes = [(slice(max(0, i * k - oy), max(0, (i + 1) * k - oy)), slice(max(0, j * k - ox), max(0, (j + 1) * k - ox)))
             for i, j in cells]
    curves = np.zeros((n, steps + 1))
    for s in range(n):
        sums = np.array([rel[s][:, a, b].sum() for a, b in boxes])
        perm = np.argsort(-sums if order == "morf" else sums, kind="stable")
        for step in range(steps + 1):
            xi = x[s].copy()
            for r in perm[:step]:
                xi[:, boxes[r][0], boxes[r][1]] = base
            curves[s, step] = dt.reference.forward(net, xi[None])[0, t[s]]
    return curves


@pytest.mark.parametrize(("k", "order"), [(4, "morf"), (3, "lerf"), (2, "morf")])
def test_region_perturbation_equals_direct_loop(case, backend, k, order):
    net, x, rel, t = case
    res = ev.region_perturbation(net, x, rel, t, region_size=k, order=order, baseline=-0.5, backend=backend)
    gy, gx = -(-6 // k), -(-7 // k)
    assert res.units == gy * gx and res.curves.shape == (3, gy * gx + 1)
    ref = _loop_regions(net, x, rel, t, k, gy * gx, order, -0.5)
    tol = 1e-12 if backend == "numpy" else 1e-5
    np.testing.assert_allclose(res.curves, ref, rtol=tol, atol=tol * np.abs(ref).max())


def test_reuse_and_chunking_do_not_change_curves(case, backend):
    """Baseline 0 on the black band: those steps are not rerun, and their values are the previous
    ones; every batch size gives the same curves."""
    net, x, rel, t = case
    full = ev.pixel_flipping(net, x, rel, t, baseline=0.0, reuse_unchanged=False, backend=backend)
    reused = ev.pixel_flipping(net, x, rel, t, baseline=0.0, backend=backend)
    assert full.evaluated == 3 * 43 and reused.evaluated == 3 * (1 + 28)   # 14 of 42 pixels are black
    # the compiled engine computes each image alone (bitwise equal); BLAS may block batches differently
    same = np.testing.assert_array_equal if backend == "cpu" else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12))
    same(reused.curves, full.curves)
    for bs in (1, 7):
        same(ev.pixel_flipping(net, x, rel, t, baseline=0.0, batch_size=bs, backend=backend).curves, reused.curves)


def test_accepts_explanation_explainer_and_torch_free_inputs(case):
    net, x, _, _ = case
    ex = dt.Explainer(net, dt.composites.epsilon_plus(), backend="numpy")
    res = ex.explain(x)
    a = ev.pixel_flipping(ex, x, res, steps=4, features_per_step=2)
    b = ev.pixel_flipping(net, x, res.relevance, res.target, steps=4, features_per_step=2, backend="numpy")
    np.testing.assert_array_equal(a.target, res.target)
    np.testing.assert_allclose(a.curves, b.curves, rtol=1e-12)
    assert "pixel_flipping" in repr(a) and a.mean_curve.shape == (5,) and np.isfinite(a.mean_aopc)


def test_compare_methods(case):
    net, x, _, _ = case
    out = ev.compare(net, x, ["epsilon-plus", "sensitivity", "occlusion", "random"], steps=6,
                     features_per_step=3, backend="numpy")
    assert list(out) == ["epsilon-plus", "sensitivity", "occlusion", "random"]
    assert all(r.curves.shape == (3, 7) for r in out.values())
    assert out["random"].order == "random" and out["sensitivity"].order == "morf"
    reg = ev.compare(net, x, {"z": dt.composites.epsilon_plus()}, measure="region-perturbation", region_size=3,
                     backend="numpy")
    assert reg["z"].kind == "region_perturbation"
    with pytest.raises(dt.InputError, match="unknown method"):
        ev.compare(net, x, ["no-such-method"])


def test_bad_input(case):
    net, x, rel, t = case
    pf = ev.pixel_flipping
    with pytest.raises(dt.InputError, match="steps"):
        pf(net, x, rel, t, steps=0)
    with pytest.raises(dt.InputError, match="steps"):
        pf(net, x, rel, t, steps=-3)
    with pytest.raises(dt.InputError, match="steps=50 is more"):
        pf(net, x, rel, t, steps=50)
    with pytest.raises(dt.InputError, match="features_per_step"):
        pf(net, x, rel, t, features_per_step=0)
    with pytest.raises(dt.ShapeError, match="relevance has shape"):
        pf(net, x, rel[:, :, :5], t)
    with pytest.raises(dt.ShapeError, match="relevance has shape"):
        pf(net, x, rel[:2], t)
    with pytest.raises(dt.InputError, match="NaN"):
        pf(net, x, np.full(x.shape, np.nan), t)
    with pytest.raises(dt.InputError, match="order"):
        pf(net, x, rel, t, order="best")
    with pytest.raises(dt.InputError, match="needs a relevance"):
        pf(net, x, None, t)
    with pytest.raises(dt.InputError, match="target"):
        pf(net, x, rel, 7)
    with pytest.raises(dt.ShapeError, match="baseline"):
        pf(net, x, rel, t, baseline=np.zeros(3))
    with pytest.raises(dt.InputError, match="baseline"):
        pf(net, x, rel, t, baseline="black")
    with pytest.raises(dt.ShapeError):
        pf(net, x[:, :1], rel[:, :1], t)
    with pytest.raises(dt.InputTypeError, match="model"):
        pf("net.npz", x, rel, t)
    with pytest.raises(dt.ShapeError, match="image input"):
        ev.region_perturbation(dt.Sequential([dt.Dense(np.ones((1, 4)), np.zeros(1))]), np.ones((2, 4)),
                               np.ones((2, 4)))
    with pytest.raises(dt.InputError, match="region_size"):
        ev.region_perturbation(net, x, rel, t, region_size=0)
    with pytest.raises(dt.InputError, match="region_size 8"):
        ev.region_perturbation(net, x, rel, t, region_size=8)


def test_cli_evaluate(tmp_path, capsys):
    from deeptaylor.cli import main

    rng = np.random.default_rng(5)
    net = dt.Sequential([dt.Conv2d(rng.normal(size=(3, 1, 3, 3)), -np.abs(rng.normal(size=3)) * 0.1, padding=1),
                         dt.ReLU(), dt.MaxPool2d(2), dt.Flatten(), dt.Dense(rng.normal(size=(4, 27)), np.zeros(4))])
    dt.save(net, tmp_path / "m.npz", input_shape=(1, 6, 6))
    np.save(tmp_path / "x.npy", (rng.uniform(0, 1, size=(5, 6, 6)) * 255).astype(np.uint8))
    out = tmp_path / "ev"
    code = main(["evaluate", "--model", str(tmp_path / "m.npz"), "--input", str(tmp_path / "x.npy"),
                 "--methods", "deep-taylor,sensitivity,random", "--out", str(out), "--steps", "6",
                 "--features-per-step", "6", "--backend", "numpy", "--no-progress"])
    text = capsys.readouterr()
    assert code == 0, text.err
    report = json.loads((out / "evaluation.json").read_text())
    assert set(report["methods"]) == {"deep-taylor", "sensitivity", "random"}
    for entry in report["methods"].values():
        assert len(entry["mean_curve"]) == 7 and np.isfinite(entry["aopc"])
    curves = np.load(out / "curves.npz")
    assert curves["sensitivity"].shape == (5, 7)
    assert (out / "curves.png").is_file()
    assert "AOPC" in text.out
    # one-line errors
    code = main(["evaluate", "--model", str(tmp_path / "m.npz"), "--input", str(tmp_path / "x.npy"),
                 "--methods", "deep-taylor,nope", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("deeptaylor: error: unknown method 'nope'") and err.count("\n") == 1
    code = main(["evaluate", "--model", str(tmp_path / "m.npz"), "--input", str(tmp_path / "x.npy"),
                 "--methods", "sensitivity", "--steps", "99", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "steps=99 is more" in err
