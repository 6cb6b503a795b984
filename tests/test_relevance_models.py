"""Relevance models (Montavon et al. 2017, Sec. 4; slides 003): the trainer of deep detection-pooling
networks, the training-free model (exact conservation and positivity at every layer, as properties on
random deep p-norm networks, both backends) and the min-max model (it learns, approximates the
engine's relevance on held-out data, explains itself conservatively, plugs into an Explainer)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import deeptaylor as dt
from deeptaylor import relevance_models as rm
from deeptaylor import train as tr
from deeptaylor.errors import InputError, RuleError, ShapeError, UnsupportedError
from deeptaylor.rules import WSquare, ZBox, ZPlus

BACKENDS = dt.available_backends()



def _with_biases(net: dt.Sequential, rng: np.random.Generator, scale: float) -> dt.Sequential:
    """``net`` with random biases in [-scale, 0] on every linear layer (b <= 0, DTD's premise)."""
    layers = []
    for layer in net.layers:
        if isinstance(layer, dt.Dense):
            layer = dt.Dense(layer.weight, -scale * rng.uniform(size=layer.out_features))
        elif isinstance(layer, dt.Conv2d):
            layer = dt.Conv2d(layer.weight, -scale * rng.uniform(size=layer.out_channels))
        layers.append(layer)
    return dt.Sequential(layers)


# ------------------------------------------------------------------------------------------------
# train.train_network


def _chain64(net: dt.Sequential) -> tr._Chain:
    ch = tr._Chain(net, "mse", 0.1, 0.0, None)
    ch.params = {i: [np.array(net[i].weight, dtype=np.float64), np.array(net[i].bias, dtype=np.float64)]
                 for i in ch.params}
    return ch


def test_train_network_gradients_match_finite_differences(rng):
    """Every layer kind of the trainer (strided padded conv, p-norm pooling with and without overlap,
    sum and max pooling, Flatten, Dense, global sum) against central differences in float64."""
    net = dt.Sequential([
        dt.Conv2d(rng.normal(size=(3, 2, 3, 3)), rng.normal(size=3) * 0.1, stride=2, padding=1),  # 2x9x9 -> 3x5x5
        dt.ReLU(),
        dt.LpPool(3.0, kernel_size=2, stride=1),                      # overlapping windows -> 3x4x4
        dt.Conv2d(rng.normal(size=(4, 3, 2, 2)), rng.normal(size=4) * 0.1),   # -> 4x3x3
        dt.ReLU(),
        dt.SumPool2d(2, stride=1),                                    # -> 4x2x2
        dt.MaxPool2d(1),
        dt.LpPool(2.5, kernel_size=2),                                # non-overlapping -> 4x1x1
        dt.Flatten(),
        dt.Dense(rng.normal(size=(5, 4)), rng.normal(size=5) * 0.1),
        dt.ReLU(),
        dt.GlobalSumPool(),
    ])
    x = rng.uniform(0.1, 1.0, (4, 2, 9, 9))
    y = rng.uniform(0, 2, 4)
    ch = _chain64(net)

    def loss() -> float:
        out, _ = ch.forward(x)
        return float(0.5 * np.mean((out[:, 0] - y) ** 2))

    out, caches = ch.forward(x)
    _, g, _ = tr._loss_grad(out, y, "mse")
    grads = ch.backward(g, caches)
    np.testing.assert_allclose(out[:, 0], net.forward(x)[:, 0], rtol=1e-12)  # the reference's forward
    h = 1e-6
    for i, (w, b) in ch.params.items():
        for arr, garr in ((w, grads[i][0]), (b, grads[i][1])):
            flat, gflat = arr.reshape(-1), garr.reshape(-1)
            for j in rng.choice(flat.size, size=min(6, flat.size), replace=False):
                old = flat[j]
                flat[j] = old + h
                up = loss()
                flat[j] = old - h
                down = loss()
                flat[j] = old
                assert gflat[j] == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8), (i, j)


def _toy_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """1x8x8 images in [0, 1]: positive when a bright 3x3 square sits somewhere."""
    x = rng.uniform(0, 0.2, (n, 1, 8, 8))
    y = (rng.uniform(size=n) < 0.5).astype(np.float32)
    for i in np.flatnonzero(y):
        r, c = rng.integers(0, 6, size=2)
        x[i, 0, r:r + 3, c:c + 3] = rng.uniform(0.7, 1.0, (3, 3))
    return x.astype(np.float32), y


def test_train_network_learns_keeps_biases_nonpositive_and_is_seeded(rng):
    x, y = _toy_images(rng, 600)
    net = rm.training_free_network((1, 8, 8), channels=(4,), kernel_size=3, pool=(None,), hidden=(6,), seed=0)
    net = rm.rescale_output(net, x)
    kw = dict(lr=0.02, momentum=0.9, log_every=100, checkpoints=(0, 300), val=(x[:200], y[:200]))
    a = tr.train_network(net, x, y, 300, seed=1, **kw)
    assert a.log.loss[-1] < 0.5 * a.log.loss[0]
    assert a.log.val_accuracy[-1] > 0.9
    assert [type(la) for la in a.net] == [type(la) for la in net]
    assert all(np.all(la.bias <= 0) for la in a.net if la.linear)
    assert any(np.any(la.bias < 0) for la in a.net if la.linear)    # the clipping is active
    np.testing.assert_array_equal(a.snapshots[0][0].weight, net[0].weight)
    b = tr.train_network(net, x, y, 300, seed=1, **kw)
    c = tr.train_network(net, x, y, 300, seed=2, **kw)
    np.testing.assert_array_equal(a.net[0].weight, b.net[0].weight)
    assert not np.array_equal(a.net[0].weight, c.net[0].weight)


def test_train_network_refuses_what_it_cannot_train(rng):
    x = rng.uniform(0, 1, (4, 1, 6, 6)).astype(np.float32)
    y = np.zeros(4, np.float32)
    with pytest.raises(UnsupportedError, match="AvgPool2d"):
        tr.train_network(dt.Sequential([dt.AvgPool2d(2), dt.Flatten(), dt.Dense(np.ones((1, 9)))]), x, y, 1)
    with pytest.raises(ShapeError, match="one output"):
        tr.train_network(dt.Sequential([dt.Flatten(), dt.Dense(np.ones((2, 36)))]), x, y, 1)
    with pytest.raises(InputError, match="momentum"):
        tr.train_network(dt.Sequential([dt.Flatten(), dt.Dense(np.ones((1, 36)))]), x, y, 1, momentum=1.0)


# ------------------------------------------------------------------------------------------------
# the training-free relevance model


def test_training_free_network_structure():
    net = rm.training_free_network((1, 28, 56), channels=(16, 32), pool=(2, None), hidden=(32,), p=2.0)
    assert [la.kind for la in net] == ["Conv2d", "ReLU", "LpPool", "Conv2d", "ReLU", "LpPool", "Flatten", "Dense",
                                       "ReLU", "GlobalSumPool"]
    assert net.shapes((1, 1, 28, 56))[6] == (1, 32, 1, 1)        # per-channel global p-norm pooling
    assert all(np.all(la.bias == 0) for la in net if la.linear)
    assert isinstance(rm.training_free_network((1, 8, 8), (2,), 3, (None,), (3,), top_p=3.0)[-1], dt.LpPool)
    with pytest.raises(ShapeError, match="pool"):
        rm.training_free_network((1, 8, 8), channels=(2,), pool=())
    with pytest.raises(InputError, match="init"):
        rm.training_free_network((1, 8, 8), channels=(2,), kernel_size=3, pool=(None,), init="zeros")


@st.composite
def _pnorm_networks(draw):
    depth = draw(st.integers(1, 2))
    p = draw(st.floats(1.0, 6.0))
    channels = tuple(draw(st.integers(1, 5)) for _ in range(depth))
    pools = tuple(draw(st.sampled_from([2, None])) if s == depth - 1 else 2 for s in range(depth))
    hidden = tuple(draw(st.integers(1, 6)) for _ in range(draw(st.integers(1, 2))))
    top_p = draw(st.sampled_from([1.0, 2.0, 4.0]))
    size = 10 if depth == 2 else draw(st.integers(5, 9))
    seed = draw(st.integers(0, 2**16))
    first = draw(st.sampled_from(["zB", "w2"]))
    return depth, p, channels, pools, hidden, top_p, size, seed, first


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_pnorm_networks())
def test_training_free_is_exactly_conservative_and_positive_at_every_layer(backend, spec):
    """Random deep p-norm networks (p in [1, 6], 1-2 convolution stages of 1-5 channels with windowed or
    global p-norm pooling, 1-2 Dense layers, a sum or p-norm top, biases <= 0): the training-free
    composite conserves f(x) at every layer to float rounding and gives no negative relevance."""
    depth, p, channels, pools, hidden, top_p, size, seed, first = spec
    rng = np.random.default_rng(seed)
    net = rm.training_free_network((2, size, size), channels=channels, kernel_size=2, pool=pools, hidden=hidden,
                                   p=p, top_p=top_p, seed=seed)
    net = _with_biases(net, rng, 0.05)
    last = max(i for i, la in enumerate(net) if la.linear)   # non-negative top weights: f > 0 on most inputs
    net = dt.Sequential([dt.Dense(np.abs(la.weight), la.bias) if i == last else la for i, la in enumerate(net)])
    if first == "zB":
        x, comp = rng.uniform(0, 1, (3, 2, size, size)), dt.composites.training_free(0.0, 1.0)
    else:
        x, comp = rng.normal(size=(3, 2, size, size)), dt.composites.training_free(first=WSquare())
    ex = dt.Explainer(net, comp, backend=backend)
    res = ex.explain(x, return_layers=True)
    assert res.conservative_expected
    f = res.explained
    assert np.all(f >= 0)
    event(f"f > 0 on {int((f > 0).sum())} of 3 inputs")
    tol = 1e-12 if backend == "numpy" else 1e-5
    for r in res.layers:
        sums = r.reshape(len(r), -1).sum(axis=1)
        np.testing.assert_allclose(sums, f, rtol=tol, atol=tol * max(1e-3, float(f.max())))
        assert r.min() >= -tol * max(1e-3, float(np.abs(r).max())), "negative relevance"


def test_training_free_cpu_matches_numpy(rng):
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled core (deeptaylor._core) is not built")
    net = _with_biases(rm.training_free_network((1, 12, 12), (3, 4), 3, (2, None), (5,), p=3.0, seed=3), rng, 0.05)
    x = rng.uniform(0, 1, (5, 1, 12, 12))
    comp = dt.composites.training_free()
    a = dt.Explainer(net, comp, backend="numpy").explain(x)
    b = dt.Explainer(net, comp, backend="cpu").explain(x)
    np.testing.assert_allclose(b.relevance, a.relevance, rtol=0, atol=2e-5 * np.abs(a.relevance).max())


def test_training_free_composite_by_name():
    c = dt.composites.get("training-free", low=-1.0, high=1.0)
    assert c.name == "training_free" and isinstance(c.first, ZBox) and isinstance(c.default, ZPlus)
    assert float(c.first.low) == -1.0


# ------------------------------------------------------------------------------------------------
# the min-max relevance model


@pytest.fixture(scope="module")
def minmax_setup():
    """A seeded deep p-norm network (1x8x8 -> conv 3x3 (4) -> global p-norm per channel -> Dense 6 ->
    sum), its engine relevances on 600 training and 200 held-out inputs, and a min-max model of the
    relevance of the 4 pooled neurons (J = 8, zB on [0, 1], context: the Dense layer's relevance)
    fitted on the training inputs: 400 Adam steps, a fraction of a second."""
    rng = np.random.default_rng(100)
    net = rm.training_free_network((1, 8, 8), channels=(4,), kernel_size=3, pool=(None,), hidden=(6,), p=2.0, seed=0)
    x, xv = rng.uniform(0, 1, (600, 1, 8, 8)), rng.uniform(0, 1, (200, 1, 8, 8))
    net = rm.rescale_output(net, x)
    mm = rm.MinMax(net, (1, 8, 8), layer=3, hidden=8, rule=ZBox(0.0, 1.0), seed=0)
    targets = mm.upper_relevance(x, backend="numpy")
    val = mm.upper_relevance(xv, backend="numpy")
    loss0 = mm.loss(xv, val)
    log = mm.fit(x, targets=targets, val=(xv, val), steps=400, batch_size=50, lr=3e-3, log_every=100)
    return net, mm, x, xv, val, loss0, log


def test_minmax_structure_and_engine_targets(minmax_setup):
    net, mm, x, *_ = minmax_setup
    assert (mm.layer, mm.context, mm.n_out, mm.n_context, mm.n_in) == (3, 5, 4, 6, 64)
    assert mm.v.shape == (64, 4, 8) and mm.vc.shape == (6, 4, 8) and mm.d.shape == (4, 8)
    up = mm.upper_relevance(x[:7], backend="numpy")
    # the targets are the engine's relevance at value 3 under z+ above (here: the whole net's z+ pass)
    full = dt.Explainer(net, dt.Composite(default=ZPlus()), backend="numpy").explain(x[:7], return_layers=True)
    np.testing.assert_allclose(up.relevance, full.layers[3].reshape(7, -1), rtol=1e-12)
    np.testing.assert_allclose(up.context, full.layers[5].reshape(7, -1), rtol=1e-12)
    np.testing.assert_allclose(up.relevance.sum(axis=1), up.explained, rtol=1e-12)   # z+ above conserves


def test_minmax_fit_reduces_the_loss(minmax_setup):
    *_, loss0, log = minmax_setup
    assert log.step == [100, 200, 300, 400]
    assert log.val_loss[-1] < 1e-3 * loss0                 # measured: 2.3 -> 7.2e-5
    assert log.val_loss[-1] < log.val_loss[0] and log.loss[-1] < log.loss[0]


def test_minmax_approximates_the_engine_on_held_out_data(minmax_setup):
    """R^ against the engine's R on 200 held-out inputs. Measured (seeded): relative RMS error over
    the neurons 0.045, per-sample |sum R^ - f(x)| / f(x) median 0.025, max 0.11. Bounds: 0.1, 0.05, 0.3."""
    _, mm, _, xv, *_ = minmax_setup
    e = mm.explain(xv, backend="numpy")
    nrmse = np.sqrt(np.mean((e.r_hat - e.r_engine) ** 2) / np.mean(e.r_engine ** 2))
    rel = np.abs(e.r_hat.sum(axis=1) - e.explained) / e.explained
    assert nrmse < 0.1
    assert np.median(rel) < 0.05
    assert rel.max() < 0.3


@pytest.mark.parametrize("rule", [ZBox(0.0, 1.0), WSquare(), ZPlus(), dt.rules.Flat()])
def test_minmax_explains_itself_conservatively_and_positively(minmax_setup, rule):
    net, mm, _, xv, *_ = minmax_setup
    m2 = rm.MinMax(net, (1, 8, 8), layer=3, hidden=8, rule=rule, seed=0)
    m2.v, m2.vc, m2.d = mm.v, mm.vc, mm.d
    e = m2.explain(xv, backend="numpy")
    np.testing.assert_allclose(e.relevance.reshape(len(xv), -1).sum(axis=1), e.r_hat.sum(axis=1), rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(e.y.sum(axis=2), e.r_hat, rtol=1e-12)
    assert e.relevance.min() >= -1e-12 * np.abs(e.relevance).max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_minmax_in_an_explainer(minmax_setup, backend):
    """The model as the rule of the layers below 3: the upper layers on the backend, the model in NumPy."""
    net, mm, _, xv, *_ = minmax_setup
    ex = dt.Explainer(net, mm.composite(), backend=backend)
    res = ex.explain(xv[:20], return_layers=True)
    assert res.backend == f"{backend}+numpy"
    assert res.method == "composite:min_max+zplus"
    assert not res.conservative_expected
    direct = mm.explain(xv[:20], backend=backend)
    np.testing.assert_allclose(res.relevance, direct.relevance, rtol=1e-12, atol=1e-15)
    sums = res.relevance.reshape(20, -1).sum(axis=1)
    np.testing.assert_allclose(sums, direct.r_hat.sum(axis=1), rtol=1e-12)       # the model's R^, exactly
    tol = 1e-12 if backend == "numpy" else 1e-5
    np.testing.assert_allclose(res.output, net.forward(xv[:20]), rtol=tol)
    assert len(res.layers) == len(net) + 1
    assert np.all(np.isnan(res.layers[1])) and np.all(np.isnan(res.layers[2]))   # inside the modelled range
    np.testing.assert_allclose(res.layers[3].reshape(20, -1), direct.r_hat, rtol=1e-12)
    np.testing.assert_allclose(res.layers[-1][:, 0], res.explained, rtol=tol)


def test_minmax_refuses_bad_arguments(minmax_setup):
    net, mm, _, xv, *_ = minmax_setup
    with pytest.raises(InputError, match="layer"):
        rm.MinMax(net, (1, 8, 8), layer=0)
    with pytest.raises(InputError, match="context"):
        rm.MinMax(net, (1, 8, 8), layer=3, context=3)
    with pytest.raises(RuleError, match="rule"):
        rm.MinMax(net, (1, 8, 8), layer=3, rule=dt.rules.Epsilon())
    with pytest.raises(UnsupportedError, match="Sequential"):
        rm.MinMax(dt.Graph(*_graph_of(net)), (1, 8, 8), layer=3)
    with pytest.raises(InputError, match="within"):   # the zB box, checked by the Explainer before any work
        dt.Explainer(net, mm.composite(), backend="numpy").explain(xv[:2] + 1.0)
    with pytest.raises(InputError, match="within"):
        mm.explain(xv[:2] - 1.0, backend="numpy")
    other = rm.training_free_network((1, 8, 8), channels=(4,), kernel_size=3, pool=(None,), hidden=(6,), seed=9)
    with pytest.raises(UnsupportedError, match="another network"):
        dt.Explainer(other, mm.composite(), backend="numpy")


def _graph_of(net: dt.Sequential):
    x = dt.Input((1, 8, 8))
    t = x
    for layer in net.layers:
        t = layer(t)
    return x, t


def test_minmax_tiles_are_local_receptive_fields(minmax_setup):
    """With ``tile`` every detection unit sees one window of the input: its weights stay 0 outside
    (before and after the fit), its relevance stays inside, and the explanation still sums to R^."""
    net, _, x, xv, val, *_ = minmax_setup
    mm = rm.MinMax(net, (1, 8, 8), layer=3, hidden=2, rule=ZBox(0.0, 1.0), tile=4, tile_stride=2, seed=1)
    assert mm.v.shape == (64, 4, 18)                   # 3 x 3 windows of 4x4 at stride 2, 2 units each
    inside = mm.mask[:, 0, :].reshape(8, 8, 18)
    np.testing.assert_array_equal(inside[:4, :4, 0], 1)
    assert inside[:, :, 0].sum() == 16 and inside[:, :, 17].sum() == 16 and inside[4:, 4:, 17].all()
    mm.fit(x, steps=60, batch_size=50, lr=3e-3, backend="numpy")
    assert np.all(mm.v[np.broadcast_to(mm.mask, mm.v.shape) == 0] == 0)
    e = mm.explain(xv[:5], backend="numpy")
    np.testing.assert_allclose(e.relevance.reshape(5, -1).sum(axis=1), e.r_hat.sum(axis=1), rtol=1e-12)
    y = np.zeros_like(e.y)
    y[:, :, 17] = e.y[:, :, 17]                         # one unit of the bottom-right window
    r = mm.redistribute(xv[:5], y)[:, 0]
    assert np.all(r[:, :4, :] == 0) and np.all(r[:, :, :4] == 0)
    np.testing.assert_allclose(r.sum(axis=(1, 2)), y.sum(axis=(1, 2)), rtol=1e-12)
    with pytest.raises(ShapeError, match="cover"):
        rm.MinMax(net, (1, 8, 8), layer=3, tile=3)


def test_minmax_weight_decay_shrinks_the_weights(minmax_setup):
    net, _, x, *_ = minmax_setup
    norms = []
    for wd in (0.0, 50.0):
        mm = rm.MinMax(net, (1, 8, 8), layer=3, hidden=4, rule=ZBox(0.0, 1.0), seed=2)
        mm.fit(x, steps=100, batch_size=50, lr=3e-3, backend="numpy", weight_decay=wd)
        norms.append(float(np.abs(mm.v).sum()))
    assert norms[1] < 0.8 * norms[0]
