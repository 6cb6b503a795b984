"""SGEMM: NumPy's matmul (its BLAS) against deeptaylor's packed sgemm (each micro-kernel family this CPU
runs), in one pytest-benchmark group per shape, at the same thread count. Every case checks its
product against a float64 reference, so ``--benchmark-disable`` makes this a correctness run."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from deeptaylor._core import kernels as K
from workloads import blas_threads

# (M, N, K, trans_b): squares, and the dense layers of the mlp / seed_dtd workloads at batch 256
# (x (256, I) @ W (O, I)^T, the engine's forward product).
SHAPES = [(256, 256, 256, False), (1024, 1024, 1024, False), (2048, 2048, 2048, False),
          (256, 400, 784, True), (256, 400, 1568, True)]
CONTENDERS = ["numpy", *K.gemm_kernels_available(), "packed"]


@functools.lru_cache(maxsize=2)
def _problem(m, n, k, trans_b):
    rng = np.random.default_rng(m + 7 * n + 13 * k)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
    bb = (b.T if trans_b else b).astype(np.float64)
    ref = a.astype(np.float64) @ bb
    scale = (np.abs(a.astype(np.float64)) @ np.abs(bb)).max()
    return a, b, ref, scale


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + ("T" if s[3] else ""))
@pytest.mark.parametrize("contender", CONTENDERS)
def test_sgemm(benchmark, shape, contender, threads, quick):
    m, n, k, trans_b = shape
    if quick and m * n * k > 1024**3:
        pytest.skip("large square: benchmark runs only")
    a, b, ref, scale = _problem(m, n, k, trans_b)
    benchmark.group = f"sgemm {m}x{n}x{k}{' B^T' if trans_b else ''} ({threads} threads)"
    benchmark.extra_info["gflop"] = 2 * m * n * k / 1e9
    if contender == "numpy":
        bt = b.T if trans_b else b
        with blas_threads(threads):
            c = benchmark(lambda: a @ bt)
    elif contender == "packed":  # packing included: the engine packs once per plan, this is an upper bound
        c = benchmark(K.sgemm_packed, a, b, trans_b=trans_b, threads=threads)
    else:
        c = benchmark(K.sgemm, a, b, trans_b=trans_b, threads=threads, kernel=contender)
    assert c.shape == ref.shape
    assert np.abs(c - ref).max() <= 4 * np.finfo(np.float32).eps * np.sqrt(k) * scale
