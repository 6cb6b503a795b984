// Grouped / depthwise / transposed convolutions with every rule and the gradient (see
// linear_generic.hpp for the formulation: one underlying convolution, L and L^T swap roles for
// ConvTranspose2d).
#include "deeptaylor/linear_generic.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "deeptaylor/gemm.hpp"
#include "deeptaylor/ops.hpp"
#include "deeptaylor/parallel.hpp"

namespace deeptaylor {

namespace {

std::atomic<int> g_direct_mode{-1};

// The underlying convolution X (Hx, Wx, Cx) -> Y (Hy, Wy, Cy), channels-last, G groups.
struct ConvGeom {
    int64_t Cx = 1, Hx = 1, Wx = 1, Cy = 1, Hy = 1, Wy = 1;
    int64_t kh = 1, kw = 1, sh = 1, sw = 1, pt = 0, pl = 0, dh = 1, dw = 1;
    int64_t G = 1, Cxg = 1, Cyg = 1;
    int64_t Kg() const { return kh * kw * Cxg; }  // one group's im2col block, columns (i, j, c)
    int64_t K() const { return G * Kg(); }         // im2col row, columns (g, i, j, c)
    int64_t x_size() const { return Hx * Wx * Cx; }
    int64_t y_size() const { return Hy * Wy * Cy; }
    int64_t P() const { return Hy * Wy; }
    bool ident = false;  // 1x1, stride 1, no padding, same size: im2col is the identity
    int64_t chunk = 128; // Y rows per im2col block
};

// Rows [r0, r1) of the group-major im2col of X (T, Hx, Wx, Cx): col (r1 - r0, K), zero padding.
void im2col_g(const float* X, const ConvGeom& c, int64_t r0, int64_t r1, float* col) {
    const int64_t P = c.P(), K = c.K(), Kg = c.Kg(), Cxg = c.Cxg;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / P, p = r % P, oy = p / c.Wy, ox = p % c.Wy;
        const float* img = X + t * c.x_size();
        float* row = col + (r - r0) * K;
        for (int64_t i = 0; i < c.kh; ++i) {
            const int64_t iy = oy * c.sh - c.pt + i * c.dh;
            for (int64_t j = 0; j < c.kw; ++j) {
                const int64_t ix = ox * c.sw - c.pl + j * c.dw;
                float* dst = row + (i * c.kw + j) * Cxg;
                if (iy < 0 || iy >= c.Hx || ix < 0 || ix >= c.Wx) {
                    for (int64_t g = 0; g < c.G; ++g) std::memset(dst + g * Kg, 0, sizeof(float) * Cxg);
                    continue;
                }
                const float* src = img + (iy * c.Wx + ix) * c.Cx;
                if (c.G == 1)
                    std::memcpy(dst, src, sizeof(float) * Cxg);
                else
                    for (int64_t g = 0; g < c.G; ++g) std::memcpy(dst + g * Kg, src + g * Cxg, sizeof(float) * Cxg);
            }
        }
    }
}

// Transpose of im2col_g: X (T, Hx, Wx, Cx) += scatter of col (r1 - r0, K), channels [c0, c1) only.
void col2im_g(const float* col, const ConvGeom& c, int64_t r0, int64_t r1, float* X, int64_t c0, int64_t c1) {
    const int64_t P = c.P(), K = c.K(), Kg = c.Kg(), Cxg = c.Cxg;
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / P, p = r % P, oy = p / c.Wy, ox = p % c.Wy;
        float* img = X + t * c.x_size();
        const float* row = col + (r - r0) * K;
        for (int64_t i = 0; i < c.kh; ++i) {
            const int64_t iy = oy * c.sh - c.pt + i * c.dh;
            if (iy < 0 || iy >= c.Hx) continue;
            for (int64_t j = 0; j < c.kw; ++j) {
                const int64_t ix = ox * c.sw - c.pl + j * c.dw;
                if (ix < 0 || ix >= c.Wx) continue;
                const float* src = row + (i * c.kw + j) * Cxg;
                float* dst = img + (iy * c.Wx + ix) * c.Cx;
                for (int64_t g = c0 / Cxg; g * Cxg < c1; ++g) {
                    const int64_t lo = std::max(c0, g * Cxg) - g * Cxg, hi = std::min(c1, (g + 1) * Cxg) - g * Cxg;
                    const float* s = src + g * Kg;
                    float* d = dst + g * Cxg;
                    for (int64_t k = lo; k < hi; ++k) d[k] += s[k];
                }
            }
        }
    }
}

// ---- direct depthwise kernel -------------------------------------------------------------
// Output pixel (row oy, column ox) of either direction = sum over its taps (i, j) of
// src[(sy, sx)] (.) w[(i, j)] channel by channel; the (tap, source position) pairs of every output
// row and column are listed once (forward: the window; transpose: the outputs that see the pixel).
struct TapList {
    std::vector<int64_t> start;  // n + 1 offsets
    std::vector<int32_t> tap, pos;
};

// pairs (k, q) with q = (v * s - p + k * d) in [0, src) for forward, or
// q = (v + p - k * d) / s exact in [0, src) for the transpose, for every v in [0, n).
TapList make_taps(int64_t n, int64_t k, int64_t s, int64_t p, int64_t d, int64_t src, bool transpose) {
    TapList L;
    L.start.push_back(0);
    for (int64_t v = 0; v < n; ++v) {
        for (int64_t t = 0; t < k; ++t) {
            int64_t q;
            if (!transpose) {
                q = v * s - p + t * d;
            } else {
                const int64_t num = v + p - t * d;
                if (num < 0 || num % s != 0) continue;
                q = num / s;
            }
            if (q < 0 || q >= src) continue;
            L.tap.push_back(static_cast<int32_t>(t));
            L.pos.push_back(static_cast<int32_t>(q));
        }
        L.start.push_back(static_cast<int64_t>(L.tap.size()));
    }
    return L;
}

struct DwArgs {
    const float* src;   // one sample's source image (srcH, srcW, C)
    int64_t srcW, C, kw;
    const float* w;     // (kh * kw, C)
    const TapList* rows;
    const TapList* cols;
    int64_t outW, orow;
    float* dst;         // the output row (outW, C)
    bool acc;
};

// Explicit vectors (GCC/Clang vector extensions): the accumulators of a channel block stay in
// registers over all taps, whatever ISA the caller is compiled for. Loads/stores through memcpy
// (unaligned, no aliasing assumptions).
// (vld / vst are always inlined into the ISA-specific row functions: no vector crosses a call, so
// GCC's note that the vector ABI differs between ISAs does not apply.)
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float vf16 __attribute__((vector_size(64)));
typedef float vf8 __attribute__((vector_size(32)));
template <class V>
__attribute__((always_inline)) inline V vld(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
}
template <class V>
__attribute__((always_inline)) inline void vst(float* p, const V& v) {
    std::memcpy(p, &v, sizeof(V));
}

// Output pixel ox, channels [c0, c0 + NV * lanes(V)): accumulate over its taps in registers.
template <class V, int NV>
__attribute__((always_inline)) inline void dw_block(const DwArgs& a, int64_t ox, int64_t c0) {
    constexpr int LN = sizeof(V) / sizeof(float);
    V v[NV];
    float* d = a.dst + ox * a.C + c0;
    for (int n = 0; n < NV; ++n) v[n] = a.acc ? vld<V>(d + n * LN) : V{};
    const int64_t r0 = a.rows->start[a.orow], r1 = a.rows->start[a.orow + 1];
    const int64_t q0 = a.cols->start[ox], q1 = a.cols->start[ox + 1];
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = a.rows->tap[r], sy = a.rows->pos[r];
        const float* srow = a.src + sy * a.srcW * a.C + c0;
        const float* wrow = a.w + i * a.kw * a.C + c0;
        for (int64_t q = q0; q < q1; ++q) {
            const float* s = srow + a.cols->pos[q] * a.C;
            const float* w = wrow + a.cols->tap[q] * a.C;
            for (int n = 0; n < NV; ++n)
                v[n] += vld<V>(s + n * LN) * vld<V>(w + n * LN);
        }
    }
    for (int n = 0; n < NV; ++n) vst<V>(d + n * LN, v[n]);
}

// The remaining channels [c0, C) (fewer than 8), one at a time.
__attribute__((always_inline)) inline void dw_tail(const DwArgs& a, int64_t ox, int64_t c0) {
    for (int64_t c = c0; c < a.C; ++c) {
        float v = a.acc ? a.dst[ox * a.C + c] : 0.0f;
        for (int64_t r = a.rows->start[a.orow]; r < a.rows->start[a.orow + 1]; ++r)
            for (int64_t q = a.cols->start[ox]; q < a.cols->start[ox + 1]; ++q)
                v += a.src[(a.rows->pos[r] * a.srcW + a.cols->pos[q]) * a.C + c] *
                     a.w[(a.rows->tap[r] * a.kw + a.cols->tap[q]) * a.C + c];
        a.dst[ox * a.C + c] = v;
    }
}

// One output row. Channel blocks outermost: a block's input rows and taps stay in L1 across the row.
__attribute__((always_inline)) inline void dw_row_body(const DwArgs& a) {
    int64_t c0 = 0;
    for (; c0 + 64 <= a.C; c0 += 64)
        for (int64_t ox = 0; ox < a.outW; ++ox) dw_block<vf16, 4>(a, ox, c0);
    if (c0 + 32 <= a.C) {
        for (int64_t ox = 0; ox < a.outW; ++ox) dw_block<vf16, 2>(a, ox, c0);
        c0 += 32;
    }
    if (c0 + 16 <= a.C) {
        for (int64_t ox = 0; ox < a.outW; ++ox) dw_block<vf16, 1>(a, ox, c0);
        c0 += 16;
    }
    if (c0 + 8 <= a.C) {
        for (int64_t ox = 0; ox < a.outW; ++ox) dw_block<vf8, 1>(a, ox, c0);
        c0 += 8;
    }
    if (c0 < a.C)
        for (int64_t ox = 0; ox < a.outW; ++ox) dw_tail(a, ox, c0);
}

void dw_row_base(const DwArgs& a) { dw_row_body(a); }
#if defined(__x86_64__) || defined(__i386__)
#define DT_DW_X86 1
__attribute__((target("avx2,fma"))) void dw_row_avx2(const DwArgs& a) { dw_row_body(a); }
__attribute__((target("avx512f,avx512vl,fma"))) void dw_row_avx512(const DwArgs& a) { dw_row_body(a); }
#endif

using DwRowFn = void (*)(const DwArgs&);
DwRowFn pick_dw_row() {
#ifdef DT_DW_X86
    // same family as the GEMM (DEEPTAYLOR_GEMM_KERNEL may lower it)
    switch (gemm_kernel()) {
        case GemmKernel::Avx512: return dw_row_avx512;
        case GemmKernel::Avx2: return dw_row_avx2;
        default: break;
    }
#endif
    return dw_row_base;
}

// Weight variants the rules multiply by (W+ / W- come from W through the GEMM's B filter).
enum Var { VW = 0, VUp, VDn, VSq, VOne, kNumVars };

struct Weights {
    bool ready = false;
    std::vector<std::unique_ptr<PackedB>> fwd, bwd;  // per group: conv (Kg, Cyg) and conv^T (Cyg, Kg)
    std::array<std::vector<float>, 3> dw;            // direct depthwise: (kh*kw, C) per BFilter
};

int fidx(BFilter f) { return static_cast<int>(f); }

}  // namespace

struct GenericLinear::Impl {
    OpKind kind = OpKind::Conv2d;
    bool transposed = false;  // ConvTranspose2d: L = conv^T, L^T = conv
    Shape in, out;
    ConvGeom cg;
    RuleSpec rule;            // kind and parameters (bounds moved to lo / hi)
    Mode mode = Mode::Rules;
    bool nonneg_in = false;
    bool direct = false;      // direct depthwise kernel
    DwRowFn dw_row = nullptr;
    TapList fr, fc, br, bc;   // direct: forward rows/cols, transpose rows/cols
    std::vector<float> bias, bias_a, bias_b;   // bias (O); the rule's denominator biases
    std::vector<float> inv_den;                // (OH, OW, O) one sample: WSquare / Flat 1 / L(1; V)
    std::vector<float> lo, hi;                 // ZBox bounds (H, W, C) one sample
    std::array<Weights, kNumVars> w;

    int64_t in_size() const { return in.size(); }
    int64_t out_size() const { return out.size(); }
    int64_t col_floats(int64_t T) const {
        if (direct || cg.ident) return 0;
        return std::min(cg.chunk, std::max<int64_t>(T, 1) * cg.P()) * cg.K();
    }

    // ---- the underlying convolution, both directions ----
    // Y (T, Hy, Wy, Cy) (+)= conv(X)
    void conv(const Weights& W, BFilter f, const float* X, float* Y, int64_t T, bool acc, float* col, int gth) const {
        const ConvGeom& c = cg;
        if (direct) {
            const float* wv = W.dw[fidx(f)].data();
            split(T * c.Hy, gth, [&](int64_t b, int64_t e) {
                for (int64_t r = b; r < e; ++r) {
                    const int64_t t = r / c.Hy, oy = r % c.Hy;
                    DwArgs a{X + t * c.x_size(), c.Wx, c.Cx, c.kw, wv, &fr, &fc, c.Wy, oy,
                             Y + (t * c.Hy + oy) * c.Wy * c.Cy, acc};
                    dw_row(a);
                }
            });
            return;
        }
        const int64_t rows = T * c.P(), K = c.K(), Kg = c.Kg();
        for (int64_t r0 = 0; r0 < rows; r0 += c.chunk) {
            const int64_t m = std::min(c.chunk, rows - r0);
            const float* A = X + r0 * c.Cx;
            int64_t lda = c.Cx;
            if (!c.ident) {
                split(m, gth, [&](int64_t b, int64_t e) { im2col_g(X, c, r0 + b, r0 + e, col + b * K); });
                A = col;
                lda = K;
            }
            groups(gth, [&](int64_t g, int th) {
                sgemm_packed(m, A + g * Kg, lda, *W.fwd[g], Y + r0 * c.Cy + g * c.Cyg, c.Cy, acc, th, f);
            });
        }
    }

    // X (T, Hx, Wx, Cx) (+)= conv^T(Y)
    void convT(const Weights& W, BFilter f, const float* Y, float* X, int64_t T, bool acc, float* col, int gth) const {
        const ConvGeom& c = cg;
        if (direct) {
            const float* wv = W.dw[fidx(f)].data();
            split(T * c.Hx, gth, [&](int64_t b, int64_t e) {
                for (int64_t r = b; r < e; ++r) {
                    const int64_t t = r / c.Hx, iy = r % c.Hx;
                    DwArgs a{Y + t * c.y_size(), c.Wy, c.Cy, c.kw, wv, &br, &bc, c.Wx, iy,
                             X + (t * c.Hx + iy) * c.Wx * c.Cx, acc};
                    dw_row(a);
                }
            });
            return;
        }
        const int64_t rows = T * c.P(), K = c.K(), Kg = c.Kg();
        if (!c.ident && !acc)
            split(T, gth, [&](int64_t b, int64_t e) {
                std::memset(X + b * c.x_size(), 0, sizeof(float) * static_cast<size_t>((e - b) * c.x_size()));
            });
        for (int64_t r0 = 0; r0 < rows; r0 += c.chunk) {
            const int64_t m = std::min(c.chunk, rows - r0);
            if (c.ident) {
                groups(gth, [&](int64_t g, int th) {
                    sgemm_packed(m, Y + r0 * c.Cy + g * c.Cyg, c.Cy, *W.bwd[g], X + r0 * c.Cx + g * c.Cxg, c.Cx,
                                 acc, th, f);
                });
                continue;
            }
            groups(gth, [&](int64_t g, int th) {
                sgemm_packed(m, Y + r0 * c.Cy + g * c.Cyg, c.Cy, *W.bwd[g], col + g * Kg, K, false, th, f);
            });
            split(c.Cx, gth, [&](int64_t c0, int64_t c1) { col2im_g(col, c, r0, r0 + m, X, c0, c1); });
        }
    }

    // fn(g, threads) for every group: over the groups when there are enough, else inside each GEMM.
    template <class F>
    void groups(int gth, const F& fn) const {
        const int64_t G = cg.G;
        if (gth > 1 && G >= gth) {
#pragma omp parallel for schedule(static) num_threads(gth)
            for (int64_t g = 0; g < G; ++g) fn(g, 1);
        } else {
            for (int64_t g = 0; g < G; ++g) fn(g, gth);
        }
    }

    // The op's L (input (T, H, W, C) -> output (T, OH, OW, O)) and L^T, no bias.
    void L(Var v, BFilter f, const float* a, float* z, int64_t T, bool acc, float* col, int gth) const {
        if (transposed)
            convT(w[v], f, a, z, T, acc, col, gth);
        else
            conv(w[v], f, a, z, T, acc, col, gth);
    }
    void LT(Var v, BFilter f, const float* s, float* c, int64_t T, bool acc, float* col, int gth) const {
        if (transposed)
            conv(w[v], f, s, c, T, acc, col, gth);
        else
            convT(w[v], f, s, c, T, acc, col, gth);
    }
    void add_bias(float* z, const std::vector<float>& b, int64_t T, int gth) const {
        if (b.empty()) return;
        const int64_t O = out.c, rows = T * out.h * out.w;
        split(rows, gth, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r)
                for (int64_t o = 0; o < O; ++o) z[r * O + o] += b[o];
        });
    }

    // Build the per-group packs / depthwise arrays of variant v (from the torch weight Wt).
    void build(Var v, const std::vector<float>& Wt, float gamma) {
        Weights& W = w[v];
        if (W.ready) return;
        W.ready = true;
        const ConvGeom& c = cg;
        auto f = [&](float x) {
            switch (v) {
                case VUp: return x + gamma * (x > 0.0f ? x : 0.0f);
                case VDn: return x + gamma * (x < 0.0f ? x : 0.0f);
                case VSq: return x * x;
                case VOne: return 1.0f;
                default: return x;
            }
        };
        const int64_t taps = c.kh * c.kw;
        if (direct) {  // Wt (C, 1, kh, kw) -> (kh*kw, C), and its sign filters
            for (auto& d : W.dw) d.resize(static_cast<size_t>(taps * c.Cy));
            for (int64_t o = 0; o < c.Cy; ++o)
                for (int64_t t = 0; t < taps; ++t) {
                    const float x = f(Wt[o * taps + t]);
                    W.dw[0][t * c.Cy + o] = x;
                    W.dw[1][t * c.Cy + o] = x > 0.0f ? x : 0.0f;
                    W.dw[2][t * c.Cy + o] = x < 0.0f ? x : 0.0f;
                }
            return;
        }
        const int64_t Kg = c.Kg();
        std::vector<float> Wm(static_cast<size_t>(c.Cyg * Kg));
        for (int64_t g = 0; g < c.G; ++g) {
            // Wt (Cy, Cxg, kh, kw) rows of group g -> Wm (Cyg, Kg), columns (i, j, c)
            for (int64_t o = 0; o < c.Cyg; ++o)
                for (int64_t ci = 0; ci < c.Cxg; ++ci)
                    for (int64_t t = 0; t < taps; ++t)
                        Wm[o * Kg + t * c.Cxg + ci] = f(Wt[((g * c.Cyg + o) * c.Cxg + ci) * taps + t]);
            W.fwd.push_back(std::make_unique<PackedB>(Wm.data(), Kg, c.Cyg, Kg, true));
            W.bwd.push_back(std::make_unique<PackedB>(Wm.data(), c.Cyg, Kg, Kg, false));
        }
    }
};

GenericLinear::GenericLinear(std::unique_ptr<Impl> p) : impl(std::move(p)) {}
GenericLinear::~GenericLinear() = default;

void generic_set_depthwise_direct(int mode) { g_direct_mode.store(mode); }
bool generic_uses_direct(const GenericLinear& gl) { return gl.impl->direct; }

namespace {

[[noreturn]] void bad(const OpSpec& op, const std::string& msg) {
    std::ostringstream os;
    os << "generic linear (" << (op.kind == OpKind::ConvTranspose2d ? "ConvTranspose2d" : "Conv2d") << ", groups "
       << op.groups << "): " << msg;
    throw std::invalid_argument(os.str());
}

std::vector<float> to_hwc(const std::vector<float>& v, const Shape& s) {
    if (!s.permuted()) return v;
    std::vector<float> out(v.size());
    nchw_to_nhwc(v.data(), out.data(), 1, s.c, s.h, s.w);
    return out;
}

}  // namespace

std::unique_ptr<GenericLinear> make_generic_linear(const OpSpec& op, bool nonneg_in, Mode mode) {
    if (op.kind != OpKind::Conv2d && op.kind != OpKind::ConvTranspose2d) bad(op, "not a convolution");
    if (op.in.rank != 3 || op.out.rank != 3) bad(op, "input and output must be (C, H, W)");
    auto p = std::make_unique<GenericLinear::Impl>();
    GenericLinear::Impl& m = *p;
    m.kind = op.kind;
    m.transposed = op.kind == OpKind::ConvTranspose2d;
    m.in = op.in;
    m.out = op.out;
    m.mode = mode;
    m.nonneg_in = nonneg_in;
    const Geom& g = op.g;
    const int64_t G = op.groups;
    if (G < 1) bad(op, "groups must be >= 1");
    if (op.in.c % G != 0 || op.out.c % G != 0) bad(op, "input and output channels must be divisible by groups");
    if (g.kh < 1 || g.kw < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 || g.pt < 0 || g.pb < 0 || g.pl < 0 ||
        g.pr < 0)
        bad(op, "kernel, stride and dilation must be >= 1 and padding >= 0");
    const int64_t H = op.in.h, W = op.in.w;
    int64_t oh, ow;
    if (m.transposed) {
        if (op.oph < 0 || op.opw < 0 || op.oph >= std::max(g.sh, g.dh) || op.opw >= std::max(g.sw, g.dw))
            bad(op, "output_padding must be >= 0 and smaller than the stride or the dilation");
        oh = (H - 1) * g.sh - g.pt - g.pb + g.dh * (g.kh - 1) + op.oph + 1;
        ow = (W - 1) * g.sw - g.pl - g.pr + g.dw * (g.kw - 1) + op.opw + 1;
    } else {
        if (op.oph != 0 || op.opw != 0) bad(op, "output_padding is for ConvTranspose2d only");
        const int64_t nh = H + g.pt + g.pb - g.dh * (g.kh - 1) - 1, nw = W + g.pl + g.pr - g.dw * (g.kw - 1) - 1;
        oh = nh < 0 ? 0 : nh / g.sh + 1;
        ow = nw < 0 ? 0 : nw / g.sw + 1;
    }
    if (oh < 1 || ow < 1 || oh != op.out.h || ow != op.out.w)
        bad(op, "output shape does not match the window geometry");
    ConvGeom& c = m.cg;
    // the underlying convolution: Conv2d X = input, Y = output; ConvTranspose2d the other way round
    const Shape& X = m.transposed ? op.out : op.in;
    const Shape& Y = m.transposed ? op.in : op.out;
    c.Cx = X.c, c.Hx = X.h, c.Wx = X.w, c.Cy = Y.c, c.Hy = Y.h, c.Wy = Y.w;
    c.kh = g.kh, c.kw = g.kw, c.sh = g.sh, c.sw = g.sw, c.pt = g.pt, c.pl = g.pl, c.dh = g.dh, c.dw = g.dw;
    c.G = G, c.Cxg = c.Cx / G, c.Cyg = c.Cy / G;
    c.ident = c.kh == 1 && c.kw == 1 && c.sh == 1 && c.sw == 1 && c.pt == 0 && c.pl == 0 && c.Hx == c.Hy &&
              c.Wx == c.Wy;
    c.chunk = std::max<int64_t>(kMinChunkRows, kChunkFloats / std::max<int64_t>(c.K(), 1));
    c.chunk = (c.chunk + kRowMultiple - 1) / kRowMultiple * kRowMultiple;
    const int64_t wsize = c.Cy * c.Cxg * c.kh * c.kw;
    if (static_cast<int64_t>(op.weight.size()) != wsize)
        bad(op, m.transposed ? "weight must be (C, O/groups, kh, kw)" : "weight must be (O, C/groups, kh, kw)");
    const int64_t O = op.out.c;
    if (!op.bias.empty() && static_cast<int64_t>(op.bias.size()) != O) bad(op, "bias must have O entries");
    m.bias = op.bias.empty() ? std::vector<float>(static_cast<size_t>(O), 0.0f) : op.bias;
    const int dmode = g_direct_mode.load();
    m.direct = c.Cxg == 1 && c.Cyg == 1 && dmode != 0;
    if (m.direct) {
        m.dw_row = pick_dw_row();
        m.fr = make_taps(c.Hy, c.kh, c.sh, c.pt, c.dh, c.Hx, false);
        m.fc = make_taps(c.Wy, c.kw, c.sw, c.pl, c.dw, c.Wx, false);
        m.br = make_taps(c.Hx, c.kh, c.sh, c.pt, c.dh, c.Hy, true);
        m.bc = make_taps(c.Wx, c.kw, c.sw, c.pl, c.dw, c.Wy, true);
    }
    const std::vector<float>& Wt = op.weight;
    m.build(VW, Wt, 0.0f);
    if (mode != Mode::Rules) return std::make_unique<GenericLinear>(std::move(p));

    m.rule = op.rule;
    m.rule.low.clear();
    m.rule.high.clear();
    const RuleSpec& r = op.rule;
    auto pos = [](float v) { return v > 0.0f ? v : 0.0f; };
    auto neg = [](float v) { return v < 0.0f ? v : 0.0f; };
    const std::vector<float>& b = m.bias;
    std::vector<float> col(static_cast<size_t>(m.col_floats(1)));
    switch (r.kind) {
        case RuleKind::None:
            bad(op, "a linear op needs a rule");
        case RuleKind::Z:
        case RuleKind::Epsilon:
            break;
        case RuleKind::ZPlus:
            if (r.use_bias) {
                m.bias_a.resize(static_cast<size_t>(O));
                for (int64_t o = 0; o < O; ++o) m.bias_a[o] = pos(b[o]);
            }
            break;
        case RuleKind::Gamma:
            m.build(VUp, Wt, r.gamma);
            m.build(VDn, Wt, r.gamma);
            m.bias_a.resize(static_cast<size_t>(O));
            m.bias_b.resize(static_cast<size_t>(O));
            for (int64_t o = 0; o < O; ++o) {
                m.bias_a[o] = b[o] + r.gamma * pos(b[o]);
                m.bias_b[o] = b[o] + r.gamma * neg(b[o]);
            }
            break;
        case RuleKind::AlphaBeta:
            m.bias_a.resize(static_cast<size_t>(O));
            m.bias_b.resize(static_cast<size_t>(O));
            for (int64_t o = 0; o < O; ++o) {
                m.bias_a[o] = pos(b[o]);
                m.bias_b[o] = neg(b[o]);
            }
            break;
        case RuleKind::WSquare:
        case RuleKind::Flat: {
            const Var v = r.kind == RuleKind::WSquare ? VSq : VOne;
            m.build(v, Wt, 0.0f);
            // 1 / L(1; V) per output position (taps in the padding excluded, as the reference)
            const std::vector<float> ones(static_cast<size_t>(m.in_size()), 1.0f);
            m.inv_den.assign(static_cast<size_t>(m.out_size()), 0.0f);
            m.L(v, BFilter::None, ones.data(), m.inv_den.data(), 1, false, col.data(), 1);
            for (auto& x : m.inv_den) x = x != 0.0f ? 1.0f / x : 0.0f;
            // only the transpose direction is used from here
            if (!m.direct) {
                if (m.transposed)
                    m.w[v].bwd.clear();
                else
                    m.w[v].fwd.clear();
            }
            break;
        }
        case RuleKind::ZBox: {
            if (static_cast<int64_t>(r.low.size()) != m.in_size() || static_cast<int64_t>(r.high.size()) != m.in_size())
                bad(op, "ZBox low/high must be broadcast to the layer's input shape");
            m.lo = to_hwc(r.low, op.in);
            m.hi = to_hwc(r.high, op.in);
            break;
        }
    }
    return std::make_unique<GenericLinear>(std::move(p));
}

int64_t generic_scratch_floats(const GenericLinear& gl, int64_t T) {
    const GenericLinear::Impl& m = *gl.impl;
    const int64_t nin = T * m.in_size(), nout = T * m.out_size();
    int64_t f = m.col_floats(T);
    if (m.mode != Mode::Rules) return f;
    const int64_t signs = m.nonneg_in ? 0 : 3 * nin;  // a+, a-, and the a- transposes
    switch (m.rule.kind) {
        case RuleKind::Z:
        case RuleKind::Epsilon:
        case RuleKind::WSquare:
        case RuleKind::Flat:
            return f + nout;
        case RuleKind::ZPlus:
            return f + nout + signs;
        case RuleKind::Gamma:
        case RuleKind::AlphaBeta:
            return f + 2 * nout + signs;
        case RuleKind::ZBox:
            return f + nout + nin;
        case RuleKind::None:
            break;
    }
    return f;
}

void generic_forward(const GenericLinear& gl, const float* a, float* z, int64_t T, float* scratch, int gth) {
    const GenericLinear::Impl& m = *gl.impl;
    if (T <= 0) return;
    m.L(VW, BFilter::None, a, z, T, false, scratch, gth);
    m.add_bias(z, m.bias, T, gth);
}

void generic_gradient(const GenericLinear& gl, const float* g, float* gin, int64_t T, float* scratch, int gth) {
    const GenericLinear::Impl& m = *gl.impl;
    if (T <= 0) return;
    m.LT(VW, BFilter::None, g, gin, T, false, scratch, gth);
}

void generic_relevance(const GenericLinear& gl, const float* a, const float* z, const float* R, float* Rin,
                       int64_t T, float* scratch, int gth) {
    const GenericLinear::Impl& m = *gl.impl;
    if (T <= 0) return;
    if (m.mode != Mode::Rules) throw std::logic_error("generic_relevance on an op prepared for a gradient method");
    const RuleSpec& r = m.rule;
    const int64_t nin = T * m.in_size(), nout = T * m.out_size(), osz = m.out_size();
    float* col = scratch;
    float* buf = scratch + m.col_floats(T);
    auto each = [&](int64_t n, const auto& f) {
        split(n, gth, [&](int64_t b, int64_t e) {
            for (int64_t k = b; k < e; ++k) f(k);
        });
    };
    const BFilter None = BFilter::None, Pos = BFilter::Pos, Neg = BFilter::Neg;
    // the sign-split rules: a+ and a- (a- terms skipped when the input is >= 0)
    const float* ap = a;
    float *an = nullptr, *cn = nullptr;
    auto signs = [&](float* at) {
        bool nonneg = m.nonneg_in;
        if (!nonneg) {
            nonneg = true;
            for (int64_t k = 0; k < nin && nonneg; ++k) nonneg = a[k] >= 0.0f;
        }
        if (nonneg) return;
        float* P = at;
        an = at + nin;
        cn = at + 2 * nin;
        each(nin, [&](int64_t k) {
            P[k] = a[k] > 0.0f ? a[k] : 0.0f;
            an[k] = a[k] < 0.0f ? a[k] : 0.0f;
        });
        ap = P;
    };
    switch (r.kind) {
        case RuleKind::Z:        // LRP-0: s = R / z (0 where z = 0); R_in = a (.) L^T(s; W)
        case RuleKind::Epsilon: {  // LRP-eps: s = R / (z + eps sign z), sign(0) = +1
            float* s = buf;
            if (r.kind == RuleKind::Z)
                each(nout, [&](int64_t k) { s[k] = safe_div(R[k], z[k]); });
            else
                each(nout, [&](int64_t k) { s[k] = safe_div(R[k], z[k] + (z[k] >= 0.0f ? r.eps : -r.eps)); });
            m.LT(VW, None, s, Rin, T, false, col, gth);
            each(nin, [&](int64_t k) { Rin[k] *= a[k]; });
            return;
        }
        case RuleKind::ZPlus: {  // z+: den = L(a+; W+) + L(a-; W-) (+ b+)
            float* den = buf;
            signs(buf + nout);
            m.L(VW, Pos, ap, den, T, false, col, gth);
            if (an) m.L(VW, Neg, an, den, T, true, col, gth);
            m.add_bias(den, m.bias_a, T, gth);
            each(nout, [&](int64_t k) { den[k] = safe_div(R[k], den[k]); });
            m.LT(VW, Pos, den, Rin, T, false, col, gth);
            if (!an) {
                each(nin, [&](int64_t k) { Rin[k] *= ap[k]; });
                return;
            }
            m.LT(VW, Neg, den, cn, T, false, col, gth);
            each(nin, [&](int64_t k) { Rin[k] = ap[k] * Rin[k] + an[k] * cn[k]; });
            return;
        }
        case RuleKind::Gamma:
        case RuleKind::AlphaBeta: {
            // Gamma: den_up = L(a+; W+gW+) + L(a-; W+gW-) + b+gb+, den_dn = L(a+; W+gW-) + L(a-; W+gW+) + b+gb-,
            //   s_up = R (z > 0) / den_up, s_dn = R (z < 0) / den_dn,
            //   R_in = a+ (.) (L^T(s_up; Wup) + L^T(s_dn; Wdn)) + a- (.) (L^T(s_up; Wdn) + L^T(s_dn; Wup))
            // AlphaBeta: the same with Wup = W+, Wdn = W-, biases b+ / b-, s_up = alpha R / zp,
            //   s_dn = -beta R / zn.
            const bool gam = r.kind == RuleKind::Gamma;
            const Var vu = gam ? VUp : VW, vd = gam ? VDn : VW;
            const BFilter fu = gam ? None : Pos, fd = gam ? None : Neg;
            float *du = buf, *dd = buf + nout;
            signs(buf + 2 * nout);
            m.L(vu, fu, ap, du, T, false, col, gth);
            if (an) m.L(vd, fd, an, du, T, true, col, gth);
            m.add_bias(du, m.bias_a, T, gth);
            m.L(vd, fd, ap, dd, T, false, col, gth);
            if (an) m.L(vu, fu, an, dd, T, true, col, gth);
            m.add_bias(dd, m.bias_b, T, gth);
            if (gam)
                each(nout, [&](int64_t k) {
                    du[k] = safe_div(z[k] > 0.0f ? R[k] : 0.0f, du[k]);
                    dd[k] = safe_div(z[k] < 0.0f ? R[k] : 0.0f, dd[k]);
                });
            else
                each(nout, [&](int64_t k) {
                    du[k] = r.alpha * safe_div(R[k], du[k]);
                    dd[k] = -r.beta * safe_div(R[k], dd[k]);
                });
            m.LT(vu, fu, du, Rin, T, false, col, gth);
            m.LT(vd, fd, dd, Rin, T, true, col, gth);
            if (!an) {
                each(nin, [&](int64_t k) { Rin[k] *= ap[k]; });
                return;
            }
            m.LT(vd, fd, du, cn, T, false, col, gth);
            m.LT(vu, fu, dd, cn, T, true, col, gth);
            each(nin, [&](int64_t k) { Rin[k] = ap[k] * Rin[k] + an[k] * cn[k]; });
            return;
        }
        case RuleKind::WSquare:  // w²: R_in = L^T(R / L(1; W²); W²)
        case RuleKind::Flat: {   // flat: the same with unit weights
            float* s = buf;
            each(nout, [&](int64_t k) { s[k] = R[k] * m.inv_den[k % osz]; });
            m.LT(r.kind == RuleKind::WSquare ? VSq : VOne, None, s, Rin, T, false, col, gth);
            return;
        }
        case RuleKind::ZBox: {
            // zB: den = L(a - l; W+) + L(a - h; W-) (a sum of terms >= 0 on the box, computed as such
            // rather than as z - b - L(l; W+) - L(h; W-), which cancels in float32), s = R / den,
            // R_in = (a - l) (.) L^T(s; W+) + (a - h) (.) L^T(s; W-)
            float *s = buf, *c2 = buf + nout;
            const int64_t isz = m.in_size();
            each(nin, [&](int64_t k) {
                Rin[k] = a[k] - m.lo[k % isz];
                c2[k] = a[k] - m.hi[k % isz];
            });
            m.L(VW, Pos, Rin, s, T, false, col, gth);
            m.L(VW, Neg, c2, s, T, true, col, gth);
            each(nout, [&](int64_t k) { s[k] = safe_div(R[k], s[k]); });
            m.LT(VW, Pos, s, Rin, T, false, col, gth);
            m.LT(VW, Neg, s, c2, T, false, col, gth);
            each(nin, [&](int64_t k) {
                const int64_t q = k % isz;
                Rin[k] = (a[k] - m.lo[q]) * Rin[k] + (a[k] - m.hi[q]) * c2[k];
            });
            return;
        }
        case RuleKind::None:
            break;
    }
    throw std::logic_error("generic linear op without a rule");
}

}  // namespace deeptaylor
