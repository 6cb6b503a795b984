"""Memory flat in the batch size: deeptaylor's peak RSS at two batch sizes (default 8 and 64) of the
ResNet workloads, each in its own subprocess (compare.py's worker, backend 'cpu', --threads threads).

The engine keeps O(threads x tile) working memory whatever the batch (issue 9: "batch 8 vs 64: peak
RSS within 10 %"). What the *caller* holds grows with the batch, and is reported separately: the
input (N x C x H x W float32, drawn directly in float32) and the relevance the explainer returns (the
same size). ``growth`` is (RSS(64) - RSS(8)) / RSS(8); ``growth_net`` subtracts the difference in
those caller arrays (``(64 - 8) x 2 x sample bytes``), i.e. what the engine itself adds with the
batch. Each run is the worker's one warm-up explanation plus one timed one (``--repeats``).

Usage::

    python bench/memory_flat.py                              # resnet18 and resnet50, deep_taylor, 8 vs 64
    python bench/memory_flat.py --workloads resnet50 --batches 8 64 --composite epsilon_plus_flat
    python bench/memory_flat.py --out bench/results/memory-flat.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LIMIT = 0.10  # the aim: within 10 %


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import workloads as W
    from compare import run_worker

    ap = argparse.ArgumentParser(description="deeptaylor peak RSS at two batch sizes")
    ap.add_argument("--workloads", nargs="+", default=["resnet18", "resnet50"], choices=list(W.WORKLOADS))
    ap.add_argument("--batches", nargs=2, type=int, default=[8, 64])
    ap.add_argument("--composite", default="deep_taylor", choices=list(W.COMPOSITES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs after the warm-up (0: the warm-up only)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    small, large = args.batches
    report: dict = {"threads": args.threads, "composite": args.composite, "batches": [small, large],
                    "limit": LIMIT, "workloads": {}}
    ok_all = True
    with tempfile.TemporaryDirectory(prefix="dt-memflat-") as tmp:
        for wl in args.workloads:
            sample_mib = float(np.prod(W.WORKLOADS[wl].input_shape)) * 4 / 2**20
            runs = {}
            for n in (small, large):
                spec = {"workload": wl, "composite": args.composite, "threads": args.threads,
                        "repeats": args.repeats, "check_images": 1, "backend": "cpu", "images": n,
                        "heatmap": os.path.join(tmp, f"{wl}-{n}.npy")}
                runs[n] = run_worker("deeptaylor", spec, args.threads, args.timeout)
                r = runs[n]
                print(f"{wl:<10} batch {n:>4}: {r.get('status')} peak RSS {r.get('peak_rss_mib', float('nan')):8.1f} MiB"
                      f"  {r.get('images_per_s', float('nan')):7.2f} img/s  {r.get('reason', '')}", flush=True)
            entry: dict = {"runs": {str(k): v for k, v in runs.items()}, "sample_mib": sample_mib}
            if all(r.get("status") == "ok" for r in runs.values()):
                a, b = runs[small]["peak_rss_mib"], runs[large]["peak_rss_mib"]
                caller = (large - small) * 2 * sample_mib
                entry.update(growth=(b - a) / a, caller_arrays_growth_mib=caller, growth_net=(b - caller - a) / a)
                ok = entry["growth_net"] <= LIMIT
                ok_all &= ok
                print(f"{wl:<10} RSS {a:.0f} -> {b:.0f} MiB: growth {100 * entry['growth']:+.1f} % raw, "
                      f"{100 * entry['growth_net']:+.1f} % net of the caller's input + relevance "
                      f"({caller:.0f} MiB)  {'OK' if ok else 'ABOVE ' + format(LIMIT, '.0%')}", flush=True)
            else:
                ok_all = False
            report["workloads"][wl] = entry
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.out}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
