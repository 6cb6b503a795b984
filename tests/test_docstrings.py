"""Every public property of the core API has a docstring, and every reference rule function states
the shapes it works on."""

from __future__ import annotations

import inspect

import pytest

import deeptaylor as dt
from deeptaylor.reference import relevance

CLASSES = [dt.Layer, dt.Dense, dt.Conv2d, dt.ReLU, dt.MaxPool2d, dt.AvgPool2d, dt.SumPool2d, dt.GlobalSumPool,
           dt.LpPool, dt.Flatten, dt.Sequential, dt.Composite, dt.Explainer, dt.Explanation,
           dt.checks.ConservationReport, dt.checks.PositivityReport, dt.rules.Rule, dt.methods.Method]


def _properties():
    for cls in CLASSES:
        for name, member in inspect.getmembers(cls, lambda m: isinstance(m, property)):
            if not name.startswith("_"):
                yield pytest.param(cls, name, member, id=f"{cls.__name__}.{name}")


@pytest.mark.parametrize(("cls", "name", "prop"), list(_properties()))
def test_public_properties_have_docstrings(cls, name, prop):
    assert (prop.__doc__ or "").strip(), f"{cls.__name__}.{name} has no docstring"


@pytest.mark.parametrize("fn", sorted(set(relevance.RULE_FUNCTIONS.values()), key=lambda f: f.__name__),
                         ids=lambda f: f.__name__)
def test_rule_functions_state_their_shapes(fn):
    doc = fn.__doc__ or ""
    assert "Shapes:" in doc, fn.__name__
    for part in ("a : (N, in_features)", "(N, C, H, W)", "R : (N, out_features)", "returns : the shape of a"):
        assert part in doc.split("Shapes:")[1], (fn.__name__, part)
