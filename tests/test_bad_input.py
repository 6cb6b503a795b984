"""Bad input gives a clear exception of the documented type, with a message naming the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
from custom_objects import _MyLayer, _MyRule, _MyZPlus

import deeptaylor as dt


@pytest.fixture
def dense_net(rng):
    return dt.Sequential([dt.Dense(rng.normal(size=(4, 6)), -0.1 * np.ones(4)), dt.ReLU(),
                          dt.Dense(rng.normal(size=(3, 4)))])


@pytest.fixture
def conv_net(rng):
    return dt.Sequential([dt.Conv2d(rng.normal(size=(2, 3, 3, 3)), padding=1), dt.ReLU(), dt.MaxPool2d(2),
                          dt.Flatten(), dt.Dense(rng.normal(size=(5, 2 * 2 * 2)))])


@pytest.fixture(params=dt.available_backends())
def backend(request):
    return request.param


def _re(s):
    return re.escape(s)


def explain(net, x, backend="numpy", composite=None, **kw):
    comp = composite if composite is not None else dt.rules.ZPlus()
    return dt.Explainer(net, comp, backend=backend).explain(x, **kw)


# --------------------------------------------------------------------------------------------------
# The input array


@pytest.mark.parametrize(("shape", "exc", "phrase"), [
    ((6,), dt.ShapeError, "rank 1"),
    ((2, 6, 1), dt.ShapeError, "rank 3"),
    ((2, 1, 1, 6, 1), dt.ShapeError, "rank 5"),
    ((2, 7), dt.ShapeError, "expects 6 input features, got 7"),
    ((2, 1, 2, 3), dt.ShapeError, "Dense expects input (N, 6), got rank 4"),
])
def test_wrong_rank_or_features(dense_net, backend, shape, exc, phrase):
    with pytest.raises(exc, match=_re(phrase)):
        explain(dense_net, np.zeros(shape), backend)


def test_wrong_channels_names_layer(conv_net):
    with pytest.raises(dt.ShapeError, match=_re("layer 0 (Conv2d)")) as info:
        explain(conv_net, np.zeros((1, 2, 4, 4)))
    assert "expects 3 input channels, got 2" in str(info.value)
    with pytest.raises(dt.ShapeError, match=_re("layer 4 (Dense)")):
        explain(conv_net, np.zeros((1, 3, 6, 6)))      # the image is too large for the Dense layer
    with pytest.raises(dt.ShapeError, match="smaller than"):
        explain(conv_net, np.zeros((1, 3, 1, 1)))


def test_output_of_rank_three_targets_are_flat_indices(rng):
    # an (N, C, H, W) output is explained (issue 12); a target is a flat index into it, checked
    net = dt.Sequential([dt.Conv2d(rng.normal(size=(2, 1, 3, 3))), dt.ReLU()])
    assert explain(net, np.ones((1, 1, 5, 5)), target=2 * 3 * 3 - 1).relevance.shape == (1, 1, 5, 5)
    with pytest.raises(dt.InputError, match=_re("target out of range: the network has 18 output(s)")):
        explain(net, np.ones((1, 1, 5, 5)), target=18)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_input(dense_net, backend, bad):
    x = np.ones((3, 6))
    x[1, 4] = bad
    with pytest.raises(dt.InputError, match=_re("1 NaN/Inf value(s), first at index (1, 4)")):
        explain(dense_net, x, backend)


def test_empty_batch(dense_net, backend):
    with pytest.raises(dt.InputError, match="empty batch"):
        explain(dense_net, np.zeros((0, 6)), backend)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float16, np.complex128, np.bool_, object])
def test_unsupported_dtypes(dense_net, backend, dtype):
    with pytest.raises(dt.InputTypeError, match="use float32 or float64"):
        explain(dense_net, np.ones((2, 6), dtype=dtype), backend)


def test_non_array_input(dense_net):
    with pytest.raises(dt.InputTypeError, match="dtype"):
        explain(dense_net, [["a"] * 6])
    # a nested list of floats is an array: accepted
    assert explain(dense_net, [[0.5] * 6]).relevance.shape == (1, 6)


def test_errors_are_builtin_subclasses():
    assert issubclass(dt.InputError, ValueError)
    assert issubclass(dt.ShapeError, ValueError)
    assert issubclass(dt.InputTypeError, TypeError)
    assert issubclass(dt.RuleError, ValueError)
    assert issubclass(dt.UnsupportedError, NotImplementedError)
    assert issubclass(dt.ModelFormatError, ValueError)
    for e in (dt.InputError, dt.InputTypeError, dt.ShapeError, dt.RuleError, dt.UnsupportedError):
        assert issubclass(e, dt.DeepTaylorError)


# --------------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize(("target", "exc", "phrase"), [
    (3, dt.InputError, "target out of range: the network has 3 output(s) (0..2)"),
    (-1, dt.InputError, "target out of range"),
    (np.array([0, 5]), dt.InputError, "got values in [0, 5]"),
    (1.0, dt.InputTypeError, "target must be an int or an integer array, got dtype float64"),
    (np.array([0.0, 1.0]), dt.InputTypeError, "integer array"),
    (True, dt.InputTypeError, "dtype bool"),
    ("1", dt.InputTypeError, "target must be an int"),
    (np.array([0, 1, 2]), dt.ShapeError, "target must be an int or have shape (2,), got shape (3,)"),
    (np.array([[[0]], [[1]]]), dt.ShapeError, "got shape (2, 1, 1)"),   # (2, 1): one target per sample, K = 1
])
def test_bad_targets(dense_net, backend, target, exc, phrase):
    with pytest.raises(exc, match=_re(phrase)):
        explain(dense_net, np.ones((2, 6)), backend, target=target)


def test_good_targets(dense_net):
    x = np.ones((2, 6))
    assert explain(dense_net, x, target=np.int32(2)).target.tolist() == [2, 2]
    assert explain(dense_net, x, target=[0, 2]).target.tolist() == [0, 2]
    assert explain(dense_net, x, target=np.array([1, 0], dtype=np.uint8)).target.tolist() == [1, 0]


# --------------------------------------------------------------------------------------------------
# Rules on layers, composites, ZBox


def test_rule_on_a_layer_that_takes_none(dense_net):
    comp = dt.Composite(by_index={1: dt.rules.ZPlus()}, default=dt.rules.ZPlus())
    with pytest.raises(dt.RuleError, match=_re("assigned to layer 1 (ReLU), which takes no rule")):
        dt.Explainer(dense_net, comp, backend="numpy")
    with pytest.raises(dt.RuleError, match="out of range for a network of 3 layers"):
        dt.Explainer(dense_net, dt.Composite(by_index={7: dt.rules.ZPlus()}, default=dt.rules.ZPlus()), backend="numpy")
    with pytest.raises(dt.RuleError, match="given two rules"):
        dt.Explainer(dense_net, dt.Composite(by_index={0: dt.rules.ZPlus(), -3: dt.rules.Flat()}), backend="numpy")


def test_unassigned_layer(dense_net):
    with pytest.raises(dt.RuleError, match=_re("assigns no rule to layer 2 (Dense)")):
        dt.Explainer(dense_net, dt.Composite(first=dt.rules.WSquare()), backend="numpy")


def test_not_a_rule_or_composite(dense_net):
    with pytest.raises(dt.RuleError, match="not a deeptaylor rule"):
        dt.Composite(default="zplus")
    with pytest.raises(dt.RuleError, match="expected a composite"):
        dt.Explainer(dense_net, 42, backend="numpy")
    with pytest.raises(dt.RuleError, match="unknown composite 'nope'; known: deep-taylor"):
        dt.Explainer(dense_net, "nope", backend="numpy")
    with pytest.raises(dt.RuleError, match="unknown key"):
        dt.Composite.from_mapping({3.5: dt.rules.ZPlus()})
    # a string key is a node name: resolving it on a network without that node names the problem
    with pytest.raises(dt.RuleError, match="no node named 'dense'"):
        dt.Explainer(dense_net, dt.Composite.from_mapping({"dense": dt.rules.ZPlus()}), backend="numpy")
    with pytest.raises(dt.RuleError, match="by_type keys must be layer classes"):
        dt.Composite(by_type={int: dt.rules.ZPlus()})
    with pytest.raises(dt.RuleError, match="by_index keys must be layer indices"):
        dt.Composite(by_index={"0": dt.rules.ZPlus()})


def test_zbox_bounds_not_broadcastable(conv_net):
    comp = dt.composites.deep_taylor(low=np.zeros(2), high=np.ones(2))     # (2,) vs the input's (3, 4, 4)
    with pytest.raises(dt.RuleError, match=_re("do not broadcast to the layer's input shape (3, 4, 4)")):
        dt.Explainer(conv_net, comp, backend="numpy").explain(np.zeros((1, 3, 4, 4)))
    with pytest.raises(dt.RuleError, match="do not broadcast"):
        dt.rules.ZBox(np.zeros(2), np.ones(3))
    with pytest.raises(dt.RuleError, match="low must be <= high"):
        dt.rules.ZBox(1.0, 0.0)
    with pytest.raises(dt.RuleError, match="finite"):
        dt.rules.ZBox(-np.inf, 1.0)
    # a ZBox deeper in the network is checked for shape too, before any work
    deep = dt.Composite(by_index={4: dt.rules.ZBox(np.zeros(3), 1.0)}, default=dt.rules.ZPlus())
    with pytest.raises(dt.RuleError, match=_re("(8,)")):
        dt.Explainer(conv_net, deep, backend="numpy").explain(np.zeros((1, 3, 4, 4)))


@pytest.mark.parametrize("backend_name", dt.available_backends())
def test_zbox_input_outside_box(conv_net, rng, backend_name):
    x = rng.uniform(0, 1, size=(2, 3, 4, 4))
    comp = dt.composites.deep_taylor(0.0, 1.0)
    x[1, 2, 3, 0] = 1.5
    try:
        ex = dt.Explainer(conv_net, comp, backend=backend_name)
    except dt.UnsupportedError:
        pytest.skip("backend does not run this net")
    with pytest.raises(dt.InputError, match=_re("ZBox on layer 0 (Conv2d) needs inputs within [low, high]")):
        ex.explain(x)
    # per-channel bounds: channel 2 may go to 2
    ok = dt.composites.deep_taylor(np.zeros((3, 1, 1)), np.array([1.0, 1.0, 2.0]).reshape(3, 1, 1))
    assert dt.Explainer(conv_net, ok, backend="numpy").explain(x).relevance.shape == x.shape


def test_zbox_domain_checked_after_flatten(rng):
    """Flatten only reshapes: a ZBox on the Dense layer after it still sees the raw input."""
    net = dt.Sequential([dt.Flatten(), dt.Dense(rng.normal(size=(3, 12)), -0.1 * np.ones(3)), dt.ReLU(),
                         dt.GlobalSumPool()])
    x = rng.uniform(size=(2, 3, 2, 2))
    dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(x)
    x[0, 0, 0, 0] = -0.2
    with pytest.raises(dt.InputError, match=_re("ZBox on layer 1 (Dense)")):
        dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(x)


def test_zbox_domain_not_traced_through_pooling(rng):
    """Documented limit: the input box is checked only for a ZBox that sees the input (layer 0, or the
    first layer after leading Flatten layers). Behind pooling (or any layer that computes) the ZBox
    sees activations, the bounds are the user's statement about them and nothing is checked (nor is
    conservation then expected)."""
    net = dt.Sequential([dt.SumPool2d(2), dt.Flatten(), dt.Dense(rng.normal(size=(3, 3)), -0.1 * np.ones(3)),
                         dt.ReLU(), dt.GlobalSumPool()])
    x = rng.uniform(size=(2, 3, 2, 2))            # in [0, 1], but the pooled sums reach up to 4
    res = dt.Explainer(net, dt.composites.deep_taylor(0, 1), backend="numpy").explain(x)
    assert res.relevance.shape == x.shape
    assert not res.conservative_expected


@pytest.mark.parametrize(("make", "phrase"), [
    (lambda: dt.rules.Epsilon(-1e-3), "eps must be finite and >= 0"),
    (lambda: dt.rules.Epsilon(np.nan), "eps must be finite"),
    (lambda: dt.rules.Epsilon("small"), "eps must be a number"),
    (lambda: dt.rules.Gamma(-0.5), "gamma must be finite and >= 0"),
    (lambda: dt.rules.AlphaBeta(2.0, 2.0), "alpha - beta must equal 1"),
    (lambda: dt.rules.AlphaBeta(0.5, -0.5), "beta must be finite and >= 0"),
    (lambda: dt.rules.AlphaBeta(True, 0), "alpha must be a number"),
])
def test_invalid_rule_params(make, phrase):
    with pytest.raises(dt.RuleError, match=_re(phrase)):
        make()


# --------------------------------------------------------------------------------------------------
# Layer parameters


@pytest.mark.parametrize(("make", "exc", "phrase"), [
    (lambda: dt.Dense(np.ones((3, 2)), np.ones(4)), dt.ShapeError, "bias has 4 entries but weight has 3 outputs"),
    (lambda: dt.Dense(np.ones(3)), dt.ShapeError, "weight must have 2 dimensions, got shape (3,)"),
    (lambda: dt.Dense(np.ones((2, 2)), np.ones((2, 1))), dt.ShapeError, "bias must have 1 dimensions"),
    (lambda: dt.Dense(np.zeros((0, 3))), dt.ShapeError, "weight is empty"),
    (lambda: dt.Dense(np.array([[1.0, np.nan]])), dt.InputError, "Dense: weight contains NaN or Inf"),
    (lambda: dt.Dense(np.ones((1, 1)), [np.inf]), dt.InputError, "bias contains NaN or Inf"),
    (lambda: dt.Dense(np.array([["a"]])), dt.InputTypeError, "real numeric array"),
    (lambda: dt.Conv2d(np.ones((2, 1, 3))), dt.ShapeError, "weight must have 4 dimensions"),
    (lambda: dt.Conv2d(np.ones((2, 1, 3, 3)), np.ones(3)), dt.ShapeError, "2 output channels"),
    (lambda: dt.Conv2d(np.ones((2, 1, 3, 3)), stride=0), dt.ShapeError, "stride must be >= 1"),
    (lambda: dt.Conv2d(np.ones((2, 1, 3, 3)), padding=-1), dt.ShapeError, "padding must be >= 0"),
    (lambda: dt.Conv2d(np.ones((2, 1, 3, 3)), padding=(1, 2, 3)), dt.ShapeError, "padding"),
    (lambda: dt.Conv2d(np.ones((2, 1, 3, 3)), dilation=(1, 0)), dt.ShapeError, "dilation must be >= 1"),
    (lambda: dt.MaxPool2d(2, padding=2), dt.ShapeError, "must be at most half the kernel size"),
    (lambda: dt.AvgPool2d((4, 2), padding=(0, 0, 0, 2)), dt.ShapeError, "at most half"),
    (lambda: dt.SumPool2d(3, stride=(1, 1, 1)), dt.ShapeError, "stride must be an int or a pair"),
    (lambda: dt.MaxPool2d(0), dt.ShapeError, "kernel_size must be >= 1"),
    (lambda: dt.LpPool(0.5), dt.ShapeError, "p must be a finite number >= 1"),
    (lambda: dt.LpPool(2, stride=2), dt.ShapeError, "stride given without kernel_size"),
    (lambda: dt.Sequential([]), dt.ShapeError, "at least one layer"),
    (lambda: dt.Sequential([dt.ReLU(), "relu"]), TypeError, "item 1 is str"),
])
def test_bad_layer_params(make, exc, phrase):
    with pytest.raises(exc, match=_re(phrase)):
        make()


def test_layers_are_immutable(rng):
    d = dt.Dense(rng.normal(size=(2, 3)))
    with pytest.raises(AttributeError, match="immutable"):
        d.weight = np.zeros((2, 3))
    with pytest.raises(ValueError, match="read-only"):
        d.weight[0, 0] = 1.0
    w = np.ones((2, 3))
    d = dt.Dense(w)
    w[0, 0] = 5.0                  # the layer holds its own copy
    assert d.weight[0, 0] == 1.0


def test_sequential_output_shape_names_failing_layer(rng):
    net = dt.Sequential([dt.Conv2d(rng.normal(size=(4, 3, 3, 3))), dt.ReLU(), dt.MaxPool2d(2), dt.Flatten(),
                         dt.Dense(rng.normal(size=(2, 16)))])
    assert net.output_shape((5, 3, 6, 6)) == (5, 2)
    assert net.shapes((5, 3, 6, 6)) == [(5, 3, 6, 6), (5, 4, 4, 4), (5, 4, 4, 4), (5, 4, 2, 2), (5, 16), (5, 2)]
    with pytest.raises(dt.ShapeError) as info:
        net.output_shape((5, 3, 8, 8))
    msg = str(info.value)
    assert "layer 4 (Dense)" in msg
    assert "(5, 36)" in msg
    assert "expects 16 input features, got 36" in msg
    with pytest.raises(dt.ShapeError, match=_re("layer 0 (Conv2d) cannot take input of shape (5, 2, 6, 6)")):
        net.output_shape((5, 2, 6, 6))
    with pytest.raises(dt.ShapeError, match=_re("layer 2 (MaxPool2d)")):
        net.output_shape((5, 3, 3, 3))
    with pytest.raises(dt.ShapeError, match="network input must be"):
        net.output_shape((5, 3, 6))
    with pytest.raises(dt.ShapeError, match=_re("layer 0 (Conv2d)")):
        net.forward(np.zeros((1, 3, 2, 2)))


def test_explainer_arguments(dense_net):
    """Bad arguments raise deeptaylor's own errors, which are also the built-ins they used to be."""
    with pytest.raises(dt.InputTypeError, match="must be a deeptaylor.Graph or Sequential"):
        dt.Explainer([dt.ReLU()], dt.rules.ZPlus(), backend="numpy")
    with pytest.raises(dt.InputError, match="threads must be a positive int"):
        dt.Explainer(dense_net, dt.rules.ZPlus(), threads=0, backend="numpy")
    with pytest.raises(dt.InputError, match="unknown backend 'gpu'"):
        dt.Explainer(dense_net, dt.rules.ZPlus(), backend="gpu")
    with pytest.raises(dt.InputError, match="backend must be 'numpy', 'cpu' or a backend object"):
        dt.Explainer(dense_net, dt.rules.ZPlus(), backend=3)
    ex = dt.Explainer(dense_net, dt.rules.ZPlus(), backend="numpy")
    with pytest.raises(dt.InputError, match="batch_size must be a positive int"):
        ex.explain(np.ones((2, 6)), batch_size=0)
    # still the built-ins, for code that catches those
    with pytest.raises(TypeError):
        dt.Explainer([dt.ReLU()], dt.rules.ZPlus(), backend="numpy")
    with pytest.raises(ValueError, match="unknown backend"):
        dt.Explainer(dense_net, dt.rules.ZPlus(), backend="gpu")
    with pytest.raises(ValueError, match="batch_size"):
        ex.explain(np.ones((2, 6)), batch_size=0)


def test_sequential_item_not_a_layer():
    with pytest.raises(dt.InputTypeError, match=_re("Sequential: item 1 is int, not a deeptaylor layer")):
        dt.Sequential([dt.ReLU(), 3])
    with pytest.raises(TypeError):
        dt.Sequential([dt.ReLU(), "relu"])


@pytest.mark.parametrize(("low", "high"), [("a", 1.0), (0.0, "b"), (1j, 2.0), (None, 1.0), ([0.0, "x"], 1.0),
                                       (True, 1.0), (object(), 1.0)])
def test_zbox_bad_bounds_name_zbox(low, high):
    with pytest.raises(dt.RuleError, match="ZBox: (low|high) must be a real number or a numeric array"):
        dt.rules.ZBox(low, high)


@pytest.mark.parametrize("name", ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                                  "lecun_uniform", "lecun_normal", "zeros", "fans"])
def test_init_bad_shapes_name_the_initialiser(name):
    f = getattr(dt.init, name)
    for bad in ((3.5, 2), (3, True), ("4", 2), 5, None):
        with pytest.raises(dt.InputTypeError, match=f"{name}: shape must be a sequence of ints") as info:
            f(bad)
        assert isinstance(info.value, TypeError)
    if name == "zeros":                       # biases: any rank, no fans needed
        assert f((3,)).shape == (3,)
        with pytest.raises(dt.ShapeError, match="zeros: shape must have non-negative sizes"):
            f((3, -1))
    else:
        with pytest.raises(dt.ShapeError, match=f"{name}: .*>= 2 positive dimensions"):
            f((4, 0))
    # numpy integers are ints
    f((np.int64(3), np.int32(2)))
    with pytest.raises(dt.InputTypeError, match="constant: shape must be a sequence of ints"):
        dt.init.constant((2.5, 2), -0.1)


class _MyMethod(dt.methods.Method):
    __slots__ = ()


@pytest.mark.parametrize("rule", [_MyZPlus(), _MyRule()], ids=["ZPlus-subclass", "custom-rule"])
def test_custom_rule_is_refused_at_construction(backend, rule):
    """Backends dispatch rules by their exact type: a subclass or a custom Rule is refused when the
    Explainer is built (not a bare KeyError, or a compiled-plan error, at explain time)."""
    net = dt.Sequential([dt.ReLU(), dt.Dense(np.ones((3, 4)), -np.ones(3)), dt.ReLU(), dt.GlobalSumPool()])
    with pytest.raises(dt.UnsupportedError) as info:
        dt.Explainer(net, rule, backend=backend)
    msg = str(info.value)
    assert f"backend '{backend}'" in msg
    assert "layer 1 (Dense)" in msg
    assert rule.name in msg


def test_custom_layer_is_refused_at_construction(backend):
    net = dt.Sequential([dt.Dense(np.ones((3, 4))), _MyLayer(), dt.GlobalSumPool()])
    with pytest.raises(dt.UnsupportedError, match=_re(f"backend '{backend}' does not support layer 1 (_MyLayer)")):
        dt.Explainer(net, dt.rules.ZPlus(), backend=backend)
    with pytest.raises(dt.UnsupportedError, match=_re("layer 1 (_MyLayer)")):
        dt.Explainer(net, dt.methods.Sensitivity(), backend=backend)


def test_custom_method_is_refused_at_construction(backend):
    net = dt.Sequential([dt.Dense(np.ones((3, 4))), dt.ReLU(), dt.GlobalSumPool()])
    with pytest.raises(dt.UnsupportedError, match=f"backend '{backend}' does not support the method _MyMethod"):
        dt.Explainer(net, _MyMethod(), backend=backend)


def test_reference_refuses_unknown_rule_clearly():
    """Called directly (no Explainer), the reference names the rule instead of a bare KeyError."""
    from deeptaylor.reference import linear_relevance

    layer = dt.Dense(np.ones((2, 3)))
    with pytest.raises(dt.UnsupportedError, match="_MyZPlus"):
        linear_relevance(layer, _MyZPlus(), np.ones((1, 3)), np.ones((1, 2)))


# --------------------------------------------------------------------------------------------------
# Overflow: never a silent NaN heatmap

F32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.skipif("cpu" not in dt.available_backends(), reason="compiled core not built")
@pytest.mark.parametrize("value", [1e39, -1e39, 2 * F32_MAX])
def test_cpu_refuses_float64_input_beyond_float32(value):
    """The cpu backend computes in float32: a float64 input it cannot represent would become +-inf
    and NaN heatmaps. It is refused before any work, naming the problem."""
    net = dt.Sequential([dt.Dense(np.ones((2, 3))), dt.ReLU(), dt.GlobalSumPool()])
    x = np.array([[0.5, value, 0.25]])
    with pytest.raises(dt.InputError, match="beyond float32's range") as info:
        dt.Explainer(net, dt.rules.ZPlus(), backend="cpu").explain(x)
    assert "backend 'cpu'" in str(info.value)
    # the float64 reference takes it (the output is finite in float64)
    res = dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(np.abs(x))
    assert np.all(np.isfinite(res.relevance))
    # right at float32's maximum is still representable
    ok = np.array([[0.0, F32_MAX, 0.0]])
    net1 = dt.Sequential([dt.Dense(np.array([[0.0, 0.5, 0.0]])), dt.ReLU(), dt.GlobalSumPool()])
    got = dt.Explainer(net1, dt.rules.ZPlus(), backend="cpu").explain(ok)
    assert np.all(np.isfinite(got.relevance))


def _overflow_case(backend):
    """A net and input whose forward pass overflows the backend's precision (finite input)."""
    big = 1e30 if backend == "cpu" else 1e300
    net = dt.Sequential([dt.Dense(np.full((2, 3), big)), dt.ReLU(), dt.GlobalSumPool()])
    x = np.full((2, 3), big, dtype=np.float32 if backend == "cpu" else np.float64)
    return net, x


def test_forward_overflow_is_an_error_not_nan(backend):
    net, x = _overflow_case(backend)
    prec = "float32" if backend == "cpu" else "float64"
    for comp in (dt.rules.ZPlus(), dt.composites.deep_taylor_unbounded(), dt.methods.Sensitivity()):
        ex = dt.Explainer(net, comp, backend=backend)
        with pytest.raises(dt.InputError, match=f"forward pass overflowed {prec}"):
            ex.explain(x)
        with pytest.raises(dt.InputError, match=f"forward pass overflowed {prec}"):
            ex.explain(x, batch_size=1)


def test_relevance_overflow_is_an_error_not_inf(backend):
    """The output is finite but the relevance is not: sensitivity squares a huge gradient."""
    w = 1e30 if backend == "cpu" else 1e200
    net = dt.Sequential([dt.Dense(np.array([[w, 0.0]])), dt.ReLU(), dt.GlobalSumPool()])
    x = np.array([[1.0 / w, 1.0]])
    ex = dt.Explainer(net, dt.methods.Sensitivity(), backend=backend)
    with pytest.raises(dt.InputError, match="relevance pass overflowed"):
        ex.explain(x)
    # a well-scaled input to the same Explainer still works
    net2 = dt.Sequential([dt.Dense(np.array([[1.0, 0.0]])), dt.ReLU(), dt.GlobalSumPool()])
    res = dt.Explainer(net2, dt.methods.Sensitivity(), backend=backend).explain(x)
    assert np.all(np.isfinite(res.relevance))
