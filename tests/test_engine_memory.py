"""Bounded memory: the cpu engine explains 50,000 MNIST-size images in one call while its peak
resident memory grows by no more than the relevance array it returns plus a fixed margin.

The run happens in a fresh Python process, so its high-water mark (VmHWM in /proc/self/status) says
what this call needed. The bound (docs/engine.md): after the input x (N,1,28,28) float32 exists,
peak growth <= relevance (N*784*4 bytes) + output + 100 MiB (per-thread arenas of at most 16 MiB,
packed weights, the Explainer's transient input checks, allocator slack). A per-layer copy of the
activations of the whole batch would be >= 2 x 157 MB more and fail it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import deeptaylor as dt

pytestmark = pytest.mark.skipif(
    "cpu" not in dt.available_backends() or not Path("/proc/self/status").exists(),
    reason="needs the compiled core and /proc (Linux)",
)

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import deeptaylor as dt

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    N = 50_000
    rng = np.random.default_rng(7)
    hidden = 100
    w1 = rng.normal(size=(hidden, 784)) / 28.0
    w2 = rng.normal(size=(10, hidden)) / 10.0
    net = dt.Sequential([dt.Dense(w1, -np.abs(rng.normal(size=hidden)) * 0.1), dt.ReLU(),
                         dt.Dense(w2, np.zeros(10))])
    # images stay (N, 1, 28, 28): a Flatten in front feeds the 784-100-10 MLP
    net = dt.Sequential([dt.Flatten()] + list(net))
    x = np.empty((N, 1, 28, 28), dtype=np.float32)
    for s in range(0, N, 5000):
        x[s:s + 5000] = rng.random((min(5000, N - s), 1, 28, 28), dtype=np.float32)
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu")
    ex.explain(x[:2])                      # compile the plan and load everything first
    before = status("VmRSS")
    res = ex.explain(x)
    peak = status("VmHWM")
    ref = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="numpy").explain(x[:16].astype(np.float64))
    err = float(np.abs(res.relevance[:16] - ref.relevance).max() / np.abs(ref.relevance).max())
    tot = res.relevance.reshape(N, -1).astype(np.float64).sum(axis=1)
    pos = res.explained > 0
    cons = float(np.max(np.abs(tot[pos] - res.explained[pos]) / res.explained[pos]))
    plan = ex.backend.plan(net, ex.assignment, (1, 28, 28))
    print(json.dumps({"before": before, "peak": peak, "relevance_bytes": res.relevance.nbytes,
                      "output_bytes": res.output.nbytes, "err": err, "cons": cons,
                      "tile": plan.tile, "arena": plan.arena_bytes, "shape": list(res.relevance.shape)}))
""")

MARGIN = 100 * 2**20


def test_50k_images_in_one_call_stay_within_the_memory_bound():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["shape"] == [50_000, 1, 28, 28]
    assert r["err"] <= 1e-4
    assert r["cons"] <= 1e-4
    growth = r["peak"] - r["before"]
    bound = r["relevance_bytes"] + r["output_bytes"] + MARGIN
    assert growth <= bound, f"peak RSS grew by {growth / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB ({r})"
