"""The paper's deep-network experiment end to end on a tiny schedule (real MNIST), and its command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from deeptaylor import datasets as ds
from deeptaylor.cli import main
from deeptaylor.deep_experiment import METHOD_NAMES, consistency_stats, run_deep_mnist_detection

KEYS = ("conservation_rel_err_median", "conservation_rel_err_max", "negative_mass", "sum_vs_output_corr",
        "on_target_share")


def _mnist_dir() -> Path | None:
    """Real MNIST: ``$DEEPTAYLOR_MNIST`` or ``shared/data/mnist`` above the current directory
    (:func:`deeptaylor.datasets.find_mnist`), else above this file (the repository's ../shared/data/mnist)."""
    return ds.find_mnist() or ds.find_mnist(Path(__file__).resolve().parent)


needs_mnist = pytest.mark.skipif(_mnist_dir() is None,
                                 reason="real MNIST not found: set DEEPTAYLOR_MNIST or put it in ../shared/data/mnist")


@needs_mnist
def test_deep_experiment_tiny_schedule(tmp_path):
    out = tmp_path / "deep"
    lines: list[str] = []
    data = run_deep_mnist_detection(out, steps=40, mnist=_mnist_dir(), n_train=400, n_test=60, n_taylor=4,
                                    minmax_train=200, minmax_steps=40, progress=False, log=lines.append)
    assert any("training_free" in line for line in lines)
    for name in ("heatmaps.png", "consistency.png", "table.txt", "train_log.txt", "results.json",
                 "deep_network.npz", *(f"consistency_{m}.png" for m in METHOD_NAMES)):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == list(data["methods"]) == list(METHOD_NAMES)
    for name, m in saved["methods"].items():
        for key in KEYS:
            assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key, m[key])
    assert data["methods"]["taylor"]["n_images"] == 4   # the 4th test image has a target digit
    # the paper's findings, already on a tiny run: training-free and one-layer DTD conserve to float32
    # rounding and are positive; the min-max explanation sums to the model's R^ exactly
    for name in ("training_free", "one_layer_dtd"):
        assert data["methods"][name]["conservation_rel_err_max"] < 1e-4
        assert data["methods"][name]["negative_mass"] == 0.0
    assert data["methods"]["min_max"]["explanation_sum_minus_r_hat_max"] < 1e-10
    assert data["methods"]["min_max"]["backend"].endswith("+numpy")
    assert len(data["training"]["deep"]["log"]) > 0 and len(data["training"]["min_max"]["log"]) > 0
    assert data["training"]["deep"]["steps"] == 40


def test_deep_experiment_command_line(tmp_path, monkeypatch, capsys):
    """The CLI passes its options through (the run itself is the test above)."""
    from deeptaylor import deep_experiment

    seen = {}

    def fake(out, **kwargs):
        seen.update(kwargs, out=out)
        return {"files": [str(Path(out) / "results.json")]}

    monkeypatch.setattr(deep_experiment, "run_deep_mnist_detection", fake)
    assert main(["experiment", "deep-mnist-detection", "--mnist", str(tmp_path), "--steps", "77", "--n-taylor", "5",
                 "--lr", "0.02", "--no-progress"]) == 0
    assert seen["out"] == "deeptaylor-deep-mnist-detection"
    assert (seen["steps"], seen["n_taylor"], seen["lr"], seen["n_train"], seen["progress"]) == (77, 5, 0.02, 20000,
                                                                                              False)
    assert seen["positive_fraction"] == 0.5
    assert "results.json" in capsys.readouterr().out
    seen.clear()
    assert main(["experiment", "deep-mnist-detection", "--paper", "--mnist", str(tmp_path), "--out",
                 str(tmp_path / "p")]) == 0
    assert (seen["steps"], seen["n_train"]) == (300000, 60000) and "lr" not in seen


def test_deep_experiment_without_mnist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEEPTAYLOR_MNIST", str(tmp_path / "absent"))
    monkeypatch.chdir(tmp_path)
    assert main(["experiment", "deep-mnist-detection", "--out", str(tmp_path / "o")]) == 2
    assert "MNIST not found" in capsys.readouterr().err
    assert main(["experiment", "deep-mnist-detection", "--steps", "1,2", "--mnist", str(tmp_path)]) == 2
    assert "one step count" in capsys.readouterr().err


def test_consistency_stats():
    rng = np.random.default_rng(0)
    f = np.array([1.0, 2.0, 0.0, 4.0])
    r = rng.uniform(0, 1, (4, 2, 3))
    r /= r.sum(axis=(1, 2), keepdims=True)
    r *= np.array([1.0, 2.2, 0.0, 4.0])[:, None, None]
    r[1, 0, 0] -= 0.1                       # sum 2.1 for f = 2: rel. err 0.05; one negative entry
    st = consistency_stats(r, f)
    assert st["n_positive_output"] == 3
    assert st["conservation_rel_err_max"] == pytest.approx(0.05)
    assert st["conservation_rel_err_median"] == pytest.approx(0.0, abs=1e-15)
    neg = -np.minimum(r, 0).sum()
    assert st["negative_mass"] == pytest.approx(neg / np.abs(r).sum())
    assert st["sum_vs_output_corr"] == pytest.approx(np.corrcoef(r.reshape(4, -1).sum(1), f)[0, 1])
    mask = np.zeros((4, 2, 3), bool)
    mask[0, :, :1] = True
    share = np.maximum(r[0], 0)[:, :1].sum() / np.maximum(r[0], 0).sum()
    assert consistency_stats(r, f, mask)["on_target_share"] == pytest.approx(share)
