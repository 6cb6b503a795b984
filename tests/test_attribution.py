"""The baseline attribution methods (deeptaylor.attribution): IntegratedGradients against its closed form
on a linear model and against Captum, SmoothGrad against Zennit on the same noise, Occlusion against
Captum and Zennit; both backends; chunking; bad arguments."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.attribution import IG_METHODS, ig_weights
from deeptaylor.methods import IntegratedGradients, Occlusion, SmoothGrad

from conftest import import_zennit

torch = pytest.importorskip("torch")
captum_attr = pytest.importorskip("captum.attr")

SHAPE = (2, 8, 8)


def _torch_model(seed: int = 0) -> torch.nn.Module:
    """A small conv net (float64): conv3x3 ReLU maxpool2 conv1x1 ReLU flatten dense(3)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                            torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(4 * 4 * 4, 3)).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m


@pytest.fixture(scope="module")
def model():
    m = _torch_model()
    return m, dt.from_torch(m, input_shape=SHAPE)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return rng.uniform(0, 1, size=(5, *SHAPE)), np.array([0, 2, 1, 1, 0])


def _maxnorm(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# numpy: float64 throughout (Captum casts its quadrature weights to float32: ~1e-8); cpu: float32
TOL = {"numpy": 1e-7, "cpu": 1e-5}


# ------------------------------------------------------------------------------ integrated gradients


@pytest.mark.parametrize("method", IG_METHODS)
def test_ig_closed_form_on_linear_model(backend, method):
    """f(x) = W x + c: the gradient is W_t everywhere, so IG = (x - b) W_t times the weights' sum, and
    completeness holds exactly (delta = 0)."""
    rng = np.random.default_rng(1)
    w, c = rng.normal(size=(4, 12)), rng.normal(size=4)
    net = dt.Sequential([dt.Dense(w, c)])
    x = rng.normal(size=(6, 12))
    base = rng.normal(size=12)
    t = np.array([0, 1, 2, 3, 3, 1])
    res = dt.Explainer(net, IntegratedGradients(steps=7, baseline=base, method=method), backend=backend
                       ).explain(x, target=t)
    _, weights = ig_weights(7, method)
    np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-14)
    expected = (x - base) * w[t]
    assert _maxnorm(res.relevance, expected) < TOL[backend]
    assert np.abs(res.extras["delta"]).max() < 1e-4 * np.abs(res.explained).max()
    assert res.extras["delta"].shape == (6,)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right", "riemann_middle", "riemann_left"])
def test_ig_matches_captum(model, data, backend, method):
    tm, net = model
    x, t = data
    ig = captum_attr.IntegratedGradients(tm)
    ref = ig.attribute(torch.from_numpy(x), baselines=0.25, target=torch.from_numpy(t), n_steps=9,
                       method=method).numpy()
    res = dt.Explainer(net, IntegratedGradients(steps=9, baseline=0.25, method=method), backend=backend
                       ).explain(x, target=t)
    assert _maxnorm(res.relevance, ref) < TOL[backend]


def test_ig_trapezoid_is_captums_rescaled(model, data):
    """Captum's trapezoid weights sum to 1 - 1/m; ours to 1: the results differ by exactly (m-1)/m."""
    tm, net = model
    x, t = data
    ref = captum_attr.IntegratedGradients(tm).attribute(
        torch.from_numpy(x), target=torch.from_numpy(t), n_steps=6, method="riemann_trapezoid").numpy()
    res = dt.Explainer(net, IntegratedGradients(steps=6, method="riemann_trapezoid"), backend="numpy"
                       ).explain(x, target=t)
    assert _maxnorm(res.relevance * 5 / 6, ref) < TOL["numpy"]


def test_ig_matches_zennit_and_chunks(model, data, backend):
    """Zennit's IntegratedGradients is the right Riemann sum from a zero baseline; the default target
    (the largest output at x) is kept along the path; batch_size=3 (chunks within one step) and 11
    (several steps per chunk) give the same result."""
    zennit = import_zennit()
    tm, net = model
    x, _ = data
    xt = torch.from_numpy(x)
    pred = tm(xt).argmax(1)
    onehot = torch.nn.functional.one_hot(pred, 3).double()
    with zennit.attribution.IntegratedGradients(tm, n_iter=8) as attributor:
        _, ref = attributor(xt, onehot)
    for bs in (None, 3, 11):
        res = dt.Explainer(net, IntegratedGradients(steps=8, method="riemann_right", batch_size=bs),
                           backend=backend).explain(x)
        np.testing.assert_array_equal(res.target, pred.numpy())
        assert _maxnorm(res.relevance, ref.detach().numpy()) < TOL[backend]


# ----------------------------------------------------------------------------------------- SmoothGrad


def _zennit_smoothgrad(tm, x, t, n, sigma, seed, monkeypatch):
    """Zennit's SmoothGrad with torch.randn_like replaced by our generator's draws (the same noise)."""
    zennit = import_zennit()
    draws = iter(np.random.default_rng(seed).standard_normal((n - 1, *x.shape)))
    monkeypatch.setattr(zennit.attribution.torch, "randn_like", lambda a: torch.from_numpy(next(draws)))
    onehot = torch.nn.functional.one_hot(torch.from_numpy(t), 3).double()
    with zennit.attribution.SmoothGrad(tm, noise_level=sigma, n_iter=n) as attributor:
        _, ref = attributor(torch.from_numpy(x), onehot)
    monkeypatch.undo()
    return ref.detach().numpy()


def test_smoothgrad_matches_zennit(model, data, backend, monkeypatch):
    tm, net = model
    x, t = data
    ref = _zennit_smoothgrad(tm, x, t, 6, 0.2, 3, monkeypatch)
    for bs in (None, 4):
        res = dt.Explainer(net, SmoothGrad(n=6, sigma=0.2, seed=3, batch_size=bs), backend=backend
                           ).explain(x, target=t)
        assert _maxnorm(res.relevance, ref) < TOL[backend]


def test_smoothgrad_n1_is_gradient_and_seeded(model, data, backend):
    _, net = model
    x, t = data
    g = dt.Explainer(net, "gradient", backend=backend).explain(x, target=t).relevance
    np.testing.assert_array_equal(
        dt.Explainer(net, SmoothGrad(n=1), backend=backend).explain(x, target=t).relevance, g)
    a = dt.Explainer(net, SmoothGrad(n=4, seed=1), backend=backend).explain(x, target=t).relevance
    b = dt.Explainer(net, SmoothGrad(n=4, seed=1), backend=backend).explain(x, target=t).relevance
    c = dt.Explainer(net, SmoothGrad(n=4, seed=2), backend=backend).explain(x, target=t).relevance
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# ------------------------------------------------------------------------------------------ Occlusion


@pytest.mark.parametrize(("window", "stride"), [(4, 4), (3, 2), ((2, 4), (1, 3)), (8, 8)])
def test_occlusion_matches_captum(model, data, backend, window, stride):
    tm, net = model
    x, t = data
    win = (window, window) if isinstance(window, int) else window
    st = (stride, stride) if isinstance(stride, int) else stride
    ref = captum_attr.Occlusion(tm).attribute(torch.from_numpy(x), sliding_window_shapes=(2, *win),
                                              strides=(1, *st), baselines=0.5, target=torch.from_numpy(t))
    res = dt.Explainer(net, Occlusion(window, stride, baseline=0.5), backend=backend).explain(x, target=t)
    assert _maxnorm(res.relevance, ref.numpy()) < TOL[backend]


def test_occlusion_matches_zennit_where_windows_tile(model, data, backend):
    zennit = import_zennit()
    tm, net = model
    x, t = data
    xt = torch.from_numpy(x)
    f0 = tm(xt).detach()
    onehot = torch.nn.functional.one_hot(torch.from_numpy(t), 3).double()
    occlude = functools.partial(zennit.attribution.occlude_independent, fill_fn=lambda a: torch.full_like(a, 0.3),
                                invert=True)
    with zennit.attribution.Occlusion(tm, occlusion_fn=occlude, window=(4, 2), stride=(4, 2)) as attributor:
        _, ref = attributor(xt, lambda out: (f0 - out) * onehot)
    for bs in (None, 7):
        res = dt.Explainer(net, Occlusion((4, 2), baseline=0.3, batch_size=bs), backend=backend
                           ).explain(x, target=t)
        assert _maxnorm(res.relevance, ref.numpy()) < TOL[backend]


def test_occlusion_flat_input_by_hand(backend):
    """(N, F) input, windows of 2 features with stride 1 over a linear model: by hand."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 5))
    net = dt.Sequential([dt.Dense(w, np.zeros(2))])
    x = rng.normal(size=(3, 5))
    res = dt.Explainer(net, Occlusion(2, 1), backend=backend).explain(x, target=np.zeros(3, dtype=int))
    contrib = x * w[0]                                  # occluding W (baseline 0) drops sum_{q in W} contrib_q
    drops = np.stack([contrib[:, i:i + 2].sum(1) for i in range(4)], 1)
    expected = np.zeros_like(x)
    for p in range(5):
        wins = [i for i in range(4) if i <= p < i + 2]
        expected[:, p] = drops[:, wins].mean(1)
    assert _maxnorm(res.relevance, expected) < TOL[backend]


# ------------------------------------------------------------------------------------------ bad input


def test_bad_arguments():
    with pytest.raises(dt.InputError, match="steps"):
        IntegratedGradients(steps=0)
    with pytest.raises(dt.InputError, match="integration method"):
        IntegratedGradients(method="simpson")
    with pytest.raises(dt.InputError, match="finite"):
        IntegratedGradients(baseline=float("nan"))
    with pytest.raises(dt.InputError, match="n must"):
        SmoothGrad(n=0)
    with pytest.raises(dt.InputError, match="sigma"):
        SmoothGrad(sigma=-1.0)
    with pytest.raises(dt.InputError, match="window"):
        Occlusion(window=0)
    with pytest.raises(dt.InputError, match="stride"):
        Occlusion(window=2, stride=3)
    with pytest.raises(dt.InputError, match="batch_size"):
        Occlusion(batch_size=0)


def test_bad_shapes(model, data):
    _, net = model
    x, _ = data
    with pytest.raises(dt.ShapeError, match="baseline"):
        dt.Explainer(net, IntegratedGradients(steps=2, baseline=np.zeros(3)), backend="numpy").explain(x)
    # a window beyond the input is cut to it (Zennit's convention): one window, the whole image
    big = dt.Explainer(net, Occlusion((9, 20)), backend="numpy").explain(x).relevance
    np.testing.assert_array_equal(big, dt.Explainer(net, Occlusion(8), backend="numpy").explain(x).relevance)
    with pytest.raises(dt.ShapeError, match="single ints"):
        dt.Explainer(dt.Sequential([dt.Dense(np.ones((2, 5)), np.zeros(2))]), Occlusion((2, 3)),
                     backend="numpy").explain(np.ones((1, 5)))
    with pytest.raises(dt.InputError, match="target"):
        dt.Explainer(net, SmoothGrad(n=2), backend="numpy").explain(x, target=5)


def test_equality_and_repr():
    assert IntegratedGradients(8, np.ones(3)) == IntegratedGradients(8, np.ones(3))
    assert IntegratedGradients(8) != IntegratedGradients(9)
    assert repr(Occlusion(4)) == "Occlusion(window=(4, 4), stride=(4, 4), baseline=0.0, batch_size=None)"
    assert hash(SmoothGrad(4)) == hash(SmoothGrad(4))
