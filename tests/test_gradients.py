"""Gradient methods against central finite differences (float64) on small random networks with every
layer type. Inputs are redrawn until every ReLU input is away from 0 and every max-pool window has a
unique maximum with a margin, so the finite differences do not cross a kink."""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.reference import forward_layer
from deeptaylor.reference.ops import window_taps

MARGIN = 1e-3
H = 1e-6


def _pad(a, padding, value):
    t, b, lf, r = padding
    return np.pad(a, ((0, 0), (0, 0), (t, b), (lf, r)), constant_values=value)


def away_from_kinks(net: dt.Sequential, x: np.ndarray) -> bool:
    """True if no ReLU input is within MARGIN of 0 and every max-pool window's maximum beats the
    runner-up by more than MARGIN, unless it is an exact 0 from a ReLU (finite differences of size H then stay on one linear piece)."""
    a = x
    for layer in net:
        if isinstance(layer, dt.ReLU) and np.any(np.abs(a) < MARGIN):
            return False
        if isinstance(layer, dt.MaxPool2d):
            taps = window_taps(a.shape[2], a.shape[3], layer.kernel_size, layer.stride, layer.padding)
            next(taps)
            ap = _pad(a, layer.padding, -np.inf)
            vals = np.sort(np.stack([ap[:, :, rows, cols] for _, _, rows, cols in taps]), axis=0)
            # a tie among exact zeros (units switched off by a ReLU below, which stay off) is harmless
            if vals.shape[0] > 1 and np.any((vals[-1] - vals[-2] < MARGIN) & (vals[-1] != 0.0)):
                return False
        a = forward_layer(layer, a)[0]
    return True


def finite_difference_gradient(net: dt.Sequential, x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """d f_target / dx by central differences, all perturbations of a sample in one batch."""
    n, shape = x.shape[0], x.shape[1:]
    p = int(np.prod(shape))
    grad = np.zeros_like(x)
    eye = np.eye(p).reshape((p,) + shape)
    for k in range(n):
        plus = net.forward(x[k][None] + H * eye)[:, target[k]]
        minus = net.forward(x[k][None] - H * eye)[:, target[k]]
        grad[k] = ((plus - minus) / (2 * H)).reshape(shape)
    return grad


def close(got, want, rtol):
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12))


def conv(rng, o, c, k):
    return rng.normal(size=(o, c, k, k)) / np.sqrt(c * k * k), rng.normal(size=o) * 0.1


def dense(rng, o, i):
    return rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1


def nets(rng):
    """(name, net, input shape without batch): together they use every layer type."""
    out = []
    w1, b1 = conv(rng, 3, 2, 3)
    w2, b2 = conv(rng, 4, 3, 2)
    w3, b3 = dense(rng, 5, 4 * 5 * 4)
    w4, b4 = dense(rng, 3, 5)
    out.append(("conv-max-avg-dense", dt.Sequential([
        dt.Conv2d(w1, b1, stride=1, padding=(1, 0, 1, 1)), dt.ReLU(), dt.MaxPool2d(2, 2, 1),
        dt.Conv2d(w2, b2, dilation=(1, 2), padding=1), dt.ReLU(), dt.AvgPool2d(2, 1, (0, 1, 1, 0)),
        dt.Flatten(), dt.Dense(w3, b3), dt.ReLU(), dt.Dense(w4, b4)]), (2, 7, 6)))
    w1, b1 = conv(rng, 3, 1, 2)
    out.append(("conv-sum-lp", dt.Sequential([
        dt.Conv2d(w1, b1, stride=(2, 1)), dt.ReLU(), dt.SumPool2d((1, 2), 1), dt.LpPool(3.0, 2, 1),
        dt.LpPool(2.0)]), (1, 7, 6)))
    w1, b1 = dense(rng, 6, 7)
    out.append(("dense-globalsum", dt.Sequential([dt.Dense(w1, b1), dt.ReLU(), dt.GlobalSumPool()]), (7,)))
    w1, b1 = conv(rng, 2, 2, 3)
    w2, b2 = dense(rng, 4, 2 * 3 * 3)
    out.append(("conv-flatten-dense-lp1", dt.Sequential([
        dt.Conv2d(w1, b1, stride=2, padding=1), dt.ReLU(), dt.Flatten(), dt.Dense(w2, b2), dt.ReLU(),
        dt.LpPool(1.0)]), (2, 5, 6)))
    return out


NET_NAMES = ["conv-max-avg-dense", "conv-sum-lp", "dense-globalsum", "conv-flatten-dense-lp1"]


@pytest.mark.parametrize("name", NET_NAMES)
@pytest.mark.parametrize("batch", [1, 3])
def test_sensitivity_and_gradient_x_input_match_finite_differences(name, batch):
    rng = np.random.default_rng([NET_NAMES.index(name), batch])
    net, shape = next((n, s) for nm, n, s in nets(rng) if nm == name)
    for _ in range(500):
        x = rng.uniform(-1.0, 1.0, size=(batch,) + shape)
        if away_from_kinks(net, x):
            break
    else:  # pragma: no cover - the nets are small; this would signal a broken generator
        pytest.fail("no input away from the kinks")
    k = net.output_shape(x.shape)[1]
    target = rng.integers(0, k, size=batch)
    fd = finite_difference_gradient(net, x, target)
    assert np.max(np.abs(fd)) > 1e-3          # the target depends on the input: the test can fail
    sens = dt.Explainer(net, dt.methods.Sensitivity(), backend="numpy").explain(x, target=target)
    gxi = dt.Explainer(net, dt.methods.GradientXInput(), backend="numpy").explain(x, target=target)
    close(sens.relevance, fd ** 2, rtol=1e-6)
    close(gxi.relevance, x * fd, rtol=1e-6)
    assert sens.relevance.shape == x.shape
    assert np.all(sens.relevance >= 0)
    np.testing.assert_array_equal(sens.target, target)


def test_gradient_x_input_is_x_times_gradient_layerwise(rng):
    """With return_layers, Sensitivity gives (df/da_l)^2 and GradientXInput a_l * df/da_l at every
    layer input: their ratio recovers |a_l| wherever the gradient is nonzero."""
    net, shape = nets(rng)[0][1:]
    x = rng.uniform(-1, 1, size=(2,) + shape)
    s = dt.Explainer(net, dt.methods.Sensitivity(), backend="numpy").explain(x, return_layers=True)
    g = dt.Explainer(net, dt.methods.GradientXInput(), backend="numpy").explain(x, return_layers=True)
    acts = [x]
    for layer in net:
        acts.append(forward_layer(layer, acts[-1])[0])
    assert len(s.layers) == len(net) + 1
    for a, sl, gl in zip(acts, s.layers, g.layers, strict=True):
        np.testing.assert_allclose(gl ** 2, a ** 2 * sl, rtol=1e-10, atol=1e-14)
    # at the output: a one-hot gradient
    onehot = np.zeros_like(s.output)
    onehot[np.arange(2), s.target] = 1.0
    np.testing.assert_array_equal(s.layers[-1], onehot)


def test_gradient_x_input_conserves_for_bias_free_relu_net(rng):
    """A bias-free ReLU network is positively homogeneous, so sum_p x_p df/dx_p = f(x) (Euler)."""
    w1 = rng.normal(size=(3, 2, 3, 3))
    w2 = rng.normal(size=(4, 3 * 2 * 2))
    net = dt.Sequential([dt.Conv2d(w1, padding=1), dt.ReLU(), dt.MaxPool2d(3, 3), dt.Flatten(),
                         dt.Dense(w2)])
    x = rng.normal(size=(3, 2, 6, 6))
    res = dt.Explainer(net, dt.methods.GradientXInput(), backend="numpy").explain(x)
    np.testing.assert_allclose(res.relevance.reshape(3, -1).sum(1), res.explained, rtol=1e-10)
