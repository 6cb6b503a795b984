"""``deeptaylor explain --target all | top:K | FILE.npy``: several explained outputs per input, streamed."""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.cli import main


def _net(rng) -> dt.Graph:
    x = dt.Input((1, 6, 6))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(3, 1, 3, 3)), -np.abs(rng.normal(size=3)) * 0.05, padding=1)(x))
    out = dt.Dense(rng.normal(size=(4, 3 * 36)), -np.abs(rng.normal(size=4)) * 0.05)(dt.Flatten()(h))
    return dt.Graph(x, out)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def files(tmp_path, rng):
    net = _net(rng)
    dt.save(net, tmp_path / "m.npz")
    x = rng.uniform(0, 1, (5, 1, 6, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return net, x, tmp_path


@pytest.mark.parametrize("backend", ["numpy", "cpu"])
def test_target_all_streams_a_target_axis(files, capsys, backend):
    net, x, tmp = files
    out = tmp / "out"
    assert main(["explain", "--model", str(tmp / "m.npz"), "--input", str(tmp / "x.npy"), "--out", str(out),
                 "--target", "all", "--backend", backend, "--batch-size", "2", "--png", "2",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "5 input(s) x 4 target(s)" in text
    r, t = np.load(out / "relevance.npy"), np.load(out / "target.npy")
    assert r.shape == (5, 4, 1, 6, 6) and t.shape == (5, 4)
    np.testing.assert_array_equal(t, np.tile(np.arange(4), (5, 1)))
    ref = dt.Explainer(net, dt.composites.get("deep-taylor"), backend=backend).explain(x, target="all")
    np.testing.assert_allclose(r, ref.relevance, rtol=1e-6, atol=1e-7)
    # a PNG per target for the first two inputs
    assert sorted(p.name for p in out.glob("heatmap_*.png")) == [
        f"heatmap_{i:04d}_t{j}.png" for i in range(2) for j in range(4)]


def test_target_top_and_file(files, capsys):
    net, x, tmp = files
    out = tmp / "top"
    assert main(["explain", "--model", str(tmp / "m.npz"), "--input", str(tmp / "x.npy"), "--out", str(out),
                 "--target", "top:2", "--backend", "numpy", "--png", "none", "--no-progress"]) == 0
    ex = dt.Explainer(net, dt.composites.get("deep-taylor"), backend="numpy")
    ref = ex.explain(x, target=("top", 2))
    np.testing.assert_array_equal(np.load(out / "target.npy"), ref.target)
    np.testing.assert_allclose(np.load(out / "relevance.npy"), ref.relevance, rtol=1e-12, atol=1e-12)
    # a file of per-input targets: (N,) keeps today's shapes, (N, K) adds the axis
    tfile = tmp / "t.npy"
    np.save(tfile, np.array([3, 0, 1, 2, 3]))
    assert main(["explain", "--model", str(tmp / "m.npz"), "--input", str(tmp / "x.npy"), "--out", str(out),
                 "--target", str(tfile), "--backend", "numpy", "--png", "none", "--no-progress"]) == 0
    r = np.load(out / "relevance.npy")
    assert r.shape == x.shape
    np.testing.assert_allclose(r, ex.explain(x, target=np.array([3, 0, 1, 2, 3])).relevance, rtol=1e-12,
                               atol=1e-12)
    np.save(tfile, np.array([[3, 0]] * 5))
    assert main(["explain", "--model", str(tmp / "m.npz"), "--input", str(tmp / "x.npy"), "--out", str(out),
                 "--target", str(tfile), "--backend", "numpy", "--png", "none", "--no-progress"]) == 0
    assert np.load(out / "relevance.npy").shape == (5, 2, 1, 6, 6)
    capsys.readouterr()


@pytest.mark.parametrize(("target", "content", "message"), [
    ("top:0", None, "top:K needs K in [1, 4]"),
    ("top:x", None, "needs an integer K"),
    ("9", None, "target out of range"),
    ("missing.npy", None, "not found"),
    ("t.npy", np.array([0, 1]), "shape"),
    ("t.npy", np.array([0, 1, 2, 3, 4]), "out of range"),
    ("t.npy", np.array([0.5] * 5), "dtype"),
])
def test_target_errors_are_one_line(files, capsys, target, content, message):
    _, _, tmp = files
    if content is not None:
        np.save(tmp / target, content)
    arg = str(tmp / target) if target.endswith(".npy") else target
    assert main(["explain", "--model", str(tmp / "m.npz"), "--input", str(tmp / "x.npy"), "--out",
                 str(tmp / "o"), "--target", arg, "--backend", "numpy", "--no-progress"]) == 2
    line = _err_line(capsys)
    assert line.startswith("deeptaylor: error:") and message in line
