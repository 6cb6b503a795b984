"""The seeds' numerical task (examples/numerical_task.py) against a hand computation of the slides'
formulas (seed 003): R_k = x_k; R_j = x_j; R_i = sum_j q_ij / (sum_i' q_i'j) R_j with
q = w², x w+ or x w - l w+ - h w-. The hand computation is written with explicit loops over i and j
from the weights and input only; nothing is taken from deeptaylor's rule code."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "numerical_task.py"


@pytest.fixture(scope="module")
def task():
    spec = importlib.util.spec_from_file_location("numerical_task", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hand(x: list[float], w: list[list[float]], b: list[float], rule: str, low: float = 0.0,
         high: float = 1.0) -> dict[str, object]:
    """The slides' computation with loops. x[i], w[i][j] (slide notation), b[j]."""
    n_in, n_hid = len(x), len(b)
    xj = []
    for j in range(n_hid):
        z = b[j]
        for i in range(n_in):
            z += x[i] * w[i][j]
        xj.append(max(0.0, z))
    xk = sum(xj)
    rk = xk                      # step 1: R_k = x_k
    rj = list(xj)                # steps 2-3: root x~_j = 0 and dR_k/dx_j = 1 give R_j = x_j
    ri = [0.0] * n_in            # step 4: the detection layer's rule
    for j in range(n_hid):
        q = []
        for i in range(n_in):
            wp, wn = max(0.0, w[i][j]), min(0.0, w[i][j])
            if rule == "w2":
                q.append(w[i][j] ** 2)
            elif rule == "zplus":
                q.append(x[i] * wp)
            elif rule == "zB":
                q.append(x[i] * w[i][j] - low * wp - high * wn)
            else:
                raise ValueError(rule)
        den = sum(q)
        for i in range(n_in):
            ri[i] += q[i] / den * rj[j] if den != 0 else 0.0
    return {"x_k": xk, "R_k": rk, "R_j": rj, "R_i": ri, "x_j": xj}


@pytest.mark.parametrize("seed", [0, 5, 21])
def test_numbers_match_hand_computation(task, seed, capsys):
    d = task.run(seed, verbose=False)
    assert capsys.readouterr().out == ""
    x, w, b = d["x"].tolist(), d["w"].tolist(), d["b"].tolist()
    assert all(0.0 <= v <= 1.0 for v in x)
    assert x[-1] == 0.0
    assert all(v <= 0 for v in b)
    assert d["w"].shape == (6, 4)
    # every hidden unit away from its kink, so the comparison tests the rules
    assert all(abs(v) > 1e-3 for v in d["z"])
    tol = 1e-12
    for rule in ("w2", "zplus", "zB"):
        h = hand(x, w, b, rule)
        scale = max(1.0, h["x_k"])
        assert math.isclose(d["f"][0], h["x_k"], abs_tol=tol)
        np.testing.assert_allclose(d["hidden"], h["x_j"], rtol=0, atol=tol)
        np.testing.assert_allclose(d[f"R_k/{rule}"], [h["R_k"]], rtol=0, atol=tol * scale)
        np.testing.assert_allclose(d[f"R_j/{rule}"], h["R_j"], rtol=0, atol=tol * scale)
        np.testing.assert_allclose(d[f"R_i/{rule}"], h["R_i"], rtol=0, atol=tol * scale)
        # conservation and positivity (what the slides' propositions promise) in the hand numbers too
        assert math.isclose(sum(h["R_i"]), h["x_k"], rel_tol=1e-12, abs_tol=1e-15)
        assert min(h["R_i"]) >= 0.0
        assert d[f"conservation/{rule}"][0] <= 1e-12 * scale


@pytest.mark.parametrize("seed", [0, 21])
def test_sensitivity_by_hand(task, seed):
    d = task.run(seed, verbose=False)
    x, w, b = d["x"], d["w"], d["b"]
    grad = []
    for i in range(6):
        g = 0.0
        for j in range(4):
            z = sum(x[k] * w[k][j] for k in range(6)) + b[j]
            if z > 0:                 # dx_j/dz_j = 1 where the unit fires, 0 elsewhere; dx_k/dx_j = 1
                g += w[i][j]
        grad.append(g)
    np.testing.assert_allclose(d["sensitivity"], np.square(grad), rtol=1e-12, atol=1e-14)
    # not conservative: the squared gradient does not sum to f(x) in general
    assert abs(d["sensitivity"].sum() - d["f"][0]) > 1e-3


def test_zero_input_is_treated_as_the_rules_say(task):
    d = task.run(21, verbose=False)
    assert d["x"][-1] == 0.0
    assert d["R_i/zplus"][-1] == 0.0          # z+ gives nothing to an input that is off
    assert d["R_i/w2"][-1] > 0.0              # w² ignores the input value
    # zB: a dark pixel with a negative weight into an active unit is evidence for it
    active = d["hidden"] > 0
    assert np.any(d["w"][-1, active] < 0)
    assert d["R_i/zB"][-1] > 0.0


def test_script_prints_tables_and_reading(task, capsys):
    task.run(21, verbose=True)
    out = capsys.readouterr().out
    for phrase in ("Relevance per layer", "Relevance of the inputs R_i", "Checks", "Reading the numbers",
                   "w²", "z+", "zB", "(df/dx_i)^2", "not conservative"):
        assert phrase in out
    d = task.run(21, verbose=False)
    assert f"{d['f'][0]:.6f}" in out
    for rule in ("w2", "zplus", "zB"):
        assert f"{d[f'R_i/{rule}'].sum():.6f}" in out
    assert "NO" not in out.split("Checks")[1].split("Reading")[0]
    # dt.checks' own reports, for every rule
    for label, method in (("w²", "deep_taylor_unbounded"), ("z+", "ZPlus"), ("zB", "deep_taylor")):
        assert f"[{label}] conservation (composite:{method}, 1 samples)" in out
        assert f"[{label}] positivity (composite:{method})" in out
    assert out.count("negative |R| mass  0.00 %") == 3


def test_no_unit_fires(task, capsys):
    # seed 3 switches every unit off: the example must say so instead of dividing by zero
    d = task.run(3, verbose=True)
    out = capsys.readouterr().out
    assert d["f"][0] == 0.0
    assert "nothing to explain" in out
    for rule in ("w2", "zplus", "zB"):
        assert np.all(d[f"R_i/{rule}"] == 0.0)


def test_default_seed_pinned_by_hand(task):
    """The default seed's network redrawn here from the raw generator with the Keras formula, and two
    literal results, so that a change to dt.init (or to the example's draws) cannot slip through as
    'the example and the hand computation still agree with each other'."""
    assert task.DEFAULT_SEED == 21
    rng = np.random.default_rng(21)
    limit = math.sqrt(6.0 / (6 + 4))       # glorot_uniform, Dense (out=4, in=6): sqrt(6 / (fan_in + fan_out))
    w_out_in = [[-limit + 2.0 * limit * u for u in row] for row in rng.random((4, 6)).tolist()]
    b = [-(0.05 + 0.15 * u) for u in rng.random(4).tolist()]        # -U(0.05, 0.2)
    x = rng.random(6).tolist()                                      # U(0, 1), last entry set to 0
    x[-1] = 0.0
    w = [[w_out_in[j][i] for j in range(4)] for i in range(6)]      # slide notation w[i][j]
    d = task.run(verbose=False)
    np.testing.assert_allclose(d["w"], w, rtol=0, atol=1e-15)
    np.testing.assert_allclose(d["b"], b, rtol=0, atol=1e-15)
    np.testing.assert_allclose(d["x"], x, rtol=0, atol=1e-15)
    # as printed by `python examples/numerical_task.py` (4 decimals): w_00 = 0.4355, b_0 = -0.0890
    assert round(d["w"][0, 0], 4) == 0.4355
    assert round(d["b"][0], 4) == -0.0890
    # literals: f(x) = x_0 + x_2 + x_3 = 0.4121 + 0.2540 + 0.0216 (unit 1 off), and z+'s R_2, each
    # from hand() above on these weights (float64, sums in slide order), pinned to 12 digits
    h = hand(x, w, b, "zplus")
    assert math.isclose(h["x_k"], 0.6876410476657729, rel_tol=1e-12)
    assert math.isclose(h["R_i"][2], 0.3032833455965215, rel_tol=1e-12)
    assert math.isclose(d["f"][0], 0.6876410476657729, rel_tol=1e-12)
    assert math.isclose(d["R_i/zplus"][2], 0.3032833455965215, rel_tol=1e-12)


# --------------------------------------------------------------------------------------------------
# Across the initialisers of dt.init (issue 11, part 5)

INITS = ("glorot_uniform", "glorot_normal", "he_uniform", "he_normal", "lecun_uniform", "lecun_normal")


def test_initialisers_are_dt_init(task):
    import deeptaylor as dt

    assert task.INITIALISERS == INITS
    for init in INITS:
        assert callable(getattr(dt.init, init))
    with pytest.raises(ValueError, match="unknown initialiser"):
        task.build(0, "orthogonal")


def test_across_initialisers_small(task, capsys, tmp_path):
    png = tmp_path / "init.png"
    res = task.across_initialisers(21, n_networks=12, verbose=True, plot=str(png))
    out = capsys.readouterr().out
    seed, nets, summary = res["seed"], res["networks"], res["summary"]
    assert tuple(seed) == INITS and tuple(nets) == INITS and tuple(summary) == INITS
    n_in, n_out = 6, 4
    # the weights follow each formula; one seed draws the same biases and input under every initialiser
    # and the same numbers scaled within a shape (the Keras formulas)
    std = {"glorot": math.sqrt(2 / (n_in + n_out)), "he": math.sqrt(2 / n_in), "lecun": math.sqrt(1 / n_in)}
    for init in INITS:
        d = seed[init]
        s = std[init.split("_")[0]]
        bound = math.sqrt(3) * s if init.endswith("uniform") else 2 * s / 0.87962566103423978
        assert np.abs(d["w"]).max() <= bound
        np.testing.assert_array_equal(d["b"], seed["glorot_uniform"]["b"])
        np.testing.assert_array_equal(d["x"], seed["glorot_uniform"]["x"])
        ref = seed["glorot_" + init.split("_")[1]]["w"]
        np.testing.assert_allclose(d["w"], ref * s / std["glorot"], rtol=1e-12, atol=1e-15)
        assert summary[init]["w_std_formula"] == pytest.approx(s, rel=1e-12)
        # every layer's relevance against the slides' formulas, by hand
        for rule in ("w2", "zplus", "zB"):
            h = hand(d["x"].tolist(), d["w"].tolist(), d["b"].tolist(), rule)
            scale = max(1.0, h["x_k"])
            np.testing.assert_allclose(d[f"R_j/{rule}"], h["R_j"], rtol=0, atol=1e-12 * scale)
            np.testing.assert_allclose(d[f"R_i/{rule}"], h["R_i"], rtol=0, atol=1e-12 * scale)
            np.testing.assert_allclose(d[f"R_k/{rule}"], [h["x_k"]], rtol=0, atol=1e-12 * scale)
    # the statistics are those of the networks: recompute a few from the per-network arrays
    for init in INITS:
        st, sm = nets[init], summary[init]
        live = st["f"] > 0
        assert st["f"].shape == (12,) and st["shares/w2"].shape == (12, 6)
        assert sm["top/w2"] == pytest.approx(st["top/w2"][live].mean())
        np.testing.assert_allclose(st["top/zplus"][live], st["shares/zplus"][live, 0], rtol=1e-12)
        np.testing.assert_allclose(st["shares/zB"][live].sum(1), 1.0, rtol=1e-12)
        assert sm["dead"] == pytest.approx(1 - live.mean())
        assert sm["sens_ratio"] == pytest.approx(np.median(st["sens_ratio"][live]))
        assert max(sm[f"err/{r}"] for r in ("w2", "zplus", "zB")) <= 1e-12
        assert min(sm[f"min/{r}"] for r in ("w2", "zplus", "zB")) >= 0.0
        assert np.all((st["eff/w2"][live] >= 1) & (st["eff/w2"][live] <= 6))
        # the network of seed s is build(s, init): its f is the one reported
        assert st["f"][3] == pytest.approx(float(task.run(3, verbose=False, init=init)["f"][0]), rel=1e-15)
    # printed: a block per initialiser with the per-layer relevances and the checks, the table, the reading
    for init in INITS:
        assert f"{init}: " in out
        row = [line for line in out.splitlines() if line.startswith(f"  {init} ")][0]
        assert f"{summary[init]['f']:9.3f}" in row and f"{summary[init]['top/w2']:9.3f}" in row
    assert out.count("x_j = R_j") == 6 and out.count(": consistent") == 6 and "NOT consistent" not in out
    for phrase in ("Reading the numbers", "Scale.", "Shape changes it", "Sensitivity is not scale-free"):
        assert phrase in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line_initialisers(task, capsys):
    task.main(["--initialisers", "--networks", "2", "5"])
    out = capsys.readouterr().out
    assert "under each initialiser of dt.init (seed 5)" in out and "Over 2 random networks" in out
    task.main(["5"])
    assert "detection-pooling network (seed 5)" in capsys.readouterr().out
