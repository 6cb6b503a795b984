// Layout and window kernels (channels-last). Plain loops on the calling thread; see ops.hpp.
#include <algorithm>
#include <cstring>
#include <limits>

#include "deeptaylor/ops.hpp"

namespace deeptaylor {

void nchw_to_nhwc(const float* src, float* dst, int64_t T, int64_t C, int64_t H, int64_t W) {
    const int64_t HW = H * W;
    for (int64_t t = 0; t < T; ++t) {
        const float* s = src + t * C * HW;
        float* d = dst + t * C * HW;
        for (int64_t c = 0; c < C; ++c)
            for (int64_t p = 0; p < HW; ++p) d[p * C + c] = s[c * HW + p];
    }
}

void nhwc_to_nchw(const float* src, float* dst, int64_t T, int64_t C, int64_t H, int64_t W) {
    const int64_t HW = H * W;
    for (int64_t t = 0; t < T; ++t) {
        const float* s = src + t * C * HW;
        float* d = dst + t * C * HW;
        for (int64_t p = 0; p < HW; ++p)
            for (int64_t c = 0; c < C; ++c) d[c * HW + p] = s[p * C + c];
    }
}

// Valid kernel columns j in [j0, j1) for output column ox: 0 <= ox*sw - pl + j*dw < W.
static inline void valid_taps(int64_t ox, const Geom& g, int64_t& j0, int64_t& j1) {
    const int64_t x0 = ox * g.sw - g.pl;  // input column of tap 0
    j0 = x0 >= 0 ? 0 : (-x0 + g.dw - 1) / g.dw;
    j1 = x0 >= g.W ? 0 : std::min<int64_t>(g.kw, (g.W - 1 - x0) / g.dw + 1);
    if (j1 < j0) j1 = j0;
}

void im2col_rows(const float* a, const Geom& g, int64_t r0, int64_t r1, float* col) {
    const int64_t P = g.P(), Kc = g.Kc(), C = g.C, rowlen = g.kw * C;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / P, p = r % P, oy = p / g.OW, ox = p % g.OW;
        const float* img = a + t * g.in_size();
        float* row = col + (r - r0) * Kc;
        int64_t j0, j1;
        valid_taps(ox, g, j0, j1);
        const int64_t x0 = ox * g.sw - g.pl;
        for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t iy = oy * g.sh - g.pt + i * g.dh;
            float* dst = row + i * rowlen;
            if (iy < 0 || iy >= g.H || j1 == j0) {
                for (int64_t k = 0; k < rowlen; ++k) dst[k] = 0.0f;
                continue;
            }
            for (int64_t k = 0; k < j0 * C; ++k) dst[k] = 0.0f;
            const float* src = img + iy * g.W * C;  // input row iy; tap j reads column x0 + j*dw
            if (g.dw == 1) {  // the valid taps of a kernel row are one contiguous run of the input
                const float* s = src + (x0 + j0) * C;
                float* d = dst + j0 * C;
                const int64_t n = (j1 - j0) * C;
                for (int64_t k = 0; k < n; ++k) d[k] = s[k];
            } else {
                for (int64_t j = j0; j < j1; ++j) {
                    const float* s = src + (x0 + j * g.dw) * C;
                    float* d = dst + j * C;
                    for (int64_t c = 0; c < C; ++c) d[c] = s[c];
                }
            }
            for (int64_t k = j1 * C; k < rowlen; ++k) dst[k] = 0.0f;
        }
    }
}

// DT_CLONES: the scatter-adds are long runs of d[k] += s[k]
DT_CLONES void col2im_add_rows(const float* col, const Geom& g, int64_t r0, int64_t r1, float* img_all,
                               int64_t c0, int64_t c1) {
    const int64_t P = g.P(), Kc = g.Kc(), C = g.C, rowlen = g.kw * C;
    if (c1 < 0) c1 = C;
    const bool all = c0 == 0 && c1 == C;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / P, p = r % P, oy = p / g.OW, ox = p % g.OW;
        float* img = img_all + t * g.in_size();
        const float* row = col + (r - r0) * Kc;
        int64_t j0, j1;
        valid_taps(ox, g, j0, j1);
        if (j1 == j0) continue;
        const int64_t x0 = ox * g.sw - g.pl;
        for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t iy = oy * g.sh - g.pt + i * g.dh;
            if (iy < 0 || iy >= g.H) continue;
            const float* src = row + i * rowlen;
            float* dst = img + iy * g.W * C;
            if (g.dw == 1 && all) {
                const float* s = src + j0 * C;
                float* d = dst + (x0 + j0) * C;
                const int64_t n = (j1 - j0) * C;
                for (int64_t k = 0; k < n; ++k) d[k] += s[k];
            } else {
                for (int64_t j = j0; j < j1; ++j) {
                    const float* s = src + j * C;
                    float* d = dst + (x0 + j * g.dw) * C;
                    for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
                }
            }
        }
    }
}

void window_sum(const float* a, const Geom& g, int64_t T, float* out) {
    const int64_t C = g.C;
    for (int64_t t = 0; t < T; ++t) {
        const float* img = a + t * g.in_size();
        for (int64_t oy = 0; oy < g.OH; ++oy)
            for (int64_t ox = 0; ox < g.OW; ++ox) {
                float* o = out + ((t * g.OH + oy) * g.OW + ox) * C;
                for (int64_t c = 0; c < C; ++c) o[c] = 0.0f;
                for (int64_t i = 0; i < g.kh; ++i) {
                    const int64_t iy = oy * g.sh - g.pt + i;
                    if (iy < 0 || iy >= g.H) continue;
                    for (int64_t j = 0; j < g.kw; ++j) {
                        const int64_t ix = ox * g.sw - g.pl + j;
                        if (ix < 0 || ix >= g.W) continue;
                        const float* src = img + (iy * g.W + ix) * C;
                        for (int64_t c = 0; c < C; ++c) o[c] += src[c];
                    }
                }
            }
    }
}

void window_scatter(const float* y, const Geom& g, int64_t T, float* img_all) {
    const int64_t C = g.C;
    std::memset(img_all, 0, sizeof(float) * static_cast<size_t>(T * g.in_size()));
    for (int64_t t = 0; t < T; ++t) {
        float* img = img_all + t * g.in_size();
        for (int64_t oy = 0; oy < g.OH; ++oy)
            for (int64_t ox = 0; ox < g.OW; ++ox) {
                const float* v = y + ((t * g.OH + oy) * g.OW + ox) * C;
                for (int64_t i = 0; i < g.kh; ++i) {
                    const int64_t iy = oy * g.sh - g.pt + i;
                    if (iy < 0 || iy >= g.H) continue;
                    for (int64_t j = 0; j < g.kw; ++j) {
                        const int64_t ix = ox * g.sw - g.pl + j;
                        if (ix < 0 || ix >= g.W) continue;
                        float* dst = img + (iy * g.W + ix) * C;
                        for (int64_t c = 0; c < C; ++c) dst[c] += v[c];
                    }
                }
            }
    }
}

void maxpool_forward(const float* a, const Geom& g, int64_t T, float* out, int32_t* arg) {
    const int64_t C = g.C;
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < T; ++t) {
        const float* img = a + t * g.in_size();
        for (int64_t oy = 0; oy < g.OH; ++oy)
            for (int64_t ox = 0; ox < g.OW; ++ox) {
                const int64_t o0 = ((t * g.OH + oy) * g.OW + ox) * C;
                float* __restrict o = out + o0;  // restrict: lets the channel loop vectorise
                int32_t* __restrict k = arg + o0;
                for (int64_t c = 0; c < C; ++c) {
                    o[c] = ninf;
                    k[c] = 0;
                }
                for (int64_t i = 0; i < g.kh; ++i) {
                    const int64_t iy = oy * g.sh - g.pt + i;
                    if (iy < 0 || iy >= g.H) continue;
                    for (int64_t j = 0; j < g.kw; ++j) {
                        const int64_t ix = ox * g.sw - g.pl + j;
                        if (ix < 0 || ix >= g.W) continue;
                        const float* __restrict src = img + (iy * g.W + ix) * C;
                        const int32_t tap = static_cast<int32_t>(i * g.kw + j);
                        for (int64_t c = 0; c < C; ++c) {  // branch-free selects so it vectorises
                            const float v = src[c], cur = o[c];
                            const int32_t kc = k[c];
                            const int32_t better = v > cur ? -1 : 0;  // strict: the first maximum wins
                            o[c] = v > cur ? v : cur;
                            k[c] = (tap & better) | (kc & ~better);
                        }
                    }
                }
            }
    }
}

void maxpool_scatter(const float* y, const int32_t* arg, const Geom& g, int64_t T, float* img_all) {
    const int64_t C = g.C;
    std::memset(img_all, 0, sizeof(float) * static_cast<size_t>(T * g.in_size()));
    for (int64_t t = 0; t < T; ++t) {
        float* img = img_all + t * g.in_size();
        for (int64_t oy = 0; oy < g.OH; ++oy)
            for (int64_t ox = 0; ox < g.OW; ++ox) {
                const int64_t o0 = ((t * g.OH + oy) * g.OW + ox) * C;
                for (int64_t c = 0; c < C; ++c) {
                    const int64_t tap = arg[o0 + c];
                    const int64_t iy = oy * g.sh - g.pt + tap / g.kw;
                    const int64_t ix = ox * g.sw - g.pl + tap % g.kw;
                    img[(iy * g.W + ix) * C + c] += y[o0 + c];
                }
            }
    }
}

}  // namespace deeptaylor
