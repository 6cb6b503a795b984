// Element-wise kernels of the relevance passes (ops.hpp), multi-versioned (DT_CLONES): the engine's
// translation unit is compiled for the baseline ISA, where a conditional division does not vectorise
// (it may not be speculated); with AVX-512 the compiler masks it.
#include "deeptaylor/ops.hpp"
#include "deeptaylor/parallel.hpp"

namespace deeptaylor {

DT_CLONES void safe_div_n(const float* __restrict num, const float* __restrict den, float* __restrict out,
                          int64_t n) {
    for (int64_t k = 0; k < n; ++k) out[k] = safe_div(num[k], den[k]);
}

DT_CLONES void safe_div_diff_n(const float* __restrict num, const float* __restrict a, const float* __restrict b,
                               float* __restrict out, int64_t n) {
    for (int64_t k = 0; k < n; ++k) out[k] = safe_div(num[k], a[k] - b[k]);
}

}  // namespace deeptaylor
