"""Composites: rule resolution order, negative indices, mappings, the named registry."""

from __future__ import annotations

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.rules import Epsilon, Flat, Gamma, WSquare, Z, ZBox, ZPlus


@pytest.fixture
def net(rng):
    # linear layers at indices 0 (Conv2d), 2 (Conv2d), 5 (Dense), 7 (Dense)
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(2, 1, 3, 3)), padding=1), dt.ReLU(),
        dt.Conv2d(rng.normal(size=(2, 2, 3, 3)), padding=1), dt.ReLU(), dt.Flatten(),
        dt.Dense(rng.normal(size=(4, 2 * 4 * 4))), dt.ReLU(), dt.Dense(rng.normal(size=(3, 4)))])


def test_resolution_order(net):
    """by_index > first > by_type > default."""
    comp = dt.Composite(by_index={7: Z()}, first=WSquare(), by_type={dt.Conv2d: Gamma(0.5)}, default=Epsilon(0.1))
    assert comp.resolve(net) == [WSquare(), None, Gamma(0.5), None, None, Epsilon(0.1), None, Z()]
    # by_index beats first
    comp = dt.Composite(by_index={0: Flat()}, first=WSquare(), default=ZPlus())
    assert comp.resolve(net)[0] == Flat()
    # first beats by_type; by_type beats default
    comp = dt.Composite(first=ZBox(0, 1), by_type={dt.Conv2d: Gamma(), dt.Dense: Epsilon()}, default=ZPlus())
    rules = comp.resolve(net)
    assert rules[0] == ZBox(0, 1)
    assert rules[2] == Gamma()
    assert rules[5] == Epsilon()
    assert rules[7] == Epsilon()
    assert [r is None for r in rules] == [not layer.linear for layer in net]


def test_negative_indices(net):
    comp = dt.Composite(by_index={-1: Z(), -3: Flat()}, default=ZPlus())
    rules = comp.resolve(net)
    assert rules[7] == Z()
    assert rules[5] == Flat()
    assert rules[0] == ZPlus()
    with pytest.raises(dt.RuleError, match="out of range"):
        dt.Composite(by_index={-9: Z()}, default=ZPlus()).resolve(net)


def test_by_type_follows_subclasses(net):
    class MyDense(dt.Dense):
        __slots__ = ()

    n2 = dt.Sequential([MyDense(np.ones((2, 3))), dt.ReLU(), dt.GlobalSumPool()])
    assert dt.Composite(by_type={dt.Dense: Flat()}).resolve(n2)[0] == Flat()
    assert dt.Composite(by_type={dt.Dense: Flat(), MyDense: Z()}).resolve(n2)[0] == Z()


def test_from_mapping(net):
    comp = dt.Composite.from_mapping({"first": WSquare(), dt.Dense: Epsilon(0.2), -1: Z(), "default": ZPlus()})
    assert comp.name == "mapping"
    assert comp.resolve(net) == [WSquare(), None, ZPlus(), None, None, Epsilon(0.2), None, Z()]
    # the Explainer takes mappings, rules and names directly
    x = np.random.default_rng(0).uniform(size=(2, 1, 4, 4))
    a = dt.Explainer(net, {"first": WSquare(), "default": ZPlus()}, backend="numpy").explain(x)
    b = dt.Explainer(net, dt.composites.deep_taylor_unbounded(), backend="numpy").explain(x)
    np.testing.assert_array_equal(a.relevance, b.relevance)
    c = dt.Explainer(net, ZPlus(), backend="numpy")
    assert c.assignment == [ZPlus(), None, ZPlus(), None, None, ZPlus(), None, ZPlus()]


def test_builtin_composites(net):
    assert dt.composites.deep_taylor(-1, 2).resolve(net) == [ZBox(-1, 2), None, ZPlus(), None, None, ZPlus(), None,
                                                            ZPlus()]
    assert dt.composites.deep_taylor_unbounded().resolve(net)[0] == WSquare()
    eps = dt.composites.epsilon_plus_flat(1e-3).resolve(net)
    assert eps == [Flat(), None, ZPlus(use_bias=True), None, None, Epsilon(1e-3), None, Epsilon(1e-3)]
    box = dt.composites.epsilon_gamma_box(0, 1, epsilon=0.5, gamma=0.1).resolve(net)
    assert box == [ZBox(0, 1), None, Gamma(0.1), None, None, Epsilon(0.5), None, Epsilon(0.5)]


def test_names_and_get(monkeypatch):
    names = dt.composites.names()
    for n in ("deep-taylor", "deep-taylor-unbounded", "epsilon-plus-flat", "epsilon-gamma-box", "sensitivity",
              "gradient-x-input"):
        assert n in names
    assert names == sorted(names)
    assert dt.composites.get("deep-taylor", low=-1.0, high=1.0).first == ZBox(-1.0, 1.0)
    assert dt.composites.get("deep_taylor").first == ZBox(0.0, 1.0)          # _ and - are equivalent
    assert isinstance(dt.composites.get("sensitivity"), dt.methods.Sensitivity)
    with pytest.raises(dt.RuleError, match="unknown composite 'zzz'"):
        dt.composites.get("zzz")
    monkeypatch.setattr(dt.composites, "_REGISTRY", dict(dt.composites._REGISTRY))
    dt.composites.register("all-flat", lambda: dt.Composite(default=Flat(), name="all-flat"))
    assert "all-flat" in dt.composites.names()
    assert dt.composites.get("all_flat").default == Flat()


def test_explainer_uses_names(net):
    ex = dt.Explainer(net, "epsilon-plus-flat", backend="numpy")
    assert ex.method_name == "composite:epsilon_plus_flat"
    assert dt.Explainer(net, "sensitivity", backend="numpy").method_name == "Sensitivity"


def test_repr_and_immutability():
    comp = dt.Composite(first=WSquare(), by_index={3: Z()}, by_type={dt.Dense: Epsilon(0.5)}, default=ZPlus(),
                        name="mine")
    text = repr(comp)
    for part in ("Composite[mine]", "first=WSquare()", "by_index={3: Z()}", "Dense: Epsilon(eps=0.5)",
                 "default=ZPlus(use_bias=False)"):
        assert part in text
    with pytest.raises(AttributeError, match="immutable"):
        comp.default = Z()


def test_mappings_are_read_only():
    """A Composite is immutable all the way down: its by_index / by_type mappings cannot be edited
    after construction (the caller's dicts are copied, so editing those changes nothing either)."""
    by_type = {dt.Dense: Epsilon(0.5)}
    by_index = {0: Z()}
    comp = dt.Composite(by_index=by_index, by_type=by_type, default=ZPlus())
    with pytest.raises(TypeError):
        comp.by_type[dt.Dense] = "junk"
    with pytest.raises(TypeError):
        comp.by_index[1] = Flat()
    with pytest.raises(TypeError):
        del comp.by_type[dt.Dense]
    by_type[dt.Conv2d] = Z()
    by_index[5] = Flat()
    assert dict(comp.by_type) == {dt.Dense: Epsilon(0.5)}
    assert dict(comp.by_index) == {0: Z()}


@pytest.mark.parametrize("layer_type", [dt.MaxPool2d, dt.ReLU, dt.AvgPool2d, dt.SumPool2d, dt.GlobalSumPool,
                                        dt.LpPool, dt.Flatten, dt.Layer])
def test_rule_for_a_non_linear_type_is_refused(layer_type):
    """Only Dense and Conv2d (and their subclasses) take a rule: a rule given to any other layer
    type would be silently ignored, so it is an error at construction, naming the type."""
    with pytest.raises(dt.RuleError, match=layer_type.__name__) as info:
        dt.Composite(by_type={layer_type: ZPlus()}, default=ZPlus())
    assert "takes no rule" in str(info.value)
    with pytest.raises(dt.RuleError, match=layer_type.__name__):
        dt.Composite.from_mapping({layer_type: WSquare(), "default": ZPlus()})


def test_rule_for_a_linear_subclass_type_is_accepted():
    class MyConv(dt.Conv2d):
        __slots__ = ()

    comp = dt.Composite(by_type={MyConv: Z(), dt.Dense: Flat()})
    assert set(comp.by_type) == {MyConv, dt.Dense}
