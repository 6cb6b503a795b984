// deeptaylor SGEMM interface (row-major, float32).
//
// The engine only calls what is declared here; implementations live in cpp/src/gemm_*.cpp
// (a portable reference loop now; packed, cache-blocked AVX-512 / AVX2 micro-kernels picked at run
// time are the fast path). No BLAS dependency.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace deeptaylor {

// C (M, N) = op(A) (M, K) * op(B) (K, N)  [+ C if accumulate]
//   op(A) = A (M, K) with row stride lda, or A^T where A is (K, M) with row stride lda (trans_a)
//   op(B) = B (K, N) with row stride ldb, or B^T where B is (N, K) with row stride ldb (trans_b)
// threads: number of OpenMP threads the GEMM may use internally (1 = run on the calling thread,
// which is what the engine does when it already parallelises over batch tiles).
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
           const float* A, int64_t lda, const float* B, int64_t ldb,
           float* C, int64_t ldc, bool accumulate, int threads = 1);

// A right-hand operand (K, N) packed once (e.g. a weight matrix at plan time) for repeated use.
class PackedB {
public:
    // Pack op(B) (K, N): B is (K, N) with row stride ldb, or (N, K) if trans_b.
    PackedB(const float* B, int64_t K, int64_t N, int64_t ldb, bool trans_b);
    ~PackedB();
    PackedB(const PackedB&) = delete;
    PackedB& operator=(const PackedB&) = delete;
    int64_t K() const { return K_; }
    int64_t N() const { return N_; }
    // Opaque storage owned by the implementation.
    const float* data() const { return data_.data(); }
    std::vector<float>& storage() { return data_; }

private:
    int64_t K_, N_;
    std::vector<float> data_;
};

// C (M, N) = A (M, K) * Bp (K, N) [+ C if accumulate], A row-major with row stride lda.
void sgemm_packed(int64_t M, const float* A, int64_t lda, const PackedB& Bp,
                  float* C, int64_t ldc, bool accumulate, int threads = 1);

// Name of the micro-kernel selected at run time ("avx512", "avx2" or "scalar").
const char* gemm_kernel_name();

}  // namespace deeptaylor
