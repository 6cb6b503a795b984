// Conv strategy measurement (docs/engine.md): forward convolution by im2col + packed SGEMM (what
// the engine does) vs a direct channels-last convolution (output channels innermost, AVX2+FMA),
// single thread, best of 7. Not part of the build; compile from the repository root (one command):
//   g++ -O3 -std=c++17 -fopenmp -Icpp/include -Icpp/src cpp/tools/conv_strategy_bench.cpp
//       cpp/src/gemm*.cpp cpp/src/ops_window.cpp -o /tmp/conv_strategy_bench
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
#include "deeptaylor/gemm.hpp"
#include "deeptaylor/ops.hpp"
using namespace deeptaylor;
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// out (T*P, O) = direct conv of a (T,H,W,C) with Wt (Kc, O) [tap-major, c, then O contiguous]
__attribute__((target("avx2,fma")))
void direct(const float* a, const Geom& g, int64_t T, const float* Wt, float* out) {
    const int64_t O = g.O, C = g.C;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t oy = 0; oy < g.OH; ++oy)
            for (int64_t ox = 0; ox < g.OW; ++ox) {
                float* o = out + ((t * g.OH + oy) * g.OW + ox) * O;
                for (int64_t k = 0; k < O; ++k) o[k] = 0;
                for (int64_t i = 0; i < g.kh; ++i) {
                    const int64_t iy = oy - g.pt + i;
                    if (iy < 0 || iy >= g.H) continue;
                    for (int64_t j = 0; j < g.kw; ++j) {
                        const int64_t ix = ox - g.pl + j;
                        if (ix < 0 || ix >= g.W) continue;
                        const float* src = a + ((t * g.H + iy) * g.W + ix) * C;
                        const float* w = Wt + (i * g.kw + j) * C * O;
                        for (int64_t c = 0; c < C; ++c) {
                            const float v = src[c];
                            const float* wr = w + c * O;
                            for (int64_t k = 0; k < O; ++k) o[k] += v * wr[k];
                        }
                    }
                }
            }
}

int main() {
    struct Case { const char* name; int64_t C, H, O, k, pad; } cases[] = {{"lenet conv1 1x28x28 -> 32, 5x5", 1, 28, 32, 5, 0},
                                                                          {"lenet conv2 32x12x12 -> 64, 5x5", 32, 12, 64, 5, 0},
                                                                          {"vgg-ish 64x32x32 -> 64, 3x3 pad1", 64, 32, 64, 3, 1}};
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    const int64_t T = 32;
    for (auto& cs : cases) {
        Geom g;
        g.C = cs.C; g.H = g.W = cs.H; g.O = cs.O; g.kh = g.kw = cs.k; g.pt = g.pb = g.pl = g.pr = cs.pad;
        g.OH = g.OW = cs.H + 2 * cs.pad - cs.k + 1;
        const int64_t Kc = g.Kc(), rows = T * g.P();
        std::vector<float> a(T * g.in_size()), Wm(g.O * Kc), Wt(Kc * g.O), out1(rows * g.O), out2(rows * g.O);
        for (auto& v : a) v = nd(rng);
        for (auto& v : Wm) v = nd(rng);
        for (int64_t o = 0; o < g.O; ++o) for (int64_t k = 0; k < Kc; ++k) Wt[k * g.O + o] = Wm[o * Kc + k];
        PackedB pb(Wm.data(), Kc, g.O, Kc, true);
        const int64_t RB = std::max<int64_t>(8, (1 << 17) / Kc);
        std::vector<float> col(RB * Kc);
        double best1 = 1e9, best2 = 1e9, bestc = 1e9;
        for (int rep = 0; rep < 7; ++rep) {
            double t0 = now(), tc = 0;
            for (int64_t r0 = 0; r0 < rows; r0 += RB) {
                const int64_t m = std::min(RB, rows - r0);
                double c0 = now();
                im2col_rows(a.data(), g, r0, r0 + m, col.data());
                tc += now() - c0;
                sgemm_packed(m, col.data(), Kc, pb, out1.data() + r0 * g.O, g.O, false, 1);
            }
            best1 = std::min(best1, now() - t0);
            bestc = std::min(bestc, tc);
            t0 = now();
            direct(a.data(), g, T, Wt.data(), out2.data());
            best2 = std::min(best2, now() - t0);
        }
        double md = 0, mx = 0;
        for (size_t i = 0; i < out1.size(); ++i) { md = std::max<double>(md, std::abs(out1[i] - out2[i])); mx = std::max<double>(mx, std::abs(out1[i])); }
        const double gf = 2.0 * rows * Kc * g.O * 1e-9;
        std::printf("%-36s T=%ld  im2col+GEMM %7.2f ms (%5.1f GFLOP/s, im2col %4.1f ms)  direct %7.2f ms (%5.1f GFLOP/s)  maxdiff %.1e\n",
                    cs.name, (long)T, best1 * 1e3, gf / best1, bestc * 1e3, best2 * 1e3, gf / best2, md / mx);
    }
    std::printf("gemm kernel: %s\n", gemm_kernel_name());
}
