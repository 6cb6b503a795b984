// Packed, cache-blocked SGEMM (Goto & van de Geijn 2008; BLIS, Van Zee & van de Geijn 2015).
//
// Loop nest for one slab of C (row-major, vectors along N, A broadcast):
//   for mc-block of rows of A           pack A (mc x kc) into MR-row micro-panels    (L3)
//     for kc-block of K
//       for nc-block of columns         pack op(B) (kc x nc) into NR-column panels  (L2)
//         for MR micro-panel of A       A micro-panel (MR x kc) stays in L1
//           for NR micro-panel of B     streamed from L2
//             micro-kernel: MR x NR tile of C in registers
// Edges: packing pads A rows and B columns with zeros; the tile functions take the valid m x n and
// store only those (masked stores / short loops). trans_a / trans_b are absorbed by the packing.
// Micro-kernels live in gemm_microkernels.cpp; the family is picked once at run time.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "deeptaylor/gemm.hpp"
#include "gemm_kernels.hpp"

#ifdef DEEPTAYLOR_HAVE_OPENMP
#include <omp.h>
#endif

namespace deeptaylor {
namespace {
using gemm_detail::Kernel;
using gemm_detail::TileFn;
using gemm_detail::SparseRowFn;
using gemm_detail::kSparsePanels;

const Kernel& kernel_of(GemmKernel k) {
#ifdef DEEPTAYLOR_GEMM_X86
    if (k == GemmKernel::Avx512) return gemm_detail::kAvx512;
    if (k == GemmKernel::Avx2) return gemm_detail::kAvx2;
#endif
    (void)k;
    return gemm_detail::kScalar;
}

bool cpu_supports(GemmKernel k) {
    switch (k) {
        case GemmKernel::Scalar: return true;
#ifdef DEEPTAYLOR_GEMM_X86
        // __builtin_cpu_supports also checks that the OS saves the ymm / zmm state (XGETBV).
        case GemmKernel::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case GemmKernel::Avx512:
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#endif
        default: return false;
    }
}

// The best supported family, lowered by DEEPTAYLOR_GEMM_KERNEL=scalar|avx2|avx512 (a request above
// what the CPU supports, or an unknown value, leaves the best one).
GemmKernel detect() {
#ifdef DEEPTAYLOR_GEMM_X86
    __builtin_cpu_init();  // in case the first GEMM runs from a static initialiser
#endif
    GemmKernel best = GemmKernel::Scalar;
    if (cpu_supports(GemmKernel::Avx2)) best = GemmKernel::Avx2;
    if (cpu_supports(GemmKernel::Avx512)) best = GemmKernel::Avx512;
    if (const char* env = std::getenv("DEEPTAYLOR_GEMM_KERNEL")) {
        const std::string v(env);
        GemmKernel want = best;
        if (v == "scalar") want = GemmKernel::Scalar;
        else if (v == "avx2") want = GemmKernel::Avx2;
        else if (v == "avx512") want = GemmKernel::Avx512;
        if (static_cast<int>(want) < static_cast<int>(best)) best = want;
    }
    return best;
}

GemmKernel resolve(GemmKernel k) {
    if (k == GemmKernel::Auto) return gemm_kernel();
    if (!cpu_supports(k))
        throw std::invalid_argument(std::string("GEMM kernel '") + gemm_kernel_name(k) +
                                    "' is not supported by this CPU (or build)");
    return k;
}

// Depth of the K blocks for a product with inner dimension K: K split into equal blocks of at most
// 1.25 kc. A fixed kc would leave a short last block (K = 400 = 384 + 16, 784 = 2 x 384 + 16), and a
// block costs a pass over C and a micro-kernel start-up whatever its depth. Packing (PackedB) and
// the driver use the same depth, so a pre-packed operand's layout matches the loops.
int64_t block_k(const Kernel& kr, int64_t K) {
    const int64_t kmax = kr.kc + kr.kc / 4;
    if (K <= kmax) return std::max<int64_t>(K, 1);
    const int64_t nb = (K + kmax - 1) / kmax;
    return (K + nb - 1) / nb;
}

// A 64-byte aligned scratch buffer, one per thread, grown on demand and reused across calls (the
// engine calls the GEMM once per layer per batch tile: no allocation in the steady state).
struct Scratch {
    float* p = nullptr;
    std::size_t cap = 0;
    float* get(std::size_t n) {
        if (n > cap) {
            release();
            p = static_cast<float*>(::operator new(n * sizeof(float), std::align_val_t(64)));
            cap = n;
        }
        return p;
    }
    void release() {
        if (p) ::operator delete(p, std::align_val_t(64));
        p = nullptr;
        cap = 0;
    }
    ~Scratch() { release(); }
};
thread_local Scratch tl_a, tl_b, tl_bfull;

// Pack rows [i0, i0+mc) x columns [p0, p0+kc) of op(A) into MR-row micro-panels:
// out[(ir / MR) * MR * kc + k * MR + r] = op(A)[i0 + ir + r, p0 + k]; rows past mc are zero.
// op(A) = A (M, K) with row stride lda, or A^T for A (K, M) if trans.
void pack_a(const float* A, int64_t lda, bool trans, int64_t i0, int64_t mc, int64_t p0, int64_t kc,
            int MR, float* out) {
    for (int64_t ir = 0; ir < mc; ir += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, mc - ir));
        float* dst = out + ir * kc;  // (ir / MR) * MR * kc
        if (!trans) {
            for (int r = 0; r < mr; ++r) {
                const float* src = A + (i0 + ir + r) * lda + p0;
                for (int64_t k = 0; k < kc; ++k) dst[k * MR + r] = src[k];
            }
            if (mr < MR)
                for (int64_t k = 0; k < kc; ++k)
                    for (int r = mr; r < MR; ++r) dst[k * MR + r] = 0.0f;
        } else {
            for (int64_t k = 0; k < kc; ++k) {
                const float* src = A + (p0 + k) * lda + i0 + ir;
                float* d = dst + k * MR;
                for (int r = 0; r < mr; ++r) d[r] = src[r];
                for (int r = mr; r < MR; ++r) d[r] = 0.0f;
            }
        }
    }
}

// Pack rows [p0, p0+kc) x columns [j0, j0+nc) of op(B) into NR-column micro-panels:
// out[(jr / NR) * NR * kc + k * NR + j] = op(B)[p0 + k, j0 + jr + j]; columns past nc are zero.
// op(B) = B (K, N) with row stride ldb, or B^T for B (N, K) if trans.
void pack_b(const float* B, int64_t ldb, bool trans, int64_t p0, int64_t kc, int64_t j0, int64_t nc,
            int NR, float* out) {
    for (int64_t jr = 0; jr < nc; jr += NR) {
        const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
        float* dst = out + jr * kc;  // (jr / NR) * NR * kc
        if (!trans) {
            for (int64_t k = 0; k < kc; ++k) {
                const float* src = B + (p0 + k) * ldb + j0 + jr;
                float* d = dst + k * NR;
                std::memcpy(d, src, sizeof(float) * static_cast<std::size_t>(nr));
                for (int j = nr; j < NR; ++j) d[j] = 0.0f;
            }
        } else {
            // A transpose: chunks of 64 k so that the chunk's destination rows (64 x NR floats) and
            // source segments (NR x 64 floats) stay in L1 while every source row is read in order.
            constexpr int64_t kChunk = 64;
            for (int64_t k0 = 0; k0 < kc; k0 += kChunk) {
                const int64_t k1 = std::min(kc, k0 + kChunk);
                for (int j = 0; j < nr; ++j) {
                    const float* src = B + (j0 + jr + j) * ldb + p0;
                    for (int64_t k = k0; k < k1; ++k) dst[k * NR + j] = src[k];
                }
                for (int64_t k = k0; k < k1; ++k)
                    for (int j = nr; j < NR; ++j) dst[k * NR + j] = 0.0f;
            }
        }
    }
}

// C (mc, nc) (+)= Ap (mc, kc) Bp (kc, nc), both packed; ir outer so one A micro-panel stays in L1
// while the B block streams from L2.
// ep (if any) runs on each finished tile while it is still in L1; (i0, j0) = C's position in the
// whole product, for the epilogue's indexing.
// ars = 0: A is the packed block Ap (MR-row micro-panels); ars > 0: A is row-major with row stride
// ars, read in place by the micro-kernel.
void macro_kernel(const Kernel& kr, int64_t mc, int64_t nc, int64_t kc, const float* A, int64_t ars,
                  const float* Bp, float* C, int64_t ldc, bool add, const GemmEpilogue* ep,
                  int64_t i0, int64_t j0, int filter) {
    const TileFn tile = kr.tile[ars > 0 ? 1 : 0][filter];
    for (int64_t ir = 0; ir < mc; ir += kr.mr) {
        const int m = static_cast<int>(std::min<int64_t>(kr.mr, mc - ir));
        const float* a = ars > 0 ? A + ir * ars : A + ir * kc;
        for (int64_t jr = 0; jr < nc; jr += kr.nr) {
            const int n = static_cast<int>(std::min<int64_t>(kr.nr, nc - jr));
            float* c = C + ir * ldc + jr;
            tile(m, n, kc, a, ars, Bp + jr * kc, c, ldc, add);
            if (ep) ep->fn(ep->ctx, i0 + ir, j0 + jr, m, n, c, ldc);
        }
    }
}

// Pack A only for wide products. Packing costs about one pass over A; the multiply about N / (2 NR)
// micro-kernel sweeps over it (each of the N / NR panels of B against every A micro-panel), so for a
// narrow op(B) (a convolution with 32-64 output channels, a Dense layer with 10 outputs) packing is a
// large share of the work and the micro-kernel reads A in place instead (its MR rows are streams the
// hardware prefetcher follows; they stay in L1/L2 across the N / NR panels). Measured:
// docs/engine.md section 7 (lenet 253 -> 217 ms per 256 images, one thread).
int64_t pack_a_min_n() {
    static const int64_t v = [] {
        const char* env = std::getenv("DEEPTAYLOR_GEMM_PACK_A_MIN_N");
        return env ? std::max<int64_t>(0, std::atoll(env)) : int64_t(256);
    }();
    return v;
}

// Where op(B) comes from: a raw matrix (packed block by block here) or a PackedB.
struct BSource {
    const float* B;
    int64_t ldb;
    bool trans;
    const float* packed;  // PackedB panels, or nullptr
    int64_t npad;         // PackedB: N rounded up to NR
    int filter = 0;       // BFilter applied by the micro-kernel
};

// One slab of C: rows [i0, i1), columns [j0, j1) (j0 a multiple of NR), on the calling thread.
void gemm_slab(const Kernel& kr, bool trans_a, const float* A, int64_t lda, const BSource& bs, int64_t K,
               int64_t i0, int64_t i1, int64_t j0, int64_t j1, float* C, int64_t ldc, bool accumulate,
               const GemmEpilogue* ep) {
    // pack_a / pack_b write whole MR-row / NR-column panels: round the block sizes up *after*
    // clipping them (kr.mc need not be a multiple of MR).
    const int64_t mcmax = ((std::min(kr.mc, i1 - i0) + kr.mr - 1) / kr.mr) * kr.mr;
    const int64_t kcb = block_k(kr, K);
    const int64_t kcmax = std::min(kcb, K);
    const int64_t ncmax = ((std::min(kr.nc, j1 - j0) + kr.nr - 1) / kr.nr) * kr.nr;
    const bool pack = trans_a || (j1 - j0) >= pack_a_min_n();
    float* Ap = pack ? tl_a.get(static_cast<std::size_t>(mcmax * kcmax)) : nullptr;
    float* Bbuf = bs.packed ? nullptr : tl_b.get(static_cast<std::size_t>(kcmax * ncmax));
    for (int64_t ic = i0; ic < i1; ic += kr.mc) {
        const int64_t mc = std::min(kr.mc, i1 - ic);
        for (int64_t pc = 0; pc < K; pc += kcb) {
            const int64_t kc = std::min(kcb, K - pc);
            const bool add = accumulate || pc > 0;
            if (pack) pack_a(A, lda, trans_a, ic, mc, pc, kc, kr.mr, Ap);
            const float* Ablk = pack ? Ap : A + ic * lda + pc;
            const int64_t ars = pack ? 0 : lda;
            for (int64_t jc = j0; jc < j1; jc += kr.nc) {
                const int64_t nc = std::min(kr.nc, j1 - jc);
                const float* Bp;
                if (bs.packed) {
                    Bp = bs.packed + pc * bs.npad + jc * kc;  // block pc, panel jc / NR
                } else {
                    pack_b(bs.B, bs.ldb, bs.trans, pc, kc, jc, nc, kr.nr, Bbuf);
                    Bp = Bbuf;
                }
                macro_kernel(kr, mc, nc, kc, Ablk, ars, Bp, C + ic * ldc + jc, ldc, add,
                             pc + kc >= K ? ep : nullptr, ic, jc, bs.filter);
            }
        }
    }
}

// Largest op(B) (floats) that a multi-threaded call packs once for all threads (32 MB).
constexpr int64_t kSharedPackMax = int64_t(8) << 20;

// Split C into slabs (row or column ranges of whole tiles) and run them on up to `threads` threads.
// Each thread writes its own part of C: no atomics, no reductions, and every element is summed in
// the same order whatever the split (results do not depend on the thread count). Row slabs need
// every thread to see all of op(B): a small enough op(B) is packed once, cooperatively, before the
// slabs start (as a PackedB); otherwise each thread packs the B blocks it needs. Column slabs (few
// rows, e.g. a small batch times a wide layer) need all of op(A): each thread packs its own copy,
// which is small then.
void gemm_driver(const Kernel& kr, bool trans_a, const float* A, int64_t lda, const BSource& bs,
                 int64_t M, int64_t N, int64_t K, float* C, int64_t ldc, bool accumulate, int threads,
                 const GemmEpilogue* ep = nullptr) {
    if (M <= 0 || N <= 0) return;
    if (ep && !ep->fn) ep = nullptr;
    if (K <= 0) {
        if (!accumulate)
            for (int64_t i = 0; i < M; ++i)
                std::memset(C + i * ldc, 0, sizeof(float) * static_cast<std::size_t>(N));
        if (ep) ep->fn(ep->ctx, 0, 0, M, N, C, ldc);
        return;
    }
    const int64_t mt = (M + kr.mr - 1) / kr.mr, nt = (N + kr.nr - 1) / kr.nr;
    // Below ~2 MFLOP a second thread costs more (wake-up, packing) than it saves.
    int T = std::max(1, threads);
    if (2.0 * double(M) * double(N) * double(K) < 2.0e6) T = 1;
    if (T == 1 || mt * nt == 1) {
        gemm_slab(kr, trans_a, A, lda, bs, K, 0, M, 0, N, C, ldc, accumulate, ep);
        return;
    }
    const int64_t npad = nt * kr.nr;
    const bool share_b = !bs.packed && mt >= 2 * T && K * npad <= kSharedPackMax;
    // Without a shared op(B), split the dimension whose operand is cheaper to pack twice.
    const bool split_rows = mt >= 2 * T && (bs.packed || share_b || M >= N || nt < T);
    const int64_t tiles = split_rows ? mt : nt;
    T = static_cast<int>(std::min<int64_t>(T, tiles));
    // Chunks: T when every chunk would pack its own copy of op(B) (row split, B not shared); otherwise
    // up to 4 per thread (>= 4 tiles each), taken dynamically, so that a thread slowed down by
    // another process on its core does not hold the whole product back (a shared machine).
    const int64_t want =
        (split_rows && !share_b) ? T : std::max<int64_t>(T, std::min<int64_t>(4 * T, tiles / 4));
    const int64_t per = (tiles + want - 1) / want;
    const int nslabs = static_cast<int>((tiles + per - 1) / per);
    BSource src = bs;
    const int64_t kcb = block_k(kr, K);
    const int64_t kblocks = (K + kcb - 1) / kcb;
    if (share_b)
        src = BSource{nullptr, 0, false, tl_bfull.get(static_cast<std::size_t>(K * npad)), npad, bs.filter};
    float* const shared = const_cast<float*>(src.packed);
    auto pack_part = [&](int64_t idx) {  // kc-block idx / nt, NR panel idx % nt of op(B)
        const int64_t pc = (idx / nt) * kcb, jp = (idx % nt) * kr.nr;
        const int64_t kc = std::min(kcb, K - pc);
        pack_b(bs.B, bs.ldb, bs.trans, pc, kc, jp, std::min<int64_t>(kr.nr, N - jp), kr.nr,
               shared + pc * npad + jp * kc);
    };
    auto run = [&](int s) {
        const int64_t t0 = s * per, t1 = std::min(tiles, t0 + per);
        if (split_rows)
            gemm_slab(kr, trans_a, A, lda, src, K, t0 * kr.mr, std::min(M, t1 * kr.mr), 0, N, C, ldc,
                      accumulate, ep);
        else
            gemm_slab(kr, trans_a, A, lda, src, K, 0, M, t0 * kr.nr, std::min(N, t1 * kr.nr), C, ldc,
                      accumulate, ep);
    };
#ifdef DEEPTAYLOR_HAVE_OPENMP
#pragma omp parallel num_threads(T)
    {
        if (share_b) {
#pragma omp for schedule(static)
            for (int64_t idx = 0; idx < kblocks * nt; ++idx) pack_part(idx);
        }  // implicit barrier: op(B) is packed before any slab reads it
#pragma omp for schedule(dynamic, 1)
        for (int s = 0; s < nslabs; ++s) run(s);
    }
#else
    if (share_b)
        for (int64_t idx = 0; idx < kblocks * nt; ++idx) pack_part(idx);
    for (int s = 0; s < nslabs; ++s) run(s);
#endif
}

// Rows of A per sparse-or-dense decision (sgemm_packed_sparse_a): a multiple of every MR.
constexpr int64_t kSparseChunk = 96;
constexpr int64_t kSparseMinK = 32;

// Nonzeros of a chunk of rows of A, in CSR by K block: for row r and block b, entries
// [ptr[r * (nb + 1) + b], ptr[r * (nb + 1) + b + 1]) of idx (k - the block's start) and val.
struct SparseRows {
    std::vector<int32_t> ptr, idx;
    std::vector<float> val;
};
thread_local SparseRows tl_sparse;

// sgemm_packed_sparse_a on rows [i0, i1) (one chunk), on the calling thread.
void sparse_chunk(const Kernel& kr, const float* A, int64_t lda, const BSource& bs, int64_t N, int64_t K,
                  int64_t i0, int64_t i1, float* C, int64_t ldc, bool accumulate, double max_density) {
    const int64_t rows = i1 - i0;
    // A quick estimate from every 8th row first: a clearly dense chunk goes to the dense kernels
    // without paying for the compression.
    {
        int64_t sn = 0, sr = 0;
        for (int64_t i = i0; i < i1; i += 8, ++sr) {
            const float* a = A + i * lda;
            int64_t c = 0;
            for (int64_t k = 0; k < K; ++k) c += a[k] != 0.0f;
            sn += c;
        }
        if (double(sn) > 1.5 * max_density * double(sr) * double(K)) {
            gemm_slab(kr, false, A, lda, bs, K, i0, i1, 0, N, C, ldc, accumulate, nullptr);
            return;
        }
    }
    const int64_t kcb = block_k(kr, K), nb = (K + kcb - 1) / kcb;
    SparseRows& sp = tl_sparse;
    sp.ptr.resize(static_cast<size_t>(rows * (nb + 1)));
    if (sp.idx.size() < static_cast<size_t>(rows * K + 16)) {  // + 16: CompressFn's slack
        sp.idx.resize(static_cast<size_t>(rows * K + 16));
        sp.val.resize(static_cast<size_t>(rows * K + 16));
    }
    int32_t* idx = sp.idx.data();
    float* val = sp.val.data();
    int64_t t = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float* a = A + (i0 + r) * lda;
        int32_t* ptr = sp.ptr.data() + r * (nb + 1);
        for (int64_t b = 0; b < nb; ++b) {
            ptr[b] = static_cast<int32_t>(t);
            const int64_t k0 = b * kcb, k1 = std::min(K, k0 + kcb);
            t += kr.compress(a + k0, k1 - k0, 0, idx + t, val + t);
        }
        ptr[nb] = static_cast<int32_t>(t);
    }
    if (double(t) > max_density * double(rows) * double(K)) {
        gemm_slab(kr, false, A, lda, bs, K, i0, i1, 0, N, C, ldc, accumulate, nullptr);
        return;
    }
    const SparseRowFn fn = kr.sparse[bs.filter];
    const int64_t G = int64_t(kSparsePanels) * kr.nr;
    for (int64_t b = 0; b < nb; ++b) {
        const int64_t pc = b * kcb, kc = std::min(kcb, K - pc);
        const float* Bblk = bs.packed + pc * bs.npad;
        const bool add = accumulate || b > 0;
        for (int64_t j0 = 0; j0 < N; j0 += G) {
            const int n = static_cast<int>(std::min(G, N - j0));
            fn(n, kc, Bblk + j0 * kc, rows, sp.ptr.data() + b, nb + 1, idx, val, C + i0 * ldc + j0, ldc, add);
        }
    }
}


}  // namespace

GemmKernel gemm_kernel() {
    static const GemmKernel k = detect();
    return k;
}

bool gemm_kernel_supported(GemmKernel kernel) {
    return kernel == GemmKernel::Auto || cpu_supports(kernel);
}

const char* gemm_kernel_name(GemmKernel kernel) {
    switch (kernel) {
        case GemmKernel::Scalar: return "scalar";
        case GemmKernel::Avx2: return "avx2";
        case GemmKernel::Avx512: return "avx512";
        default: return gemm_kernel_name();
    }
}

const char* gemm_kernel_name() { return gemm_kernel_name(gemm_kernel()); }

void sgemm_with(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                const float* A, int64_t lda, const float* B, int64_t ldb,
                float* C, int64_t ldc, bool accumulate, int threads) {
    const Kernel& kr = kernel_of(resolve(kernel));
    gemm_driver(kr, trans_a, A, lda, BSource{B, ldb, trans_b, nullptr, 0, 0}, M, N, K, C, ldc, accumulate,
                threads);
}

void sgemm_epilogue(GemmKernel kernel, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                    bool accumulate, int threads, const GemmEpilogue& epilogue) {
    const Kernel& kr = kernel_of(resolve(kernel));
    gemm_driver(kr, trans_a, A, lda, BSource{B, ldb, trans_b, nullptr, 0, 0}, M, N, K, C, ldc, accumulate,
                threads, &epilogue);
}

void sgemm_packed_epilogue(int64_t M, const float* A, int64_t lda, const PackedB& Bp, float* C,
                           int64_t ldc, bool accumulate, int threads, const GemmEpilogue& epilogue,
                           BFilter filter) {
    const Kernel& kr = kernel_of(Bp.kernel());
    const int64_t npad = (Bp.N() + kr.nr - 1) / kr.nr * kr.nr;
    gemm_driver(kr, false, A, lda,
                BSource{nullptr, 0, false, Bp.panels(), npad, static_cast<int>(filter)}, M, Bp.N(),
                Bp.K(), C, ldc, accumulate, threads, &epilogue);
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
           const float* A, int64_t lda, const float* B, int64_t ldb,
           float* C, int64_t ldc, bool accumulate, int threads) {
    gemm_driver(kernel_of(gemm_kernel()), trans_a, A, lda, BSource{B, ldb, trans_b, nullptr, 0, 0}, M, N, K,
                C, ldc, accumulate, threads);
}

// Layout: for each K block p (all but the last have block_k(K) rows), the NR-column panels of
// op(B)[p-block, :] one after another; block p starts at p * kc * npad (npad = N rounded up to NR),
// so any run of whole panels of one block is contiguous, exactly as pack_b writes them.
PackedB::PackedB(const float* B, int64_t K, int64_t N, int64_t ldb, bool trans_b)
    : PackedB(B, K, N, ldb, trans_b, GemmKernel::Auto) {}

PackedB::PackedB(const float* B, int64_t K, int64_t N, int64_t ldb, bool trans_b, GemmKernel kernel)
    : K_(K), N_(N), kernel_(resolve(kernel)) {
    const Kernel& kr = kernel_of(kernel_);
    const int64_t npad = std::max<int64_t>(0, (N + kr.nr - 1) / kr.nr) * kr.nr;
    const int64_t total = std::max<int64_t>(0, K) * npad;
    data_.resize(static_cast<std::size_t>(total) + 16);
    const auto addr = reinterpret_cast<std::uintptr_t>(data_.data());
    offset_ = static_cast<int64_t>(((64 - addr % 64) % 64) / sizeof(float));
    float* out = data_.data() + offset_;
    const int64_t kcb = block_k(kr, K);
    for (int64_t pc = 0; pc < K; pc += kcb) {
        const int64_t kc = std::min(kcb, K - pc);
        pack_b(B, ldb, trans_b, pc, kc, 0, N, kr.nr, out + pc * npad);
    }
}

PackedB::~PackedB() = default;

void sgemm_packed(int64_t M, const float* A, int64_t lda, const PackedB& Bp,
                  float* C, int64_t ldc, bool accumulate, int threads, BFilter filter) {
    const Kernel& kr = kernel_of(Bp.kernel());
    const int64_t npad = (Bp.N() + kr.nr - 1) / kr.nr * kr.nr;
    gemm_driver(kr, false, A, lda,
                BSource{nullptr, 0, false, Bp.panels(), npad, static_cast<int>(filter)}, M, Bp.N(),
                Bp.K(), C, ldc, accumulate, threads);
}

double sparse_a_density() {
    static const double v = [] {
        const char* env = std::getenv("DEEPTAYLOR_SPARSE_DENSITY");
        return env ? std::max(0.0, std::atof(env)) : kSparseDensityDefault;
    }();
    return v;
}

void sgemm_packed_sparse_a(int64_t M, const float* A, int64_t lda, const PackedB& Bp, float* C, int64_t ldc,
                           bool accumulate, int threads, BFilter filter, double max_density) {
    const Kernel& kr = kernel_of(Bp.kernel());
    const int64_t N = Bp.N(), K = Bp.K();
    const int64_t npad = (N + kr.nr - 1) / kr.nr * kr.nr;
    const BSource bs{nullptr, 0, false, Bp.panels(), npad, static_cast<int>(filter)};
    if (max_density < 0.0) max_density = sparse_a_density();
    // Below 32 terms per row the sparse kernel's per-row work outweighs what it skips (measured:
    // lenet's first convolution, K = 25, is never faster sparse).
    if (M <= 0 || N <= 0 || K < kSparseMinK || max_density <= 0.0) {
        gemm_driver(kr, false, A, lda, bs, M, N, K, C, ldc, accumulate, threads);
        return;
    }
    const int64_t chunks = (M + kSparseChunk - 1) / kSparseChunk;
    int T = std::max(1, threads);
    if (2.0 * double(M) * double(N) * double(K) < 2.0e6) T = 1;
    T = static_cast<int>(std::min<int64_t>(T, chunks));
    auto run = [&](int64_t c) {
        const int64_t i0 = c * kSparseChunk;
        sparse_chunk(kr, A, lda, bs, N, K, i0, std::min(M, i0 + kSparseChunk), C, ldc, accumulate, max_density);
    };
#ifdef DEEPTAYLOR_HAVE_OPENMP
    if (T > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(T)
        for (int64_t c = 0; c < chunks; ++c) run(c);
        return;
    }
#endif
    for (int64_t c = 0; c < chunks; ++c) run(c);
}

}  // namespace deeptaylor
