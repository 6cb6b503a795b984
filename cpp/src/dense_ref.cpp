// Plain-loop reference kernels for dense layers. OpenMP over the batch rows each loop *writes*
// (no atomics, results independent of the thread count).
#include "deeptaylor/kernels.hpp"

#include <cstddef>
#include <vector>

namespace deeptaylor {

void dense_forward(const float* x, const float* w, const float* b, float* out,
                   int64_t N, int64_t I, int64_t O) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const float* xn = x + n * I;
        for (int64_t o = 0; o < O; ++o) {
            const float* wo = w + o * I;
            float acc = 0.0f;
            for (int64_t i = 0; i < I; ++i) acc += xn[i] * wo[i];
            out[n * O + o] = acc + (b ? b[o] : 0.0f);
        }
    }
}

void dense_zplus_relevance(const float* a, const float* w, const float* R, float* Rin,
                           int64_t N, int64_t I, int64_t O) {
#pragma omp parallel
    {
        std::vector<float> s(static_cast<std::size_t>(O));
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; ++n) {
            const float* an = a + n * I;
            for (int64_t o = 0; o < O; ++o) {
                const float* wo = w + o * I;
                float z = 0.0f;
                for (int64_t i = 0; i < I; ++i) {
                    const float c = an[i] * wo[i];
                    z += c > 0.0f ? c : 0.0f;
                }
                s[o] = z != 0.0f ? R[n * O + o] / z : 0.0f;
            }
            float* rn = Rin + n * I;
            for (int64_t i = 0; i < I; ++i) {
                const float ai = an[i];
                float c = 0.0f;
                for (int64_t o = 0; o < O; ++o) {
                    const float wv = w[o * I + i];
                    // (a w)+ selects w+ for a > 0 and w- for a < 0
                    if ((ai > 0.0f && wv > 0.0f) || (ai < 0.0f && wv < 0.0f)) c += wv * s[o];
                }
                rn[i] = ai * c;
            }
        }
    }
}

void dense_wsquare_relevance(const float* w, const float* R, float* Rin,
                             int64_t N, int64_t I, int64_t O) {
    std::vector<float> inv(static_cast<std::size_t>(O));
    for (int64_t o = 0; o < O; ++o) {
        double z = 0.0;
        for (int64_t i = 0; i < I; ++i) z += static_cast<double>(w[o * I + i]) * w[o * I + i];
        inv[o] = z != 0.0 ? static_cast<float>(1.0 / z) : 0.0f;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        float* rn = Rin + n * I;
        for (int64_t i = 0; i < I; ++i) rn[i] = 0.0f;
        for (int64_t o = 0; o < O; ++o) {
            const float s = R[n * O + o] * inv[o];
            const float* wo = w + o * I;
            for (int64_t i = 0; i < I; ++i) rn[i] += wo[i] * wo[i] * s;
        }
    }
}

void global_sum_relevance(const float* a, const float* R, float* Rin, int64_t N, int64_t F) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const float* an = a + n * F;
        double z = 0.0;
        for (int64_t i = 0; i < F; ++i) z += an[i];
        const float s = z != 0.0 ? static_cast<float>(R[n] / z) : 0.0f;
        for (int64_t i = 0; i < F; ++i) Rin[n * F + i] = an[i] * s;
    }
}

}  // namespace deeptaylor
