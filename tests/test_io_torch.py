"""dt.from_torch / dt.to_torch: outputs equal the torch model's, clear errors for what is unsupported."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.passes import canonicalize

torch = pytest.importorskip("torch")
nn = torch.nn


def _bn_stats(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.weight is not None:
                m.weight.data.copy_(torch.rand(c, generator=g) * 2 - 0.5)
                m.bias.data.copy_(torch.rand(c, generator=g) * 2 - 1)
    return model


def lenet():
    return nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Sequential(nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2)),
                         nn.Flatten(), nn.Linear(16 * 5 * 5, 64), nn.ReLU(), nn.Dropout(), nn.Linear(64, 10))


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Identity(), nn.Linear(100, 100),
                         nn.ReLU(), nn.Linear(100, 10))


def bn_model():
    return _bn_stats(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding="same", bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 4, stride=2, padding=1, dilation=1), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1), nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(),
        nn.Linear(16, 12), nn.Dropout(0.5), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)))


CASES = {"lenet": (lenet, (1, 28, 28)), "mlp": (mlp, (1, 28, 28)), "bn": (bn_model, (3, 16, 16))}
# The importer translates every module into a node (BatchNorm, Dropout, Identity, AdaptiveAvgPool2d
# included); the shared pass deeptaylor.passes.canonicalize then drops Dropout/Identity, folds each
# BatchNorm into the layer before it and resolves the divisible adaptive pool (CANONICAL: what the
# importer itself produced before the graph work).
KINDS = {
    "lenet": ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Dense", "ReLU", "Dropout",
              "Dense"],
    "mlp": ["Flatten", "Dense", "ReLU", "Identity", "Dense", "ReLU", "Dense"],
    "bn": ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d", "AdaptiveAvgPool2d",
           "Flatten", "Dense", "Dropout", "BatchNorm1d", "ReLU", "Dense"],
}
CANONICAL = {
    "lenet": ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Dense", "ReLU", "Dense"],
    "mlp": ["Flatten", "Dense", "ReLU", "Dense", "ReLU", "Dense"],
    "bn": ["Conv2d", "ReLU", "Conv2d", "ReLU", "AvgPool2d", "AvgPool2d", "Flatten", "Dense", "ReLU", "Dense"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_torch(name):
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    net = dt.from_torch(model, shape)
    x = np.random.default_rng(1).uniform(0, 1, size=(4, *shape)).astype(np.float32)
    with torch.no_grad():
        y32 = model(torch.from_numpy(x)).numpy()
        y64 = model.double()(torch.from_numpy(x).double()).numpy()
    ours = net.forward(x)
    np.testing.assert_allclose(ours, y64, rtol=1e-9, atol=1e-9 * np.abs(y64).max())
    np.testing.assert_allclose(ours, y32, rtol=1e-5, atol=1e-5 * np.abs(y32).max())
    assert isinstance(net, dt.Sequential)  # an nn.Sequential chain stays a Sequential
    assert [layer.kind for layer in net] == KINDS[name]
    canon = canonicalize(net, shape)
    assert [layer.kind for layer in canon] == CANONICAL[name]
    # the fold keeps float32 weights float32: float32 rounding
    np.testing.assert_allclose(canon.forward(x), y32, rtol=1e-5, atol=1e-5 * np.abs(y32).max())


def test_conv_options():
    torch.manual_seed(2)
    cases = [{"padding": "same", "kernel_size": 4, "dilation": 2},
             {"padding": "valid", "kernel_size": 3, "stride": 2},
             {"padding": (2, 1), "kernel_size": (3, 5), "stride": (2, 1), "dilation": (1, 2)}]
    for kw in cases:
        model = nn.Sequential(nn.Conv2d(2, 3, **kw), nn.ReLU(), nn.Flatten()).double().eval()
        net = dt.from_torch(model, (1, 2, 11, 10))
        x = np.random.default_rng(3).normal(size=(2, 2, 11, 10))
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(net.forward(x), ref, rtol=1e-10, atol=1e-10)


def test_input_shape_forms_and_default():
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2))
    for shape in (None, (5,), (7, 5)):
        assert dt.from_torch(model, shape).output_shape((1, 5)) == (1, 2)
    with pytest.raises(dt.ShapeError, match="input_shape"):
        dt.from_torch(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(dt.ShapeError, match="module '0' of type Linear"):
        dt.from_torch(model, (6,))


@pytest.mark.parametrize(("model", "match"), [
    (nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")), r"'0' of type Conv2d.*padding_mode"),
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Sequential(nn.ReLU(), nn.GroupNorm(2, 4))),
     r"module '1\.1' of type GroupNorm.*not supported.*supported modules: "),
    (nn.Sequential(nn.MaxPool2d(2, dilation=2)), "dilation"),
    (nn.Sequential(nn.AvgPool2d(2, divisor_override=3)), "divisor_override"),
    (nn.Sequential(nn.Flatten(2)), "start_dim"),
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)), "running statistics"),
    (nn.Sequential(nn.ReLU(), nn.ZeroPad2d(1), nn.ReLU()), r"'1'.*padding is supported only right before"),
    (nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(3)), r"'0'.*padding is supported only right before"),
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Softmax(1)), r"'1' of type Softmax.*logits"),
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.Upsample(scale_factor=2, mode="bilinear")), "nearest"),
    (nn.Sequential(nn.Conv2d(2, 4, 3), nn.LayerNorm(6)), "out of scope"),
])
def test_unsupported_modules_name_path_and_type(model, match):
    with pytest.raises(dt.UnsupportedError, match=match):
        dt.from_torch(model, (2, 8, 8))


def test_batchnorm_of_the_wrong_rank_is_a_shape_error_naming_the_module():
    with pytest.raises(dt.ShapeError, match=r"module '1' of type BatchNorm1d.*expected 2D or 3D input"):
        dt.from_torch(nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm1d(4)), (2, 8, 8))


def _check_forward(model, shape, n=3, rtol=1e-10, seed=0):
    """from_torch(model) in float64 against torch in float64; returns the net."""
    model = model.double().eval()
    net = dt.from_torch(model, shape)
    x = np.random.default_rng(seed).normal(size=(n, *shape))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), ref, rtol=rtol, atol=rtol * np.abs(ref).max())
    return net


@pytest.mark.parametrize(("model", "kinds"), [
    # grouped / depthwise convolutions, a standalone BatchNorm (after a ReLU: not foldable), ceil_mode
    (nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=4),
                   nn.MaxPool2d(3, ceil_mode=True), nn.Flatten()),
     ["Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "MaxPool2d", "Flatten"]),
    (nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
                   nn.AdaptiveAvgPool2d(3)), ["AvgPool2d", "AdaptiveAvgPool2d"]),
    (nn.Sequential(nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1), nn.LeakyReLU(0.2),
                   nn.Upsample(scale_factor=2), nn.ELU(0.5), nn.ChannelShuffle(2), nn.GELU(approximate="tanh"),
                   nn.SiLU(), nn.Hardswish(), nn.Hardsigmoid(), nn.Tanh(), nn.Sigmoid(), nn.ReLU6()),
     ["ConvTranspose2d", "LeakyReLU", "Upsample", "ELU", "ChannelShuffle", "GELU", "SiLU", "Hardswish",
      "Hardsigmoid", "Tanh", "Sigmoid", "ReLU6"]),
    # padding modules fold into the layer that reads them; -inf before a max pool
    (nn.Sequential(nn.ZeroPad2d((1, 2, 0, 1)), nn.Conv2d(2, 3, 3), nn.ConstantPad2d((0, 1, 1, 0), float("-inf")),
                   nn.MaxPool2d(2, stride=1), nn.ZeroPad2d(1), nn.AvgPool2d(3, stride=1)),
     ["Conv2d", "MaxPool2d", "AvgPool2d"]),
])
def test_more_modules_match_torch(model, kinds):
    torch.manual_seed(3)
    net = _check_forward(_bn_stats(model), (2, 8, 8))
    assert [layer.kind for layer in net] == kinds


@pytest.mark.parametrize(("in_hw", "out_size"), [
    ((7, 7), 3), ((10, 10), 3), ((7, 10), (3, 3)), ((8, 6), (2, None)), ((9, 5), (4, 1)), ((6, 6), 6),
    ((5, 5), 3), ((8, 8), (2, 3)), ((2, 2), 3), ((4, 4), 8),   # uneven / overlapping / repeating windows
])
def test_adaptive_avg_pool_matches_torch(in_hw, out_size):
    """AdaptiveAvgPool2d is a node of its own (any windows); canonicalize turns the divisible ones into an
    AvgPool2d."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(out_size), nn.Flatten())
    net = _check_forward(model, (2, *in_hw), rtol=1e-12)
    assert net[0].kind == "AdaptiveAvgPool2d"
    osz = out_size if isinstance(out_size, tuple) else (out_size, out_size)
    osz = tuple(in_hw[d] if osz[d] is None else osz[d] for d in range(2))
    assert net[0].output_size == osz
    canon = canonicalize(net, (2, *in_hw))
    divisible = in_hw[0] % osz[0] == 0 and in_hw[1] % osz[1] == 0
    assert canon[0].kind == ("AvgPool2d" if divisible else "AdaptiveAvgPool2d")


class _TwiceLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class _LeakyReLU(nn.ReLU):
    def forward(self, x):
        return torch.nn.functional.leaky_relu(x, 0.1)


class _McDropout(nn.Dropout):  # "Monte-Carlo dropout": active in eval mode too
    def forward(self, x):
        return torch.nn.functional.dropout(x, self.p, training=True)


class _Reversed(nn.Sequential):
    def forward(self, x):
        for m in reversed(self):
            x = m(x)
        return x


class _Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class _ScaledConv(nn.Conv2d):  # overrides the helper that the stock forward calls
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


class _Called(nn.ReLU):
    def __call__(self, x):
        return -super().__call__(x)


@pytest.mark.parametrize(("model", "shape", "kinds"), [
    (nn.Sequential(nn.Linear(4, 4), _LeakyReLU()), (4,), ["Dense", "LeakyReLU"]),
    (nn.Sequential(nn.Linear(4, 4), _Reversed(nn.Linear(4, 3), nn.ReLU())), (4,), ["Dense", "ReLU", "Dense"]),
    (nn.Sequential(nn.Sequential(nn.Linear(4, 4), _Residual(nn.ReLU(), nn.Linear(4, 4)))), (4,),
     ["Dense", "ReLU", "Dense", "Add"]),
    (nn.Sequential(_ScaledConv(1, 2, 3), nn.ReLU()), (1, 6, 6), ["Conv2d", "ReLU"]),
])
def test_subclasses_overriding_forward_are_traced(model, shape, kinds):
    """torch.fx traces a subclass's own forward (only torch's own classes are leaves), so a subclass that
    computes something else imports as what it computes (before the graph work these were refused)."""
    torch.manual_seed(4)
    net = _check_forward(model, shape)
    assert [layer.kind for layer in net] == kinds


@pytest.mark.parametrize(("model", "shape", "match"), [
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), _TwiceLinear(4, 2)), (4,),
     r"fx node 'mul' \(call_function operator\.mul\) in module '2' \(_TwiceLinear\).*constant \(2\)"),
    (nn.Sequential(nn.Linear(4, 4), _McDropout(0.5)), (4,), r"in module '1' \(_McDropout\).*training=True"),
    (nn.Sequential(nn.Linear(4, 4), _Called()), (4,), r"fx node 'neg' \(call_function operator\.neg\)"),
    (_TwiceLinear(4, 2), (4,), r"operator\.mul\) in _TwiceLinear\.forward"),
])
def test_subclasses_computing_unsupported_ops_are_refused(model, shape, match):
    with pytest.raises(dt.UnsupportedError, match=match):
        dt.from_torch(model, shape)


def test_subclasses_keeping_the_stock_forward_are_accepted():
    class Block(nn.Sequential):
        pass

    class MyLinear(nn.Linear):
        def extra_repr(self):
            return "mine"

    model = Block(MyLinear(5, 4), nn.ReLU(), Block(MyLinear(4, 3))).double().eval()
    net = dt.from_torch(model, (5,))
    assert [layer.kind for layer in net] == ["Dense", "ReLU", "Dense"]
    x = np.random.default_rng(8).normal(size=(3, 5))
    with torch.no_grad():
        np.testing.assert_allclose(net.forward(x), model(torch.from_numpy(x)).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_batchnorm_bad_running_var_names_the_module(bad):
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Sequential(nn.BatchNorm2d(3)), nn.ReLU())
    with torch.no_grad():
        model[1][0].running_var.copy_(torch.tensor([1.0, -0.5 if bad == "negative" else float("nan"), 1.0]))
    match = r"module '1\.0' of type BatchNorm2d.*: running_var" + (
        r" \+ eps must be positive.*channel 1" if bad == "negative" else " contains NaN")
    with pytest.raises(dt.InputError, match=match):  # and no RuntimeWarning (warnings are errors in the tests)
        dt.from_torch(model, (1, 6, 6))


def test_nan_weights_name_the_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(dt.InputError, match=r"module '2' of type Linear.*Dense: weight contains NaN or Inf"):
        dt.from_torch(model)


def test_ceil_mode_matches_torch():
    for size in (8, 9):  # 9: ceil_mode adds a last, partial window
        net = _check_forward(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Flatten()), (1, size, size))
        assert net.output_shape((1, 1, size, size)) == (1, ((size + 1) // 2) ** 2)


def test_custom_module_and_non_module_errors():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x) * 2

    with pytest.raises(dt.UnsupportedError, match=r"fx node 'mul'.* in Net\.forward.*constant \(2\)"):
        dt.from_torch(Net(), (3,))
    with pytest.raises(TypeError):
        dt.from_torch("model", (3,))
    assert len(dt.from_torch(nn.Linear(3, 2))) == 1  # a single supported leaf module is fine


def test_to_torch_round_trip_every_layer():
    rng = np.random.default_rng(4)
    body = [
        dt.Conv2d(rng.normal(size=(4, 2, 3, 3)), rng.normal(size=4), stride=(1, 2), padding=((1, 2), (0, 1)),
                  dilation=(2, 1)),
        dt.ReLU(), dt.MaxPool2d(2, stride=1, padding=(1, 0, 1, 1)), dt.AvgPool2d(3, stride=1, padding=1),
        dt.AvgPool2d((2, 1), padding=(1, 0, 0, 0)), dt.SumPool2d(2, stride=1, padding=(1, 0, 0, 1)),
        dt.LpPool(3.0, kernel_size=2, stride=1), dt.Conv2d(rng.normal(size=(3, 4, 2, 2)), padding=1), dt.Flatten(),
    ]
    feats = dt.Sequential(body).output_shape((1, 2, 9, 10))[1]
    net = dt.Sequential([*body, dt.Dense(rng.normal(size=(5, feats)), rng.normal(size=5)), dt.ReLU()])
    x = rng.normal(size=(2, 2, 9, 10))
    tm = dt.to_torch(net, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(tm(torch.from_numpy(x)).numpy(), net.forward(x), rtol=1e-10, atol=1e-10)
    for tail in (dt.GlobalSumPool(), dt.LpPool(2.0)):
        n2 = dt.Sequential([*net.layers, tail])
        with torch.no_grad():
            got = dt.to_torch(n2, torch.float64)(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, n2.forward(x), rtol=1e-10)
    sub = [*body[:5], dt.Flatten()]
    feats = dt.Sequential(sub).output_shape((1, 2, 9, 10))[1]
    sub = dt.Sequential([*sub, dt.Dense(rng.normal(size=(3, feats)))])
    back = dt.from_torch(dt.to_torch(sub, torch.float64), (2, 9, 10))  # padding modules fold back
    assert [repr(a) for a in back] == [repr(b) for b in sub]
    np.testing.assert_array_equal(back.forward(x), sub.forward(x))
    assert dt.to_torch(net)[1].weight.dtype == torch.float32  # [0] pads the asymmetric padding


def test_import_deeptaylor_does_not_import_torch():
    code = ("import sys, deeptaylor; assert 'torch' not in sys.modules; "
            "assert callable(deeptaylor.from_torch) and callable(deeptaylor.to_torch); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_float32_weights_stay_float32():
    # A large float32 model is not doubled in memory on import. BatchNorm is a node of its own (float64
    # statistics); the shared fold (deeptaylor.passes) computes in float64 and keeps float32 weights float32.
    m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3)).eval()
    _bn_stats(m)
    net = dt.from_torch(m, (1, 6, 6))
    assert [(layer.kind, layer.weight.dtype) for layer in net if hasattr(layer, "weight")] == [
        ("Conv2d", np.float32), ("BatchNorm2d", np.float64), ("Dense", np.float32)]
    assert all(layer.bias.dtype == np.float64 for layer in net if hasattr(layer, "bias"))
    np.testing.assert_array_equal(net[-1].weight, m[-1].weight.detach().numpy())
    np.testing.assert_array_equal(net[0].weight, m[0].weight.detach().numpy())
    x = np.random.default_rng(0).uniform(size=(3, 1, 6, 6)).astype(np.float32)
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x.astype(np.float64)), want, rtol=1e-5, atol=1e-6)
    canon = canonicalize(net)
    assert [layer.kind for layer in canon] == ["Conv2d", "ReLU", "Flatten", "Dense"]
    np.testing.assert_allclose(canon.forward(x.astype(np.float64)), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- graphs through torch.fx
F = torch.nn.functional


class _Block(nn.Module):
    """A ResNet basic block: the module ReLU is called twice, `+=` residual, a 1x1 downsample."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.downsample(x)
        return self.relu(out)


class _TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.layer1 = nn.Sequential(_Block(8, 8, 1), _Block(8, 16, 2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer1(self.stem(x))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.fc(torch.flatten(x, 1))


def test_residual_model_names_are_module_paths():
    torch.manual_seed(0)
    net = _check_forward(_bn_stats(_TinyResNet()), (3, 8, 8))
    assert isinstance(net, dt.Graph)
    assert not isinstance(net, dt.Sequential)
    assert net.input_shape == (3, 8, 8)
    names = net.names
    for name in ("stem.0", "layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu", "layer1.0.relu:1", "layer1.0.add",
                 "layer1.1.downsample.0", "layer1.1.downsample.1", "adaptive_avg_pool2d", "flatten", "fc"):
        assert name in names, (name, names)
    assert net.node("layer1.0.add").layer.kind == "Add"
    assert len(set(names)) == len(names)
    assert dt.from_torch(_TinyResNet(), (3, 8, 8)).names == names  # stable
    canon = canonicalize(net)  # every BatchNorm follows its conv: all folded
    assert not any(layer.kind.startswith("BatchNorm") for layer in canon)


class _Functional(nn.Module):
    """Functional layers with module weights, chunk/cat, the ShuffleNet shuffle, a gate, mean, pads,
    clamp, x[:, a:b], shape arithmetic and an assertion."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(8) * 0.1)
        self.register_buffer("mean", torch.randn(8) * 0.1)
        self.register_buffer("var", torch.rand(8) + 0.5)
        self.fc_w = nn.Parameter(torch.randn(6, 10) * 0.3)
        self.se = nn.Conv2d(4, 4, 1)
        self.up = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        torch._assert(x.dim() == 4, "NCHW")
        h = F.conv2d(F.pad(x, (1, 1, 1, 1)), self.w, self.b)
        h = F.batch_norm(h, self.mean, self.var, training=False, eps=1e-3)
        h = F.relu(h, inplace=True)
        a, b = h.chunk(2, dim=1)
        h = torch.cat((F.leaky_relu(a, 0.2), b.clamp(0, 6)), dim=1)
        n, c, hh, ww = h.size()
        h = h.view(n, 2, c // 2, hh, ww)
        h = torch.transpose(h, 1, 2).contiguous()
        h = h.view(n, c, hh, ww)  # channel shuffle
        s = h[:, 2:6]
        g = torch.sigmoid(self.se(s.mean((2, 3), keepdim=True)))
        s = s * g
        s = F.max_pool2d(s, 2, ceil_mode=True)
        s = F.avg_pool2d(s, 3, stride=1, padding=1, count_include_pad=False)
        u = F.interpolate(self.up(s), scale_factor=2, mode="nearest")
        z = torch.cat([u.mean((2, 3)), F.dropout(s.mean([-2, -1]), 0.3, training=self.training), h[:, :4].mean((2, 3))], 1)
        return F.linear(z, self.fc_w)


def test_functional_ops_match_torch():
    torch.manual_seed(1)
    net = _check_forward(_Functional(), (3, 9, 9))
    kinds = {layer.kind for layer in net}
    assert {"Conv2d", "BatchNorm2d", "Slice", "Concat", "ChannelShuffle", "Mul", "AdaptiveAvgPool2d",
            "GlobalAvgPool", "Upsample", "Dropout", "Dense", "LeakyReLU", "ReLU6"} <= kinds
    assert net[0].padding == (1, 1, 1, 1)  # F.pad folded into the conv
    shuffle = next(layer for layer in net if layer.kind == "ChannelShuffle")
    assert shuffle.groups == 2


def test_training_flags_are_restored_and_eval_semantics_used():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.ReLU(), nn.Linear(6, 2))
    _bn_stats(model)
    model.train()
    model[1].eval()  # a mixed state must come back as it was
    before = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    net = dt.from_torch(model, (4,))
    assert [m.training for m in model.modules()] == before
    assert torch.equal(model[1].running_mean, stats)  # the recording run did not update the statistics
    x = np.random.default_rng(0).normal(size=(3, 4))
    model.eval()
    with torch.no_grad():
        ref = model.double()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(net.forward(x), ref, rtol=1e-10, atol=1e-12)


class _Exp(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.head = _ExpHead()

    def forward(self, x):
        return self.head(self.body(x))


class _ExpHead(nn.Module):
    def forward(self, x):
        return x.exp().flatten(1)


class _ControlFlow(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class _TwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x), x


class _Unmapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x) + 1.0


@pytest.mark.parametrize(("model", "match"), [
    (_Exp(), (r"fx node 'exp' \(call_method Tensor\.exp\) in module 'head' \(_ExpHead\) is not supported.*"
              r"supported functions: ")),
    (_ControlFlow(), r"torch\.fx cannot trace _ControlFlow\.forward.*control flow"),
    (_Unmapped(), r"fx node 'add'.*adds a constant"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Unflatten(1, (4, 36))), r"'2' of type Unflatten"),
])
def test_unmappable_nodes_give_one_error_naming_node_op_and_path(model, match):
    with pytest.raises(dt.UnsupportedError, match=match):
        dt.from_torch(model, (3, 8, 8))


def test_several_outputs_are_refused():
    with pytest.raises(dt.UnsupportedError, match=r"_TwoOut\.forward returns several tensors"):
        dt.from_torch(_TwoOut(), (3,))


def test_gate_without_sigmoid_and_broadcast_is_refused():
    class Product(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.a(x) * self.b(x)

    with pytest.raises(dt.UnsupportedError, match=r"fx node 'mul'.*neither operand is a gate"):
        dt.from_torch(Product(), (3, 8, 8))


# ------------------------------------------------------------------- the Explainer's torch helpers
def test_as_network_converts_modules_and_passes_networks_through():
    from deeptaylor.io.torch import as_network

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    net = as_network(model, (1, 6, 6))
    assert isinstance(net, dt.Sequential)
    assert len(net) == 4
    assert as_network(net) is net
    assert as_network(net, (1, 6, 6)) is net
    graph = dt.from_torch(_TinyResNet(), (3, 8, 8))
    assert as_network(graph, (3, 8, 8)) is graph
    with pytest.raises(dt.ShapeError, match="declared input shape"):
        as_network(graph, (3, 16, 16))
    with pytest.raises(dt.ShapeError):
        as_network(net, (1, 5, 5))
    with pytest.raises(dt.InputTypeError, match="got builtins.str"):
        as_network("model.pt")
    with pytest.raises(dt.ShapeError, match="input_shape"):
        as_network(model)


def test_as_array_takes_cpu_tensors():
    from deeptaylor.io.torch import as_array

    t = torch.rand(2, 3, requires_grad=True)
    a = as_array(t)
    assert isinstance(a, np.ndarray)
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, t.detach().numpy())
    assert as_array(t.double()).dtype == np.float64
    x = np.zeros((2, 3))
    assert as_array(x) is x
    with pytest.raises(dt.InputTypeError, match="bfloat16"):
        as_array(t.bfloat16())
    with pytest.raises(dt.InputTypeError, match="meta"):
        as_array(torch.zeros(2, 3, device="meta"))
    with pytest.raises(dt.InputTypeError, match=r"NumPy array .* or a CPU torch\.Tensor, got builtins\.dict"):
        as_array({"x": 1})


def test_explainer_takes_a_torch_module_and_tensor():
    """dt.Explainer(torch_module, composite, input_shape=...) converts once; explain takes a CPU tensor."""
    torch.manual_seed(5)
    model = _bn_stats(_TinyResNet()).eval()
    x = torch.rand(2, 3, 8, 8)
    ex = dt.Explainer(model, "epsilon_plus_flat", input_shape=(3, 8, 8), backend="numpy")
    res = ex.explain(x)
    net = dt.from_torch(model, (3, 8, 8))
    want = dt.Explainer(net, "epsilon_plus_flat", backend="numpy").explain(x.numpy())
    np.testing.assert_allclose(res.relevance, want.relevance, rtol=1e-12, atol=1e-12)
    with pytest.raises(dt.InputTypeError, match="torch"):
        ex.explain({"x": x})


def test_load_refuses_pickled_torch_files(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    for name, obj in (("m.pt", model), ("weights.pth", model.state_dict()), ("legacy.bin", model.state_dict())):
        path = tmp_path / name
        torch.save(obj, path, _use_new_zipfile_serialization=name != "legacy.bin")
        with pytest.raises(dt.ModelFormatError, match=r"pickle.*from_torch.*ONNX"):
            dt.load(path)
