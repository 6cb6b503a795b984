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
#endif  // DEEPTAYLOR_GEMM_X86

}  // namespace

// Blocking (Zen 4: 32 KB L1d, 1 MB L2 per core, shared L3): kc so that the A micro-panel
// (MR x kc floats) fills about half of L1; nc so that the packed B block (kc x nc) takes about
// 60-75% of L2; mc rows of A packed at once (in L3).
const Kernel kScalar{"scalar", kMrS, kNrS, 256, 256, 1024,
                    {{&tile_scalar<0, false>, &tile_scalar<1, false>, &tile_scalar<2, false>},
                      {&tile_scalar<0, true>, &tile_scalar<1, true>, &tile_scalar<2, true>}}};
#ifdef DEEPTAYLOR_GEMM_X86
const Kernel kAvx2{"avx2", kMr2, kNr2, 384, 384, 4096,
                    {{&tile_avx2<0, false>, &tile_avx2<1, false>, &tile_avx2<2, false>},
                      {&tile_avx2<0, true>, &tile_avx2<1, true>, &tile_avx2<2, true>}}};
const Kernel kAvx512{"avx512", kMr5, kNr5, 384, 384, 4096,
                    {{&tile_avx512<0, false>, &tile_avx512<1, false>, &tile_avx512<2, false>},
                      {&tile_avx512<0, true>, &tile_avx512<1, true>, &tile_avx512<2, true>}}};
#endif

}  // namespace deeptaylor::gemm_detail
