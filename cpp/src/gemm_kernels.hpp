// Internal: the GEMM micro-kernels and their blocking parameters (see gemm.cpp for the driver).
//
// Packed layouts (BLIS, Van Zee & van de Geijn 2015):
//   A micro-panel: MR rows x kc, stored k-major: Ap[k * MR + r]  (rows past M are zero)
//   B micro-panel: kc x NR columns, stored k-major: Bp[k * NR + j] (columns past N are zero)
// A tile function computes the m x n (m <= MR, n <= NR) block  C (+)= Ap^T f(Bp)  of one MR x NR tile,
// f = identity, max(., 0) or min(., 0) applied to B as it is loaded (gemm.hpp, BFilter).
#pragma once
#include <cstdint>

namespace deeptaylor::gemm_detail {

// m (<= MR) rows and n (<= NR) columns of C (row stride ldc) = [C +] sum_k Ap[k, :m]^T Bp[k, :n]
// A: the packed micro-panel (ars ignored), or for the row-major variant A[r * ars + k].
using TileFn = void (*)(int m, int n, int64_t kc, const float* A, int64_t ars, const float* Bp,
                        float* C, int64_t ldc, bool add);

struct Kernel {
    const char* name;
    int mr, nr;        // micro-tile (register block)
    int64_t kc;        // depth of a packed block: the A micro-panel (MR x kc) stays in L1
    int64_t nc;        // columns of B per block: the packed B block (kc x nc) stays in L2
    int64_t mc;        // rows of A packed at once (mc x kc, in L3)
    TileFn tile[2][3]; // [A packed | A row-major][BFilter: B as stored, max(B, 0), min(B, 0)]
};

extern const Kernel kScalar;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DEEPTAYLOR_GEMM_X86 1
extern const Kernel kAvx2;
extern const Kernel kAvx512;
#endif

}  // namespace deeptaylor::gemm_detail
