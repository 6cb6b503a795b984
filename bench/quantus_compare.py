"""deeptaylor's faithfulness evaluation (deeptaylor.evaluate) against Quantus 0.6.0, side by side: same
network, same inputs, same heatmaps, same settings; the curves must agree and the times are compared.

* network: the ``lenet`` workload (bench/workloads.py: conv5x5(32)-pool-conv5x5(64)-pool-512-10, He
  initialised, seed 0) - deeptaylor runs it on the compiled engine (cpu, float32), Quantus runs the
  same float32 weights as a torch module (``workloads.to_torch``);
* inputs: the first ``--n`` (256) of the real MNIST test digits bundled with deeptaylor, in [0, 1];
* heatmaps: deep Taylor decomposition (``composites.deep_taylor(0, 1)``: zB on the first layer, z+
  above), the largest output explained (the same target for both);
* settings: baseline 0 (black), heatmaps neither normalised nor made absolute (Quantus
  ``normalise=False, abs=False``), logits (Quantus ``softmax=False``), Quantus ``batch_size`` = all
  images at once (its fastest), both on ``--threads`` threads (torch.set_num_threads; the engine's
  ``threads``).

Cases: ``PixelFlipping(features_in_step=F)`` for each F in ``--features-per-step`` (Quantus runs until
every pixel is replaced: ceil(784 / F) steps; its curve is our ``curves[:, 1:]``), and
``RegionPerturbation(patch_size=K, order=O, regions_evaluation=all)`` for each K in ``--region-sizes``
and O in morf, lerf (its result is our ``curves[:, :1] - curves[:, 1:]``).

Agreement: ``max |ours - quantus| / max |quantus|`` over all samples and steps (float32 both sides,
different summation orders: a few 1e-7 expected; the script fails above 1e-5). Time: Quantus once
(it is slow), deeptaylor the best of ``--repeats`` runs after a warm-up; deeptaylor is also timed with
``reuse_unchanged=False`` (every step run, as Quantus does: the engine's speed alone), since with a
black baseline on MNIST most steps replace black pixels by black and are not rerun by default.

Usage::

    python bench/quantus_compare.py                      # 256 images, F = 1 and 8, K = 9 and 4; ~10 min
    python bench/quantus_compare.py --n 32 --features-per-step 16 --region-sizes 9   # quick

Writes bench/results/quantus-<date>.json. Needs ``pip install quantus==0.6.0`` (not in the test extra:
it pulls OpenCV, scikit-image, pandas and scikit-learn).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOLERANCE = 1e-5


def _maxnorm(a, b) -> float:
    import numpy as np

    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _time(fn, repeats: int) -> tuple[float, object]:
    fn()                                         # warm-up (plan build, caches)
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256, help="images (default 256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features-per-step", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--region-sizes", type=int, nargs="+", default=[9, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))

    import numpy as np
    import workloads as W

    W.import_zennit()                            # Quantus imports Zennit, which imports torchvision
    import quantus
    import torch

    import deeptaylor as dt

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    net = W.build("lenet")
    model = W.to_torch(net)
    images, _ = dt.datasets.load_sample()
    if args.n > len(images):
        sys.exit(f"--n {args.n}: only {len(images)} bundled digits")
    x = np.ascontiguousarray(images[:args.n, None] / np.float32(255), dtype=np.float32)
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu", threads=args.threads)
    res = ex.explain(x)
    rel, target = res.relevance, res.target
    common = {"normalise": False, "abs": False, "perturb_baseline": 0.0, "disable_warnings": True}
    call = {"model": model, "x_batch": x, "y_batch": target, "a_batch": rel, "device": "cpu", "softmax": False,
            "channel_first": True, "batch_size": args.n}
    cases = []
    failed = False

    def record(name: str, settings: dict, t_q: float, t_ours: float, t_all: float, diff: float, ours) -> None:
        nonlocal failed
        ok = diff <= TOLERANCE
        failed |= not ok
        cases.append({"case": name, **settings, "steps": int(ours.curves.shape[1] - 1),
                      "quantus_s": round(t_q, 4), "deeptaylor_s": round(t_ours, 4),
                      "deeptaylor_every_step_s": round(t_all, 4), "speedup": round(t_q / t_ours, 2),
                      "speedup_every_step": round(t_q / t_all, 2), "inputs_run": ours.evaluated,
                      "inputs_every_step": int(ours.curves.size), "max_normalised_diff": diff,
                      "aopc_deeptaylor": ours.mean_aopc, "agree": ok})
        print(f"{name:<40} steps {ours.curves.shape[1] - 1:>4}  Quantus {t_q:8.2f} s  deeptaylor {t_ours:7.3f} s "
              f"({t_q / t_ours:6.1f}x; every step {t_all:7.3f} s, {t_q / t_all:5.1f}x)  diff {diff:.1e}"
              + ("" if ok else "  <-- DISAGREES"), flush=True)

    for f in args.features_per_step:
        steps = math.ceil(784 / f)
        metric = quantus.PixelFlipping(features_in_step=f, **common)
        t = time.perf_counter()
        q = np.asarray(metric(**call), dtype=np.float64)
        t_q = time.perf_counter() - t
        t_ours, ours = _time(lambda f=f, s=steps: dt.evaluate.pixel_flipping(
            ex, x, rel, target, steps=s, features_per_step=f, baseline=0.0), args.repeats)
        t_all, every = _time(lambda f=f, s=steps: dt.evaluate.pixel_flipping(
            ex, x, rel, target, steps=s, features_per_step=f, baseline=0.0, reuse_unchanged=False), 1)
        assert np.array_equal(every.curves, ours.curves), "reuse_unchanged changed the curves"
        record(f"PixelFlipping(features_in_step={f})", {"features_per_step": f}, t_q, t_ours, t_all,
               _maxnorm(ours.curves[:, 1:], q), ours)

    for k in args.region_sizes:
        regions = math.ceil(28 / k) ** 2
        for order in ("morf", "lerf"):
            metric = quantus.RegionPerturbation(patch_size=k, order=order, regions_evaluation=regions, **common)
            t = time.perf_counter()
            q = np.asarray(metric(**call), dtype=np.float64)
            t_q = time.perf_counter() - t
            t_ours, ours = _time(lambda k=k, o=order: dt.evaluate.region_perturbation(
                ex, x, rel, target, region_size=k, order=o, baseline=0.0), args.repeats)
            t_all, every = _time(lambda k=k, o=order: dt.evaluate.region_perturbation(
                ex, x, rel, target, region_size=k, order=o, baseline=0.0, reuse_unchanged=False), 1)
            assert np.array_equal(every.curves, ours.curves), "reuse_unchanged changed the curves"
            record(f"RegionPerturbation(patch_size={k}, {order})", {"region_size": k, "order": order}, t_q, t_ours,
                   t_all, _maxnorm(ours.curves[:, :1] - ours.curves[:, 1:], q), ours)

    from importlib.metadata import version

    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "load_avg": os.getloadavg()},
        "threads": args.threads, "images": args.n, "model": "lenet (bench/workloads.py, seed 0)",
        "inputs": "bundled MNIST test digits / 255", "heatmaps": "deep_taylor(0, 1) on cpu, target = argmax",
        "baseline": 0.0, "versions": {p: version(p) for p in ("quantus", "torch", "numpy", "deeptaylor")},
        "tolerance": TOLERANCE, "cases": cases,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quantus-{_dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
