"""Many targets from one forward pass: K targets per image in one call against K single-target calls.

For every workload (bench/workloads.py) and composite it times, on the cpu backend with the same
thread count, in one process (ratios within one run are what to read on a shared machine):

* ``one``: ``explain(x, target=0)``, one target per image;
* ``separate``: K calls ``explain(x, target=k)``, k = 0..K-1 (what the engine did before issue 12);
* ``repeated``: one call on the batch repeated K times with a target array (what a new user tried:
  ``np.repeat(x, K)`` and ``target=np.tile(arange(K), N)``);
* ``many``: ``explain(x, target=T)`` with T = (N, K) (each image's first K classes): one forward
  pass per tile and K relevance passes run together (docs/engine.md "Many targets and seeds").

Each is the best of ``--repeats`` runs, taken in rotation (one run of each in turn), after a warm-up.
The report gives ``many / separate`` (the aim of issue 12: <= 0.35 for K = 10 on lenet and cifar_vgg),
``many / one``, the engine's passes per round and one thread's arena for K, and the max-normalised
difference between ``many`` and ``separate`` (expected 0: the passes are bitwise the single-target
passes).

Usage::

    python bench/targets.py                                   # lenet, cifar_vgg, resnet18; K = 10; 2 threads
    python bench/targets.py --workloads lenet --k 10 --repeats 5 --composites deep_taylor
    python bench/targets.py --quick                           # CI-sized batches, one repeat
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_WORKLOADS = ["lenet", "cifar_vgg", "resnet18"]
DEFAULT_COMPOSITES = ["deep_taylor", "epsilon_plus_flat", "sensitivity"]


def measure(workload: str, composite: str, k: int, threads: int, repeats: int, quick: bool) -> dict:
    """Times of one / separate / repeated / many for one workload and composite (see the module doc)."""
    import numpy as np
    import workloads as W

    import deeptaylor as dt

    wl = W.WORKLOADS[workload]
    n = wl.quick_batch if quick else wl.batch
    net = W.build(workload)
    x = W.inputs(workload, n)
    ex = dt.Explainer(net, W.composite(composite), backend="cpu", threads=threads)
    classes = ex.forward(x[:1]).shape[1]
    k = min(k, classes)
    T = np.tile(np.arange(k), (n, 1))
    xr = np.repeat(x, k, axis=0)
    tr = np.tile(np.arange(k), n)
    cases = {
        "one": lambda: ex.explain(x, target=0),
        "separate": lambda: [ex.explain(x, target=j) for j in range(k)],
        "repeated": lambda: ex.explain(xr, target=tr),
        "many": lambda: ex.explain(x, target=T),
    }
    for fn in cases.values():   # warm-up: plans, layouts and arenas made
        fn()
    best = {name: float("inf") for name in cases}
    for _ in range(max(1, repeats)):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    many = ex.explain(x, target=T).relevance
    sep = np.stack([ex.explain(x, target=j).relevance for j in range(k)], axis=1)
    diff = float(np.abs(many - sep).max() / max(float(np.abs(sep).max()), 1e-30))
    plan = ex.backend.plan(ex.graph, ex._engine_assignment, x.shape[1:])
    passes, arena_k = plan.passes(k)
    return {
        "workload": workload, "composite": composite, "images": n, "k": k, "threads": threads,
        "seconds": best,
        "many_over_separate": best["many"] / best["separate"],
        "many_over_one": best["many"] / best["one"],
        "repeated_over_one": best["repeated"] / best["one"],
        "separate_over_one": best["separate"] / best["one"],
        "passes_per_round": passes, "arena_mib_k": arena_k / 2**20, "arena_mib_one": plan.arena_bytes / 2**20,
        "tile": plan.tile, "maxnorm_diff_many_vs_separate": diff,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS)
    ap.add_argument("--composites", nargs="+", default=DEFAULT_COMPOSITES)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="CI-sized batches, one repeat")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/targets-<date>.json)")
    args = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    repeats = 1 if args.quick else args.repeats
    rows = []
    print(f"{'workload':<10} {'composite':<18} {'N':>4} {'K':>3} {'one s':>8} {'separate s':>10} "
          f"{'repeated s':>10} {'many s':>8} {'many/sep':>8} {'many/one':>8} {'rep/one':>7} {'passes':>6} "
          f"{'arena MiB (1 / K)':>17} {'diff':>8}")
    for w in args.workloads:
        for c in args.composites:
            r = measure(w, c, args.k, args.threads, repeats, args.quick)
            rows.append(r)
            s = r["seconds"]
            print(f"{w:<10} {c:<18} {r['images']:>4} {r['k']:>3} {s['one']:>8.3f} {s['separate']:>10.3f} "
                  f"{s['repeated']:>10.3f} {s['many']:>8.3f} {r['many_over_separate']:>8.3f} "
                  f"{r['many_over_one']:>8.2f} {r['repeated_over_one']:>7.2f} {r['passes_per_round']:>6} "
                  f"{r['arena_mib_one']:>8.1f} / {r['arena_mib_k']:<6.1f} {r['maxnorm_diff_many_vs_separate']:>8.1e}",
                  flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "loadavg_at_end": load},
        "args": vars(args), "rows": rows,
    }
    out = Path(args.out) if args.out else HERE / "results" / f"targets-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
