// deeptaylor SGEMM interface (row-major, float32).
//
// The engine only calls what is declared here; implementations live in cpp/src/gemm*.cpp: a
// BLIS-style packed, cache-blocked GEMM (Goto & van de Geijn 2008; Van Zee & van de Geijn 2015) with
// AVX-512 and AVX2+FMA micro-kernels picked at run time, a portable packed kernel ("scalar") for
// other CPUs, and the plain loop `sgemm_reference` kept as the oracle. No BLAS dependency.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

namespace deeptaylor {

// A filter on the right-hand operand, applied by the micro-kernel as it loads B: op(B) as stored,
// its positive part max(B, 0) or its negative part min(B, 0). One packed W then serves the rules'
// W, W+ and W- products (z+, zB) without packing a copy of each (half the plan's weight memory).
enum class BFilter : int { None = 0, Pos = 1, Neg = 2 };

// Micro-kernel families. Auto = the best one this CPU supports (or DEEPTAYLOR_GEMM_KERNEL).
enum class GemmKernel : int { Auto = -1, Scalar = 0, Avx2 = 1, Avx512 = 2 };

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
    // Same, packed for a given micro-kernel family (tests; Auto = the selected one).
    PackedB(const float* B, int64_t K, int64_t N, int64_t ldb, bool trans_b, GemmKernel kernel);
    ~PackedB();
    PackedB(const PackedB&) = delete;
    PackedB& operator=(const PackedB&) = delete;
    int64_t K() const { return K_; }
    int64_t N() const { return N_; }
    // Opaque storage owned by the implementation (panels of the packed layout, see gemm.cpp).
    const float* data() const { return data_.data(); }
    std::vector<float>& storage() { return data_; }
    // The micro-kernel family this operand was packed for (sgemm_packed uses it).
    GemmKernel kernel() const { return kernel_; }
    // First packed float: storage() start rounded up to a 64-byte boundary.
    const float* panels() const { return data_.data() + offset_; }

private:
    int64_t K_, N_;
    std::vector<float> data_;
    GemmKernel kernel_ = GemmKernel::Scalar;
    int64_t offset_ = 0;
};

// C (M, N) = A (M, K) * f(Bp) (K, N) [+ C if accumulate], A row-major with row stride lda,
// f = the filter (identity by default).
void sgemm_packed(int64_t M, const float* A, int64_t lda, const PackedB& Bp,
                  float* C, int64_t ldc, bool accumulate, int threads = 1,
                  BFilter filter = BFilter::None);

// sgemm_packed skipping the zeros of A: the rows of A (in chunks of 96) whose share of nonzeros is at
// most max_density go through a sparse kernel (for each nonzero a_ik, C_i += a_ik f(B_k)), the others
// through the dense micro-kernels. Bitwise the same C as sgemm_packed whatever the mix (the same FMA
// chain per element, in k order from zero: a zero of A adds +-0 and changes nothing), and independent
// of the thread count. For the relevance passes' transposed products, whose left operand is zero
// wherever a ReLU was off or a max-pool lost (docs/engine.md "Sparse transposed products").
// max_density < 0: sparse_a_density(); 0: always dense.
void sgemm_packed_sparse_a(int64_t M, const float* A, int64_t lda, const PackedB& Bp, float* C, int64_t ldc,
                           bool accumulate, int threads = 1, BFilter filter = BFilter::None,
                           double max_density = -1.0);
// The default density threshold: DEEPTAYLOR_SPARSE_DENSITY, or kSparseDensityDefault.
constexpr double kSparseDensityDefault = 0.35;
double sparse_a_density();

// Name of the micro-kernel selected at run time ("avx512", "avx2" or "scalar").
const char* gemm_kernel_name();

// --- additions beyond the engine's interface (tests, benchmarks) ---

// The selected family (DEEPTAYLOR_GEMM_KERNEL=scalar|avx2|avx512 may lower it; never above what the
// CPU supports) and whether a family can run on this CPU.
GemmKernel gemm_kernel();
bool gemm_kernel_supported(GemmKernel kernel);
const char* gemm_kernel_name(GemmKernel kernel);

// sgemm with a given micro-kernel family (Auto = the selected one); same arguments as sgemm.
void sgemm_with(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                const float* A, int64_t lda, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool accumulate, int threads = 1);

// A fused epilogue: fn(ctx, i0, j0, m, n, C, ldc) is called exactly once for every element of the
// product, on blocks of finished results (all of K summed, accumulate applied) while they are still
// in cache: C points to element (i0, j0) of the whole C, the block is m x n with row stride ldc.
// Typical use: bias + ReLU after a forward product, a (.) c after a relevance product. With
// threads > 1 it is called concurrently on disjoint blocks; it must not touch other elements.
struct GemmEpilogue {
    void (*fn)(void* ctx, int64_t i0, int64_t j0, int64_t m, int64_t n, float* C, int64_t ldc) = nullptr;
    void* ctx = nullptr;
};

// sgemm_with / sgemm_packed followed by the epilogue on every finished block.
void sgemm_epilogue(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                    bool accumulate, int threads, const GemmEpilogue& epilogue);
void sgemm_packed_epilogue(int64_t M, const float* A, int64_t lda, const PackedB& Bp, float* C,
                           int64_t ldc, bool accumulate, int threads, const GemmEpilogue& epilogue,
                           BFilter filter = BFilter::None);

// The plain-loop oracle (i-k-j order); same arguments as sgemm.
void sgemm_reference(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                     const float* A, int64_t lda, const float* B, int64_t ldb,
                     float* C, int64_t ldc, bool accumulate, int threads = 1);

}  // namespace deeptaylor
