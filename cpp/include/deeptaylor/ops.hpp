// Layout and window kernels of the engine, channels-last. All run on the calling thread; the engine
// splits im2col rows and col2im channels across threads when it runs one tile at a time.
#pragma once
#include <cstdint>

#include "deeptaylor/plan.hpp"

// Hot element-wise loops compiled for AVX-512 and AVX2 as well as the baseline ISA; the loader picks
// the best for the CPU (GCC function multi-versioning, x86-64 only; elsewhere one baseline version).
// Every version computes the same IEEE operations per element: results do not depend on the CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DT_CLONES
#endif

namespace deeptaylor {

// src (T, C, H, W) -> dst (T, H, W, C)
void nchw_to_nhwc(const float* src, float* dst, int64_t T, int64_t C, int64_t H, int64_t W);
// src (T, H, W, C) -> dst (T, C, H, W)
void nhwc_to_nchw(const float* src, float* dst, int64_t T, int64_t C, int64_t H, int64_t W);

// Rows [r0, r1) of the im2col matrix of a (T, H, W, C): row r = (t, oy, ox) with t = r / P,
// columns (i, j, c); taps in the zero padding are 0. col is (r1 - r0, Kc).
void im2col_rows(const float* a, const Geom& g, int64_t r0, int64_t r1, float* col);
// Transpose of im2col_rows: img (T, H, W, C) += scatter of col (r1 - r0, Kc); padding taps dropped.
// Only channels [c0, c1) are touched (c1 < 0: all), so threads may split the channels without
// write conflicts.
void col2im_add_rows(const float* col, const Geom& g, int64_t r0, int64_t r1, float* img, int64_t c0 = 0,
                     int64_t c1 = -1);

// Window sum with zero padding: a (T, H, W, C) -> out (T, OH, OW, C).
void window_sum(const float* a, const Geom& g, int64_t T, float* out);
// Transpose of window_sum: img (T, H, W, C) = every input's sum of the outputs y covering it.
void window_scatter(const float* y, const Geom& g, int64_t T, float* img);
// Max pooling (-inf padding): out (T, OH, OW, C) and the winning tap (first maximum in row-major
// tap order, as PyTorch) in arg (T, OH, OW, C).
void maxpool_forward(const float* a, const Geom& g, int64_t T, float* out, int32_t* arg);
// img (T, H, W, C) = winner-take-all scatter of y (T, OH, OW, C) through arg.
void maxpool_scatter(const float* y, const int32_t* arg, const Geom& g, int64_t T, float* img);

}  // namespace deeptaylor

namespace deeptaylor {

// ---- graph ops (ops_graph.cpp), channels-last, T samples; "acc": add into dst instead of writing ----

// y = f(a) element-wise (PyTorch's definitions; param: LeakyReLU slope, ELU alpha, GELU 1 = tanh approx).
void act_forward(ActFn f, float param, const float* a, float* y, int64_t n);
// gin = g * f'(a), PyTorch's conventions at the kinks (gin may be g itself).
void act_gradient(ActFn f, float param, const float* a, const float* g, float* gin, int64_t n);

// AdaptiveAvgPool2d windows: sum over window (rows[2 oy], rows[2 oy + 1]) x (cols[2 ox], ...).
// a (T, H, W, C) -> out (T, OH, OW, C); mean: divided by the window's size.
void adaptive_sum(const float* a, const Shape& in, const Shape& out, const int64_t* rows, const int64_t* cols,
                  int64_t T, float* dst, bool mean);
// Transpose: img (T, H, W, C) = sum of y (or y / window size when mean) over the windows covering it.
void adaptive_scatter(const float* y, const Shape& in, const Shape& out, const int64_t* rows, const int64_t* cols,
                      int64_t T, float* img, bool mean);

// Nearest upsampling by integer (sh, sw): a (T, H, W, C) -> out (T, H sh, W sw, C).
void upsample_forward(const float* a, const Shape& in, int64_t sh, int64_t sw, int64_t T, float* out);
// Transpose: img (T, H, W, C) (=|+=) sum of its sh x sw copies in y.
void upsample_sum(const float* y, const Shape& in, int64_t sh, int64_t sw, int64_t T, float* img, bool acc);

// ChannelShuffle (groups g): out channel j g + i = in channel i (C / g) + j, per pixel.
void shuffle_forward(const float* a, int64_t C, int64_t g, int64_t pixels, float* out);
// Inverse permutation: img (=|+=) unshuffled y.
void shuffle_backward(const float* y, int64_t C, int64_t g, int64_t pixels, float* img, bool acc);

// Channel block copy: dst[p, d0 + c] (=|+=) src[p, s0 + c] for c < n, per pixel (pixels rows),
// src rows of sC channels, dst rows of dC channels (Concat, Slice).
void channel_copy(const float* src, int64_t sC, int64_t s0, float* dst, int64_t dC, int64_t d0, int64_t n,
                  int64_t pixels, bool acc);

}  // namespace deeptaylor

namespace deeptaylor {

// ---- element-wise kernels of the relevance passes (ops_elementwise.cpp) ----

// out[k] = num[k] / den[k], or 0 where den[k] == 0 (safe_div, vectorised: AVX-512 masks the division).
void safe_div_n(const float* num, const float* den, float* out, int64_t n);
// out[k] = num[k] / (a[k] - b[k]), or 0 where a[k] - b[k] == 0.
void safe_div_diff_n(const float* num, const float* a, const float* b, float* out, int64_t n);

}  // namespace deeptaylor
