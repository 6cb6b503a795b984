"""Trust at the edges (issue 14): inputs that used to slip past the checks or fail with an unrelated
error, the default backend ("auto"), and model files / images whose declared sizes would cost far
more than their bytes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor.errors import BackendFallbackWarning, DeepTaylorWarning

HAVE_CPU = "cpu" in dt.available_backends()


def _dense_net() -> dt.Sequential:
    rng = np.random.default_rng(0)
    return dt.Sequential([dt.Dense(rng.normal(size=(4, 6)), -np.abs(rng.normal(size=4))), dt.ReLU(),
                          dt.Dense(rng.normal(size=(3, 4)), np.zeros(3))])


# ------------------------------------------------------------------------------- item 3: masked, matrix


@pytest.mark.parametrize("backend", dt.available_backends())
def test_masked_array_refused(backend):
    net = _dense_net()
    data = np.full((2, 6), 0.5)
    data[0, 1] = np.nan                          # hidden under the mask: used to reach the backend
    x = np.ma.array(data, mask=np.isnan(data))
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend=backend)
    with pytest.raises(dt.InputTypeError, match="masked"):
        ex.explain(x)
    # out of the zB box under the mask: refused the same way, not computed on the raw data
    y = np.ma.array(np.full((1, 6), 0.5), mask=[[False, True, False, False, False, False]])
    y.data[0, 1] = 7.0
    with pytest.raises(dt.InputTypeError, match="masked"):
        ex.explain(y)


@pytest.mark.parametrize("backend", dt.available_backends())
def test_matrix_refused(backend):
    ex = dt.Explainer(_dense_net(), dt.rules.ZPlus(), backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)   # numpy's note on np.matrix itself
        m = np.matrix(np.full((2, 6), 0.5))
    with pytest.raises(dt.InputTypeError, match="matrix"):
        ex.explain(m)


# ----------------------------------------------------------------------- item 12: API edges (explain)


@pytest.mark.parametrize("backend", dt.available_backends())
@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_big_endian_input_converted(backend, dtype):
    net = _dense_net()
    x = np.random.default_rng(1).uniform(0, 1, (3, 6))
    ex = dt.Explainer(net, dt.rules.ZPlus(), backend=backend)
    want = ex.explain(x.astype(dtype[1:].replace("f", "<f")))
    got = ex.explain(x.astype(dtype))
    np.testing.assert_array_equal(got.relevance, want.relevance)
    assert got.relevance.dtype.isnative


def test_uint64_target_beyond_int64():
    ex = dt.Explainer(_dense_net(), dt.rules.ZPlus(), backend="numpy")
    x = np.full((2, 6), 0.5)
    for target in (np.uint64(2**63), np.array([0, 2**64 - 1], dtype=np.uint64), 2**70, 2**63):
        with pytest.raises(dt.InputError, match="out of range"):
            ex.explain(x, target=target)
    assert ex.explain(x, target=np.uint64(2)).target.tolist() == [2, 2]


def test_torch_module_without_input_shape_names_the_fix():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8, 2))
    with pytest.raises(dt.ShapeError, match=r"input_shape=\(C, H, W\).*dt\.from_torch"):
        dt.Explainer(model, "epsilon-plus")


def test_non_network_names_its_type():
    class Module:  # looks like neither a Graph nor a torch module
        pass

    with pytest.raises(dt.InputTypeError, match="Module"):
        dt.Explainer(Module(), "epsilon-plus")


# ------------------------------------------------------------------------ item 13: backend="auto"


@pytest.mark.skipif(not HAVE_CPU, reason="compiled core not built")
def test_auto_default_uses_the_compiled_engine():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ex = dt.Explainer(_dense_net(), dt.composites.deep_taylor(0.0, 1.0))
    assert ex.backend.name == "cpu"
    assert ex.fallback_reason is None
    res = ex.explain(np.full((2, 6), 0.5))
    assert res.backend == "cpu"
    assert res.relevance.dtype == np.float32


def test_auto_falls_back_with_a_warning_that_says_why(monkeypatch):
    """No built-in layer or rule is refused by the compiled engine today: a refusal is simulated."""
    if HAVE_CPU:
        from deeptaylor.backends.cpu import CpuBackend

        def refuse(self, net, assignment):
            raise dt.UnsupportedError("backend 'cpu' does not support layer 1 (ReLU) [simulated]")

        monkeypatch.setattr(CpuBackend, "check", refuse)
        why = "simulated"
    else:
        why = "not built"
    with pytest.warns(BackendFallbackWarning, match=why) as rec:
        ex = dt.Explainer(_dense_net(), dt.rules.ZPlus())
    assert issubclass(rec[0].category, DeepTaylorWarning)
    assert rec[0].filename == __file__        # points at the caller's line
    assert ex.backend.name == "numpy"
    assert why in ex.fallback_reason
    res = ex.explain(np.full((2, 6), 0.5))
    assert res.backend == "numpy"
    assert res.relevance.dtype == np.float64


def test_auto_falls_back_when_the_core_is_not_built(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deeptaylor._core", None)   # import fails as without a build
    with pytest.warns(BackendFallbackWarning, match="not built"):
        ex = dt.Explainer(_dense_net(), dt.rules.ZPlus())
    assert ex.explain(np.full((1, 6), 0.5)).backend == "numpy"


def test_explicit_backends_do_not_fall_back(monkeypatch):
    net = _dense_net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dt.Explainer(net, dt.rules.ZPlus(), backend="numpy").explain(np.ones((1, 6))).backend == "numpy"
    with pytest.raises(dt.InputError, match="unknown backend"):
        dt.Explainer(net, dt.rules.ZPlus(), backend="gpu")
    if HAVE_CPU:
        from deeptaylor.backends.cpu import CpuBackend

        def refuse(self, net, assignment):
            raise dt.UnsupportedError("simulated")

        monkeypatch.setattr(CpuBackend, "check", refuse)
        with pytest.raises(dt.UnsupportedError):
            dt.Explainer(net, dt.rules.ZPlus(), backend="cpu")
