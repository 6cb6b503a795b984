"""deeptaylor (backend 'cpu') against Zennit (PyTorch CPU) and our NumPy reference, one run, same
weights and inputs, same thread count.

For every workload (bench/workloads.py) and composite it reports images/s, the ratio to Zennit, peak
RSS, achieved GFLOP/s (forward FLOPs counted analytically, 2 per multiply-accumulate of every Dense and
Conv2d; 'effective' multiplies by the work factor of the method: 3 for the LRP/DTD composites, 2 for
Sensitivity, see workloads.work_factor), and checks that the heatmaps agree (max-normalised
difference, max|R_a - R_b| / max|R_b|; a warning if above 1e-3). The same run measures the machine's
SGEMM peak (NumPy matmul, 2048², at --threads) and our own sgemm.

Each framework runs in its own subprocess so that its peak RSS (ru_maxrss) is its own; thread counts
are pinned there (OMP/OpenBLAS/MKL_NUM_THREADS, torch.set_num_threads, Explainer(threads=...)).
Throughput is the best of --repeats timed runs after one warm-up run. The NumPy reference (float64)
explains only a few images (it is slow; none for vgg16 unless --numpy-vgg16).

A workload the current cpu backend cannot run is reported as 'unsupported' (deeptaylor.UnsupportedError),
not an error.

Usage::

    python bench/compare.py                      # all workloads, 2 threads, results in bench/results/
    python bench/compare.py --quick              # CI-sized batches, one repeat
    python bench/compare.py --workloads seed_dtd mlp --composites deep_taylor --repeats 5
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DEFAULT_COMPOSITES = ["deep_taylor", "epsilon_plus_flat", "sensitivity"]
WARN_DIFF = 1e-3
WARN_L1_SENSITIVITY = 1e-2  # sum|R - R_ref| / sum|R_ref|: Sensitivity's maps (see the heatmap check)
CHECK_IMAGES = 8  # images whose heatmaps are compared across frameworks


# --------------------------------------------------------------------------------------------------
# Workers (run in subprocesses)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _best_time(fn, repeats: int, min_seconds: float = 1.0, max_runs: int = 500) -> float:
    """Best wall time of at least ``repeats`` runs, and of as many more as fit in ``min_seconds``
    (at most ``max_runs``): a 3 ms workload gets a few hundred runs, so its best is as little
    disturbed by the rest of the machine as a 3 s one's (the same rule for every framework)."""
    best = float("inf")
    start = time.perf_counter()
    runs = 0
    while runs < max(1, repeats) or (time.perf_counter() - start < min_seconds and runs < max_runs):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        runs += 1
    return best


def worker_gemm(spec: dict) -> dict:
    """SGEMM peak: NumPy matmul and our sgemm on n x n float32 at spec['threads']."""
    import numpy as np
    from deeptaylor._core import kernels as K

    n, t, reps = spec["n"], spec["threads"], spec["repeats"]
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flop = 2.0 * n**3
    out: dict = {"n": n, "threads": t}
    try:
        from threadpoolctl import threadpool_info

        out["numpy_blas"] = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                             for i in threadpool_info() if i.get("user_api") == "blas"]
    except ImportError:
        out["numpy_blas"] = "unknown (threadpoolctl not installed)"
    c = a @ b
    out["numpy_gflops"] = flop / _best_time(lambda: a @ b, reps) / 1e9
    time.sleep(0.2)  # let OpenBLAS's spinning threads go idle before timing ours
    ours = K.sgemm(a, b, threads=t)
    err = float(np.abs(ours - c).max() / np.abs(c).max())
    out["ours_gflops"] = flop / _best_time(lambda: K.sgemm(a, b, threads=t), reps) / 1e9
    out["ours_kernel"] = K.gemm_kernel_name()
    out["ours_vs_numpy_maxnorm_diff"] = err
    return out


def _save(path: str, r) -> None:
    import numpy as np

    np.save(path, np.ascontiguousarray(np.asarray(r, dtype=np.float32)), allow_pickle=False)


def worker_deeptaylor(spec: dict) -> dict:
    import numpy as np
    import workloads as W

    import deeptaylor as dt

    backend, n, t = spec["backend"], spec["images"], spec["threads"]
    net = W.build(spec["workload"])
    x = W.inputs(spec["workload"], n)
    if backend == "numpy":
        x = x.astype(np.float64)
    out: dict = {"images": n}
    try:
        ex = dt.Explainer(net, W.composite(spec["composite"]), backend=backend,
                          threads=t if backend == "cpu" else None)
        t0 = time.perf_counter()
        res = ex.explain(x)  # warm-up (and the numpy reference's only run)
        first = time.perf_counter() - t0
    except dt.UnsupportedError as exc:
        return {"status": "unsupported", "reason": str(exc), "peak_rss_mib": _peak_rss_mib()}
    best = first if spec["repeats"] == 0 else _best_time(lambda: ex.explain(x), spec["repeats"])
    out.update(status="ok", seconds=best, images_per_s=n / best, peak_rss_mib=_peak_rss_mib())
    if res.conservative_expected:
        out["conservation_max_rel_error"] = dt.checks.conservation(res).max_rel_error
    _save(spec["heatmap"], res.relevance[:spec["check_images"]])
    return out


def worker_zennit(spec: dict) -> dict:
    import torch
    import workloads as W

    n, t = spec["images"], spec["threads"]
    torch.set_num_threads(t)
    model = W.to_torch(W.specs(spec["workload"]))  # straight from float32 specs: no float64 copy
    x = torch.from_numpy(W.inputs(spec["workload"], n))
    comp = W.zennit_composite(spec["composite"])

    def run():
        if comp is None:
            return W.torch_sensitivity(model, x)
        return W.zennit_relevance(model, comp, x)

    _, rel = run()
    best = _best_time(run, spec["repeats"])
    _save(spec["heatmap"], rel.detach().numpy()[:spec["check_images"]])
    return {"status": "ok", "images": n, "seconds": best, "images_per_s": n / best,
            "peak_rss_mib": _peak_rss_mib(), "torch": torch.__version__,
            "zennit": _version("zennit") if comp is not None else None}


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


WORKERS = {"gemm": worker_gemm, "deeptaylor": worker_deeptaylor, "zennit": worker_zennit}


# --------------------------------------------------------------------------------------------------
# Parent


def _env(threads: int, clean_blas: bool = False) -> dict:
    env = dict(os.environ)
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[v] = str(threads)
    if clean_blas:  # the SGEMM peak is the machine's: no OpenBLAS core-type / L2 overrides
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    env["PYTHONPATH"] = str(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_worker(kind: str, spec: dict, threads: int, timeout: float, clean_blas: bool = False) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, json.dumps(spec)]
    try:
        p = subprocess.run(cmd, env=_env(threads, clean_blas), capture_output=True, text=True, timeout=timeout,
                           check=False)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "reason": f"more than {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"status": "error", "reason": " | ".join(tail), "returncode": p.returncode}


def maxnorm_diff(a, b) -> float:
    """max|a - b| / max|b| over the common images (b is the reference)."""
    import numpy as np

    k = min(len(a), len(b))
    a, b = a[:k].astype(np.float64), b[:k].astype(np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a - b).max())


def l1_diff(a, b) -> float:
    """sum|a - b| / sum|b| over the common images (b is the reference)."""
    import numpy as np

    k = min(len(a), len(b))
    a, b = a[:k].astype(np.float64), b[:k].astype(np.float64)
    scale = np.abs(b).sum()
    return float(np.abs(a - b).sum() / scale) if scale > 0 else float(np.abs(a - b).sum())


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def _fmt_rate(v) -> str:
    """images/s: whole numbers from 100 up, 4 significant digits below."""
    return "-" if v is None else format(v, ".0f" if v >= 100 else ".4g")


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import workloads as W

    ap = argparse.ArgumentParser(description="deeptaylor vs Zennit vs NumPy reference")
    ap.add_argument("--workloads", nargs="+", default=list(W.WORKLOADS), choices=list(W.WORKLOADS))
    ap.add_argument("--composites", nargs="+", default=DEFAULT_COMPOSITES, choices=list(W.COMPOSITES))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; the best counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="CI-sized batches, one repeat, 1024² GEMM")
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy reference")
    ap.add_argument("--numpy-vgg16", action="store_true", help="also run the (very slow) reference on vgg16")
    ap.add_argument("--gemm-size", type=int, default=None, help="square size of the SGEMM peak (2048)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/compare-<date>.json)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker process")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    T = args.threads

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = args.out or HERE / "results" / f"compare-{stamp}.json"
    report: dict = {
        "date": stamp, "threads": T, "quick": args.quick, "repeats": repeats,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": list(os.getloadavg())},
        "flop_counting": "forward GFLOP = 2 * MACs of Dense and Conv2d layers; effective = forward * work "
                         "factor (3 for LRP/DTD composites: forward, denominators, transposed product; "
                         "2 for Sensitivity)",
        "heatmap_diff": "max|R - R_ref| / max|R_ref| over the first images; ref = numpy reference if run, "
                        "else Zennit",
        "workloads": {},
    }
    n_gemm = args.gemm_size or (1024 if args.quick else 2048)
    print(f"SGEMM peak ({n_gemm}², {T} threads) ...", flush=True)
    g = run_worker("gemm", {"n": n_gemm, "threads": T, "repeats": 3 if args.quick else 5}, T, args.timeout,
                   clean_blas=True)
    report["sgemm"] = g
    if g.get("numpy_gflops"):
        print(f"  numpy matmul {g['numpy_gflops']:.1f} GFLOP/s ({g.get('numpy_blas')}), "
              f"deeptaylor sgemm {g['ours_gflops']:.1f} GFLOP/s ({g['ours_kernel']})")
    else:
        print(f"  failed: {g}")

    warnings = []
    with tempfile.TemporaryDirectory(prefix="dt-compare-") as tmp:
        for wl_name in args.workloads:
            wl = W.WORKLOADS[wl_name]
            batch = wl.quick_batch if args.quick else wl.batch
            macs = W.forward_macs(wl_name)
            fwd_gflop = 2.0 * macs / 1e9
            n_np = 0 if args.no_numpy or (wl_name == "vgg16" and not args.numpy_vgg16) else \
                min(batch, max(1, wl.numpy_images // (4 if args.quick else 1)))
            entry: dict = {"batch": batch, "forward_gflop_per_image": fwd_gflop, "graph": W.is_graph(wl_name),
                           "composites": {}}
            report["workloads"][wl_name] = entry
            print(f"\n== {wl_name}: batch {batch}, forward {fwd_gflop:.4g} GFLOP/image, {T} threads")
            print(f"   {'composite':<22}{'framework':<12}{'img/s':>10}{'x Zennit':>9}{'fwd GF/s':>10}"
                  f"{'eff GF/s':>10}{'RSS MiB':>9}  notes")
            for comp in args.composites:
                base = {"workload": wl_name, "composite": comp, "threads": T, "repeats": repeats,
                        "check_images": min(CHECK_IMAGES, batch)}
                files = {k: os.path.join(tmp, f"{wl_name}-{comp}-{k}.npy") for k in ("cpu", "zennit", "numpy")}
                res = {
                    "deeptaylor": run_worker("deeptaylor", {**base, "backend": "cpu", "images": batch,
                                                            "heatmap": files["cpu"]}, T, args.timeout),
                    "zennit": run_worker("zennit", {**base, "images": batch, "heatmap": files["zennit"]},
                                         T, args.timeout),
                }
                if n_np:
                    res["numpy_reference"] = run_worker(
                        "deeptaylor", {**base, "backend": "numpy", "images": n_np, "repeats": 0,
                                       "check_images": min(CHECK_IMAGES, n_np), "heatmap": files["numpy"]},
                        T, args.timeout)
                factor = W.work_factor(comp)
                z_ips = res["zennit"].get("images_per_s")
                for r in res.values():
                    if r.get("status") == "ok":
                        r["forward_gflops"] = r["images_per_s"] * fwd_gflop
                        r["effective_gflops"] = r["forward_gflops"] * factor
                        r["ratio_to_zennit"] = r["images_per_s"] / z_ips if z_ips else None
                # heatmap agreement
                maps = {k: np.load(files[k]) for k in files if os.path.exists(files[k])}
                diffs, l1 = {}, {}
                if "numpy" in maps:
                    for k in ("cpu", "zennit"):
                        if k in maps:
                            diffs[f"{k}_vs_numpy"] = maxnorm_diff(maps[k], maps["numpy"])
                            l1[f"{k}_vs_numpy"] = l1_diff(maps[k], maps["numpy"])
                if "cpu" in maps and "zennit" in maps:
                    diffs["cpu_vs_zennit"] = maxnorm_diff(maps["cpu"], maps["zennit"])
                    l1["cpu_vs_zennit"] = l1_diff(maps["cpu"], maps["zennit"])
                    # per image: one image off (a float32 near-tie, e.g. a max-pool window whose two
                    # largest inputs differ by ~1e-7 relative, routes the relevance to the other
                    # input) reads differently from all images off (a wrong rule)
                    entry.setdefault("per_image_cpu_vs_zennit", {})[comp] = [
                        maxnorm_diff(maps["cpu"][i:i + 1], maps["zennit"][i:i + 1])
                        for i in range(min(len(maps["cpu"]), len(maps["zennit"])))]
                entry["composites"][comp] = {"work_factor": factor, "results": res, "heatmap_diff": diffs,
                                             "heatmap_l1_diff": l1}
                for fw, r in res.items():
                    notes = r.get("reason", "") if r.get("status") != "ok" else ""
                    if "conservation_max_rel_error" in r:
                        notes += f"conservation {r['conservation_max_rel_error']:.1e} "
                    if r.get("status") == "ok" and fw == "numpy_reference":
                        notes += f"({r['images']} images) "
                    print(f"   {comp:<22}{fw[:11]:<12}{_fmt_rate(r.get('images_per_s')):>10}"
                          f"{_fmt(r.get('ratio_to_zennit'), '.2f'):>9}{_fmt(r.get('forward_gflops')):>10}"
                          f"{_fmt(r.get('effective_gflops')):>10}{_fmt(r.get('peak_rss_mib'), '.0f'):>9}  "
                          f"{r.get('status') if r.get('status') != 'ok' else ''} {notes[:90]}")
                if diffs:
                    print("   " + " " * 22 + "heatmaps: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
                          + "  (L1: " + ", ".join(f"{v:.1e}" for v in l1.values()) + ")")
                per = entry.get("per_image_cpu_vs_zennit", {}).get(comp)
                if per and not max(per) <= WARN_DIFF:
                    print("   " + " " * 22 + "cpu_vs_zennit per image: " + ", ".join(f"{v:.1e}" for v in per))
                for k, v in diffs.items():
                    # a gradient (Sensitivity) is discontinuous at ReLU kinks: deep in a float32 network
                    # a few pre-activations within ~1e-6 of 0 flip their mask and move a pixel of the
                    # max-normalised map by up to a few 1e-3 (vgg16, resnet50): its maps are compared
                    # in L1 (WARN_L1_SENSITIVITY); a wrong gradient is off in L1 too
                    if comp == "sensitivity" and v > WARN_DIFF and l1.get(k, 1.0) <= WARN_L1_SENSITIVITY:
                        continue
                    if not v <= WARN_DIFF:
                        msg = f"{wl_name}/{comp}: heatmaps differ ({k} = {v:.3e} > {WARN_DIFF:g})"
                        if k == "cpu_vs_zennit" and per:
                            off = sum(1 for d in per if not d <= WARN_DIFF)
                            msg += f"; {off} of {len(per)} images above {WARN_DIFF:g}"
                        warnings.append(msg)
                        print("   " + "!" * 10 + " WARNING: " + msg + " " + "!" * 10)
    report["warnings"] = warnings
    # a shared machine: the 1/5/15-minute load averages at the end say how disturbed the run was
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=float))
    print(f"\nwrote {out_path}")
    if warnings:
        print(f"\n{'!' * 20} {len(warnings)} HEATMAP WARNING(S) {'!' * 20}")
        for w in warnings:
            print("  " + w)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--worker":
        result = WORKERS[sys.argv[2]](json.loads(sys.argv[3]))
        print("RESULT " + json.dumps(result, default=float), flush=True)
        sys.exit(0)
    sys.exit(main())
