"""The packed SGEMM (cpp/src/gemm*.cpp) against float64 NumPy matmul: every micro-kernel family this
CPU can run, the plain-loop reference, all transpose combinations, accumulate, the PackedB path,
1 and 2 threads, and shapes around the tile and cache-block sizes (MR, NR, kc = 256/384, nc = 256/384,
mc = 1024/1536)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from deeptaylor._core import kernels as K
from hypothesis import given, settings
from hypothesis import strategies as st

KERNELS = [*K.gemm_kernels_available(), "reference"]
PACKED_KERNELS = K.gemm_kernels_available()
EPS32 = float(np.finfo(np.float32).eps)

# (M, N, K): ones, primes and odd sizes, exact tiles (12 x 32, 6 x 16, 4 x 8) and one past / short of
# them, K across the kc blocks, N across nc blocks, M across the mc block.
SHAPES = [
    (1, 1, 1), (1, 7, 3), (5, 1, 9), (2, 3, 1), (13, 17, 19), (31, 67, 97), (12, 32, 384),
    (13, 33, 385), (11, 31, 383), (6, 16, 256), (7, 15, 257), (100, 385, 769), (40, 800, 50),
    (1601, 37, 23), (257, 129, 400),
]


def _operands(rng, m, n, k, trans_a, trans_b):
    a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
    return a, b


def _check(c, a, b, trans_a, trans_b, c0=None):
    """Max-normalised error within float32 accumulation bounds: |C - C64| <= 4 eps sqrt(K) max(|A||B|)."""
    a64 = (a.T if trans_a else a).astype(np.float64)
    b64 = (b.T if trans_b else b).astype(np.float64)
    ref = a64 @ b64
    scale = (np.abs(a64) @ np.abs(b64)).max(initial=0.0)
    if c0 is not None:
        ref = ref + c0
        scale += np.abs(c0).max(initial=0.0)
    assert c.dtype == np.float32
    assert c.shape == ref.shape
    kdim = a64.shape[1]
    err = np.abs(c - ref).max(initial=0.0)
    assert err <= 4 * EPS32 * np.sqrt(max(kdim, 1)) * max(scale, 1e-30), (err, scale)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_sgemm_matches_float64(kernel, trans_a, trans_b, threads):
    rng = np.random.default_rng(7)
    for m, n, k in SHAPES:
        if kernel == "reference" and m * n * k > 2_000_000:
            continue  # the plain loop is slow with trans_b; the other shapes cover it
        a, b = _operands(rng, m, n, k, trans_a, trans_b)
        c = K.sgemm(a, b, trans_a=trans_a, trans_b=trans_b, threads=threads, kernel=kernel)
        _check(c, a, b, trans_a, trans_b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_sgemm_accumulate(kernel, threads):
    rng = np.random.default_rng(8)
    for (m, n, k), (ta, tb) in zip([(9, 45, 400), (64, 70, 30), (3, 5, 800)],
                                   [(False, True), (True, False), (True, True)], strict=True):
        a, b = _operands(rng, m, n, k, ta, tb)
        c0 = rng.standard_normal((m, n), dtype=np.float32) * 10
        c = K.sgemm(a, b, trans_a=ta, trans_b=tb, threads=threads, kernel=kernel, c=c0)
        _check(c, a, b, ta, tb, c0=c0.astype(np.float64))


@pytest.mark.parametrize("kernel", PACKED_KERNELS)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_sgemm_packed(kernel, trans_b, threads):
    rng = np.random.default_rng(9)
    for m, n, k in [(1, 1, 1), (256, 400, 784), (5, 1000, 33), (37, 10, 400), (13, 33, 770)]:
        a, b = _operands(rng, m, n, k, False, trans_b)
        c = K.sgemm_packed(a, b, trans_b=trans_b, threads=threads, kernel=kernel)
        _check(c, a, b, False, trans_b)
        c0 = rng.standard_normal((m, n), dtype=np.float32)
        c = K.sgemm_packed(a, b, trans_b=trans_b, threads=threads, kernel=kernel, c=c0)
        _check(c, a, b, False, trans_b, c0=c0.astype(np.float64))


@pytest.mark.parametrize("kernel", PACKED_KERNELS)
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("filt", ["pos", "neg"])
def test_sgemm_packed_filtered_b(kernel, trans_b, threads, filt):
    # The micro-kernel applies max(B, 0) / min(B, 0) as it loads B: the same as packing the filtered B.
    rng = np.random.default_rng(11)
    for m, n, k in [(1, 1, 1), (256, 400, 784), (5, 1000, 33), (37, 10, 400), (13, 33, 770)]:
        a, b = _operands(rng, m, n, k, False, trans_b)
        bf = np.maximum(b, 0) if filt == "pos" else np.minimum(b, 0)
        c = K.sgemm_packed(a, b, trans_b=trans_b, threads=threads, kernel=kernel, filter=filt)
        _check(c, a, bf, False, trans_b)
        # bitwise equal to packing the filtered operand itself (same products, same order)
        np.testing.assert_array_equal(c, K.sgemm_packed(a, bf, trans_b=trans_b, threads=threads, kernel=kernel))
        c0 = rng.standard_normal((m, n), dtype=np.float32)
        c = K.sgemm_packed(a, b, trans_b=trans_b, threads=threads, kernel=kernel, c=c0, filter=filt)
        _check(c, a, bf, False, trans_b, c0=c0.astype(np.float64))
    with pytest.raises(ValueError, match="filter"):
        K.sgemm_packed(a, b, trans_b=trans_b, filter="abs")


@pytest.mark.parametrize("kernel", PACKED_KERNELS)
@pytest.mark.parametrize("filt", ["none", "pos", "neg"])
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_a_is_bitwise_the_dense_product(kernel, filt, threads):
    # sgemm_packed_sparse_a skips the zeros of A (rows in chunks of 96; a chunk denser than the
    # threshold runs dense): the same FMA chain per element, so C is bitwise sgemm_packed's whatever
    # the density, the mix of sparse and dense chunks, the K blocks (K > 480: several) and the threads.
    rng = np.random.default_rng(12)
    for m, n, k in [(1, 1, 1), (5, 7, 3), (300, 25, 32), (250, 800, 64), (97, 130, 600), (200, 3136, 512)]:
        b = rng.standard_normal((n, k), dtype=np.float32)
        for density in (0.0, 0.05, 0.2, 0.6):
            a = rng.standard_normal((m, k), dtype=np.float32)
            a[rng.random((m, k)) > density] = 0
            a[: m // 2] = rng.standard_normal((m // 2, k), dtype=np.float32)  # a dense half: mixed chunks
            a[1::7, ::3] = -0.0
            dense = K.sgemm_packed(a, b, trans_b=True, threads=threads, kernel=kernel, filter=filt)
            for threshold in (1.0, 0.3, -1.0):
                sparse = K.sgemm_packed(a, b, trans_b=True, threads=threads, kernel=kernel, filter=filt,
                                        sparse=threshold)
                np.testing.assert_array_equal(sparse, dense)
            c0 = rng.standard_normal((m, n), dtype=np.float32)
            np.testing.assert_array_equal(
                K.sgemm_packed(a, b, trans_b=True, threads=threads, kernel=kernel, filter=filt, c=c0, sparse=1.0),
                K.sgemm_packed(a, b, trans_b=True, threads=threads, kernel=kernel, filter=filt, c=c0))
    bf = b if filt == "none" else (np.maximum(b, 0) if filt == "pos" else np.minimum(b, 0))
    _check(sparse, a, bf.T, False, False)
    with pytest.raises(ValueError, match="sparse"):
        K.sgemm_packed(a, b, trans_b=True, sparse=1.0, relu=True)


@pytest.mark.parametrize("kernel", PACKED_KERNELS)
def test_threads_do_not_change_the_result(kernel):
    # Threads split C into slabs; every element is summed in the same order whatever the split.
    rng = np.random.default_rng(10)
    for m, n, k in [(300, 200, 500), (8, 1000, 300)]:
        a, b = _operands(rng, m, n, k, False, True)
        c1 = K.sgemm(a, b, trans_b=True, threads=1, kernel=kernel)
        c2 = K.sgemm(a, b, trans_b=True, threads=2, kernel=kernel)
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(K.sgemm_packed(a, b, trans_b=True, threads=2, kernel=kernel), c1)


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_inner_dimension(kernel):
    a = np.zeros((3, 0), np.float32)
    b = np.zeros((0, 4), np.float32)
    np.testing.assert_array_equal(K.sgemm(a, b, kernel=kernel), np.zeros((3, 4), np.float32))
    c0 = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(K.sgemm(a, b, kernel=kernel, c=c0), c0)
    assert K.sgemm(np.zeros((0, 5), np.float32), np.ones((5, 2), np.float32), kernel=kernel).shape == (0, 2)


def test_non_finite_values_propagate():
    a = np.ones((3, 4), np.float32)
    a[1, 2] = np.nan
    b = np.ones((4, 5), np.float32)
    b[0, 3] = np.inf
    for kernel in KERNELS:
        c = K.sgemm(a, b, kernel=kernel)
        ref = a.astype(np.float64) @ b.astype(np.float64)
        np.testing.assert_array_equal(np.isnan(c), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(c), np.isinf(ref))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(m=st.integers(1, 40), n=st.integers(1, 70), k=st.integers(1, 50), trans_a=st.booleans(),
       trans_b=st.booleans(), kernel=st.sampled_from(PACKED_KERNELS))
def test_small_shapes_property(m, n, k, trans_a, trans_b, kernel):
    a, b = _operands(np.random.default_rng(m * 10007 + n * 101 + k), m, n, k, trans_a, trans_b)
    _check(K.sgemm(a, b, trans_a=trans_a, trans_b=trans_b, kernel=kernel), a, b, trans_a, trans_b)


def test_bad_arguments_raise_clear_errors():
    a = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="inner dimension"):
        K.sgemm(a, np.ones((5, 2), np.float32))
    with pytest.raises(TypeError, match="float32"):
        K.sgemm(a.astype(np.float64), np.ones((4, 2), np.float32))
    with pytest.raises(TypeError, match="C-contiguous"):
        K.sgemm(np.ones((4, 3), np.float32).T, np.ones((4, 2), np.float32))
    with pytest.raises(ValueError, match="kernel"):
        K.sgemm(a, np.ones((4, 2), np.float32), kernel="sse9")
    with pytest.raises(ValueError, match="threads"):
        K.sgemm(a, np.ones((4, 2), np.float32), threads=0)
    with pytest.raises(ValueError, match="c"):
        K.sgemm(a, np.ones((4, 2), np.float32), c=np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match="columns of a"):
        K.sgemm_packed(a, np.ones((2, 5), np.float32), trans_b=True)


def test_kernel_selection_and_environment_override():
    assert K.gemm_kernel_name() in PACKED_KERNELS
    assert K.gemm_kernel_name() == PACKED_KERNELS[0] or "DEEPTAYLOR_GEMM_KERNEL" in os.environ
    code = "from deeptaylor._core import kernels as K; print(K.gemm_kernel_name())"
    env = {**os.environ, "DEEPTAYLOR_GEMM_KERNEL": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_bias_relu_epilogue(kernel, threads):
    # The epilogue must see every element exactly once, after all of K: adding the bias twice, or
    # before the last kc block, or missing a tile would show.
    rng = np.random.default_rng(11)
    for m, n, k in [(1, 1, 1), (37, 45, 800), (300, 70, 20), (5, 3, 0)]:
        a, b = _operands(rng, m, n, k, False, True)
        bias = rng.standard_normal(n, dtype=np.float32) * 3
        c0 = rng.standard_normal((m, n), dtype=np.float32)
        ref = a.astype(np.float64) @ b.T.astype(np.float64) + c0 + bias
        tol = 4 * EPS32 * np.sqrt(max(k, 1)) * ((np.abs(a) @ np.abs(b.T)).max(initial=0) + 10)
        c = K.sgemm(a, b, trans_b=True, threads=threads, kernel=kernel, c=c0, bias=bias, relu=True)
        assert np.abs(c - np.maximum(ref, 0)).max(initial=0) <= tol
        if kernel != "reference":
            c = K.sgemm_packed(a, b, trans_b=True, threads=threads, kernel=kernel, bias=bias)
            assert np.abs(c - (ref - c0)).max(initial=0) <= tol
