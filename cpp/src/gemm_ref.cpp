// Portable reference SGEMM (plain loops, i-k-j order so the inner loop streams rows of B and C).
// It is the correctness oracle and the fallback; the fast kernels replace the dispatch below.
#include <cstring>

#include "deeptaylor/gemm.hpp"

namespace deeptaylor {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
           const float* A, int64_t lda, const float* B, int64_t ldb,
           float* C, int64_t ldc, bool accumulate, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1) if (threads > 1)
    for (int64_t i = 0; i < M; ++i) {
        float* c = C + i * ldc;
        if (!accumulate) std::memset(c, 0, sizeof(float) * static_cast<std::size_t>(N));
        for (int64_t k = 0; k < K; ++k) {
            const float a = trans_a ? A[k * lda + i] : A[i * lda + k];
            if (a == 0.0f) continue;
            if (!trans_b) {
                const float* b = B + k * ldb;
                for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
            } else {
                for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + k];
            }
        }
    }
}

PackedB::PackedB(const float* B, int64_t K, int64_t N, int64_t ldb, bool trans_b) : K_(K), N_(N) {
    // Reference layout: plain row-major (K, N).
    data_.resize(static_cast<std::size_t>(K * N));
    for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < N; ++j) data_[k * N + j] = trans_b ? B[j * ldb + k] : B[k * ldb + j];
}

PackedB::~PackedB() = default;

void sgemm_packed(int64_t M, const float* A, int64_t lda, const PackedB& Bp,
                  float* C, int64_t ldc, bool accumulate, int threads) {
    sgemm(false, false, M, Bp.N(), Bp.K(), A, lda, Bp.data(), Bp.N(), C, ldc, accumulate, threads);
}

const char* gemm_kernel_name() { return "scalar"; }

}  // namespace deeptaylor
