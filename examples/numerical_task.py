"""The seeds' numerical task: deep Taylor decomposition of a detection-pooling network, by the numbers.

The network of the slides (seed 003, "Setting"):

    x_j = max(0, sum_i x_i w_ij + b_j),   b_j <= 0        (detection: Dense + ReLU)
    x_k = sum_j x_j                                        (pooling: GlobalSumPool)

with 6 inputs in [0, 1], 4 hidden ReLU units (Glorot-uniform weights from ``dt.init``, small negative
biases) and one output. Deep Taylor decomposition explains f(x) = x_k in two steps:

* pooling layer: R_k = x_k, and the root x~_j = 0 gives R_j = x_j;
* detection layer: R_i = sum_j q_ij / (sum_i' q_i'j) R_j, with
  q_ij = w_ij^2 (w² rule, any input), q_ij = x_i w+_ij (z+ rule, x >= 0),
  q_ij = x_i w_ij - l_i w+_ij - h_i w-_ij (zB rule, l <= x <= h; here the box [0, 1]).

The script prints every layer's relevance under the three rules, the conservation and positivity
checks (as a table and as ``dt.checks.conservation`` / ``dt.checks.positivity`` report them),
sensitivity analysis for contrast, and a reading of the numbers in plain words.

Run it:  ``python examples/numerical_task.py [seed]``.  Import it:  ``run(seed, verbose=False)``
returns the numbers as a dict of arrays (used by ``tests/test_numerical_task.py``).
"""

from __future__ import annotations

import sys

import numpy as np

import deeptaylor as dt

N_IN, N_HIDDEN = 6, 4
LOW, HIGH = 0.0, 1.0
#: Seed 21 makes a telling example: three units fire, one is switched off by its negative bias alone,
#: and the three rules rank different inputs first. Any seed works (``python numerical_task.py 5``).
DEFAULT_SEED = 21

#: The explanations compared: label -> what to pass to dt.Explainer. A single rule applies to every
#: linear layer; here there is one (the detection layer), so each row is one rule of the slides.
METHODS = {
    "w2": dt.composites.deep_taylor_unbounded(),     # w² on the first (only) linear layer
    "zplus": dt.rules.ZPlus(),                         # z+ as single rule
    "zB": dt.composites.deep_taylor(LOW, HIGH),       # zB on the first (only) linear layer
}
LABELS = {"w2": "w²", "zplus": "z+", "zB": "zB"}


def build(seed: int = DEFAULT_SEED) -> tuple[dt.Sequential, np.ndarray]:
    """The detection-pooling network and one input for ``seed``.

    Returns ``(net, x)``: ``net`` is Dense(6 -> 4, Glorot-uniform weights, biases in [-0.2, -0.05])
    -> ReLU -> GlobalSumPool; ``x`` is (1, 6) in [0, 1] with its last entry set to exactly 0 (a black
    pixel), to show how the rules treat an input that is off.
    """
    rng = np.random.default_rng(seed)
    weight = dt.init.glorot_uniform((N_HIDDEN, N_IN), rng)          # (out, in) = w_ij transposed
    bias = -rng.uniform(0.05, 0.2, size=N_HIDDEN)                   # b_j <= 0, as the slides require
    x = rng.uniform(LOW, HIGH, size=(1, N_IN))
    x[0, -1] = 0.0
    net = dt.Sequential([dt.Dense(weight, bias), dt.ReLU(), dt.GlobalSumPool()])
    return net, x


def run(seed: int = DEFAULT_SEED, verbose: bool = True) -> dict[str, np.ndarray]:
    """Explain the seed network's output for ``seed``; print the tables when ``verbose``.

    Returns a dict of float64 arrays (slide notation, one sample):

    ``x`` (6,) inputs x_i; ``w`` (6, 4) weights w_ij; ``b`` (4,) biases b_j; ``z`` (4,) pre-activations;
    ``hidden`` (4,) x_j; ``f`` (1,) output x_k; for each rule r in ``w2``, ``zplus``, ``zB``:
    ``R_i/r`` (6,), ``R_j/r`` (4,), ``R_k/r`` (1,), ``conservation/r`` (1,) = |sum R_i - f|; and
    ``sensitivity`` (6,) = (df/dx_i)^2.
    """
    net, x = build(seed)
    dense = net[0]
    out: dict[str, np.ndarray] = {
        "x": x[0].copy(),
        "w": dense.weight.T.copy(),
        "b": dense.bias.copy(),
    }
    out["z"] = x[0] @ out["w"] + out["b"]
    out["hidden"] = np.maximum(out["z"], 0.0)
    checks: dict[str, tuple[dt.checks.ConservationReport, dt.checks.PositivityReport]] = {}
    for key, method in METHODS.items():
        res = dt.Explainer(net, method, backend="numpy").explain(x, return_layers=True)
        checks[key] = (dt.checks.conservation(res), dt.checks.positivity(res))
        # layers[0]: input of the Dense layer (R_i); layers[1] = layers[2]: the hidden units (R_j);
        # layers[3]: the output (R_k).
        out[f"R_i/{key}"] = res.layers[0][0]
        out[f"R_j/{key}"] = res.layers[2][0]
        out[f"R_k/{key}"] = res.layers[3][0]
        out["f"] = res.output[0]
        out[f"conservation/{key}"] = np.array([checks[key][0].max_abs_error])
    sens = dt.Explainer(net, dt.methods.Sensitivity(), backend="numpy").explain(x)
    out["sensitivity"] = sens.relevance[0]
    if verbose:
        report(out, seed, checks)
    return out


# --------------------------------------------------------------------------------------------------
# Printing


def _row(label: str, values: np.ndarray, width: int = 9) -> str:
    return f"  {label:<14}" + "".join(f"{v:>{width}.4f}" for v in values)


def _header(label: str, names: list[str], width: int = 9) -> str:
    return f"  {label:<14}" + "".join(f"{n:>{width}}" for n in names)


def report(d: dict[str, np.ndarray], seed: int, checks: dict[str, tuple] | None = None) -> None:
    """Print the tables and the plain-language reading of ``run``'s numbers; ``checks`` maps each rule
    to its ``(dt.checks.conservation(res), dt.checks.positivity(res))`` reports, printed as they are."""
    ins = [f"i={i}" for i in range(N_IN)]
    hid = [f"j={j}" for j in range(N_HIDDEN)]
    print(f"Deep Taylor decomposition of a detection-pooling network (seed {seed})")
    print("  x_j = max(0, sum_i x_i w_ij + b_j),  x_k = sum_j x_j,  b_j <= 0\n")
    print("Network and input")
    print(_header("", ins))
    print(_row("x_i", d["x"]))
    for j in range(N_HIDDEN):
        print(_row(f"w_i{j}", d["w"][:, j]))
    print()
    print(_header("", hid))
    print(_row("b_j", d["b"]))
    print(_row("z_j", d["z"]))
    print(_row("x_j = R_j", d["hidden"]))
    print(f"  output f(x) = x_k = sum_j x_j = {d['f'][0]:.6f}\n")

    print("Relevance per layer (R_k = x_k at the output, R_j = x_j at the hidden units)")
    print(_header("rule", ["R_k"] + hid))
    for key, label in LABELS.items():
        print(_row(label, np.concatenate([d[f"R_k/{key}"], d[f"R_j/{key}"]])))
    print()
    print("Relevance of the inputs R_i")
    print(_header("rule", ins + ["sum"]))
    for key, label in LABELS.items():
        r = d[f"R_i/{key}"]
        print(_row(label, np.append(r, r.sum())))
    s = d["sensitivity"]
    print(_row("(df/dx_i)^2", np.append(s, s.sum())))
    print()

    print("Checks")
    print(f"  {'rule':<14}{'sum R_i':>12}{'f(x)':>12}{'|sum R_i - f|':>16}{'min R_i':>12}  consistent")
    for key, label in LABELS.items():
        r = d[f"R_i/{key}"]
        err = abs(r.sum() - d["f"][0])
        ok = err <= 1e-12 * max(1.0, abs(d["f"][0])) and r.min() >= 0
        print(f"  {label:<14}{r.sum():>12.6f}{d['f'][0]:>12.6f}{err:>16.2e}{r.min():>12.6f}  "
              f"{'yes' if ok else 'NO'}")
    print(f"  {'sensitivity':<14}{s.sum():>12.6f}{d['f'][0]:>12.6f}{abs(s.sum() - d['f'][0]):>16.2e}"
          f"{s.min():>12.6f}  positive, not conservative\n")
    if checks:
        print("The same checks as deeptaylor reports them (dt.checks.conservation / dt.checks.positivity)")
        for key, label in LABELS.items():
            for rep in checks[key]:
                first, *rest = str(rep).splitlines()
                print(f"  [{label}] {first}")
                for line in rest:
                    print(f"  {line}")
        print()
    print("Reading the numbers")
    for paragraph in interpret(d):
        print(_wrap(paragraph))
        print()


def _wrap(text: str, width: int = 100, indent: str = "  ") -> str:
    words, lines, line = text.split(), [], indent
    for w in words:
        if len(line) + len(w) + 1 > width and line.strip():
            lines.append(line.rstrip())
            line = indent
        line += w + " "
    lines.append(line.rstrip())
    return "\n".join(lines)


def _units(js: list[int]) -> str:
    return f"unit {js[0]}" if len(js) == 1 else "units " + ", ".join(map(str, js[:-1])) + f" and {js[-1]}"


def interpret(d: dict[str, np.ndarray]) -> list[str]:
    """Paragraphs that read ``run``'s numbers in plain words (generated from the numbers)."""
    x, w, hidden, f = d["x"], d["w"], d["hidden"], float(d["f"][0])
    active = [j for j in range(N_HIDDEN) if hidden[j] > 0]
    inactive = [j for j in range(N_HIDDEN) if hidden[j] == 0]
    paras = []
    if not active:
        return [(f"No hidden unit fires (every z_j <= 0), so f(x) = {f:.4f}: there is nothing to explain and "
                 "every deep Taylor rule gives zero relevance everywhere. Try another seed.")]
    p = (f"The output f(x) = {f:.4f} is the sum of the hidden units that fire: "
         + ", ".join(f"x_{j} = {hidden[j]:.4f}" for j in active) + ". ")
    by_bias = [j for j in inactive if d["z"][j] - d["b"][j] > 0]
    if inactive:
        p += (_units(inactive).capitalize() + (" is" if len(inactive) == 1 else " are") + " off (z_j <= 0"
              + (f"; {_units(by_bias)} only because of the negative bias" if by_bias
                 else "") + "). A unit that is off has R_j = x_j = 0 and passes nothing down, under every rule. ")
    p += ("All three rules start from the same R_j = x_j; they differ only in how the detection layer "
          "splits each R_j among the inputs.")
    paras.append(p)

    def top(r: np.ndarray) -> int:
        return int(np.argmax(r))

    zp = d["R_i/zplus"]
    i = top(zp)
    j = max(active, key=lambda j: x[i] * max(w[i, j], 0.0)) if active else 0
    paras.append(
        f"z+ (inputs >= 0) gives the most relevance to input {i} (R = {zp[i]:.4f}, {100 * zp[i] / f:.0f}% "
        f"of f): it is bright (x = {x[i]:.3f}) and has a large positive weight w = {w[i, j]:.3f} into the "
        f"active unit {j}. z+ shares R_j in proportion to the positive contributions x_i w+_ij, so it "
        "ignores negative weights (evidence against a unit is not explained) and gives nothing to "
        "inputs that are 0.")
    w2 = d["R_i/w2"]
    i2 = top(w2)
    j2 = max(active, key=lambda j: w[i2, j] ** 2 / np.sum(w[:, j] ** 2) * hidden[j])
    paras.append(
        f"w² (inputs unbounded) ranks input {i2} first (R = {w2[i2]:.4f}), mostly through unit {j2}, "
        f"where its weight w = {w[i2, j2]:.3f} is {100 * w[i2, j2] ** 2 / np.sum(w[:, j2] ** 2):.0f}% of "
        f"the unit's squared weights. w² shares R_j in proportion to w_ij², which depends on the weights "
        "only, not on the input values: an input gets relevance for being strongly connected to an active "
        "unit, whatever the sign of the weight and whatever its value.")
    zb = d["R_i/zB"]
    ib = top(zb)

    def qb(i: int, j: int) -> float:  # the zB contribution (x_i - l) w+_ij + (x_i - h) w-_ij >= 0
        return (x[i] - LOW) * max(w[i, j], 0.0) + (x[i] - HIGH) * min(w[i, j], 0.0)

    jb = max(active, key=lambda j: qb(ib, j) / sum(qb(i, j) for i in range(N_IN)) * hidden[j])
    why = (f"it is {x[ib]:.3f} above the lower bound and its weight into unit {jb} is positive "
           f"(w = {w[ib, jb]:.3f})" if w[ib, jb] > 0 else
           f"it is {HIGH - x[ib]:.3f} below the upper bound and its weight into unit {jb} is negative "
           f"(w = {w[ib, jb]:.3f}): being dark is evidence for the unit")
    paras.append(
        f"zB (inputs in the box [{LOW:g}, {HIGH:g}]) ranks input {ib} first (R = {zb[ib]:.4f}): {why}. "
        "zB measures each input against the box corner that switches the unit off (x_i = l_i where "
        "w_ij > 0, x_i = h_i where w_ij < 0), so a bright input with a positive weight and a dark input "
        "with a negative weight both count as evidence for the unit.")
    dark = [k for k in range(N_IN) if x[k] == 0.0]
    for k in dark:
        neg = [j for j in active if w[k, j] < 0]
        paras.append(
            f"Input {k} is 0 (a black pixel). z+ gives it {zp[k]:.4f}; w² gives it {w2[k]:.4f} although it "
            f"contributes nothing to f; zB gives it {zb[k]:.4f}"
            + (f", because it has negative weights into active {_units(neg)}: "
               "had it been bright, those units would have fired less." if neg else
               ", because none of its weights into active units is negative.") )
    s = d["sensitivity"]
    ks = top(s)
    paras.append(
        f"Sensitivity analysis, (df/dx_i)^2, is positive but not conservative: it sums to "
        f"{s.sum():.4f}, not to f = {f:.4f}, because it explains how f *changes* (the gradient "
        f"sum_j w_ij over the active units), not what f *is*. It ranks input {ks} first "
        f"(x = {x[ks]:.3f}) regardless of its value and would give a dark input the same score as a bright "
        "one. Every deep Taylor rule above sums exactly to f and is non-negative.")
    return paras


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SEED, verbose=True)
