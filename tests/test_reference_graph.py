"""The float64 reference on the graph layers: forward and gradient of every new node against torch
(float64), relevance properties (conservation where theory promises it, and exactly what is lost
where it does not), and every linear rule on grouped and transposed convolutions against the slow
definitions of tests/test_rules.py (the layer turned into a dense matrix by applying it to unit
vectors).
"""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.methods import GradientXInput, Sensitivity
from deeptaylor.reference import engine, linear_relevance
from deeptaylor.reference.ops import activation_derivative, linear_forward
from deeptaylor.rules import Epsilon, Flat, Gamma, WSquare, Z, ZBox, ZPlus
from test_rules import DEFINITIONS, RULES, Matrix, draw_input

torch = pytest.importorskip("torch")
F = torch.nn.functional

SEEDS = range(6)


def T(a: np.ndarray) -> torch.Tensor:  # noqa: N802
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# One random instance of every node: (layer, input arrays, the same computation in torch)


def _conv(rng):
    g = int(rng.choice([1, 2, 3]))
    depthwise = rng.uniform() < 0.3
    cin = g * int(rng.integers(1, 3))
    cout = cin * int(rng.integers(1, 3)) if depthwise else g * int(rng.integers(1, 3))
    g = cin if depthwise else g
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    stride = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    pad = tuple(int(v) for v in rng.integers(0, 3, size=4))
    h = max(int(rng.integers(3, 8)), dil[0] * (kh - 1) + 1)
    w = max(int(rng.integers(3, 8)), dil[1] * (kw - 1) + 1)
    n = int(rng.choice([1, 2, 3]))
    layer = dt.Conv2d(rng.normal(size=(cout, cin // g, kh, kw)), rng.normal(size=cout), stride=stride,
                      padding=pad, dilation=dil, groups=g)
    t, b, lft, r = pad

    def fn(x):
        return F.conv2d(F.pad(x, (lft, r, t, b)), T(layer.weight), T(layer.bias), stride, 0, dil, g)

    return layer, [rng.normal(size=(n, cin, h, w))], fn


def _convT(rng, symmetric=False):  # noqa: N802
    g = int(rng.choice([1, 2]))
    cin, cout = g * int(rng.integers(1, 3)), g * int(rng.integers(1, 3))
    if rng.uniform() < 0.25:  # depthwise
        g, cout = cin, cin
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    stride = (int(rng.integers(1, 4)), int(rng.integers(1, 3)))
    dil = (int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    op = (int(rng.integers(0, max(stride[0], dil[0]))), int(rng.integers(0, max(stride[1], dil[1]))))
    h, w, n = int(rng.integers(1, 6)), int(rng.integers(1, 6)), int(rng.choice([1, 2]))
    full = ((h - 1) * stride[0] + dil[0] * (kh - 1) + 1 + op[0], (w - 1) * stride[1] + dil[1] * (kw - 1) + 1 + op[1])
    if symmetric:
        ph, pw = (int(rng.integers(0, (full[0] - 1) // 2 + 1)), int(rng.integers(0, (full[1] - 1) // 2 + 1)))
        pad = (ph, ph, pw, pw)
    else:
        t, lft = int(rng.integers(0, full[0])), int(rng.integers(0, full[1]))
        pad = (t, int(rng.integers(0, full[0] - t)), lft, int(rng.integers(0, full[1] - lft)))
    layer = dt.ConvTranspose2d(rng.normal(size=(cin, cout // g, kh, kw)), rng.normal(size=cout), stride=stride,
                               padding=pad, output_padding=op, dilation=dil, groups=g)
    t, b, lft, r = pad

    def fn(x):
        if symmetric:
            return F.conv_transpose2d(x, T(layer.weight), T(layer.bias), stride, (t, lft), op, g, dil)
        y = F.conv_transpose2d(x, T(layer.weight), T(layer.bias), stride, 0, op, g, dil)
        return y[:, :, t:y.shape[2] - b, lft:y.shape[3] - r]

    return layer, [rng.normal(size=(n, cin, h, w))], fn


def _batchnorm(rng, rank):
    c = int(rng.integers(1, 5))
    mean, var = rng.normal(size=c), rng.uniform(0.1, 2.0, size=c)
    wt, bs, eps = rng.normal(size=c), rng.normal(size=c), float(rng.choice([1e-5, 1e-3, 0.0]))
    cls = dt.BatchNorm2d if rank == 4 else dt.BatchNorm1d
    layer = cls(mean, var, wt, bs, eps=eps)
    shape = (int(rng.integers(1, 4)), c) + ((int(rng.integers(1, 5)), int(rng.integers(1, 5))) if rank == 4 else ())

    def fn(x):
        return F.batch_norm(x, T(mean), T(var), T(wt), T(bs), training=False, eps=eps)

    return layer, [rng.normal(size=shape)], fn


ACTIVATIONS = {
    "leaky_relu": (lambda: dt.LeakyReLU(0.07), lambda x: F.leaky_relu(x, 0.07)),
    "relu6": (dt.ReLU6, F.relu6),
    "elu": (lambda: dt.ELU(1.7), lambda x: F.elu(x, 1.7)),
    "gelu": (dt.GELU, F.gelu),
    "gelu_tanh": (lambda: dt.GELU("tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "silu": (dt.SiLU, F.silu),
    "hardswish": (dt.Hardswish, F.hardswish),
    "hardsigmoid": (dt.Hardsigmoid, F.hardsigmoid),
    "tanh": (dt.Tanh, torch.tanh),
    "sigmoid": (dt.Sigmoid, torch.sigmoid),
    "relu": (dt.ReLU, F.relu),
}


def _activation(rng, name):
    make, fn = ACTIVATIONS[name]
    shape = (int(rng.integers(1, 4)), 3, 4, 5) if rng.uniform() < 0.5 else (int(rng.integers(1, 4)), 7)
    return make(), [rng.normal(scale=4.0, size=shape)], fn


def _pool_geometry(rng):
    k = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    s = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    p = (int(rng.integers(0, k[0] // 2 + 1)), int(rng.integers(0, k[1] // 2 + 1)))
    h, w = int(rng.integers(k[0], k[0] + 6)), int(rng.integers(k[1], k[1] + 6))
    return k, s, p, (int(rng.choice([1, 2])), int(rng.integers(1, 4)), h, w)


def _maxpool(rng):
    k, s, p, shape = _pool_geometry(rng)
    ceil = bool(rng.uniform() < 0.7)
    layer = dt.MaxPool2d(k, s, p, ceil_mode=ceil)
    return layer, [rng.normal(size=shape)], lambda x: F.max_pool2d(x, k, s, p, ceil_mode=ceil)


def _avgpool(rng):
    k, s, p, shape = _pool_geometry(rng)
    ceil, count = bool(rng.uniform() < 0.7), bool(rng.uniform() < 0.5)
    layer = dt.AvgPool2d(k, s, p, ceil_mode=ceil, count_include_pad=count)
    return layer, [rng.normal(size=shape)], \
        lambda x: F.avg_pool2d(x, k, s, p, ceil_mode=ceil, count_include_pad=count)


def _adaptive(rng):
    shape = (int(rng.choice([1, 2])), 2, int(rng.integers(1, 10)), int(rng.integers(1, 10)))
    out = (int(rng.integers(1, 7)), int(rng.integers(1, 7)))
    return dt.AdaptiveAvgPool2d(out), [rng.normal(size=shape)], lambda x: F.adaptive_avg_pool2d(x, out)


def _global_avg(rng):
    shape = (int(rng.choice([1, 3])), int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 6)))
    return dt.GlobalAvgPool(), [rng.normal(size=shape)], lambda x: x.mean((2, 3))


def _upsample(rng):
    sf = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    shape = (int(rng.choice([1, 2])), 2, int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    return dt.Upsample(sf), [rng.normal(size=shape)], \
        lambda x: F.interpolate(x, scale_factor=(float(sf[0]), float(sf[1])), mode="nearest")


def _shuffle(rng):
    g = int(rng.integers(1, 4))
    c = g * int(rng.integers(1, 4))
    shape = (int(rng.choice([1, 2])), c, 3, 2)
    return dt.ChannelShuffle(g), [rng.normal(size=shape)], torch.nn.ChannelShuffle(g)


def _slice(rng):
    c = int(rng.integers(2, 7))
    start = int(rng.integers(0, c))
    stop = int(rng.integers(start + 1, c + 1))
    shape = (2, c, 3, 3) if rng.uniform() < 0.5 else (2, c)
    return dt.Slice(start, stop), [rng.normal(size=shape)], lambda x: x[:, start:stop]


def _identity(rng):
    return dt.Identity(), [rng.normal(size=(2, 3, 2, 2))], lambda x: x


def _dropout(rng):
    return dt.Dropout(0.3), [rng.normal(size=(2, 5))], lambda x: x


def _add(rng):
    k = int(rng.integers(2, 5))
    shape = (int(rng.choice([1, 2])), 3, 2, 3) if rng.uniform() < 0.5 else (2, 4)
    return dt.Add(), [rng.normal(size=shape) for _ in range(k)], lambda *xs: sum(xs[1:], xs[0])


def _concat(rng):
    k = int(rng.integers(2, 4))
    spatial = (3, 2) if rng.uniform() < 0.5 else ()
    xs = [rng.normal(size=(2, int(rng.integers(1, 4))) + spatial) for _ in range(k)]
    return dt.Concat(), xs, lambda *ts: torch.cat(ts, dim=1)


def _mul(rng, broadcast):
    shape = (int(rng.choice([1, 2])), 3, 4, 5)
    gate = shape[:2] + (1, 1) if broadcast else shape
    return dt.Mul(), [rng.normal(size=shape), rng.uniform(0, 1, size=gate)], lambda s, g: s * g


CASES = {
    "conv2d-groups": _conv,
    "conv_transpose2d": _convT,
    "conv_transpose2d-symmetric": lambda r: _convT(r, symmetric=True),
    "batchnorm2d": lambda r: _batchnorm(r, 4),
    "batchnorm1d": lambda r: _batchnorm(r, 2),
    **{f"act-{name}": (lambda r, name=name: _activation(r, name)) for name in ACTIVATIONS},
    "maxpool-ceil": _maxpool,
    "avgpool-ceil-count": _avgpool,
    "adaptive_avgpool": _adaptive,
    "global_avgpool": _global_avg,
    "upsample": _upsample,
    "channel_shuffle": _shuffle,
    "slice": _slice,
    "identity": _identity,
    "dropout": _dropout,
    "add": _add,
    "concat": _concat,
    "mul": lambda r: _mul(r, False),
    "mul-broadcast": lambda r: _mul(r, True),
}


def _case(name, seed):
    rng = np.random.default_rng([sorted(CASES).index(name), seed])
    return CASES[name](rng)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_torch(name, seed):
    layer, xs, fn = _case(name, seed)
    out, _ = engine.forward_node(layer, xs)
    want = fn(*[T(x) for x in xs]).numpy()
    assert out.shape == want.shape == layer.output_shape(*[x.shape for x in xs])
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_matches_torch_autograd(name, seed):
    layer, xs, fn = _case(name, seed)
    out, cache = engine.forward_node(layer, xs)
    g = np.random.default_rng(seed + 1000).normal(size=out.shape)
    grads = engine.gradient_node(layer, xs, out, cache, g)
    ts = [T(x).requires_grad_(True) for x in xs]
    (fn(*ts) * T(g)).sum().backward()
    assert len(grads) == len(xs)
    rtol = 1e-7 if name == "act-hardsigmoid" else 1e-11   # torch: 1/6 as a float32 constant
    for got, t in zip(grads, ts, strict=True):
        assert got.shape == t.shape
        np.testing.assert_allclose(got, t.grad.numpy(), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_kinks_match_torch(name):
    """Forward and derivative at the kinks and the saturation boundaries, where conventions differ."""
    make, fn = ACTIVATIONS[name]
    layer = make()
    x = np.array([[-6.0, -3.0, -1e-300, 0.0, 1e-300, 3.0, 6.0, -50.0, 50.0, -800.0, 800.0]])
    t = T(x).requires_grad_(True)
    y = fn(t)
    y.sum().backward()
    out, cache = engine.forward_node(layer, [x])
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-13, atol=1e-300)
    grad = engine.gradient_node(layer, [x], out, cache, np.ones_like(x))[0]
    # torch computes tanh' = 1 - y^2 from the output (cancellation in the tails) and hardsigmoid's
    # slope 1/6 as a float32 constant even in float64: compare those to that precision
    rtol = {"hardsigmoid": 1e-7}.get(name, 1e-10)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=rtol, atol=1e-300)
    if name in ("leaky_relu", "relu6", "hardswish"):  # piecewise: the kink conventions bit for bit
        np.testing.assert_array_equal(activation_derivative(layer.fn, layer.param, x), t.grad.numpy())
    if name == "hardsigmoid":
        np.testing.assert_array_equal(activation_derivative(layer.fn, layer.param, x) > 0, t.grad.numpy() > 0)


# --------------------------------------------------------------------------------------------------
# Relevance of the structural nodes


def _relevance(layer, xs, R, rule=None):
    out, cache = engine.forward_node(layer, xs)
    return engine.relevance_node(layer, rule, xs, out, cache, R), out


def _total(parts):
    return sum(float(p.sum()) for p in parts)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["concat", "slice", "upsample", "channel_shuffle", "identity", "dropout",
                                  "maxpool-ceil", "mul", "mul-broadcast"])
def test_routing_nodes_are_exactly_conservative(name, seed):
    """Nodes that route relevance without mixing it conserve it exactly (Slice conserves what it reads;
    max pooling sends each window's relevance to its winner; Mul all of it to the signal)."""
    layer, xs, _ = _case(name, seed)
    out, _ = engine.forward_node(layer, xs)
    R = np.random.default_rng(seed).normal(size=out.shape)
    parts, _ = _relevance(layer, xs, R)
    assert [p.shape for p in parts] == [x.shape for x in xs]
    assert _total(parts) == pytest.approx(float(R.sum()), rel=1e-12, abs=1e-12)
    if name == "concat":
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), R)
    if name == "slice":
        np.testing.assert_array_equal(parts[0][:, layer.start:layer.stop], R)
        assert not np.delete(parts[0], np.s_[layer.start:layer.stop], axis=1).any()
    if name == "channel_shuffle":  # a permutation: the same multiset, and forward(R_in) == R
        np.testing.assert_array_equal(engine.forward_node(layer, parts)[0], R)
    if name.startswith("mul"):
        np.testing.assert_array_equal(parts[0], R)
        assert parts[1].shape == xs[1].shape and not parts[1].any()


def test_upsample_relevance_is_the_sum_of_the_copies():
    layer = dt.Upsample((2, 3))
    x = np.arange(4.0).reshape(1, 1, 2, 2)
    R = np.arange(24.0).reshape(1, 1, 4, 6)
    (got,), _ = _relevance(layer, [x], R)
    want = np.array([[R[0, 0, 0:2, 0:3].sum(), R[0, 0, 0:2, 3:6].sum()],
                     [R[0, 0, 2:4, 0:3].sum(), R[0, 0, 2:4, 3:6].sum()]])
    np.testing.assert_array_equal(got[0, 0], want)


@pytest.mark.parametrize("seed", SEEDS)
def test_add_norm_rule(seed):
    """R_k = a_k R / (z + eps sgn z): conservative up to the factor z / (z + eps sgn z) (relative loss
    eps / |z + eps sgn z|), positive for non-negative inputs and positive R."""
    layer, xs, _ = _case("add", seed)
    out, _ = engine.forward_node(layer, xs)
    R = np.random.default_rng(seed).normal(size=out.shape)
    parts, _ = _relevance(layer, xs, R)
    den = out + layer.eps * np.where(out >= 0, 1.0, -1.0)
    for p, a in zip(parts, xs, strict=True):
        np.testing.assert_allclose(p, a * R / den, rtol=1e-14)
    np.testing.assert_allclose(sum(parts), R * out / den, rtol=1e-12, atol=1e-300)
    loss = np.abs(R - sum(parts))
    np.testing.assert_allclose(loss, np.abs(R) * layer.eps / np.abs(den), rtol=1e-6, atol=1e-300)
    # non-negative inputs, positive relevance: every share is non-negative
    pos = [np.abs(x) for x in xs]
    pos[0][..., 0] = 0.0
    parts, _ = _relevance(layer, pos, np.abs(R))
    assert all((p >= 0).all() for p in parts)


def test_add_norm_rule_loses_relevance_where_the_sum_is_zero_and_can_create_negative():
    layer = dt.Add()
    a = np.array([[1.0, 2.0, 0.0, 3.0]])
    b = np.array([[-1.0, 1.0, 0.0, -1.0]])          # sums: 0, 3, 0, 2
    R = np.array([[5.0, 3.0, 7.0, 2.0]])
    (ra, rb), out = _relevance(layer, [a, b], R)
    # z = 0: R / eps times a_k, but a_1 + a_2 = 0: the shares cancel and the relevance is lost
    np.testing.assert_allclose(ra + rb, [[0.0, 3.0 * 3 / (3 + 1e-6), 0.0, 2.0 * 2 / (2 + 1e-6)]], atol=1e-9)
    assert ra[0, 0] == pytest.approx(5.0 / 1e-6)    # ... each share alone is huge: R a_k / eps
    # mixed signs: negative relevance is created for the negative summand, the other gets more than R
    assert rb[0, 3] < 0 and ra[0, 3] > R[0, 3]


@pytest.mark.parametrize("rank", [2, 4])
def test_batchnorm_pass_epsilon_and_z(rank, rng):
    layer, (x,), _ = _batchnorm(rng, rank)
    y, cache = engine.forward_node(layer, [x])
    R = rng.normal(size=y.shape)
    (r_pass,), _ = _relevance(layer, [x], R, None)
    np.testing.assert_array_equal(r_pass, R)
    shape = (1, -1) + (1,) * (rank - 2)
    contrib = x * layer.scale.reshape(shape)
    for eps in (0.0, 1e-2, 0.5):
        (r_eps,), _ = _relevance(layer, [x], R, Epsilon(eps))
        np.testing.assert_allclose(r_eps, contrib * R / (y + eps * np.where(y >= 0, 1, -1)), rtol=1e-12)
    (r_z,), _ = _relevance(layer, [x], R, Z())
    np.testing.assert_allclose(r_z, contrib * R / y, rtol=1e-12)
    # without a shift, Z is the identity on relevance (a diagonal layer passes each R_j to its input)
    c = layer.num_features
    noshift = type(layer)(np.zeros(c), layer.running_var, layer.weight, np.zeros(c), eps=layer.eps)
    (r_z0,), _ = _relevance(noshift, [x], R, Z())
    np.testing.assert_allclose(r_z0, R, rtol=1e-12)
    # Z: 0 where y == 0
    x0 = np.broadcast_to(-layer.shift.reshape(shape) / layer.scale.reshape(shape), x.shape).copy()
    (r_zero,), _ = _relevance(layer, [x0], R, Z())
    assert np.all(np.isfinite(r_zero))


def test_batchnorm_unsupported_rule():
    layer = dt.BatchNorm1d(np.zeros(2), np.ones(2))
    with pytest.raises(dt.UnsupportedError, match="BatchNorm1d"):
        _relevance(layer, [np.ones((1, 2))], np.ones((1, 2)), ZPlus())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", ["avgpool-ceil-count", "adaptive_avgpool", "global_avgpool"])
def test_average_pools_relevance_in_proportion(name, seed):
    """R_i = a_i sum_{j covers i} R_j / sum_{i' in j} a_i' (the divisor cancels), checked element by
    element against the pool's dense 0/1 window matrix; conservative on positive inputs."""
    layer, (x,), _ = _case(name, seed)
    x = np.abs(x) + 0.1
    out, _ = engine.forward_node(layer, [x])
    R = np.random.default_rng(seed).normal(size=out.shape)
    (got,), _ = _relevance(layer, [x], R)
    # window membership: the gradient of the pool is inv_count * membership
    n = x.shape[0]
    p = int(np.prod(x.shape[1:]))
    eye = np.eye(p).reshape((p,) + x.shape[1:])
    member = engine.forward_node(layer, [eye])[0].reshape(p, -1).T > 0     # (outputs, inputs)
    want = np.zeros((n, p))
    for k in range(n):
        a, r = x[k].ravel(), R[k].ravel()
        for j in range(member.shape[0]):
            want[k] += member[j] * a * r[j] / (member[j] * a).sum()
    np.testing.assert_allclose(got.reshape(n, -1), want, rtol=1e-12)
    np.testing.assert_allclose(got.reshape(n, -1).sum(1), R.reshape(n, -1).sum(1), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Every rule on grouped and transposed convolutions


def _conv_layers():
    rng = np.random.default_rng(7)
    return {
        "conv-groups": (dt.Conv2d(rng.normal(size=(4, 1, 2, 3)), rng.normal(size=4), stride=(2, 1),
                                  padding=(1, 0, 0, 2), groups=2), (2, 4, 4)),
        "conv-depthwise": (dt.Conv2d(rng.normal(size=(3, 1, 3, 3)), rng.normal(size=3), padding=1, groups=3),
                           (3, 4, 3)),
        "convT": (dt.ConvTranspose2d(rng.normal(size=(2, 3, 3, 2)), rng.normal(size=3), stride=(2, 3),
                                     padding=(1, 0, 0, 1), output_padding=(1, 2)), (2, 3, 2)),
        "convT-groups-dilation": (dt.ConvTranspose2d(rng.normal(size=(4, 1, 2, 2)), rng.normal(size=2),
                                                     stride=1, padding=1, output_padding=1, dilation=2,
                                                     groups=2), (4, 3, 3)),
    }


CONV_LAYERS = _conv_layers()


def as_matrix(layer, sample_shape) -> Matrix:
    """Dense matrix of any linear layer (from unit vectors through the layer's own forward)."""
    p = int(np.prod(sample_shape))
    eye = np.eye(p).reshape((p,) + tuple(sample_shape))
    M = linear_forward(layer, eye, layer.weight, None).reshape(p, -1).T
    conn = linear_forward(layer, eye, np.ones_like(layer.weight), None).reshape(p, -1).T > 0
    b = linear_forward(layer, np.zeros((1,) + tuple(sample_shape)), np.zeros_like(layer.weight), layer.bias)
    return Matrix(M, b.ravel(), conn)


def test_dense_matrix_is_the_transposed_conv_and_its_transpose():
    """L and L^T of a transposed convolution are transposes of each other (<L a, s> = <a, L^T s>)."""
    rng = np.random.default_rng(3)
    for layer, sample in CONV_LAYERS.values():
        a = rng.normal(size=(2,) + sample)
        s = rng.normal(size=layer.output_shape(a.shape))
        W = np.asarray(layer.weight)
        lhs = (linear_forward(layer, a, W, None) * s).sum()
        rhs = (a * dt.reference.ops.linear_transpose(layer, s, W, a.shape)).sum()
        assert lhs == pytest.approx(rhs, rel=1e-12)


@pytest.mark.parametrize("layer_name", sorted(CONV_LAYERS))
@pytest.mark.parametrize(("name", "make_rule", "domain"), RULES, ids=[r[0] for r in RULES])
def test_rule_on_grouped_and_transposed_convs_matches_definition(layer_name, name, make_rule, domain):
    layer, sample = CONV_LAYERS[layer_name]
    rng = np.random.default_rng([sorted(CONV_LAYERS).index(layer_name), [r[0] for r in RULES].index(name)])
    rule = make_rule(sample)
    batch = 2
    out_shape = layer.output_shape((batch,) + sample)
    m = as_matrix(layer, sample)
    lo = hi = None
    if isinstance(rule, ZBox):
        lo, hi = (np.broadcast_to(v, sample).ravel() for v in rule.bounds_for(sample))
    for _ in range(100):
        a = draw_input(rule, domain, (batch,) + sample, rng)
        R = rng.normal(size=out_shape)
        want, smallest = np.zeros((batch, m.M.shape[1])), np.inf
        for k in range(batch):
            r, dens = DEFINITIONS[type(rule)](rule, m, a[k].ravel(), R[k].ravel(), lo, hi)
            want[k] = r
            smallest = min([smallest] + [abs(d) for d in dens if d != 0])
        if smallest > 1e-3 or isinstance(rule, (WSquare, Flat)):
            break
    else:  # pragma: no cover
        pytest.fail("could not draw an input away from z = 0")
    got = linear_relevance(layer, rule, a, R)
    assert got.shape == a.shape
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(got.reshape(batch, -1), want, rtol=1e-10, atol=1e-10 * scale)


def _nobias(layer):
    if isinstance(layer, dt.ConvTranspose2d):
        return dt.ConvTranspose2d(layer.weight, None, layer.stride, layer.padding, layer.output_padding,
                                  layer.dilation, layer.groups)
    return dt.Conv2d(layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


@pytest.mark.parametrize("layer_name", sorted(CONV_LAYERS))
def test_conservation_on_grouped_and_transposed_convs(layer_name):
    """Where theory promises it (docs/theory.md section 3): Z and Epsilon(0) without bias, z+ (bias
    ignored) and Gamma on a >= 0 without bias (outputs with z > 0), w² and flat, zB inside the box —
    each on the outputs whose denominators are non-zero (a transposed conv's output may see no input
    at all); z+, w², flat and zB are also positive."""
    layer, sample = CONV_LAYERS[layer_name]
    rng = np.random.default_rng(11)
    a = rng.uniform(0.1, 1.0, size=(2,) + sample)
    R = rng.uniform(0.5, 1.0, size=layer.output_shape(a.shape))
    nb = _nobias(layer)
    W = np.asarray(layer.weight)
    reach = linear_forward(layer, np.ones_like(a), np.abs(W), None) > 0   # outputs reached by an input
    zp = linear_forward(layer, a, np.maximum(W, 0), None)
    Rr = R * reach
    Rp = R * (zp > 0)

    def total(v):
        return v.reshape(2, -1).sum(1)

    for rule, lay, Rj in [(Z(), nb, Rr), (Epsilon(0.0), nb, Rr), (ZPlus(), layer, Rp), (ZPlus(), nb, Rp),
                          (Gamma(0.5), nb, Rp), (WSquare(), layer, Rr), (Flat(), layer, Rr),
                          (ZBox(0.0, 1.0), layer, None)]:
        if isinstance(rule, (Z, Epsilon)):
            Rj = Rj * (np.abs(linear_forward(lay, a, W, None)) > 1e-9)
        if isinstance(rule, Gamma):
            Rj = Rj * (linear_forward(lay, a, W, None) > 0)
        if isinstance(rule, ZBox):
            den = linear_forward(layer, a, W, None) - linear_forward(layer, np.ones_like(a), np.minimum(W, 0), None)
            Rj = R * (den > 1e-9)
        got = linear_relevance(lay, rule, a, Rj)
        np.testing.assert_allclose(total(got), total(Rj), rtol=1e-10, err_msg=repr(rule))
        if isinstance(rule, (ZPlus, WSquare, Flat, ZBox)):   # (Gamma still passes negative shares)
            assert (got >= -1e-12).all(), rule


# --------------------------------------------------------------------------------------------------
# Whole graphs through reference.run


def _graph(rng):
    """conv -> BN -> ELU, fan-out into a grouped conv branch and an identity branch, Add, an SE gate
    (adaptive pool to 1x1, 1x1 convs, Sigmoid, Mul), Concat with a channel-shuffled slice,
    average pool with ceil_mode, upsample, transposed conv, GELU, max-pool with ceil_mode, global
    average, Dense."""
    x = dt.Input((2, 7, 6))
    h = dt.Conv2d(rng.normal(size=(4, 2, 3, 3)) * 0.5, rng.normal(size=4) * 0.1, padding=1)(x)
    h = dt.BatchNorm2d(rng.normal(size=4) * 0.1, rng.uniform(0.5, 1.5, size=4), rng.uniform(0.5, 1.5, size=4),
                       rng.normal(size=4) * 0.1)(h)
    h = dt.ELU(0.8)(h)
    br = dt.Conv2d(rng.normal(size=(4, 2, 3, 3)) * 0.5, rng.normal(size=4) * 0.1, padding=1, groups=2)(h)
    br = dt.LeakyReLU(0.1)(br)
    h = dt.Add()(br, h)
    gate = dt.AdaptiveAvgPool2d(1)(h)
    gate = dt.ReLU()(dt.Conv2d(rng.normal(size=(2, 4, 1, 1)), rng.normal(size=2) * 0.1)(gate))
    # (Sigmoid, not Hardsigmoid: torch's float64 hardsigmoid gradient is only float32-accurate)
    gate = dt.Sigmoid()(dt.Conv2d(rng.normal(size=(4, 2, 1, 1)), rng.normal(size=4))(gate))
    h = dt.Mul()(h, gate)
    part = dt.ChannelShuffle(2)(dt.Slice(0, 2)(h))
    h = dt.Concat()(h, part)                                                   # 6 channels
    h = dt.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)(h)      # 4 x 4
    h = dt.Upsample(2)(h)                                                      # 8 x 8
    h = dt.ConvTranspose2d(rng.normal(size=(6, 3, 2, 2)) * 0.5, rng.normal(size=3) * 0.1, stride=2,
                           padding=1, output_padding=1)(h)
    h = dt.GELU("tanh")(h)
    h = dt.MaxPool2d(3, 2, ceil_mode=True)(h)
    h = dt.GlobalAvgPool()(h)
    out = dt.Dense(rng.normal(size=(5, 3)), rng.normal(size=5))(h)
    return dt.Graph(x, out)


def _torch_graph(net):
    """The same graph evaluated in torch from the reference's own node list (forward via CASES' torch
    functions would need the random draws; rebuild each node from its attributes instead)."""
    def node_fn(layer):
        if isinstance(layer, dt.Conv2d):
            t, b, lft, r = layer.padding
            return lambda x: F.conv2d(F.pad(x, (lft, r, t, b)), T(layer.weight), T(layer.bias), layer.stride, 0,
                                      layer.dilation, layer.groups)
        if isinstance(layer, dt.ConvTranspose2d):
            t, b, lft, r = layer.padding

            def ct(x):
                y = F.conv_transpose2d(x, T(layer.weight), T(layer.bias), layer.stride, 0, layer.output_padding,
                                       layer.groups, layer.dilation)
                return y[:, :, t:y.shape[2] - b, lft:y.shape[3] - r]
            return ct
        if isinstance(layer, dt.BatchNorm2d):
            return lambda x: F.batch_norm(x, T(layer.running_mean), T(layer.running_var), T(layer.weight),
                                          T(layer.bias), training=False, eps=layer.eps)
        if isinstance(layer, dt.Dense):
            return lambda x: x @ T(layer.weight).T + T(layer.bias)
        if isinstance(layer, dt.AvgPool2d):
            return lambda x: F.avg_pool2d(x, layer.kernel_size, layer.stride, layer.padding[::2],
                                          ceil_mode=layer.ceil_mode, count_include_pad=layer.count_include_pad)
        if isinstance(layer, dt.MaxPool2d):
            return lambda x: F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding[::2],
                                          ceil_mode=layer.ceil_mode)
        if isinstance(layer, dt.AdaptiveAvgPool2d):
            return lambda x: F.adaptive_avg_pool2d(x, layer.output_size)
        if isinstance(layer, dt.ChannelShuffle):
            return torch.nn.ChannelShuffle(layer.groups)
        if isinstance(layer, dt.Slice):
            return lambda x: x[:, layer.start:layer.stop]
        if isinstance(layer, dt.Upsample):
            return lambda x: F.interpolate(x, scale_factor=tuple(map(float, layer.scale_factor)), mode="nearest")
        if isinstance(layer, dt.GlobalAvgPool):
            return lambda x: x.mean((2, 3))
        if isinstance(layer, dt.Add):
            return lambda *xs: sum(xs[1:], xs[0])
        if isinstance(layer, dt.Concat):
            return lambda *xs: torch.cat(xs, dim=1)
        if isinstance(layer, dt.Mul):
            return lambda s, g: s * g
        if isinstance(layer, dt.ELU):
            return lambda x: F.elu(x, layer.alpha)
        if isinstance(layer, dt.LeakyReLU):
            return lambda x: F.leaky_relu(x, layer.negative_slope)
        if isinstance(layer, dt.GELU):
            return lambda x: F.gelu(x, approximate=layer.approximate)
        if isinstance(layer, dt.Sigmoid):
            return torch.sigmoid
        if isinstance(layer, dt.ReLU):
            return F.relu
        raise AssertionError(layer)

    fns = [node_fn(node.layer) for node in net.nodes]

    def run(x):
        vals = [x]
        for node, fn in zip(net.nodes, fns, strict=True):
            vals.append(fn(*[vals[v] for v in node.inputs]))
        return vals[-1]
    return run


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_forward_and_gradients_match_torch(batch):
    rng = np.random.default_rng(batch)
    net = _graph(rng)
    x = rng.normal(size=(batch, 2, 7, 6))
    tx = T(x).requires_grad_(True)
    ty = _torch_graph(net)(tx)
    out = dt.reference.forward(net, x)
    np.testing.assert_allclose(out, ty.detach().numpy(), rtol=1e-11, atol=1e-11)
    targets = np.arange(batch) % 5
    (ty[np.arange(batch), targets]).sum().backward()
    grad = tx.grad.numpy()
    p = dt.reference.run(net, GradientXInput(), x, targets)
    np.testing.assert_allclose(p.relevance, grad * x, rtol=1e-10, atol=1e-12)
    p = dt.reference.run(net, Sensitivity(), x, targets)
    np.testing.assert_allclose(p.relevance, grad ** 2, rtol=1e-10, atol=1e-14)


def _assignment(net, linear_rule):
    return [linear_rule if node.layer.linear else None for node in net.nodes]


def test_graph_relevance_conserved_through_routing_fanout_and_pools():
    """A graph of only routing nodes and proportional pools on a positive input, closed by a
    GlobalSumPool: the input relevance sums to f(x) exactly (fan-out adds, Concat slices, Slice
    scatters, ChannelShuffle permutes, Upsample sums copies, pools share in proportion; Add with
    positive inputs loses only the eps share)."""
    x = dt.Input((4, 5, 7))
    a = dt.Slice(1, 3)(x)
    b = dt.ChannelShuffle(2)(x)
    c = dt.Concat()(a, b, x)                                        # fan-out of x (3 readers)
    c = dt.Upsample((2, 1))(c)
    c = dt.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)(c)
    c = dt.AdaptiveAvgPool2d((3, 2))(c)
    d = dt.Add()(c, c)                                             # fan-out into one node twice
    out = dt.GlobalSumPool()(dt.MaxPool2d(2, 2, ceil_mode=True)(d))
    net = dt.Graph(x, out)
    xv = np.random.default_rng(0).uniform(0.1, 1.0, size=(3, 4, 5, 7))
    p = dt.reference.run(net, _assignment(net, Z()), xv, None)
    # the only loss: the Add's eps share, sum_j R_j z_j / (z_j + eps) instead of sum_j R_j
    i = next(k for k, node in enumerate(net.nodes) if isinstance(node.layer, dt.Add))
    z, R = p.activations[i + 1], p.layers[i + 1]
    expect = (R * z / (z + 1e-6)).reshape(3, -1).sum(1)
    np.testing.assert_allclose(R.reshape(3, -1).sum(1), p.output[:, 0], rtol=1e-12)
    np.testing.assert_allclose(p.relevance.reshape(3, -1).sum(1), expect, rtol=1e-12)
    assert (p.relevance >= 0).all()


def test_graph_relevance_mul_gate_gets_nothing_and_explainer_agrees_if_ready():
    rng = np.random.default_rng(5)
    x = dt.Input((3, 4, 4))
    h = dt.ReLU()(dt.Conv2d(rng.normal(size=(3, 3, 3, 3)), padding=1)(x))
    g = dt.Sigmoid()(dt.Conv2d(rng.normal(size=(3, 3, 1, 1)))(dt.AdaptiveAvgPool2d(1)(h)))
    y = dt.Mul()(h, g)
    out = dt.Dense(rng.normal(size=(2, 48)))(dt.Flatten()(y))
    net = dt.Graph(x, out)
    xv = rng.uniform(size=(2, 3, 4, 4))
    p = dt.reference.run(net, _assignment(net, Epsilon(1e-9)), xv, None)
    gate_value = next(i + 1 for i, node in enumerate(net.nodes) if isinstance(node.layer, dt.Sigmoid))
    assert not p.layers[gate_value].any()
    # the gate branch carries nothing back, so the input relevance is what the first conv got from h
    conv_in = p.layers[0]
    h_value = next(i + 1 for i, node in enumerate(net.nodes) if isinstance(node.layer, dt.ReLU))
    np.testing.assert_allclose(conv_in.reshape(2, -1).sum(1), p.layers[h_value].reshape(2, -1).sum(1),
                               rtol=1e-6)


def test_add_is_zennits_norm_rule_on_its_sum_layer():
    """Zennit's ResNet canonizer routes residual additions through ``zennit.layer.Sum`` (inputs stacked
    on a last axis), which its composites explain with ``Norm``: the reference's Add must agree."""
    from conftest import import_zennit

    import_zennit()
    from zennit.core import Composite
    from zennit.layer import Sum
    from zennit.rules import Norm

    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(2, 3, 4, 4)) for _ in range(3)]
    xs[1][0, 0, 0, 0] = -(xs[0][0, 0, 0, 0] + xs[2][0, 0, 0, 0])     # an exact zero sum
    xs[1][0, 0, 0, 1] = -(xs[0][0, 0, 0, 1] + xs[2][0, 0, 0, 1]) + 1e-7  # a sum below eps
    R = rng.normal(size=xs[0].shape)
    stacked = T(np.stack(xs, axis=-1)).requires_grad_(True)
    module = Sum(dim=-1)
    composite = Composite(module_map=lambda ctx, name, mod: Norm() if isinstance(mod, Sum) else None)
    with composite.context(module) as mod:
        out = mod(stacked)
        (rel,) = torch.autograd.grad(out, stacked, T(R))
    parts, _ = _relevance(dt.Add(), xs, R)
    np.testing.assert_allclose(np.stack(parts, axis=-1), rel.numpy(), rtol=1e-12, atol=1e-12 * np.abs(R).max())
