"""GEMM throughput table: deeptaylor's sgemm (each available kernel, 1 and 2 threads) against NumPy's
matmul (its BLAS, same thread counts) on square float32 matrices, measured in the same run.

Each entry is the best of ``--repeats`` timings in each of ``--rounds`` passes over the whole table
(the machine may be shared: the best run is the least disturbed one). Usage::

    python bench/gemm_table.py [--sizes 256 512 1024 2048] [--repeats 5] [--rounds 3] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: page faults, packing buffers, thread start
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _blas_limiter():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits


def numpy_blas_info() -> str:
    """A one-line description of NumPy's BLAS (library, architecture kernel) if threadpoolctl is present."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed (OpenBLAS core type unknown)"
    parts = [f"{i.get('internal_api')} {i.get('version')} arch={i.get('architecture')} "
             f"threads={i.get('num_threads')}" for i in threadpool_info() if i.get("user_api") == "blas"]
    return "; ".join(parts) or "no BLAS found by threadpoolctl"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 1536, 2048])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kernels", nargs="+", default=None)
    ap.add_argument("--rounds", type=int, default=1, help="passes over the whole table; best per cell")
    args = ap.parse_args(argv)

    from deeptaylor._core import kernels as k

    kernels = args.kernels or k.gemm_kernels_available()
    limiter = _blas_limiter()
    print(f"selected kernel: {k.gemm_kernel_name()}; numpy BLAS: {numpy_blas_info()}")
    print(" ".join(f"{v}={os.environ.get(v)}" for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")))
    print(f"GFLOP/s, best of {args.repeats} repeats x {args.rounds} rounds")
    head = f"{'n':>5} {'thr':>3} {'numpy':>7} " + " ".join(f"{kn:>7}" for kn in kernels) + "   best/numpy"
    print(head)
    rng = np.random.default_rng(0)
    mats = {n: (rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32))
            for n in args.sizes}
    best: dict = {}
    # Whole-table rounds: a disturbance (another process on a shared machine) hits different cells in
    # different rounds; each cell keeps its best time over all rounds.
    for _ in range(args.rounds):
        for n, (a, b) in mats.items():
            for t in args.threads:
                # Each contender runs as a block of repeats after a warm-up call and a short pause, so
                # that the other library's spinning worker threads have gone to sleep and do not steal
                # the cores.
                fns = {kn: (lambda kn=kn, a=a, b=b, t=t: k.sgemm(a, b, threads=t, kernel=kn)) for kn in kernels}
                if limiter is not None:
                    fns = {"numpy": (lambda a=a, b=b: a @ b), **fns}
                for name, fn in fns.items():
                    time.sleep(0.2)
                    if name == "numpy":
                        with limiter(limits=t, user_api="blas"):
                            s = _best(fn, args.repeats)
                    else:
                        s = _best(fn, args.repeats)
                    key = (n, t, name)
                    best[key] = min(best.get(key, float("inf")), s)
    for n in args.sizes:
        flop = 2.0 * n**3
        for t in args.threads:
            g = {name: flop / best[(n, t, name)] / 1e9 for name in ["numpy", *kernels] if (n, t, name) in best}
            gn = g.get("numpy", float("nan"))
            ours = max(g[kn] for kn in kernels)
            print(f"{n:>5} {t:>3} {gn:>7.1f} " + " ".join(f"{g[kn]:>7.1f}" for kn in kernels)
                  + f"   {ours / gn:>6.2f}")

if __name__ == "__main__":
    main()
