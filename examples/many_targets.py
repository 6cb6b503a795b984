"""Explaining every class of a batch from one forward pass, and explaining a contrast with a seed.

Runs on the ``lenet`` benchmark network (bench/workloads.py: seeded He-initialised weights, biases
<= 0, inputs in [0, 1]; no download): all ten classes of 256 images in one call against ten
single-class calls, the top-3 classes, and the contrast "class 3 rather than class 5" as an output
seed, with the conservation checks per target and per seed.

    python examples/many_targets.py [--threads 2] [--images 256]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import workloads as W  # noqa: E402

import deeptaylor as dt  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=256)
    args = ap.parse_args()
    net = W.build("lenet")
    x = W.inputs("lenet", args.images)
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu", threads=args.threads)

    res = ex.explain(x, target="all")                      # every class: one forward pass
    print(f"target='all': relevance {res.relevance.shape}, explained {res.explained.shape}")
    rep = dt.checks.conservation(res)
    pos = res.explained > 0
    print(f"  conservation per image and class (f > 0): max |sum R - f| / f = {rep.rel_error[pos].max():.1e}")
    one = best_of(lambda: ex.explain(x, target=0))
    ten = best_of(lambda: [ex.explain(x, target=k) for k in range(10)])
    together = best_of(lambda: ex.explain(x, target="all"))
    print(f"  one class {one:.3f} s, ten single-class calls {ten:.3f} s, all ten in one call {together:.3f} s "
          f"({together / ten:.2f} x the ten calls, {together / one:.1f} x one class)")

    top = ex.explain(x, target=("top", 3))
    print(f"target=('top', 3): classes of image 0 {top.target[0].tolist()}, "
          f"outputs {np.round(top.explained[0], 3).tolist()}")

    c = ex.explain(x, seed=dt.seeds.contrast(3, 5))         # why 3 rather than 5
    diff = res.relevance[:, 3] - res.relevance[:, 5]
    print(f"seed=contrast(3, 5): explained = f3 - f5 (image 0: {c.explained[0]:.3f}); equals the difference "
          f"of the two classes' heatmaps to {np.abs(c.relevance - diff).max() / np.abs(diff).max():.1e}")
    print(f"  conservation against the seed: max |sum R - (f3 - f5)| = "
          f"{dt.checks.conservation(c).max_abs_error:.1e}")


if __name__ == "__main__":
    main()
