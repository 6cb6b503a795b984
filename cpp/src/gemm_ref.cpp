// Portable reference SGEMM (plain loops, i-k-j order so the inner loop streams rows of B and C).
// It is the correctness oracle for the packed kernels (tests call it through _core.kernels.sgemm
// with kernel="reference"); the dispatching sgemm lives in gemm.cpp.
#include <cstring>

#include "deeptaylor/gemm.hpp"

namespace deeptaylor {

// C (M, N) = op(A) (M, K) op(B) (K, N) [+ C]; see gemm.hpp. OpenMP over the rows of C each thread
// writes (no atomics, no reduction: results do not depend on the thread count).
void sgemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                     const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (threads > 1)
    for (int64_t i = 0; i < M; ++i) {
        float* c = C + i * ldc;
        if (!accumulate) std::memset(c, 0, sizeof(float) * static_cast<std::size_t>(N));
        for (int64_t k = 0; k < K; ++k) {
            const float a = trans_a ? A[k * lda + i] : A[i * lda + k];
            if (!trans_b) {
                const float* b = B + k * ldb;
                for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
            } else {
                for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + k];
            }
        }
    }
}

}  // namespace deeptaylor
