// Kernels of the graph ops (activations, adaptive pooling, upsampling, channel shuffle, channel
// block copies), channels-last, plain loops on the calling thread; see ops.hpp.
#include <cmath>
#include <cstring>

#include "deeptaylor/ops.hpp"

namespace deeptaylor {

namespace {
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kGeluBeta = 0.79788456080286535588f;  // sqrt(2 / pi)
constexpr float kGeluKappa = 0.044715f;
inline float sigm(float x) { return 1.0f / (1.0f + std::exp(-x)); }
}  // namespace

void act_forward(ActFn f, float param, const float* a, float* y, int64_t n) {
    switch (f) {
        case ActFn::LeakyReLU:
            for (int64_t k = 0; k < n; ++k) y[k] = a[k] > 0.0f ? a[k] : a[k] * param;
            break;
        case ActFn::ReLU6:
            for (int64_t k = 0; k < n; ++k) y[k] = std::fmin(std::fmax(a[k], 0.0f), 6.0f);
            break;
        case ActFn::ELU:
            for (int64_t k = 0; k < n; ++k) y[k] = a[k] > 0.0f ? a[k] : param * std::expm1(a[k]);
            break;
        case ActFn::GELU:
            if (param != 0.0f) {
                for (int64_t k = 0; k < n; ++k) {
                    const float x = a[k];
                    y[k] = 0.5f * x * (1.0f + std::tanh(kGeluBeta * (x + kGeluKappa * x * x * x)));
                }
            } else {
                for (int64_t k = 0; k < n; ++k) y[k] = 0.5f * a[k] * (1.0f + std::erf(a[k] * kSqrt1_2));
            }
            break;
        case ActFn::SiLU:
            for (int64_t k = 0; k < n; ++k) y[k] = a[k] * sigm(a[k]);
            break;
        case ActFn::Hardswish:
            for (int64_t k = 0; k < n; ++k) y[k] = a[k] * std::fmin(std::fmax(a[k] + 3.0f, 0.0f), 6.0f) / 6.0f;
            break;
        case ActFn::Hardsigmoid:
            for (int64_t k = 0; k < n; ++k) y[k] = std::fmin(std::fmax(a[k] + 3.0f, 0.0f), 6.0f) / 6.0f;
            break;
        case ActFn::Tanh:
            for (int64_t k = 0; k < n; ++k) y[k] = std::tanh(a[k]);
            break;
        case ActFn::Sigmoid:
            for (int64_t k = 0; k < n; ++k) y[k] = sigm(a[k]);
            break;
    }
}

void act_gradient(ActFn f, float param, const float* a, const float* g, float* gin, int64_t n) {
    switch (f) {
        case ActFn::LeakyReLU:  // torch: x > 0 ? g : g * slope
            for (int64_t k = 0; k < n; ++k) gin[k] = a[k] > 0.0f ? g[k] : g[k] * param;
            break;
        case ActFn::ReLU6:  // hardtanh(0, 6): 0 at and beyond the kinks
            for (int64_t k = 0; k < n; ++k) gin[k] = a[k] > 0.0f && a[k] < 6.0f ? g[k] : 0.0f;
            break;
        case ActFn::ELU:  // x <= 0: g * alpha * exp(x)
            for (int64_t k = 0; k < n; ++k) gin[k] = a[k] > 0.0f ? g[k] : g[k] * param * std::exp(a[k]);
            break;
        case ActFn::GELU:
            if (param != 0.0f) {
                for (int64_t k = 0; k < n; ++k) {
                    const float x = a[k], x2 = x * x;
                    const float t = std::tanh(kGeluBeta * (x + kGeluKappa * x2 * x));
                    const float left = 0.5f * x, right = 1.0f + t;
                    const float dl = 0.5f * right;
                    const float dr = left * (1.0f - t * t) * kGeluBeta * (1.0f + 3.0f * kGeluKappa * x2);
                    gin[k] = g[k] * (dl + dr);
                }
            } else {
                for (int64_t k = 0; k < n; ++k) {
                    const float x = a[k];
                    const float cdf = 0.5f * (1.0f + std::erf(x * kSqrt1_2));
                    const float pdf = kInvSqrt2Pi * std::exp(-0.5f * x * x);
                    gin[k] = g[k] * (cdf + x * pdf);
                }
            }
            break;
        case ActFn::SiLU:
            for (int64_t k = 0; k < n; ++k) {
                const float s = sigm(a[k]);
                gin[k] = g[k] * s * (1.0f + a[k] * (1.0f - s));
            }
            break;
        case ActFn::Hardswish:  // torch 2.x hardswish_backward: x <= -3: 0; x < 3: g (x / 3 + 1/2); else g
            for (int64_t k = 0; k < n; ++k) {
                const float x = a[k];
                gin[k] = x <= -3.0f ? 0.0f : (x < 3.0f ? g[k] * (x / 3.0f + 0.5f) : g[k]);
            }
            break;
        case ActFn::Hardsigmoid:  // torch: -3 < x < 3: g / 6; else 0
            for (int64_t k = 0; k < n; ++k) gin[k] = a[k] > -3.0f && a[k] < 3.0f ? g[k] / 6.0f : 0.0f;
            break;
        case ActFn::Tanh:
            for (int64_t k = 0; k < n; ++k) {
                const float y = std::tanh(a[k]);
                gin[k] = g[k] * (1.0f - y * y);
            }
            break;
        case ActFn::Sigmoid:
            for (int64_t k = 0; k < n; ++k) {
                const float y = sigm(a[k]);
                gin[k] = g[k] * y * (1.0f - y);
            }
            break;
    }
}

void adaptive_sum(const float* a, const Shape& in, const Shape& out, const int64_t* rows, const int64_t* cols,
                  int64_t T, float* dst, bool mean) {
    const int64_t C = in.c, H = in.h, W = in.w, OH = out.h, OW = out.w;
    for (int64_t t = 0; t < T; ++t) {
        const float* img = a + t * H * W * C;
        for (int64_t oy = 0; oy < OH; ++oy)
            for (int64_t ox = 0; ox < OW; ++ox) {
                float* o = dst + ((t * OH + oy) * OW + ox) * C;
                for (int64_t c = 0; c < C; ++c) o[c] = 0.0f;
                const int64_t y0 = rows[2 * oy], y1 = rows[2 * oy + 1], x0 = cols[2 * ox], x1 = cols[2 * ox + 1];
                for (int64_t iy = y0; iy < y1; ++iy)
                    for (int64_t ix = x0; ix < x1; ++ix) {
                        const float* s = img + (iy * W + ix) * C;
                        for (int64_t c = 0; c < C; ++c) o[c] += s[c];
                    }
                if (mean) {
                    const float inv = 1.0f / static_cast<float>((y1 - y0) * (x1 - x0));
                    for (int64_t c = 0; c < C; ++c) o[c] *= inv;
                }
            }
    }
}

void adaptive_scatter(const float* y, const Shape& in, const Shape& out, const int64_t* rows, const int64_t* cols,
                      int64_t T, float* img_all, bool mean) {
    const int64_t C = in.c, H = in.h, W = in.w, OH = out.h, OW = out.w;
    std::memset(img_all, 0, sizeof(float) * static_cast<size_t>(T * H * W * C));
    for (int64_t t = 0; t < T; ++t) {
        float* img = img_all + t * H * W * C;
        for (int64_t oy = 0; oy < OH; ++oy)
            for (int64_t ox = 0; ox < OW; ++ox) {
                const float* v = y + ((t * OH + oy) * OW + ox) * C;
                const int64_t y0 = rows[2 * oy], y1 = rows[2 * oy + 1], x0 = cols[2 * ox], x1 = cols[2 * ox + 1];
                const float inv = mean ? 1.0f / static_cast<float>((y1 - y0) * (x1 - x0)) : 1.0f;
                for (int64_t iy = y0; iy < y1; ++iy)
                    for (int64_t ix = x0; ix < x1; ++ix) {
                        float* d = img + (iy * W + ix) * C;
                        for (int64_t c = 0; c < C; ++c) d[c] += mean ? v[c] * inv : v[c];
                    }
            }
    }
}

void upsample_forward(const float* a, const Shape& in, int64_t sh, int64_t sw, int64_t T, float* out) {
    const int64_t C = in.c, H = in.h, W = in.w, OW = W * sw;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t oy = 0; oy < H * sh; ++oy) {
            const float* srow = a + (t * H + oy / sh) * W * C;
            float* drow = out + (t * H * sh + oy) * OW * C;
            for (int64_t ox = 0; ox < OW; ++ox) std::memcpy(drow + ox * C, srow + (ox / sw) * C, sizeof(float) * C);
        }
}

void upsample_sum(const float* y, const Shape& in, int64_t sh, int64_t sw, int64_t T, float* img, bool acc) {
    const int64_t C = in.c, H = in.h, W = in.w, OW = W * sw;
    if (!acc) std::memset(img, 0, sizeof(float) * static_cast<size_t>(T * H * W * C));
    for (int64_t t = 0; t < T; ++t)
        for (int64_t oy = 0; oy < H * sh; ++oy) {
            float* drow = img + (t * H + oy / sh) * W * C;
            const float* srow = y + (t * H * sh + oy) * OW * C;
            for (int64_t ox = 0; ox < OW; ++ox) {
                float* d = drow + (ox / sw) * C;
                const float* s = srow + ox * C;
                for (int64_t c = 0; c < C; ++c) d[c] += s[c];
            }
        }
}

void shuffle_forward(const float* a, int64_t C, int64_t g, int64_t pixels, float* out) {
    const int64_t q = C / g;
    for (int64_t p = 0; p < pixels; ++p) {
        const float* s = a + p * C;
        float* d = out + p * C;
        for (int64_t i = 0; i < g; ++i)
            for (int64_t j = 0; j < q; ++j) d[j * g + i] = s[i * q + j];
    }
}

void shuffle_backward(const float* y, int64_t C, int64_t g, int64_t pixels, float* img, bool acc) {
    const int64_t q = C / g;
    for (int64_t p = 0; p < pixels; ++p) {
        const float* s = y + p * C;
        float* d = img + p * C;
        for (int64_t i = 0; i < g; ++i)
            for (int64_t j = 0; j < q; ++j) {
                if (acc)
                    d[i * q + j] += s[j * g + i];
                else
                    d[i * q + j] = s[j * g + i];
            }
    }
}

void channel_copy(const float* src, int64_t sC, int64_t s0, float* dst, int64_t dC, int64_t d0, int64_t n,
                  int64_t pixels, bool acc) {
    for (int64_t p = 0; p < pixels; ++p) {
        const float* s = src + p * sC + s0;
        float* d = dst + p * dC + d0;
        if (acc)
            for (int64_t c = 0; c < n; ++c) d[c] += s[c];
        else
            std::memcpy(d, s, sizeof(float) * static_cast<size_t>(n));
    }
}

}  // namespace deeptaylor
