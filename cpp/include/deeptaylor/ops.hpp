// Layout and window kernels of the engine, channels-last. All run on the calling thread; the engine
// splits im2col rows and col2im channels across threads when it runs one tile at a time.
#pragma once
#include <cstdint>

#include "deeptaylor/plan.hpp"

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
