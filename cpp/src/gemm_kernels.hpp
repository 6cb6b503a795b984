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

// Rows of C from sparse rows of A, n (<= kSparsePanels * NR) columns: for row r < rows,
// C[r * ldc + :n] = [C +] sum_t val[t] * f(B[idx[t], :n]) over t in [ptr[r * ps], ptr[r * ps + 1]), in
// that order; B = the kSparsePanels NR-column panels of one packed block of depth kc starting at Bp
// (panel p at Bp + p * kc * NR). With idx ascending this is bitwise the tile function's result for the
// dense row (an FMA chain in k order from zero: a zero of A adds +-0 and changes nothing), so the
// sparse and dense paths can be mixed freely.
using SparseRowFn = void (*)(int n, int64_t kc, const float* Bp, int64_t rows, const int32_t* ptr, int64_t ps,
                             const int32_t* idx, const float* val, float* C, int64_t ldc, bool add);
constexpr int kSparsePanels = 4;
// The nonzeros of a[0:n] in order: idx[t] = base + position, val[t] = value; returns their count.
// idx / val need room for n + 16 entries.
using CompressFn = int64_t (*)(const float* a, int64_t n, int32_t base, int32_t* idx, float* val);

struct Kernel {
    const char* name;
    int mr, nr;        // micro-tile (register block)
    int64_t kc;        // depth of a packed block: the A micro-panel (MR x kc) stays in L1
    int64_t nc;        // columns of B per block: the packed B block (kc x nc) stays in L2
    int64_t mc;        // rows of A packed at once (mc x kc, in L3)
    TileFn tile[2][3]; // [A packed | A row-major][BFilter: B as stored, max(B, 0), min(B, 0)]
    SparseRowFn sparse[3];  // [BFilter]
    CompressFn compress;
};

extern const Kernel kScalar;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DEEPTAYLOR_GEMM_X86 1
extern const Kernel kAvx2;
extern const Kernel kAvx512;
#endif

}  // namespace deeptaylor::gemm_detail
