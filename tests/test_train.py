"""The NumPy SGD trainer: it learns, keeps b <= 0, is seeded, and its gradients are right."""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import train as tr
from deeptaylor.train import _forward, _sgd_step


def _toy_detection(rng: np.random.Generator, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Inputs in [0, 1]^30 where the target is present iff the first 10 features hold a bump."""
    x = rng.uniform(0, 0.3, (n, 30))
    y = (rng.uniform(size=n) < 0.5).astype(np.float32)
    x[y == 1, :10] += rng.uniform(0.5, 0.7, (int(y.sum()), 10))
    return np.clip(x, 0, 1).astype(np.float32), y


def test_detection_training_reduces_loss_and_keeps_bias_nonpositive(rng):
    x, y = _toy_detection(rng)
    res = tr.train_detection(x, y, 600, hidden=16, lr=0.01, seed=1, log_every=100, checkpoints=(0, 300, 600),
                             val=(x[:100], y[:100]))
    assert res.log.step == [100, 200, 300, 400, 500, 600]
    assert res.log.loss[-1] < 0.5 * res.log.loss[0]
    assert res.log.accuracy[-1] > 0.9
    assert res.log.val_accuracy[-1] > 0.9
    assert sorted(res.snapshots) == [0, 300, 600]
    for net in [res.net, *res.snapshots.values()]:
        assert [layer.kind for layer in net] == ["Dense", "ReLU", "GlobalSumPool"]
        assert np.all(net[0].bias <= 0)
    assert np.all(res.snapshots[0][0].bias == 0)  # biases start at zero
    assert np.any(res.net[0].bias < 0)  # ... and the constraint is active, not vacuous
    assert tr.detection_accuracy(res.net, x, y) > 0.9
    # the trained net is a valid deeptaylor network: DTD (zB on [0, 1]) is conservative on it
    e = dt.Explainer(res.net, dt.composites.deep_taylor(0.0, 1.0), backend="numpy").explain(x[:20].astype(np.float64))
    assert dt.checks.conservation(e).ok(rtol=1e-8, atol=1e-10)


def test_training_is_seeded(rng):
    x, y = _toy_detection(rng, 100)
    a = tr.train_detection(x, y, 50, hidden=8, seed=3)
    b = tr.train_detection(x, y, 50, hidden=8, seed=3)
    c = tr.train_detection(x, y, 50, hidden=8, seed=4)
    np.testing.assert_array_equal(a.net[0].weight, b.net[0].weight)
    assert not np.array_equal(a.net[0].weight, c.net[0].weight)


@pytest.mark.parametrize(("head", "loss"), [("sum", "mse"), ("logits", "xent")])
def test_sgd_step_matches_finite_differences(rng, head, loss):
    x = rng.uniform(0, 1, (5, 6)).astype(np.float64)
    params = [[rng.normal(size=(4, 6)), rng.normal(size=4) * 0.1]]
    if head == "logits":
        params.append([rng.normal(size=(3, 4)), rng.normal(size=3) * 0.1])
        y = np.array([0, 2, 1, 1, 0])
    else:
        y = rng.uniform(0, 2, 5)

    def total(p):
        out, _, _ = _forward(p, x, head)
        if loss == "mse":
            return 0.5 * np.mean((out[:, 0] - y) ** 2)
        z = out - out.max(axis=1, keepdims=True)
        return float(-np.mean(z[np.arange(5), y] - np.log(np.exp(z).sum(axis=1))))

    lr = 1e-3
    stepped = [[w.copy(), b.copy()] for w, b in params]
    _sgd_step(stepped, x, y, lr, head, loss, None)
    for li, (w, b) in enumerate(params):
        for arr, new in ((w, stepped[li][0]), (b, stepped[li][1])):
            grad = (arr - new) / lr
            num = np.zeros_like(arr)
            for idx in np.ndindex(arr.shape):
                old = arr[idx]
                arr[idx] = old + 1e-6
                up = total(params)
                arr[idx] = old - 1e-6
                down = total(params)
                arr[idx] = old
                num[idx] = (up - down) / 2e-6
            np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-7)


def test_classifier_learns(rng):
    centres = rng.normal(size=(3, 8)) * 3
    y = rng.integers(0, 3, 300)
    x = (centres[y] + rng.normal(size=(300, 8))).astype(np.float32)
    res = tr.train_classifier(x, y, 400, hidden=(16,), lr=0.05, seed=0, log_every=100)
    assert res.log.loss[-1] < 0.5 * res.log.loss[0]
    assert tr.classifier_accuracy(res.net, x, y) > 0.9
    assert [layer.kind for layer in res.net] == ["Dense", "ReLU", "Dense"]
    assert res.net.forward(x[:2].astype(np.float64)).shape == (2, 3)


def test_progress_bar_optional(rng, capsys):
    pytest.importorskip("tqdm")
    x, y = _toy_detection(rng, 50)
    tr.train_detection(x, y, 10, hidden=4, progress=True)
    assert "training" in capsys.readouterr().err


def test_bad_arguments(rng):
    x, y = _toy_detection(rng, 20)
    with pytest.raises(dt.ShapeError):
        tr.train_detection(x, y[:5], 10)
    with pytest.raises(dt.InputError, match="float"):
        tr.train_detection((x * 255).astype(np.uint8), y, 10)
    with pytest.raises(dt.InputError, match="steps"):
        tr.train_detection(x, y, -1)
    with pytest.raises(dt.InputError, match="checkpoint"):
        tr.train_detection(x, y, 10, checkpoints=(20,))
    with pytest.raises(dt.InputError, match="lr"):
        tr.train_detection(x, y, 10, lr=0.0)
    with pytest.raises(dt.InputError, match="diverged"):
        tr.train_classifier(x * 1e6, (y > 0).astype(int), 50, lr=1e6)
