"""The ``deeptaylor`` command line, end to end in temporary directories."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import heatmap as hm
from deeptaylor.cli import main


@pytest.fixture
def small_net(rng) -> dt.Sequential:
    """A 1568-8-1 detection-pooling net with b <= 0 (as the bundled one, smaller)."""
    return dt.Sequential([dt.Dense(rng.normal(size=(8, 1568)) * 0.05, -rng.uniform(0, 0.1, 8)), dt.ReLU(),
                          dt.GlobalSumPool()])


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message on stderr"
    assert "Traceback" not in "\n".join(err)
    return err[-1]


def test_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "-n", "60"]) == 0
    text = capsys.readouterr().out
    img = hm.read_png(out / "heatmaps.png")
    assert img.ndim == 3
    assert img.shape[0] > 6 * 28
    assert img.shape[1] > 5 * 56
    assert (out / "overlay_zB.png").is_file()
    r = np.load(out / "relevance_zB.npy")
    x = np.load(out / "inputs.npy")
    assert r.shape == x.shape == (60, 28, 56)
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.split() and line.split()[0] in ("sensitivity", "w2", "z+", "zB")}
    assert set(rows) == {"sensitivity", "w2", "z+", "zB"}
    # the paper's qualitative finding, on the bundled model: DTD rules consistent, sensitivity not conservative
    for name in ("w2", "z+", "zB"):
        assert rows[name][-2:] == ["yes", "yes"], rows[name]
    assert rows["sensitivity"][-2] == "NO"
    # the zB heatmaps are positive and (for the trained model) lean towards the target digit
    assert r.min() >= -1e-5
    assert "heatmaps.png" in text
    assert "columns: input | sensitivity | w2 | z+ | zB" in text


def test_bad_colour_map_fails_before_any_work(tmp_path, small_net, capsys):
    """A bad --cmap is a usage error: exit 2, one message, and no output directory at all."""
    model = tmp_path / "net.npz"
    dt.save(small_net, model)
    np.save(tmp_path / "x.npy", np.zeros((2, 1568), np.float32))
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x.npy"), "--out", str(out),
                 "--cmap", "jet"]) == 2
    line = _err_line(capsys)
    assert "--cmap" in line
    assert "jet" in line
    assert not out.exists()
    assert main(["demo", "--out", str(out), "--cmap", "viridis"]) == 2
    assert "viridis" in _err_line(capsys)
    assert not out.exists()
    assert capsys.readouterr().out == ""


def test_explain_npy_and_images(tmp_path, small_net, rng, capsys):
    model = tmp_path / "net.npz"
    dt.save(small_net, model)
    x = rng.uniform(0, 1, (5, 28, 56)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x.npy"), "--composite", "deep-taylor",
                 "--target", "0", "--out", str(out), "--backend", "numpy", "--batch-size", "2",
                 "--no-progress"]) == 0
    r = np.load(out / "relevance.npy")
    assert r.shape == (5, 28, 56)  # the input's shape, not the network's flat (5, 1568)
    ref = dt.Explainer(small_net, dt.composites.deep_taylor(0.0, 1.0), backend="numpy").explain(x.reshape(5, -1))
    np.testing.assert_allclose(r.reshape(5, -1), ref.relevance, rtol=1e-6, atol=1e-12)
    pngs = sorted(out.glob("heatmap_*.png"))
    assert len(pngs) == 5
    # PNGs enlarged 4x by default (nearest neighbour): each relevance value is a 4x4 block
    img = hm.read_png(pngs[0])
    assert img.shape == (4 * 28, 4 * 56, 3)
    np.testing.assert_array_equal(img[::4, ::4], hm.to_rgb(ref.relevance[0].reshape(28, 56)))
    np.testing.assert_array_equal(img, hm.upscale(img[::4, ::4], 4))
    text = capsys.readouterr().out
    assert "explained 5 input(s)" in text
    assert "(5, 28, 56)" in text
    assert "224x112 pixels" in text
    # --scale 1: native size
    out1 = tmp_path / "out1"
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x.npy"), "--out", str(out1),
                 "--backend", "numpy", "--scale", "1", "--cmap", "coldnhot", "--no-progress"]) == 0
    np.testing.assert_array_equal(hm.read_png(out1 / "heatmap_0000.png"),
                                  hm.to_rgb(ref.relevance[0].reshape(28, 56), cmap="coldnhot"))

    # uint8 .npy images are scaled by 1/255; flat inputs are drawn with --image-shape
    np.save(tmp_path / "u8.npy", (x * 255).astype(np.uint8).reshape(5, -1))
    out2 = tmp_path / "out2"
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "u8.npy"), "--composite",
                 "sensitivity", "--out", str(out2), "--image-shape", "28,56", "--backend", "numpy"]) == 0
    assert len(list(out2.glob("heatmap_*.png"))) == 5
    assert np.load(out2 / "relevance.npy").shape == (5, 1568)  # flat input, flat relevance

    # a directory of PNG images
    imgdir = tmp_path / "imgs"
    imgdir.mkdir()
    for i in range(3):
        hm.save_png(imgdir / f"d{i}.png", (x[i] * 255).astype(np.uint8))
    out3 = tmp_path / "out3"
    assert main(["explain", "--model", str(model), "--input", str(imgdir), "--composite", "deep-taylor-unbounded",
                 "--out", str(out3)]) == 0
    assert sorted(p.name for p in out3.glob("*.png")) == ["heatmap_d0.png", "heatmap_d1.png", "heatmap_d2.png"]
    r3 = np.load(out3 / "relevance.npy")
    assert r3.shape == (3, 28, 56)  # as the images were read
    ref3 = dt.Explainer(small_net, dt.composites.deep_taylor_unbounded(), backend="numpy").explain(
        ((x[:3] * 255).astype(np.uint8) / 255.0).reshape(3, -1))
    np.testing.assert_allclose(r3.reshape(3, -1), ref3.relevance, rtol=1e-4,
                               atol=1e-6 * np.abs(ref3.relevance).max())


def test_explain_errors(tmp_path, small_net, capsys):
    model = tmp_path / "net.npz"
    dt.save(small_net, model)
    good = tmp_path / "x.npy"
    np.save(good, np.zeros((2, 1568), np.float32))
    base = ["explain", "--model", str(model), "--input", str(good), "--out", str(tmp_path / "o")]

    def fails(args, match):
        assert main(args) == 2
        line = _err_line(capsys)
        assert line.startswith("deeptaylor: error:"), line
        assert match in line, line

    fails(["explain", "--model", str(tmp_path / "missing.npz"), "--input", str(good), "--out", "o"], "not found")
    fails(base[:4] + [str(tmp_path / "nope.npy")] + base[5:], "not found")
    fails(base + ["--composite", "magic"], "unknown composite")
    np.save(tmp_path / "bad.npy", np.zeros((2, 100), np.float32))
    fails(base[:4] + [str(tmp_path / "bad.npy")] + base[5:], "expects 1568")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    fails(base[:4] + [str(tmp_path / "junk.npy")] + base[5:], "cannot read")
    (tmp_path / "model.npz").write_bytes(b"PK\x03\x04garbage")
    fails(["explain", "--model", str(tmp_path / "model.npz"), "--input", str(good), "--out", "o"], "corrupt")
    imgdir = tmp_path / "imgs"
    imgdir.mkdir()
    fails(base[:4] + [str(imgdir)] + base[5:], "no images")
    (imgdir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    fails(base[:4] + [str(imgdir)] + base[5:], "broken.png")
    fails(base + ["--image-shape", "10,10"], "does not match")
    fails(base + ["--image-shape", "28"], "H,W")
    fails(base + ["--target", "x"], "--target")
    fails(base + ["--target", "3"], "out of range")
    assert main(base + ["--scale", "0"]) == 2
    assert "--scale" in _err_line(capsys)
    np.save(tmp_path / "neg.npy", -np.ones((2, 1568), np.float32))
    fails(base[:4] + [str(tmp_path / "neg.npy")] + base[5:], "[low, high]")
    # argparse usage errors: exit 2, no traceback
    assert main(["explain"]) == 2
    assert "required" in _err_line(capsys)
    assert main(["frobnicate"]) == 2
    _err_line(capsys)


def test_experiment_errors(tmp_path, capsys):
    assert main(["experiment", "mnist-detection", "--mnist", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "not found" in _err_line(capsys)
    assert main(["experiment", "mnist-detection", "--mnist", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--steps", "0,1", "--no-progress"]) == 2
    assert "no MNIST images file" in _err_line(capsys)
    assert main(["experiment", "mnist-detection", "--steps", "1,x"]) == 2
    _err_line(capsys)


def test_console_script_entry_point(tmp_path):
    exe = shutil.which("deeptaylor", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("the deeptaylor console script is not installed")
    proc = subprocess.run([exe, "explain", "--model", str(tmp_path / "none.npz"), "--input", "x.npy", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("deeptaylor: error:")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([exe, "demo", "--out", str(tmp_path / "d"), "-n", "20"], capture_output=True, text=True,
                          check=False, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "heatmaps.png").is_file()


def _mnist_dir() -> Path | None:
    """Real MNIST: ``$DEEPTAYLOR_MNIST`` or ``shared/data/mnist`` above the current directory
    (:func:`deeptaylor.datasets.find_mnist`), else above this file (the repository's ../shared/data/mnist)."""
    from deeptaylor import datasets as ds

    return ds.find_mnist() or ds.find_mnist(Path(__file__).resolve().parent)


@pytest.mark.skipif(_mnist_dir() is None,
                    reason="real MNIST not found: set DEEPTAYLOR_MNIST or put it in ../shared/data/mnist")
def test_experiment_small_run(tmp_path, capsys):
    import json

    out = tmp_path / "exp"
    assert main(["experiment", "mnist-detection", "--mnist", str(_mnist_dir()), "--out", str(out), "--steps", "0,30",
                 "--n-train", "600", "--n-test", "60", "--no-progress", "--backend", "numpy"]) == 0
    text = capsys.readouterr().out
    assert "test accuracy" in text
    for k in (0, 30):
        img = hm.read_png(out / f"steps_{k:06d}.png")
        assert img.ndim == 3
    assert (out / "table.txt").is_file()
    assert (out / "detection_30.npz").is_file()
    assert np.all(dt.load(out / "detection_30.npz")[0].bias <= 0)
    summary = json.loads((out / "results.json").read_text())
    rows = {(r["steps"], r["method"]): r for r in summary["rows"]}
    assert len(rows) == 8
    for k in (0, 30):
        for name in ("w2", "z+", "zB"):
            assert rows[k, name]["conservation_error"] < 1e-10
            assert rows[k, name]["negative_mass"] == 0.0
        assert rows[k, "sensitivity"]["conservation_error"] > 1e-2  # sensitivity is not conservative


def _write_idx(path: Path, arr: np.ndarray) -> None:
    import gzip
    import struct

    magic = 2051 if arr.ndim == 3 else 2049
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes())


@pytest.fixture
def sample_mnist(tmp_path) -> Path:
    """A directory of MNIST IDX files (train and t10k) holding the bundled 300-digit sample."""
    from deeptaylor import datasets as ds

    images, labels = ds.load_sample()
    d = tmp_path / "mnist"
    d.mkdir()
    for prefix in ("train", "t10k"):
        _write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return d


def test_experiment_dead_network(tmp_path, sample_mnist, capsys):
    """With a huge learning rate every ReLU dies: one warning line per step count, and results.json is
    strict JSON with null (not NaN) for the undefined numbers."""
    import json

    out = tmp_path / "exp"
    assert main(["experiment", "mnist-detection", "--mnist", str(sample_mnist), "--out", str(out), "--steps", "0,30",
                 "--n-train", "200", "--n-test", "40", "--lr", "50", "--no-progress"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("deeptaylor: warning:")]
    assert len(warnings) == 1, captured.err
    assert "after 30 steps f(x) = 0 on all 40 test images" in warnings[0]
    assert "learning rate 50" in warnings[0]
    assert "Traceback" not in captured.err

    def no_constants(name):
        raise AssertionError(f"results.json holds the non-JSON constant {name}")

    summary = json.loads((out / "results.json").read_text(), parse_constant=no_constants)
    assert summary["warnings"] == [warnings[0].removeprefix("deeptaylor: warning: ")]
    rows = {(r["steps"], r["method"]): r for r in summary["rows"]}
    for name in ("sensitivity", "w2", "z+", "zB"):
        assert rows[30, name]["mean_f"] == 0.0
        assert rows[30, name]["conservation_error"] is None
        assert rows[30, name]["correlation"] is None
        assert rows[30, name]["target_share"] is None
        assert rows[0, name]["conservation_error"] is not None  # the untrained net is alive
    assert "warning: after 30 steps" in (out / "table.txt").read_text()


def test_experiment_live_network_has_no_warning(tmp_path, sample_mnist, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "mnist-detection", "--mnist", str(sample_mnist), "--out", str(out), "--steps", "0,20",
                 "--n-train", "200", "--n-test", "40", "--no-progress"]) == 0
    assert "warning" not in capsys.readouterr().err
    import json

    summary = json.loads((out / "results.json").read_text())
    assert summary["warnings"] == []
    assert all(r["conservation_error"] is not None for r in summary["rows"])
    assert summary["positive_fraction"] == 0.5
    assert summary["columns"] == ["input", "sensitivity", "w²", "z+", "zB"]


def test_experiment_natural_sampling(tmp_path, sample_mnist, capsys):
    import json

    out = tmp_path / "exp"
    assert main(["experiment", "mnist-detection", "--mnist", str(sample_mnist), "--out", str(out), "--steps", "0",
                 "--n-train", "100", "--n-test", "200", "--positive-fraction", "natural", "--no-progress"]) == 0
    assert "natural sampling" in capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert summary["positive_fraction"] is None
    assert main(["experiment", "mnist-detection", "--positive-fraction", "2"]) == 2
    assert "natural" in _err_line(capsys)


# ------------------------------------------------------------------------------------------ graph models


def _graph_model(rng, channels=3):
    """A small residual + concat graph with b <= 0."""
    x = dt.Input((channels, 8, 8))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(4, channels, 3, 3)) * 0.3, -np.abs(rng.normal(size=4)) * 0.05,
                            padding=1)(x, name="conv1"), name="relu1")
    y = dt.ReLU()(dt.Conv2d(rng.normal(size=(4, 4, 3, 3)) * 0.3, -np.abs(rng.normal(size=4)) * 0.05,
                            padding=1)(h, name="conv2"))
    y = dt.Add()(y, h, name="layer1.add")
    z = dt.Concat()(y, dt.BatchNorm2d(np.zeros(4), np.ones(4))(h, name="bn"), name="cat")
    out = dt.Dense(rng.normal(size=(5, 8 * 16)), -np.abs(rng.normal(size=5)) * 0.05)(
        dt.Flatten()(dt.AvgPool2d(2)(z)), name="fc")
    return dt.Graph(x, out)


@pytest.mark.parametrize("composite", ["deep-taylor", "epsilon-plus", "epsilon-plus-flat", "epsilon-alpha2-beta1",
                                       "epsilon_alpha2_beta1_flat", "epsilon-gamma-box", "gradient-x-input"])
def test_explain_graph_model_end_to_end(tmp_path, rng, capsys, composite):
    net = _graph_model(rng)
    model = tmp_path / "g.npz"
    dt.save(net, model)
    x = rng.uniform(0, 1, (3, 3, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x.npy"), "--out", str(out),
                 "--composite", composite, "--backend", "numpy", "--scale", "2"]) == 0
    text = capsys.readouterr().out
    assert "backend numpy" in text
    r = np.load(out / "relevance.npy")
    assert r.shape == x.shape
    expected = dt.Explainer(net, dt.composites.get(composite.replace("_", "-")), backend="numpy").explain(x).relevance
    np.testing.assert_allclose(r, expected, rtol=1e-12, atol=1e-12)
    pngs = sorted(out.glob("heatmap_*.png"))
    assert len(pngs) == 3
    assert hm.read_png(pngs[0]).shape[:2] == (16, 16)


def test_explain_graph_model_cpu_and_images(tmp_path, rng, capsys):
    """Default backend (cpu where it can run the graph), an image directory read as RGB by the graph's
    declared 3-channel input, and flat .npy samples reshaped to the declared (C, H, W)."""
    net = _graph_model(rng)
    model = tmp_path / "g.npz"
    dt.save(net, model)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for k in range(2):
        hm.save_png(imgs / f"im{k}.png", rng.integers(0, 256, (8, 8, 3)).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["explain", "--model", str(model), "--input", str(imgs), "--out", str(out), "--no-progress"]) == 0
    assert np.load(out / "relevance.npy").shape == (2, 3, 8, 8)
    assert (out / "heatmap_im0.png").is_file()
    assert (out / "heatmap_im1.png").is_file()
    np.save(tmp_path / "flat.npy", rng.uniform(0, 1, (2, 192)))
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "flat.npy"), "--out",
                 str(tmp_path / "o2"), "--backend", "numpy"]) == 0
    assert np.load(tmp_path / "o2" / "relevance.npy").shape == (2, 192)
    assert len(list((tmp_path / "o2").glob("heatmap_*.png"))) == 2
    capsys.readouterr()


def test_explain_graph_model_errors(tmp_path, rng, capsys):
    model = tmp_path / "g.npz"
    dt.save(_graph_model(rng), model)
    np.save(tmp_path / "x1.npy", np.zeros((2, 1, 8, 8), np.float32))
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x1.npy"), "--out",
                 str(tmp_path / "o")]) == 2
    line = _err_line(capsys)
    assert "1 channel(s)" in line
    assert "(3, 8, 8)" in line
    np.save(tmp_path / "x2.npy", np.zeros((2, 3, 5, 5), np.float32))
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x2.npy"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "'fc'" in _err_line(capsys)  # the node that cannot take the shape
    assert main(["explain", "--model", str(model), "--input", str(tmp_path / "x2.npy"), "--out",
                 str(tmp_path / "o"), "--composite", "epsilon-unknown"]) == 2
    line = _err_line(capsys)
    assert "unknown composite" in line
    assert "epsilon-gamma-box" in line
    bad = tmp_path / "bad.npz"
    data = bytearray(model.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    bad.write_bytes(bytes(data))
    assert main(["explain", "--model", str(bad), "--input", str(tmp_path / "x2.npy"), "--out",
                 str(tmp_path / "o")]) == 2
    assert "bad.npz" in _err_line(capsys)
    assert main(["info", "--model", str(bad)]) == 2
    assert "bad.npz" in _err_line(capsys)


def test_info(tmp_path, rng, small_net, capsys):
    net = _graph_model(rng)
    dt.save(net, tmp_path / "g.npz")
    assert main(["info", "--model", str(tmp_path / "g.npz")]) == 0
    text = capsys.readouterr().out
    assert "format version 2" in text
    assert "Graph: 10 node(s), input (3, 8, 8), output (5,)" in text
    line = next(line for line in text.splitlines() if line.strip().startswith("layer1.add"))
    assert "Add()" in line
    assert "<- " in line
    assert "relu1" in line
    assert line.endswith("-> (4, 8, 8)")
    n_params = sum(getattr(layer, a).size for layer in net for a in ("weight", "bias", "running_mean", "running_var")
                   if hasattr(layer, a))
    assert f"{n_params} parameters" in text
    # a Sequential: the stored input shape gives the shapes; --input-shape overrides it
    dt.save(small_net, tmp_path / "s.npz")
    assert main(["info", "--model", str(tmp_path / "s.npz")]) == 0
    text = capsys.readouterr().out
    assert "Sequential: 3 node(s), input (1568,), output (1,)" in text
    assert main(["info", "--model", str(tmp_path / "g.npz"), "--input-shape", "3,16,16"]) == 2
    assert "'fc'" in _err_line(capsys)
    assert main(["info", "--model", str(tmp_path / "g.npz"), "--input-shape", "3,x"]) == 2
    assert "--input-shape" in _err_line(capsys)
    assert main(["info", "--model", str(tmp_path / "missing.npz")]) == 2
    assert "not found" in _err_line(capsys)
    # the bundled 0.1 (version 1) model
    from deeptaylor import datasets

    path = Path(datasets.__file__).parent / "data" / "detection_1568_400_1.npz"
    assert main(["info", "--model", str(path)]) == 0
    assert "format version 1" in capsys.readouterr().out


def test_internal_errors_are_one_line(tmp_path, small_net, capsys, monkeypatch):
    """An unexpected exception (a bug) is still one line and exit 2, with a pointer to --debug."""
    from deeptaylor import cli

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setitem(cli._cmd_info.__globals__, "_cmd_info", boom)
    dt.save(small_net, tmp_path / "s.npz")
    assert main(["info", "--model", str(tmp_path / "s.npz")]) == 2
    line = _err_line(capsys)
    assert "internal error" in line
    assert "kaboom" in line
    assert "--debug" in line
    with pytest.raises(RuntimeError):
        main(["--debug", "info", "--model", str(tmp_path / "s.npz")])
