// GEMM micro-kernels (Goto & van de Geijn 2008, "Anatomy of high-performance matrix multiplication";
// BLIS: Van Zee & van de Geijn 2015). Each computes one MR x NR tile of C from packed panels with the
// whole tile held in registers: per k, NR/W vector loads of B and MR broadcasts of A feed
// MR * NR/W FMAs.
//
// The SIMD kernels are compiled with function-level target attributes so that only they use
// AVX2/AVX-512 instructions; the library stays portable and gemm.cpp calls them only after
// __builtin_cpu_supports says the CPU (and OS) can run them.
//
// A comes packed (MR-row micro-panels, k-major: Ap[k * MR + r]) or, with R = true, straight from a
// row-major matrix (A[r * ars + k]): for narrow products (N of a few NR panels, e.g. a convolution
// with 32-64 output channels) packing A costs a large share of the multiply itself (gemm.cpp).
#include <cstdint>

#include "gemm_kernels.hpp"

#ifdef DEEPTAYLOR_GEMM_X86
#include <immintrin.h>
#endif

namespace deeptaylor::gemm_detail {
namespace {

// ---------------------------------------------------------------------------------------------
// Portable kernel: 4 x 8, plain C++ (the compiler vectorises the j loops at the baseline ISA).
constexpr int kMrS = 4, kNrS = 8;

// F: the B filter (0 as stored, 1 max(b, 0), 2 min(b, 0)), applied to each B value as it is loaded.
template <int F>
inline float filt(float b) {
    if constexpr (F == 1) return b > 0.0f ? b : 0.0f;
    if constexpr (F == 2) return b < 0.0f ? b : 0.0f;
    return b;
}

// Ap (kc, kMrS) packed (A row-major A[r * ars + k] if R), Bp (kc, kNrS) packed -> C (m, n), m <= 4,
// n <= 8
template <int M, int F, bool R>
void tile_scalar_m(int n, int64_t kc, const float* Ap, int64_t ars, const float* Bp, float* C, int64_t ldc,
                   bool add) {
    float acc[M][kNrS] = {};
    for (int64_t k = 0; k < kc; ++k) {
        float b[kNrS];
        for (int j = 0; j < kNrS; ++j) b[j] = filt<F>(Bp[k * kNrS + j]);
        for (int i = 0; i < M; ++i) {
            const float ai = R ? Ap[i * ars + k] : Ap[k * kMrS + i];
            for (int j = 0; j < kNrS; ++j) acc[i][j] += ai * b[j];
        }
    }
    for (int i = 0; i < M; ++i) {
        float* c = C + i * ldc;
        if (add)
            for (int j = 0; j < n; ++j) c[j] += acc[i][j];
        else
            for (int j = 0; j < n; ++j) c[j] = acc[i][j];
    }
}

template <int F, bool R>
void tile_scalar(int m, int n, int64_t kc, const float* Ap, int64_t ars, const float* Bp, float* C, int64_t ldc,
                 bool add) {
    switch (m) {
        case 1: tile_scalar_m<1, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 2: tile_scalar_m<2, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 3: tile_scalar_m<3, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        default: tile_scalar_m<4, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
    }
}

// Sparse rows (gemm_kernels.hpp, SparseRowFn): the same per-element sum as tile_scalar_m.
template <int F>
void sparse_scalar(int n, int64_t kc, const float* Bp, int64_t rows, const int32_t* ptr, int64_t ps,
                   const int32_t* idx, const float* val, float* C, int64_t ldc, bool add) {
    constexpr int W = kSparsePanels * kNrS;
    const int panels = (n + kNrS - 1) / kNrS;
    for (int64_t r = 0; r < rows; ++r) {
        float acc[W] = {};
        for (int64_t t = ptr[r * ps]; t < ptr[r * ps + 1]; ++t) {
            const float a = val[t];
            const float* b = Bp + int64_t(idx[t]) * kNrS;
            for (int p = 0; p < panels; ++p)
                for (int j = 0; j < kNrS; ++j) acc[p * kNrS + j] += a * filt<F>(b[p * kc * kNrS + j]);
        }
        float* c = C + r * ldc;
        if (add)
            for (int j = 0; j < n; ++j) c[j] += acc[j];
        else
            for (int j = 0; j < n; ++j) c[j] = acc[j];
    }
}

// Branch-free (the zero pattern is random: a branch would mispredict on most elements); writes one
// entry past the count, within the caller's slack (CompressFn).
int64_t compress_scalar(const float* a, int64_t n, int32_t base, int32_t* idx, float* val) {
    int64_t t = 0;
    for (int64_t k = 0; k < n; ++k) {
        const float v = a[k];
        idx[t] = base + static_cast<int32_t>(k);
        val[t] = v;
        t += v != 0.0f;
    }
    return t;
}

#ifdef DEEPTAYLOR_GEMM_X86
#define DT_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DT_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,fma")))

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 6 x 16 (12 ymm accumulators + 2 for B + 1 broadcast of the 16 registers).
constexpr int kMr2 = 6, kNr2 = 16;

template <int F>
DT_TARGET_AVX2 inline __m256 filt2(__m256 b) {
    if constexpr (F == 1) return _mm256_max_ps(b, _mm256_setzero_ps());
    if constexpr (F == 2) return _mm256_min_ps(b, _mm256_setzero_ps());
    return b;
}

// Ap (kc, 6), Bp (kc, 16) packed (A row-major A[r * ars + k] if R), 32-byte aligned
// -> C (m, n), m <= 6, n <= 16
template <int M, int F, bool R>
DT_TARGET_AVX2 void tile_avx2_m(int n, int64_t kc, const float* Ap, int64_t ars, const float* Bp,
                                float* C, int64_t ldc, bool add) {
    __m256 c0[M], c1[M];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {  // the C tile is read at the end: start fetching it now
        _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + 15), _MM_HINT_T0);
        c0[i] = c1[i] = _mm256_setzero_ps();
    }
#pragma GCC unroll 2
    for (int64_t k = 0; k < kc; ++k) {
        const __m256 b0 = filt2<F>(_mm256_load_ps(Bp + k * kNr2));
        const __m256 b1 = filt2<F>(_mm256_load_ps(Bp + k * kNr2 + 8));
        const float* a = R ? Ap + k : Ap + k * kMr2;
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
            const __m256 ai = _mm256_broadcast_ss(a + (R ? i * ars : i));
            c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
        }
    }
    if (n == kNr2) {
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
            float* c = C + i * ldc;
            if (add) {
                c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(c));
                c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(c + 8));
            }
            _mm256_storeu_ps(c, c0[i]);
            _mm256_storeu_ps(c + 8, c1[i]);
        }
    } else {  // right edge: masked loads/stores of the n valid columns
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
        const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8), lane);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) {
            float* c = C + i * ldc;
            if (add) {
                c0[i] = _mm256_add_ps(c0[i], _mm256_maskload_ps(c, m0));
                c1[i] = _mm256_add_ps(c1[i], _mm256_maskload_ps(c + 8, m1));
            }
            _mm256_maskstore_ps(c, m0, c0[i]);
            _mm256_maskstore_ps(c + 8, m1, c1[i]);
        }
    }
}

template <int F, bool R>
DT_TARGET_AVX2 void tile_avx2(int m, int n, int64_t kc, const float* Ap, int64_t ars, const float* Bp,
                              float* C, int64_t ldc, bool add) {
    switch (m) {
        case 1: tile_avx2_m<1, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 2: tile_avx2_m<2, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 3: tile_avx2_m<3, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 4: tile_avx2_m<4, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 5: tile_avx2_m<5, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        default: tile_avx2_m<6, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
    }
}

// Sparse rows, P panels of 16 (2 ymm each), two rows at a time (independent FMA chains): the same
// FMA chain per element as tile_avx2_m.
template <int P>
DT_TARGET_AVX2 inline void sparse_avx2_store(int n, __m256* c, float* C, bool add) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
#pragma GCC unroll 8
    for (int j = 0; j < 2 * P; ++j) {
        const int left = n - 8 * j;
        if (left <= 0) break;
        float* cj = C + 8 * j;
        if (left >= 8) {
            if (add) c[j] = _mm256_add_ps(c[j], _mm256_loadu_ps(cj));
            _mm256_storeu_ps(cj, c[j]);
        } else {
            const __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lane);
            if (add) c[j] = _mm256_add_ps(c[j], _mm256_maskload_ps(cj, mk));
            _mm256_maskstore_ps(cj, mk, c[j]);
        }
    }
}

template <int P, int F>
DT_TARGET_AVX2 inline void sparse_avx2_step(const float* Bp, int64_t pstride, int32_t k, float v, __m256* c) {
    const __m256 a = _mm256_set1_ps(v);
    const float* b = Bp + int64_t(k) * kNr2;
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
        c[2 * p] = _mm256_fmadd_ps(a, filt2<F>(_mm256_load_ps(b + p * pstride)), c[2 * p]);
        c[2 * p + 1] = _mm256_fmadd_ps(a, filt2<F>(_mm256_load_ps(b + p * pstride + 8)), c[2 * p + 1]);
    }
}

template <int P, int F>
DT_TARGET_AVX2 void sparse_avx2_p(int n, int64_t kc, const float* Bp, int64_t rows, const int32_t* ptr,
                                  int64_t ps, const int32_t* idx, const float* val, float* C, int64_t ldc,
                                  bool add) {
    const int64_t pstride = kc * kNr2;
    int64_t r = 0;
    for (; r + 1 < rows; r += 2) {
        __m256 c[2 * P], d[2 * P];
#pragma GCC unroll 8
        for (int j = 0; j < 2 * P; ++j) c[j] = d[j] = _mm256_setzero_ps();
        int64_t t = ptr[r * ps], u = ptr[(r + 1) * ps];
        const int64_t te = ptr[r * ps + 1], ue = ptr[(r + 1) * ps + 1];
        for (; t < te && u < ue; ++t, ++u) {
            sparse_avx2_step<P, F>(Bp, pstride, idx[t], val[t], c);
            sparse_avx2_step<P, F>(Bp, pstride, idx[u], val[u], d);
        }
        for (; t < te; ++t) sparse_avx2_step<P, F>(Bp, pstride, idx[t], val[t], c);
        for (; u < ue; ++u) sparse_avx2_step<P, F>(Bp, pstride, idx[u], val[u], d);
        sparse_avx2_store<P>(n, c, C + r * ldc, add);
        sparse_avx2_store<P>(n, d, C + (r + 1) * ldc, add);
    }
    if (r < rows) {
        __m256 c[2 * P];
#pragma GCC unroll 8
        for (int j = 0; j < 2 * P; ++j) c[j] = _mm256_setzero_ps();
        for (int64_t t = ptr[r * ps]; t < ptr[r * ps + 1]; ++t) sparse_avx2_step<P, F>(Bp, pstride, idx[t], val[t], c);
        sparse_avx2_store<P>(n, c, C + r * ldc, add);
    }
}

template <int F>
DT_TARGET_AVX2 void sparse_avx2(int n, int64_t kc, const float* Bp, int64_t rows, const int32_t* ptr, int64_t ps,
                                const int32_t* idx, const float* val, float* C, int64_t ldc, bool add) {
    switch ((n + kNr2 - 1) / kNr2) {
        case 1: sparse_avx2_p<1, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
        case 2: sparse_avx2_p<2, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
        case 3: sparse_avx2_p<3, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
        default: sparse_avx2_p<4, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
    }
}

// ---------------------------------------------------------------------------------------------
// AVX-512: 12 x 32 (24 zmm accumulators + 2 for B + 1 broadcast of the 32 registers). On Zen 4 a
// zmm FMA issues as two 256-bit halves, so the peak equals AVX2's; the gain is twice the
// registers (a larger tile: fewer loads per FMA) and masked stores for the right edge.
constexpr int kMr5 = 12, kNr5 = 32;

template <int F>
DT_TARGET_AVX512 inline __m512 filt5(__m512 b) {
    if constexpr (F == 1) return _mm512_max_ps(b, _mm512_setzero_ps());
    if constexpr (F == 2) return _mm512_min_ps(b, _mm512_setzero_ps());
    return b;
}

// Ap (kc, 12), Bp (kc, 32) packed (A row-major A[r * ars + k] if R), 64-byte aligned
// -> C (m, n), m <= 12, n <= 32
template <int M, int F, bool R>
DT_TARGET_AVX512 void tile_avx512_m(int n, int64_t kc, const float* Ap, int64_t ars,
                                    const float* Bp, float* C, int64_t ldc, bool add) {
    __m512 c0[M], c1[M];
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {  // the C tile is read at the end: start fetching it now
        _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(C + i * ldc + 31), _MM_HINT_T0);
        c0[i] = c1[i] = _mm512_setzero_ps();
    }
#pragma GCC unroll 2
    for (int64_t k = 0; k < kc; ++k) {
        const __m512 b0 = filt5<F>(_mm512_load_ps(Bp + k * kNr5));
        const __m512 b1 = filt5<F>(_mm512_load_ps(Bp + k * kNr5 + 16));
        const float* a = R ? Ap + k : Ap + k * kMr5;
#pragma GCC unroll 16
        for (int i = 0; i < M; ++i) {
            const __m512 ai = _mm512_set1_ps(a[R ? i * ars : i]);
            c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
            c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
        }
    }
    const __mmask16 m0 = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    const __mmask16 m1 = n >= 32   ? __mmask16(0xFFFF)
                         : n <= 16 ? __mmask16(0)
                                   : __mmask16((1u << (n - 16)) - 1u);
#pragma GCC unroll 16
    for (int i = 0; i < M; ++i) {
        float* c = C + i * ldc;
        if (add) {
            c0[i] = _mm512_add_ps(c0[i], _mm512_maskz_loadu_ps(m0, c));
            c1[i] = _mm512_add_ps(c1[i], _mm512_maskz_loadu_ps(m1, c + 16));
        }
        _mm512_mask_storeu_ps(c, m0, c0[i]);
        _mm512_mask_storeu_ps(c + 16, m1, c1[i]);
    }
}

template <int F, bool R>
DT_TARGET_AVX512 void tile_avx512(int m, int n, int64_t kc, const float* Ap, int64_t ars, const float* Bp,
                                  float* C, int64_t ldc, bool add) {
    switch (m) {
        case 1: tile_avx512_m<1, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 2: tile_avx512_m<2, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 3: tile_avx512_m<3, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 4: tile_avx512_m<4, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 5: tile_avx512_m<5, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 6: tile_avx512_m<6, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 7: tile_avx512_m<7, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 8: tile_avx512_m<8, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 9: tile_avx512_m<9, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 10: tile_avx512_m<10, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        case 11: tile_avx512_m<11, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
        default: tile_avx512_m<12, F, R>(n, kc, Ap, ars, Bp, C, ldc, add); break;
    }
}
// vcompressps into a register, then a full store (16 values per step; the store writes up to 15
// entries past the count, hence the 16 entries of slack the caller leaves). The memory form of
// vcompressps is microcoded and very slow on AMD Zen 4/5.
DT_TARGET_AVX512 int64_t compress_avx512(const float* a, int64_t n, int32_t base, int32_t* idx, float* val) {
    const __m512i step = _mm512_set1_epi32(16);
    __m512i k = _mm512_add_epi32(_mm512_set1_epi32(base),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    int64_t t = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(a + i);
        const __mmask16 nz = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        _mm512_storeu_ps(val + t, _mm512_maskz_compress_ps(nz, v));
        _mm512_storeu_si512(idx + t, _mm512_maskz_compress_epi32(nz, k));
        t += __builtin_popcount(static_cast<unsigned>(nz));
        k = _mm512_add_epi32(k, step);
    }
    if (i < n) {
        const __mmask16 in = static_cast<__mmask16>((1u << (n - i)) - 1u);
        const __m512 v = _mm512_maskz_loadu_ps(in, a + i);
        const __mmask16 nz = _mm512_mask_cmp_ps_mask(in, v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
        _mm512_storeu_ps(val + t, _mm512_maskz_compress_ps(nz, v));
        _mm512_storeu_si512(idx + t, _mm512_maskz_compress_epi32(nz, k));
        t += __builtin_popcount(static_cast<unsigned>(nz));
    }
    return t;
}

// Sparse rows, P panels of 32 (2 zmm each), two rows at a time (independent FMA chains): the same
// FMA chain per element as tile_avx512_m.
template <int P>
DT_TARGET_AVX512 inline void sparse_avx512_store(int n, __m512* c, float* C, bool add) {
#pragma GCC unroll 8
    for (int j = 0; j < 2 * P; ++j) {
        const int left = n - 16 * j;
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
        float* cj = C + 16 * j;
        if (add) c[j] = _mm512_add_ps(c[j], _mm512_maskz_loadu_ps(mk, cj));
        _mm512_mask_storeu_ps(cj, mk, c[j]);
    }
}

template <int P, int F>
DT_TARGET_AVX512 inline void sparse_avx512_step(const float* Bp, int64_t pstride, int32_t k, float v, __m512* c) {
    const __m512 a = _mm512_set1_ps(v);
    const float* b = Bp + int64_t(k) * kNr5;
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
        c[2 * p] = _mm512_fmadd_ps(a, filt5<F>(_mm512_load_ps(b + p * pstride)), c[2 * p]);
        c[2 * p + 1] = _mm512_fmadd_ps(a, filt5<F>(_mm512_load_ps(b + p * pstride + 16)), c[2 * p + 1]);
    }
}

template <int P, int F>
DT_TARGET_AVX512 void sparse_avx512_p(int n, int64_t kc, const float* Bp, int64_t rows, const int32_t* ptr,
                                      int64_t ps, const int32_t* idx, const float* val, float* C, int64_t ldc,
                                      bool add) {
    const int64_t pstride = kc * kNr5;
    int64_t r = 0;
    for (; r + 1 < rows; r += 2) {
        __m512 c[2 * P], d[2 * P];
#pragma GCC unroll 8
        for (int j = 0; j < 2 * P; ++j) c[j] = d[j] = _mm512_setzero_ps();
        int64_t t = ptr[r * ps], u = ptr[(r + 1) * ps];
        const int64_t te = ptr[r * ps + 1], ue = ptr[(r + 1) * ps + 1];
        for (; t < te && u < ue; ++t, ++u) {
            sparse_avx512_step<P, F>(Bp, pstride, idx[t], val[t], c);
            sparse_avx512_step<P, F>(Bp, pstride, idx[u], val[u], d);
        }
        for (; t < te; ++t) sparse_avx512_step<P, F>(Bp, pstride, idx[t], val[t], c);
        for (; u < ue; ++u) sparse_avx512_step<P, F>(Bp, pstride, idx[u], val[u], d);
        sparse_avx512_store<P>(n, c, C + r * ldc, add);
        sparse_avx512_store<P>(n, d, C + (r + 1) * ldc, add);
    }
    if (r < rows) {
        __m512 c[2 * P];
#pragma GCC unroll 8
        for (int j = 0; j < 2 * P; ++j) c[j] = _mm512_setzero_ps();
        for (int64_t t = ptr[r * ps]; t < ptr[r * ps + 1]; ++t)
            sparse_avx512_step<P, F>(Bp, pstride, idx[t], val[t], c);
        sparse_avx512_store<P>(n, c, C + r * ldc, add);
    }
}

template <int F>
DT_TARGET_AVX512 void sparse_avx512(int n, int64_t kc, const float* Bp, int64_t rows, const int32_t* ptr,
                                    int64_t ps, const int32_t* idx, const float* val, float* C, int64_t ldc,
                                    bool add) {
    switch ((n + kNr5 - 1) / kNr5) {
        case 1: sparse_avx512_p<1, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
        case 2: sparse_avx512_p<2, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
        case 3: sparse_avx512_p<3, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
        default: sparse_avx512_p<4, F>(n, kc, Bp, rows, ptr, ps, idx, val, C, ldc, add); break;
    }
}
#endif  // DEEPTAYLOR_GEMM_X86

}  // namespace

// Blocking (Zen 4: 32 KB L1d, 1 MB L2 per core, shared L3): kc so that the A micro-panel
// (MR x kc floats) fills about half of L1; nc so that the packed B block (kc x nc) takes about
// 60-75% of L2; mc rows of A packed at once (in L3).
const Kernel kScalar{"scalar", kMrS, kNrS, 256, 256, 1024,
                    {{&tile_scalar<0, false>, &tile_scalar<1, false>, &tile_scalar<2, false>},
                      {&tile_scalar<0, true>, &tile_scalar<1, true>, &tile_scalar<2, true>}},
                    {&sparse_scalar<0>, &sparse_scalar<1>, &sparse_scalar<2>}, &compress_scalar};
#ifdef DEEPTAYLOR_GEMM_X86
const Kernel kAvx2{"avx2", kMr2, kNr2, 384, 384, 4096,
                    {{&tile_avx2<0, false>, &tile_avx2<1, false>, &tile_avx2<2, false>},
                      {&tile_avx2<0, true>, &tile_avx2<1, true>, &tile_avx2<2, true>}},
                    {&sparse_avx2<0>, &sparse_avx2<1>, &sparse_avx2<2>}, &compress_scalar};
const Kernel kAvx512{"avx512", kMr5, kNr5, 384, 384, 4096,
                    {{&tile_avx512<0, false>, &tile_avx512<1, false>, &tile_avx512<2, false>},
                      {&tile_avx512<0, true>, &tile_avx512<1, true>, &tile_avx512<2, true>}},
                    {&sparse_avx512<0>, &sparse_avx512<1>, &sparse_avx512<2>}, &compress_avx512};
#endif

}  // namespace deeptaylor::gemm_detail
