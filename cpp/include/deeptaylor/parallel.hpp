// Small helpers shared by the executor (engine_cpu.cpp) and the generic linear ops (linear_generic.cpp).
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace deeptaylor {

// num / den, or 0 where den == 0: a unit with a zero denominator passes no relevance (the reference's
// safe_divide).
inline float safe_div(float num, float den) { return den != 0.0f ? num / den : 0.0f; }

// f(begin, end) over [0, n), split into contiguous ranges across gth threads; serial when gth == 1
// (the parallel-over-tiles path, which must not nest) or when there is too little to split.
template <class F>
void split(int64_t n, int gth, const F& f) {
    if (gth <= 1 || n < 2 * gth) {
        f(int64_t{0}, n);
        return;
    }
#pragma omp parallel num_threads(gth)
    {
        int64_t nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        f(n * id / nt, n * (id + 1) / nt);
    }
}

}  // namespace deeptaylor
